"""Database backups on the server: what they are called, what they hold, and the
moves that make, check and restore them (scripts/backup-db.sh, one round trip each).

    /backups/db_20261201_210455_manual.dump            pg_dump custom format (zstd:1; zlib before PostgreSQL 16)
    /backups/db_20261201_210455_manual.dump.sha256     its checksum
    /backups/db_20261201_210455_manual.dump.json       its manifest: tables and row counts, release, ...
    /backups/db_20261201_210455_manual.dump.verified   the last verification: "ok <when>" or "failed <when> <why>"
    /backups/data_20261201_210455_manual.tar.gz (+ the same sidecars)   an archive of app.data_dir

A restore never drops the live database: the backup is restored into a new
database, checked against its manifest, and only then swapped in by renaming
(the old one is kept as <db>_before_<stamp>); a data archive is extracted
into a new directory and swapped in the same way (scripts/backup-data.sh).
Deploy, rollback --with-db and the backup tasks all go through here. The pure parts (names, manifests,
comparisons) are tested as data; retention lives in core/retention.py.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from dataclasses import dataclass, field
from datetime import UTC, datetime

from . import database_location, redact, templates
from .batch import ProbeResult
from .errors import OpsError, UsageError
from .target import Target, command_failed

SCRIPT = "backup-db.sh"
DATA_SCRIPT = "backup-data.sh"


def run_lock(state_dir: str) -> str:
    """The flock the backup timers' runs take (one at a time); a host patch takes it too,
    so a reboot or Docker restarting never cuts a backup."""
    return f"{state_dir.rstrip('/')}/backup.lock"


def _tool_version() -> str:
    """"coachntt-ops <version>" for the manifest, from pyproject.toml (plain characters only)."""
    import tomllib

    from .settings import PROJECT_DIR

    try:
        version = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, ValueError):
        version = "unknown"
    return "coachntt-ops " + re.sub(r"[^A-Za-z0-9.+-]", "", str(version))[:40]


TOOL = _tool_version()
# db_<UTC date>_<UTC time>_<label>[-n].dump (*.sql.gz: plain dumps of earlier versions);
# data_<UTC date>_<UTC time>_<label>[-n].tar.gz for archives of app.data_dir.
_NAME = re.compile(r"(?:db_(\d{8})_(\d{6})_([A-Za-z0-9][A-Za-z0-9._-]{0,80})\.(dump|sql\.gz)"
                   r"|data_(\d{8})_(\d{6})_([A-Za-z0-9][A-Za-z0-9._-]{0,80})\.(tar\.gz))")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,40}")
# The backup-db.sh / backup-data.sh exit codes that are not a failure of the work itself.
NO_CONTAINER, NO_DIRECTORY, NO_SPACE, NO_SUCH_BACKUP, NO_DATA_DIR = 3, 4, 5, 6, 7
# <db>_before_<stamp> must fit PostgreSQL's 63-byte names (longer ones are cut silently).
MAX_DB_NAME_FOR_RESTORE = 63 - len("_before_20261201_210455")


def validate_name(name: str) -> str:
    """A backup's file name, refused before connecting unless it is one of ours."""
    if not name:
        raise UsageError("name a backup (or `latest` for backup.verify)", "see `backup.list`")
    if "/" in name or ".." in name:
        raise UsageError(f"'{name}' is not a backup name: a name has no '/' or '..'", "give a name from `backup.list`")
    if not _NAME.fullmatch(name):
        raise UsageError(f"'{name}' is not a backup name (db_YYYYmmdd_HHMMSS_<label>.dump or data_..._<label>.tar.gz)",
                         "give a name from `backup.list`")
    return name


def validate_label(label: str) -> str:
    if not _LABEL.fullmatch(label):
        raise UsageError(f"--label must be letters, digits, _ or - (at most 41), got '{label}'", "pick a plain word")
    return label


def _parts(name: str) -> tuple[str, str, str, str] | None:
    """(date, time, label, extension) of one of our names."""
    found = _NAME.fullmatch(name)
    if not found:
        return None
    groups = found.groups()
    return groups[0:4] if groups[0] else groups[4:8]


def is_data(name: str) -> bool:
    """An archive of app.data_dir (not a database dump)."""
    parts = _parts(name)
    return bool(parts) and parts[3] == "tar.gz"


def taken_at(name: str) -> datetime | None:
    """When a backup was taken (UTC), read from its name."""
    parts = _parts(name)
    if not parts:
        return None
    try:
        return datetime.strptime(parts[0] + parts[1], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def kind_of(name: str) -> str:
    """pre-deploy (taken before a migration), or the label it was taken with; (sql.gz) for
    plain SQL dumps; data archives are `data` followed by their label."""
    parts = _parts(name)
    if not parts:
        return "?"
    label, extension = parts[2], parts[3]
    kind = "pre-deploy" if label.startswith("pre-") else re.sub(r"-\d+$", "", label)
    if extension == "tar.gz":
        return f"data/{kind}"
    return kind + (" (sql.gz)" if extension == "sql.gz" else "")


def stamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y%m%d_%H%M%S")


# -- what the server says ------------------------------------------------------


@dataclass(frozen=True)
class Backup:
    """One line of `backup-db.sh list`."""

    name: str
    size: int
    mtime: int
    has_checksum: bool
    has_manifest: bool
    verification: str = ""  # "ok <when>" | "failed <when> <why>" | ""

    @property
    def when(self) -> datetime:
        return taken_at(self.name) or datetime.fromtimestamp(self.mtime, UTC)

    @property
    def verified_ok(self) -> bool:
        return self.verification.startswith("ok ")

    @property
    def checksum_state(self) -> str:
        if not self.has_checksum:
            return "no sha256"
        if self.verification.startswith("failed "):
            return "BAD" if "sha256" in self.verification else "ok"
        return "ok" if self.verified_ok else "unchecked"


def parse_list(text: str) -> list[Backup]:
    """Backups, oldest first; lines that are not one of ours are skipped."""
    backups = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) != 6 or not _NAME.fullmatch(fields[0]) or not fields[1].isdigit() or not fields[2].isdigit():
            continue
        backups.append(Backup(fields[0], int(fields[1]), int(fields[2]), fields[3] == "yes", fields[4] == "yes",
                              fields[5].strip() if fields[5].isprintable() else ""))
    return sorted(backups, key=lambda b: (b.when, b.name))


@dataclass(frozen=True)
class Manifest:
    tables: dict[str, int] = field(default_factory=dict)
    release: str = ""
    postgres: str = ""
    size: int = 0


def parse_manifest(text: str) -> Manifest | None:
    """A manifest (or backup-db.sh's "restored=" object); None when it is not one."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("tables"), list):
        return None
    tables: dict[str, int] = {}
    for entry in data["tables"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("table"), str) or type(entry.get("rows")) is not int:
            return None
        tables[entry["table"]] = entry["rows"]
    release = data.get("release")
    release = release if isinstance(release, str) and re.fullmatch(r"[0-9a-f]{7,64}", release) else ""
    size = data.get("size") if type(data.get("size")) is int else 0
    return Manifest(tables, release, str(data.get("postgres", "")), size)


def differences(expected: Manifest, restored: Manifest) -> list[str]:
    """How a restored database differs from its manifest (tables and row counts); [] when it matches."""
    found = []
    for table in sorted(set(expected.tables) | set(restored.tables)):
        if table not in restored.tables:
            found.append(f"{table} missing")
        elif table not in expected.tables:
            found.append(f"{table} not in the manifest")
        elif expected.tables[table] != restored.tables[table]:
            found.append(f"{table} has {restored.tables[table]} rows, the manifest {expected.tables[table]}")
    return found


# -- moves on the server ---------------------------------------------------------


class NoDatabase(OpsError):
    """The PostgreSQL container is not running (a first release has none yet)."""


def script_text(name: str) -> str:
    """A backup script with the functions both share (scripts/backup-common.sh) in front."""
    return templates.script("backup-common.sh") + "\n" + templates.script(name)


def _script(action: str, *args: str) -> str:
    return f"bash -c {shlex.quote(script_text(SCRIPT))} backup-db {action} " + " ".join(shlex.quote(a) for a in args)


def list_command(backup_dir: str) -> str:
    return _script("list", backup_dir)


def dump(target: Target, app, label: str, *, min_free_mb: int, tool: str) -> tuple[str, list[str]]:
    """pg_dump to a new backup; (its path, warnings). Exit 3 of the script (no
    database container) is raised as NoDatabase for the caller to judge."""
    result = target.run(_script("dump", app.db_container, app.db_user, app.db_name, app.backup_dir, label,
                                app.state_dir, str(min_free_mb), tool), user=app.owner, check=False, timeout=3600)
    if result.exit_status == NO_CONTAINER:
        # An app host of a layout has no database of its own: starting one would be wrong advice.
        located = target.run(database_location.probe(app), check=False)
        at = database_location.elsewhere(ProbeResult(located.stdout, located.exit_status))
        if at:
            raise UsageError(f"the database of {target.label} runs on {at} (its DATABASE_URL), not here",
                             "back it up on that host (fab -H USER@HOST backup.now, roles.db); nothing changed")
        raise NoDatabase(f"the database container {app.db_container} is not running on {target.label}",
                         "start it (`docker compose up -d postgres` in the app directory); nothing changed")
    if result.exit_status == NO_DIRECTORY:
        raise UsageError(f"backup directory {app.backup_dir} is missing on {target.label}", "run `deploy.setup`; nothing changed")
    if not result.ok:
        raise failed(result, target.label, "the backup failed", "nothing kept; fix that and rerun")
    lines = result.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith(app.backup_dir + "/"):
        raise OpsError(f"the backup on {target.label} named no file", f"check {app.backup_dir} and scripts/{SCRIPT}")
    return lines[-1], [line for line in lines[:-1] if line.startswith("warning:")]


def load(target: Target, app, name: str, database: str, *, keep: bool) -> tuple[Manifest | None, Manifest]:
    """Restore backup `name` into the new `database` (dropped again unless `keep`);
    (its manifest or None for an old dump without one, what the new database holds)."""
    result = target.run(_script("load", app.db_container, app.db_user, app.backup_dir, name, database, "yes" if keep else "no"),
                        user=app.owner, check=False, timeout=3600)
    if result.exit_status == NO_SUCH_BACKUP:
        raise UsageError(f"no backup {name} in {app.backup_dir} on {target.label}", "see `backup.list`; nothing changed")
    if result.exit_status == NO_CONTAINER:
        raise NoDatabase(f"the database container {app.db_container} is not running on {target.label}",
                       "start it (`docker compose up -d postgres` in the app directory); nothing changed")
    if not result.ok:
        raise failed(result, target.label, f"restoring {name} failed", "the live database was not touched")
    fields = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    restored = parse_manifest(fields.get("restored", ""))
    if restored is None:
        raise OpsError(f"restoring {name} on {target.label} did not say what it restored", f"check scripts/{SCRIPT}")
    return parse_manifest(fields.get("manifest", "")), restored


def drop(target: Target, app, *databases: str) -> None:
    target.run(_script("drop", app.db_container, app.db_user, *databases), user=app.owner, timeout=300)


def swap(target: Target, app, replacement: str, aside: str, *, api: str) -> None:
    """Writers stopped (the live api slot's service `api`, pgbouncer), live renamed to
    `aside`, `replacement` renamed to live (one transaction), writers started again —
    also when the swap failed."""
    writers = f"{shlex.quote(api)} pgbouncer"
    result = target.run(_script("swap", app.db_container, app.db_user, app.db_name, replacement, aside,
                                app.compose(f"stop {writers}"), app.compose(f"start {writers}")),
                        user=app.owner, check=False, timeout=600)
    if not result.ok:
        raise failed(result, target.label, f"swapping in {replacement} failed", "api and pgbouncer were started again")


def restore_in_place(target: Target, app, backup: str, reporter, *, api: str) -> None:
    """The safe restore of `backup` (a path under app.backup_dir): into a new database,
    checked against its manifest, then swapped in with `api` (the slot that writes)
    stopped around the swap; the live database is kept beside it, never dropped."""
    when = datetime.now(UTC)
    database, _ = restore_checked(target, app, split_path(backup, app.backup_dir), when, reporter)
    swap(target, app, database, f"{app.db_name}_before_{stamp(when)}", api=api)


def record(target: Target, app, name: str, ok: bool, why: str = "") -> None:
    target.run(_script("record", app.backup_dir, name, "ok" if ok else "failed", why[:300]), user=app.owner, timeout=60)


def remove(target: Target, app, names: list[str]) -> None:
    target.run(_script("remove", app.backup_dir, *names), user=app.owner, timeout=300)


def restore_checked(target: Target, app, name: str, when: datetime, reporter) -> tuple[str, Manifest | None]:
    """Restore `name` into <db>_restore_<stamp> and check it against its manifest.
    Returns the new database's name and the manifest; on any failure the new
    database is dropped and the live one was never touched."""
    if len(app.db_name) > MAX_DB_NAME_FOR_RESTORE:
        raise UsageError(f"backup.db_name '{app.db_name}' is too long to keep a copy beside it",
                         f"a safe restore needs a name of at most {MAX_DB_NAME_FOR_RESTORE} characters")
    database = f"{app.db_name}_restore_{stamp(when)}"
    manifest, restored = load(target, app, name, database, keep=True)
    if manifest is None:
        reporter.info(f"  warning: {name} has no manifest: restored without checking row counts")
        return database, None
    wrong = differences(manifest, restored)
    if wrong:
        drop(target, app, database)
        raise OpsError(f"{name} restored, but not as its manifest says ({'; '.join(wrong[:3])})",
                       "the live database was not touched; verify an older backup with `backup.verify`")
    return database, manifest


def split_path(path: str, backup_dir: str) -> str:
    """The name of a backup the release log names by path; it must lie in backup_dir."""
    if posixpath.dirname(path) != backup_dir.rstrip("/"):
        raise UsageError(f"the recorded backup {path} is not in {backup_dir}", "restore it by hand, or pick one with `backup.list`")
    return validate_name(posixpath.basename(path))


def failed(result, where: str, fallback: str, hint: str) -> OpsError:
    """The script's own last line says what went wrong; else what was being done."""
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    if not lines:
        return command_failed(result, where, what=fallback)
    return OpsError(redact.redact(f"{lines[-1]} (on {where})"), hint)
