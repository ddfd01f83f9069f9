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

`validate` checks every setting against its rule (RULES) before any task
connects: values end up in shell commands and config files on the server, so a
value that is not what its setting means is refused with exit 2.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from . import layout, redact, window
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
    # Where each overridden value came from (dotted key -> "the environment",
    # ".env.production", "the command line"), so an error can say what to fix.
    sources: Mapping[str, str] = field(default_factory=dict, repr=False)

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

    def with_overrides(self, overrides: Mapping[str, Any]) -> Settings:
        """The command-line layer: flags given to a task, as dotted keys."""
        values = copy.deepcopy(dict(self.values))
        sources = dict(self.sources)
        for dotted, value in overrides.items():
            if value is not None:
                _set_dotted(values, dotted, value)
                sources[dotted] = "the command line"
        return Settings(self.env, values, self.secrets, sources)


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
    sources: dict[str, str] = {}
    for layer, source in ((file_values, env_file.name), (environ, "the environment")):
        for key, raw in layer.items():
            if key.startswith(PREFIX) and key not in CONTROL_VARIABLES:
                dotted = key[len(PREFIX):].lower().replace("__", ".")
                try:
                    _set_dotted(values, dotted, _coerce(key, raw, _get_dotted(values, dotted)))
                except TypeError:
                    raise ConfigError(f"{key} nests below a setting that is a single value", "check the spelling of the key") from None
                sources[dotted] = source
            elif layer is file_values or key in KNOWN_SECRETS:
                if not key.startswith(PREFIX):
                    secrets[key] = raw
    redact.register(*secrets.values())
    return Settings(env, values, secrets, sources)


def from_context(c: Any, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings for a task: invoke's config under both `inv` and `fab`, validated."""
    defaults = c.config.get("coachntt")
    if defaults is None:
        raise ConfigError(
            "no 'coachntt' section in the configuration",
            f"run from the project directory ({PROJECT_DIR}) so invoke.yaml is found",
        )
    return validate(load(defaults, environ))


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


# -- validation ----------------------------------------------------------------
# One rule per setting. Values reach shell commands, sudoers, nginx and
# fail2ban files on the server: each must look like what it names, and the
# patterns leave no room for shell syntax. Absent settings are not checked
# here; `require` reports them where a task needs them.


@dataclass(frozen=True)
class Rule:
    expected: str  # completes "<key> must be ..."
    check: Callable[[Any], bool]
    each: bool = False  # a list: the rule holds for every item


def _matches(pattern: str) -> Callable[[Any], bool]:
    compiled = re.compile(pattern)
    return lambda value: isinstance(value, str) and compiled.fullmatch(value) is not None


def _whole_number(low: int, high: int) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if isinstance(value, str) and value.isdigit():  # settings with no default stay strings
            value = int(value)
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    return check


def _absolute_dir(value: Any) -> bool:
    return _SAFE_ABSOLUTE(value) and value.rstrip("/") != "" and ".." not in value.split("/")


def _absolute_path(value: Any) -> bool:
    """Like _absolute_dir, and / itself."""
    return _SAFE_ABSOLUTE(value) and ".." not in value.split("/")


def _path_inside_app_dir(value: Any) -> bool:
    return _SAFE_RELATIVE(value) and ".." not in value.split("/")


def _compose_file(value: Any) -> bool:
    return (_SAFE_ABSOLUTE(value) or _SAFE_RELATIVE(value)) and ".." not in value.split("/")


def _host_port(value: Any) -> bool:
    found = isinstance(value, str) and _HOST_PORT.fullmatch(value)
    return bool(found) and 0 < int(found.group(1)) < 65536


def _ssh_host(value: Any) -> bool:
    return isinstance(value, str) and layout.parse_login(value) is not None and value == value.strip()


def _optional_ssh_host(value: Any) -> bool:
    return value == "" or _ssh_host(value)


def _offsite_repo(value: Any) -> bool:
    """Empty (off-site copies off) or an SFTP repository below / without '..'."""
    if value == "":
        return True
    found = isinstance(value, str) and re.fullmatch(OFFSITE_REPO, value)
    return bool(found) and ".." not in found.group(3).split("/")


def _plain_text(value: Any) -> bool:
    """Any text without control characters (it is quoted wherever it is used)."""
    return isinstance(value, str) and all(ch.isprintable() for ch in value)


def _hook(value: Any) -> bool:
    """Hooks are shell on purpose; they travel quoted as one argument. Only NUL cannot."""
    return isinstance(value, str) and "\0" not in value


_SAFE_ABSOLUTE = _matches(r"/[A-Za-z0-9._/-]*")
_SAFE_RELATIVE = _matches(r"[A-Za-z0-9._][A-Za-z0-9._/-]*")
_HOST_PORT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}):(\d{1,5})")
USER_NAME = r"[a-z_][a-z0-9_-]{0,31}"
HOST_NAME = r"(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}"
# git check-ref-format, narrowed to characters that mean nothing to a shell.
GIT_BRANCH = r"(?!-)(?!/)(?!.*\.\.)(?!.*//)(?!.*/\.)(?!\.)(?!.*\.lock$)(?!.*[./]$)[A-Za-z0-9._/-]{1,200}"
# A URL git can fetch, an scp-like ssh address or a local path; never an option.
GIT_REPO = r"(?:(?:https?|ssh|git|file)://|[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:|/)[^\s'\"`$;|&<>\\(){}*?!#]+"
HEALTH_URL = r"https?://(?:127\.0\.0\.1|localhost|\[::1\])(?::\d{1,5})?(?:/[A-Za-z0-9._~/%+-]*)?(?:\?[A-Za-z0-9._~%+=&-]*)?"
PUBLIC_KEY = r"[a-z][a-z0-9@.-]* [A-Za-z0-9+/]+={0,3}(?: [^\x00-\x1f\x7f]*)?"
# restic's SFTP repository: sftp:USER@HOST:/ABSOLUTE/PATH (core/offsite.py reads the parts).
OFFSITE_REPO = r"sftp:([a-z_][a-z0-9_.-]{0,31})@([A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})):(/[A-Za-z0-9._/-]*[A-Za-z0-9._-])"
EMAIL = r"[A-Za-z0-9._%+-]{1,64}@" + HOST_NAME
# An https URL of plain characters: it is passed to certbot --server and curl.
ACME_URL = r"https://[A-Za-z0-9.-]+(?::\d{1,5})?(?:/[A-Za-z0-9._~/%+-]*)?"

_USER = Rule("a user name (a-z, 0-9, _ -; at most 32, not starting with a digit or -)", _matches(USER_NAME))
_PERCENT = Rule("a whole number from 1 to 100", _whole_number(1, 100))
_KEEP = Rule("a whole number from 0 to 1000", _whole_number(0, 1000))
_DOMAIN = Rule("a host name", _matches(HOST_NAME))
_UPSTREAM = Rule("host:port", _host_port)
# systemd OnCalendar text (weekdays, dates, times, ranges, timezones); the host's own
# `systemd-analyze calendar` judges the rest. No '=', quotes or newlines reach the unit file.
_CALENDAR = Rule("a systemd calendar time like '*-*-* 02:00:00' or 'Sun *-*-* 03:00:00'",
                 _matches(r"[A-Za-z0-9*][A-Za-z0-9*:,./~ _+-]{0,99}"))
_DURATION = Rule("a fail2ban duration like 600, 10m or 1h", _matches(r"-1|\d{1,9}[smhdw]?"))
# The OS baseline's items, in the order `secure` applies them (fabfile/os_baseline.py
# builds one per name); here so a misspelt `baseline.skip` is refused before connecting.
BASELINE_ITEMS = ("login-defs", "pam-tmpdir", "module-blacklist", "sysctl", "needrestart", "debsums",
                  "auditd", "process-accounting", "login-banner")

RULES: dict[str, Rule] = {
    "host": Rule("user@host[:port]", _ssh_host),
    # Several hosts (core/layout.py): every role empty is the single-VPS layout.
    "roles.app": Rule("a list of user@host[:port]", _ssh_host, each=True),
    "roles.lb": Rule("empty or one user@host[:port]", _optional_ssh_host),
    "roles.db": Rule("empty or one user@host[:port]", _optional_ssh_host),
    "roles.replica": Rule("a list of user@host[:port]", _ssh_host, each=True),
    # db.replica (fabfile/db.py): names that reach SQL and shell, sizes PostgreSQL reads.
    "db.replication_user": Rule("a database role name (letters, digits, _)", _matches(r"[A-Za-z_][A-Za-z0-9_]{0,62}")),
    "db.volume": Rule("a Docker volume name (letters, digits, _ . -)", _matches(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")),
    "db.wal_keep_max": Rule("a size PostgreSQL reads, like 512MB or 2GB", _matches(r"[1-9][0-9]{0,6}(kB|MB|GB|TB)")),
    "db.standby_timeout": Rule("a whole number of seconds from 10 to 3600", _whole_number(10, 3600)),
    "release.roll_failure": Rule("keep or rollback", lambda v: v in ("keep", "rollback")),
    "release.roll_parallel": Rule("a whole number of app hosts from 1 to 50", _whole_number(1, 50)),
    # The load balancer (core/balancer.py): where app hosts listen for it, how long a failed host rests.
    "lb.backend_port": Rule("a port from 1024 to 65535", _whole_number(1024, 65535)),
    "lb.fail_timeout": Rule("a whole number of seconds from 1 to 300", _whole_number(1, 300)),
    # How many hosts a task works on at once (core/fleet.py).
    "fleet.parallel_reads": Rule("a whole number of hosts from 1 to 100", _whole_number(1, 100)),
    "fleet.parallel_changes": Rule("a whole number of hosts from 1 to 50", _whole_number(1, 50)),
    "deploy_user": _USER,
    "deploy_groups": Rule("a list of group names (a-z, 0-9, _ -)", _matches(USER_NAME), each=True),
    "state_dir": Rule("an absolute path below / (letters, digits, . _ - /)", _absolute_dir),
    "authorized_keys": Rule("a list of public key lines like 'ssh-ed25519 AAAA... comment'", _matches(PUBLIC_KEY), each=True),
    "app.dir": Rule("an absolute path below / (letters, digits, . _ - /)", _absolute_dir),
    "app.repo": Rule("a git URL (https://, ssh://, git://, file://, user@host:path) or an absolute path",
                     lambda v: v == "" or _matches(GIT_REPO)(v)),
    "app.branch": Rule("a git branch name (letters, digits, . _ - /)", _matches(GIT_BRANCH)),
    "app.compose_file": Rule("a file name inside app.dir or an absolute path (letters, digits, . _ - /)", _compose_file),
    "app.compose_overrides": Rule("a list of file names inside app.dir or absolute paths (letters, digits, . _ - /)",
                                  _compose_file, each=True),
    "app.data_dir": Rule("an absolute path below / (letters, digits, . _ - /)", _absolute_dir),
    "app.env_file": Rule("a file name inside app.dir (letters, digits, . _ - /)", _path_inside_app_dir),
    "app.health_url": Rule("an http(s) URL on 127.0.0.1 or localhost, like http://127.0.0.1:8000/health", _matches(HEALTH_URL)),
    "app.health_deadline": Rule("a whole number of seconds from 1 to 3600", _whole_number(1, 3600)),
    "app.health_interval": Rule("a whole number of seconds from 1 to 60", _whole_number(1, 60)),
    "app.hooks.*": Rule("shell text without NUL characters", _hook),
    "domains.*": _DOMAIN,
    "upstreams.*": _UPSTREAM,
    "staging.enabled": Rule("true or false", lambda v: isinstance(v, bool)),
    "docker.daemon_hardening": Rule("true or false", lambda v: isinstance(v, bool)),
    "staging.dir": Rule("an absolute path below / (letters, digits, . _ - /)", _absolute_dir),
    "staging.project": Rule("a compose project name (a-z, 0-9, _ -; starting with a letter or digit)",
                            _matches(r"[a-z0-9][a-z0-9_-]{0,62}")),
    "staging.env_file": Rule("a file name inside staging.dir (letters, digits, . _ - /)", _path_inside_app_dir),
    "staging.db_container": Rule("a container name (letters, digits, _ . -)", _matches(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")),
    "staging.db_name": Rule("a database name (letters, digits, _)", _matches(r"[A-Za-z_][A-Za-z0-9_]{0,62}")),
    "staging.smoke_path": Rule("a URL path like /api/notes (letters, digits, . _ ~ / - and a query)",
                               _matches(r"/[A-Za-z0-9._~/%+-]*(?:\?[A-Za-z0-9._~%+=&-]*)?")),
    "ssl.email": Rule("an e-mail address like ops@example.com", lambda v: v == "" or _matches(EMAIL)(v)),
    "ssl.acme_server": Rule("an https:// ACME directory URL", _matches(ACME_URL)),
    "ssl.min_days_left": Rule("a whole number of days from 0 to 3650", _whole_number(0, 3650)),
    "rate_limit.rate": Rule("a rate like 10r/s or 600r/m", _matches(r"\d{1,6}r/[sm]")),
    "rate_limit.burst": Rule("a whole number from 0 to 100000", _whole_number(0, 100000)),
    "firewall.allow": Rule("a list of ufw rules like 22/tcp, 60000:61000/udp or OpenSSH",
                           _matches(r"\d{1,5}(?::\d{1,5})?(?:/(?:tcp|udp))?|[A-Za-z][A-Za-z0-9_.-]{0,63}"), each=True),
    "thresholds.disk_free_percent_min": _PERCENT,
    "thresholds.memory_used_percent_max": _PERCENT,
    "thresholds.cpu_percent_max": _PERCENT,
    "thresholds.certificate_days_min": Rule("a whole number of days from 0 to 365", _whole_number(0, 365)),
    "thresholds.backup_age_hours_max": Rule("a whole number of hours from 1 to 8760", _whole_number(1, 8760)),
    "thresholds.replication_lag_seconds_max": Rule("a whole number of seconds from 1 to 86400", _whole_number(1, 86400)),
    "thresholds.error_rate_percent_max": Rule("a whole number from 0 to 100", _whole_number(0, 100)),
    "thresholds.error_rate_min_requests": Rule("a whole number from 1 to 1000000", _whole_number(1, 1000000)),
    "thresholds.health_grace_seconds": Rule("a whole number of seconds from 0 to 3600", _whole_number(0, 3600)),
    "monitor.disk_paths": Rule("a list of absolute paths (letters, digits, . _ - /)", _absolute_path, each=True),
    "monitor.pgbouncer": _UPSTREAM,
    "monitor.certificate_missing": Rule("warn or fail", lambda v: v in ("warn", "fail")),
    "monitor.cpu_sample_ms": Rule("a whole number of ms from 50 to 10000", _whole_number(50, 10000)),
    "monitor.access_log": Rule("an absolute file path (letters, digits, . _ - /)", _absolute_dir),
    "monitor.watch_interval": Rule("a whole number of seconds from 1 to 60", _whole_number(1, 60)),
    "monitor.stack.dir": Rule("an absolute path below / (letters, digits, . _ - /)", _absolute_dir),
    "monitor.stack.compose_overrides": Rule("a list of absolute paths (letters, digits, . _ - /)",
                                         lambda v: _SAFE_ABSOLUTE(v) and ".." not in v.split("/"), each=True),
    "monitor.stack.verify_deadline": Rule("a whole number of seconds from 1 to 3600", _whole_number(1, 3600)),
    "backup.dir": Rule("an absolute path below / (letters, digits, . _ - /)", _absolute_dir),
    "backup.keep_daily": _KEEP,
    "backup.keep_weekly": _KEEP,
    "backup.keep_monthly": _KEEP,
    "backup.keep_data": _KEEP,
    "backup.min_free_mb": Rule("a whole number of MiB from 0 to 1000000", _whole_number(0, 1000000)),
    "backup.db_container": Rule("a container name (letters, digits, _ . -)", _matches(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")),
    "backup.db_user": Rule("a database user name (letters, digits, _)", _matches(r"[A-Za-z_][A-Za-z0-9_]{0,62}")),
    "backup.db_name": Rule("a database name (letters, digits, _)", _matches(r"[A-Za-z_][A-Za-z0-9_]{0,62}")),
    "backup.db_schedule": _CALENDAR,
    "backup.data_schedule": _CALENDAR,
    "backup.offsite_repo": Rule("empty (off) or sftp:USER@HOST:/ABSOLUTE/PATH (letters, digits, . _ - /)", _offsite_repo),
    "backup.offsite_port": Rule("a port number from 1 to 65535", _whole_number(1, 65535)),
    "backup.pull_dir": Rule("a directory on this machine, relative to the project or absolute (letters, digits, . _ - /)",
                            _compose_file),
    "ssh.connect_timeout": Rule("a whole number of seconds from 1 to 300", _whole_number(1, 300)),
    "cutover.port_a": Rule("a port number from 1024 to 65535", _whole_number(1024, 65535)),
    "cutover.port_b": Rule("a port number from 1024 to 65535", _whole_number(1024, 65535)),
    "cutover.drain_seconds": Rule("a whole number of seconds from 0 to 3600", _whole_number(0, 3600)),
    "release.watch_seconds": Rule("a whole number of seconds from 1 to 14400", _whole_number(1, 14400)),
    "cutover.retry_after": Rule("a whole number of seconds from 1 to 86400", _whole_number(1, 86400)),
    "ssh.known_hosts": Rule("a file path", lambda v: _plain_text(v) and v != ""),
    "fail2ban.bantime": _DURATION,
    "fail2ban.findtime": _DURATION,
    "fail2ban.maxretry": Rule("a whole number from 1 to 100", _whole_number(1, 100)),
    "baseline.skip": Rule(f"a list of baseline items from: {', '.join(BASELINE_ITEMS)}",
                          lambda v: v in BASELINE_ITEMS, each=True),
    "maintenance.window": Rule(f"a weekly window like {window.EXAMPLES}", window.is_valid),
    "maintenance.reboot_timeout": Rule("a whole number of seconds from 60 to 3600", _whole_number(60, 3600)),
}


def validate(settings: Settings) -> Settings:
    """Check every setting that has a rule; the first bad one is a ConfigError (exit 2)."""
    for dotted, value in _leaves(settings.values):
        rule = RULES.get(dotted) or RULES.get(dotted.rsplit(".", 1)[0] + ".*")
        if rule is None:
            continue  # read by no task
        if rule.each:
            if not isinstance(value, list):
                _refuse(settings, dotted, rule, value)
            for item in value:
                if not rule.check(item):
                    _refuse(settings, dotted, rule, item)
        elif not rule.check(value):
            _refuse(settings, dotted, rule, value)
    _check_slot_ports(settings)
    layout.check(settings.get("roles") or {})
    return settings


def _check_slot_ports(settings: Settings) -> None:
    """The two api slots need ports of their own: not each other's, not another
    service's that nginx proxies to on this host (staging on 8001, Grafana on 3000)."""
    ports = {name: settings.get(f"cutover.port_{name}") for name in ("a", "b")}
    if any(port is None for port in ports.values()):
        return
    taken = {int(port): f"cutover.port_{name}" for name, port in ports.items()}
    if len(taken) < 2:
        raise ConfigError(f"cutover.port_a and cutover.port_b must differ, both are {ports['a']}",
                          "give each api slot its own port (defaults 8000 and 8002)")
    for service in ("staging", "metrics"):
        upstream = settings.get(f"upstreams.{service}") or ""
        port = int(upstream.rsplit(":", 1)[1]) if _host_port(upstream) else None
        if port in taken:
            raise ConfigError(f"{taken[port]} is {port}, which upstreams.{service} ({upstream}) uses",
                              "pick a free port for the api slot (defaults 8000 and 8002)")


def _leaves(values: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        dotted = f"{path}{key}"
        if isinstance(value, Mapping):
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted, value


def _refuse(settings: Settings, dotted: str, rule: Rule, value: Any) -> None:
    source = settings.sources.get(dotted)
    if source is None:
        hint = f"fix {dotted} in invoke.yaml, or set {env_key(dotted)}=... in .env.{settings.env}"
    elif source == "the command line":
        hint = "fix the flag"
    else:
        hint = f"fix {env_key(dotted)} in {source}"
    raise ConfigError(f"{dotted} must be {rule.expected}, got {shown(value)}", hint)


def shown(value: Any, limit: int = 80) -> str:
    """A value quoted for a one-line message: control characters escaped, long values cut."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[: limit + 1])
    return f"'{text[: limit - 3]}...'" if len(text) > limit else f"'{text}'"
