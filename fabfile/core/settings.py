"""Settings: invoke.yaml defaults, then .env.<environment>, then the process
environment, then command-line flags — later layers win.

    invoke.yaml (fabric.yaml is a symlink)   coachntt: {app: {branch: main}}
    .env.production                          COACHNTT_APP__BRANCH=release
    environment                              COACHNTT_APP__BRANCH=hotfix
    task flag                                --branch=hotfix-2

`COACHNTT_ENV` picks the environment (production, staging, sandbox; default
production). Keys spelled COACHNTT_<SECTION>__<KEY> override settings; every
other key in the env file is a secret (JWT_SECRET=...), as are the well-known
secret names in the process environment. Secrets are never read from
invoke.yaml and are registered for redaction as soon as they load.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from dotenv import dotenv_values

from . import redact
from .errors import ConfigError

PROJECT_DIR = Path(__file__).resolve().parents[2]
ENVIRONMENTS = ("production", "staging", "sandbox")
PREFIX = "COACHNTT_"
# Variables that steer a run rather than hold a setting.
CONTROL_VARIABLES = {"COACHNTT_ENV", "COACHNTT_ENV_FILE", "COACHNTT_ACCEPT_NEW_HOST_KEY"}
# Secret names taken from the process environment (CI passes them this way).
KNOWN_SECRETS = (
    "DATABASE_URL",
    "POSTGRES_PASSWORD",
    "JWT_SECRET",
    "API_KEY",
    "GRAFANA_ADMIN_PASSWORD",
)
_SECRET_LOOKING_KEY = re.compile(r"password|secret|token|api_key", re.IGNORECASE)


@dataclass(frozen=True)
class Settings:
    env: str
    values: Mapping[str, Any]
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.values
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    def require(self, dotted: str) -> Any:
        value = self.get(dotted)
        if value in (None, "", []):
            raise ConfigError(
                f"missing config value '{dotted}'",
                f"set it in invoke.yaml or as {env_key(dotted)}=... in .env.{self.env}",
            )
        return value

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Settings":
        """The command-line layer: flags given to a task, as dotted keys."""
        values = copy.deepcopy(dict(self.values))
        for dotted, value in overrides.items():
            if value is not None:
                _set_dotted(values, dotted, value)
        return Settings(self.env, values, self.secrets)


def env_key(dotted: str) -> str:
    """'app.branch' -> 'COACHNTT_APP__BRANCH'"""
    return PREFIX + dotted.replace(".", "__").upper()


def selected_environment(environ: Mapping[str, str]) -> str:
    env = environ.get("COACHNTT_ENV", "production")
    if env not in ENVIRONMENTS:
        raise ConfigError(
            f"COACHNTT_ENV must be one of {', '.join(ENVIRONMENTS)}, got '{env}'",
            "unset it or pick one of those",
        )
    return env


def load(
    defaults: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    project_dir: Path = PROJECT_DIR,
) -> Settings:
    """Build Settings from the `coachntt` section of invoke.yaml (`defaults`)."""
    environ = os.environ if environ is None else environ
    env = selected_environment(environ)
    _refuse_secrets_in_defaults(defaults)
    values = copy.deepcopy(_plain(defaults))

    env_file = Path(environ.get("COACHNTT_ENV_FILE") or project_dir / f".env.{env}")
    file_values = {k: v for k, v in dotenv_values(env_file).items() if v is not None} if env_file.is_file() else {}

    secrets: dict[str, str] = {}
    for layer in (file_values, environ):
        for key, raw in layer.items():
            if key.startswith(PREFIX) and key not in CONTROL_VARIABLES:
                dotted = key[len(PREFIX):].lower().replace("__", ".")
                try:
                    _set_dotted(values, dotted, _coerce(key, raw, _get_dotted(values, dotted)))
                except TypeError:
                    raise ConfigError(f"{key} nests below a setting that is a single value", "check the spelling of the key") from None
            elif layer is file_values or key in KNOWN_SECRETS:
                if not key.startswith(PREFIX):
                    secrets[key] = raw
    redact.register(*secrets.values())
    return Settings(env, values, secrets)


def from_context(c: Any, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings for a task: invoke's config under both `inv` and `fab`."""
    defaults = c.config.get("coachntt")
    if defaults is None:
        raise ConfigError(
            "no 'coachntt' section in the configuration",
            f"run from the project directory ({PROJECT_DIR}) so invoke.yaml is found",
        )
    return load(defaults, environ)


def _refuse_secrets_in_defaults(defaults: Mapping[str, Any], path: str = "") -> None:
    for key, value in defaults.items():
        dotted = f"{path}{key}"
        if isinstance(value, Mapping):
            _refuse_secrets_in_defaults(value, dotted + ".")
        elif _SECRET_LOOKING_KEY.search(str(key)) and value:
            raise ConfigError(
                f"invoke.yaml holds a secret at '{dotted}'",
                "move it to .env.<environment> or the environment; invoke.yaml is committed",
            )


def _plain(node: Any) -> Any:
    """invoke's DataProxy -> plain dicts, so Settings can be deep-copied."""
    if isinstance(node, Mapping):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


def _get_dotted(values: Mapping[str, Any], dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TypeError(dotted)
    node[last] = value


def _coerce(key: str, raw: str, current: Any) -> Any:
    """Env files hold strings; give them the type of the default they replace."""
    if isinstance(current, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got '{raw}'", "fix the value") from None
    if isinstance(current, list):
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw
