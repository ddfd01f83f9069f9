"""The operator's settings for the tool installed on the server.

`inv backup.now` on the server must resolve the same app dir, database, backup
dir, ... as `fab -H HOST backup.now` from the operator's machine. So `tool.install`
writes the operator's non-default settings (COACHNTT_* from .env.<env> and the
process environment) to SETTINGS_FILE, which the tool there reads through
COACHNTT_ENV_FILE. Left out:

    host          the server would connect to itself over SSH
    ssh.*         how the operator's machine connects (its known_hosts file)
    secrets       names that look secret, URLs with a password or token in them,
                  and every non-COACHNTT_ key (those are secrets by definition)
    the rest      keys no task reads (no rule in RULES), command-line flags

The file is rendered as dotenv text and read back with the same loader the
server uses: a value that would not come back unchanged is refused (exit 2).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import redact
from .errors import ConfigError
from .settings import _SECRET_LOOKING_KEY, RULES, Settings, env_key, load

SETTINGS_FILE = "/etc/coachntt-ops/settings.env"
HEADER = """\
# Written by `tool.install` from the operator's settings (COACHNTT_ENV={env}): the
# COACHNTT_* values that differ from invoke.yaml, without the host and without secrets.
# Every install rewrites it: change settings on the operator's machine, then rerun tool.install.
"""


def has_rule(dotted: str) -> bool:
    return dotted in RULES or f"{dotted.rsplit('.', 1)[0]}.*" in RULES


def left_out(dotted: str, value: Any) -> str:
    """Why a setting stays off the server ("" = it goes)."""
    if dotted == "host":
        return "the server's own address"
    if dotted.startswith("roles."):
        return "which hosts this machine reaches (the server's own tool works on itself)"
    if dotted.startswith("ssh."):
        return "how this machine connects"
    if _SECRET_LOOKING_KEY.search(dotted):
        return "a secret"
    if isinstance(value, str) and redact.url(value) != value:
        return "holds a password or token"
    if not has_rule(dotted):
        return "read by no task"
    return ""


def forwarded(settings: Settings) -> dict[str, Any]:
    """dotted key -> value of every setting the server's tool must see (sorted)."""
    chosen = {}
    for dotted, source in sorted(settings.sources.items()):
        if source == "the command line":
            continue
        value = settings.get(dotted)
        if not left_out(dotted, value):
            chosen[dotted] = value
    return chosen


def text_of(value: Any) -> str:
    """A setting as the env-file text that load() turns back into it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


# python-dotenv expands ${NAME} even inside single quotes and has no escape for it; an
# expansion of a variable nobody sets, defaulting to "$", writes a literal "${".
LITERAL_DOLLAR = "${COACHNTT_LITERAL_DOLLAR:-$}"


def dotenv_line(key: str, text: str) -> str:
    # In single quotes python-dotenv undoes only \\ and \'.
    quoted = text.replace("\\", "\\\\").replace("'", "\\'").replace("${", LITERAL_DOLLAR + "{")
    return f"{key}='{quoted}'"


def render(settings: Settings) -> str:
    lines = [dotenv_line(env_key(dotted), text_of(value)) for dotted, value in forwarded(settings).items()]
    return HEADER.format(env=settings.env) + "".join(f"{line}\n" for line in lines)


def checked(settings: Settings, defaults: Mapping[str, Any]) -> str:
    """render(), proven to load back into the same values on the server (else ConfigError)."""
    content = render(settings)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "settings.env"
        path.write_text(content)
        back = load(defaults, {"COACHNTT_ENV": settings.env, "COACHNTT_ENV_FILE": str(path)}, project_dir=Path(directory))
    for dotted, value in forwarded(settings).items():
        if back.get(dotted) != value:
            raise ConfigError(f"{dotted} cannot be written to the server's settings file unchanged (got back {back.get(dotted)!r})",
                              f"change {env_key(dotted)}: the server reads it back differently (a list item with a comma?)")
    return content
