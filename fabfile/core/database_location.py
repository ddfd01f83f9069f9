"""Where the app's database runs for the host a task works on: here (the single-VPS layout,
PostgreSQL in the compose stack), or elsewhere: an app host of a layout whose DATABASE_URL
names roles.db's host (db.primary writes it).

The host's own env file says which (scripts/database-location.sh reads DATABASE_URL's host,
never printing the URL); a release reads it in its one round trip of facts. An app host
whose database is elsewhere starts no PostgreSQL, backs the database up on roles.db (this
module connects there), and leaves PgBouncer and the backups to that host's monitor.check.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import templates
from .batch import ProbeResult
from .errors import ConfigError
from .layout import parse_login, role_hosts
from .target import Target
from .task import ops_at


def probe(app: Any) -> str:
    """The location line, then exit 0 only when that database accepts connections: pg_isready
    inside the container here (a paused or wedged PostgreSQL fails it too), a TCP connection
    to HOST:PORT elsewhere."""
    args = " ".join(shlex.quote(a) for a in (app.env_path, app.db_container, app.db_user, app.db_name))
    text = templates.script("database-location.sh") + '\ndatabase_ready "$@"'
    return f"sh -c {shlex.quote(text)} database {args}"


def elsewhere(fact: ProbeResult) -> str:
    """'HOST:PORT' when the probe found DATABASE_URL naming another host, '' when the
    database runs here (the first line of the probe, or of monitor-check.sh's database frame)."""
    first = fact.stdout.strip().partition("\n")[0]
    return first.removeprefix("elsewhere ").strip() if first.startswith("elsewhere ") else ""


def backup_login(ops, database_at: str) -> str:
    """Where a release backs the database up: '' for this host, else roles.db's login. Checked
    in the preflight: the backup must be taken where the database really is, so roles.db must
    be the host DATABASE_URL names."""
    if not database_at:
        return ""
    login = (role_hosts(ops.settings.get("roles") or {}).get("db") or [""])[0]
    parsed = parse_login(login) if login else None
    if parsed is None or parsed.host != database_at.rpartition(":")[0]:
        raise ConfigError(f"the database of {ops.where} is on {database_at} (DATABASE_URL), but roles.db is "
                          f"{login or 'not set'}", "set roles.db to that host (COACHNTT_ROLES__DB=user@ADDRESS): a "
                          "release backs the database up there before it migrates; nothing changed")
    return login


@contextmanager
def on_host(ops, here: Target, login: str) -> Iterator[Target]:
    """The host the database runs on: this one (`here`), or roles.db's (`login`), connected
    with the run's SSH options for as long as the block runs."""
    if not login:
        yield here
        return
    with ops_at(ops.context, login, ops.settings) as db_ops:
        yield db_ops.target
