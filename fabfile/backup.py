"""backup: dumps of the app database that are whole, checked, restorable and pruned.

Runbook:
    backup.now [--label L]        pg_dump (custom format) of the app database in one
                                  round trip: refused when backup.dir lacks the last
                                  backup's size plus backup.min_free_mb; written under a
                                  temporary name, read back whole, sha256 + manifest
                                  (tables, row counts, release, versions), then renamed.
                                  A failure leaves no file. Warns when the dump is under
                                  half the previous one.
    backup.now --data             the same for app.data_dir: tar.gz read as root,
                                  read back whole, sha256 + manifest (entries, bytes)
    backup.list                   name, kind, size, age, checksum, last verification
    backup.verify NAME|latest[-data]  checksum, restore into a scratch database, tables and
                                  row counts against the manifest, scratch dropped, the
                                  outcome recorded beside the backup
    backup.restore NAME --yes     under the deploy lock, in phases:
                                  1. restore into <db>_restore_<stamp>, check it
                                  2. swap: writers stopped, live renamed <db>_before_<stamp>,
                                     restored renamed live, writers started (always)
                                  3. health gate; failing, the database before is swapped
                                     back in. The live database is never dropped.
                                  A data archive goes the same way: extracted into
                                  <data_dir>.restore_<stamp>, checked, swapped in with the
                                  api stopped, the directory before kept as .before_<stamp>
                                  Cut off: `deploy.recover` settles it like a release.
    backup.offsite [--init | --fetch NAME]   off-site copies, and
    backup.pull NAME|latest       a copy on this machine: see backup_copies.py
    backup.prune [--dry]          retention (core/retention.py): backup.keep_daily /
                                  keep_weekly / keep_monthly; never the newest verified
                                  one nor a dump `rollback --with-db` may still need;
                                  data archives: the newest backup.keep_data; set-aside
                                  databases and directories older than keep_daily days and
                                  leftovers of cut-off restores older than a day dropped
`backup.schedule` (timers) lives in backup_schedule.py.
"""

from __future__ import annotations

import shlex
from datetime import UTC, datetime

from invoke import Collection

from .core import backups, data_archives, lock, retention, slots, state
from .core.app import App, preflight_error, release_facts, report_failed_gate
from .core.batch import gather
from .core.cutoff import phase, release_lock
from .core.errors import OpsError, UsageError
from .core.target import Target
from .core.task import ops_task

# -- now ----------------------------------------------------------------------------


@ops_task(help={"label": "a word in the backup's name (default manual)", "data": "archive app.data_dir instead of the database"})
def now(ops, label="manual", data=False):
    """Dump the app database (or --data: archive app.data_dir) to backup.dir: whole or not at all, with sha256 and manifest."""
    label = backups.validate_label(label)
    app = App.from_settings(ops.settings)
    if ops.dry:
        what = (f"archive {app.data_dir} to {app.backup_dir}/data_<now>_{label}.tar.gz" if data else
                f"dump {app.db_name} from {app.db_container} to {app.backup_dir}/db_<now>_{label}.dump")
        ops.reporter.info(f"  would {what}")
        return
    if data:
        with ops.reporter.phase("archive data directory", reason=app.data_dir):
            path, warnings = data_archives.archive(ops.target, app, label, min_free_mb=app.backup_min_free_mb, tool=backups.TOOL)
    else:
        with ops.reporter.phase("dump database"):
            path, warnings = backups.dump(ops.target, app, label, min_free_mb=app.backup_min_free_mb, tool=backups.TOOL)
    for warning in warnings:
        ops.reporter.info(f"  {warning}")
    ops.reporter.info(f"  backup: {path}")


# -- list ---------------------------------------------------------------------------


def read_backups(target: Target, app: App) -> list[backups.Backup]:
    result = target.run(backups.list_command(app.backup_dir), user=app.owner, check=False, timeout=120)
    if result.exit_status == backups.NO_DIRECTORY:
        raise UsageError(f"backup directory {app.backup_dir} is missing on {target.label}", "run `deploy.setup`")
    if not result.ok:
        raise OpsError(f"cannot list {app.backup_dir} on {target.label} (exit {result.exit_status})",
                       result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "check the directory's owner")
    return backups.parse_list(result.stdout)


def age(when: datetime, now_: datetime) -> str:
    seconds = max(0, int((now_ - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@ops_task(name="list")
def list_(ops):
    """Backups, oldest first: name, kind, size, age, checksum, last verification."""
    app = App.from_settings(ops.settings)
    found = read_backups(ops.target, app)
    moment = datetime.now(UTC)
    for b in found:
        ops.reporter.info(f"  {b.name:<48} {backups.kind_of(b.name):<12} {b.size / 1048576:9.1f} MiB {age(b.when, moment):>5}  "
                          f"sha256 {b.checksum_state:<9} {b.verification or 'never verified'}")
    if not found:
        ops.reporter.info(f"  no backups in {app.backup_dir}")


# -- verify -------------------------------------------------------------------------


def chosen(ops, app: App, name: str) -> str:
    if name in LATEST:
        data = name == "latest-data"
        found = [b for b in read_backups(ops.target, app) if backups.is_data(b.name) == data]
        if not found:
            raise UsageError(f"no {'data archives' if data else 'database backups'} in {app.backup_dir} on {ops.where}",
                             f"take one with `backup.now{' --data' if data else ''}`")
        return found[-1].name
    return name


# invoke has no optional positional arguments: NAME is required; `latest` names the newest
# database backup, `latest-data` the newest data archive.
LATEST = ("latest", "latest-data")


@ops_task(positional=["name"], help={"name": "the backup (from backup.list), `latest` (database) or `latest-data`"})
def verify(ops, name=None):
    """Prove a backup restores: checksum, restore into a scratch database (or directory), compare with its manifest."""
    name = name or ""  # None, not "": invoke fills a positional argument only while it is None
    if name not in LATEST:
        backups.validate_name(name)
    app = App.from_settings(ops.settings)
    name = chosen(ops, app, name)
    if ops.dry:
        ops.reporter.info(f"  would restore {name} into a scratch database, compare it with its manifest and drop it")
        return
    with ops.reporter.phase("verify", reason=name):
        try:
            wrong, holds = restore_to_scratch(ops.target, app, name)
        except (UsageError, backups.NoDatabase):
            raise  # nothing learned about the backup itself
        except OpsError as exc:
            backups.record(ops.target, app, name, False, exc.what)
            raise
        backups.record(ops.target, app, name, not wrong, "; ".join(wrong))
        if wrong:
            raise OpsError(f"{name} restores, but not as its manifest says: {'; '.join(wrong[:3])}",
                           "take a new backup with `backup.now`")
    ops.reporter.info(f"  {name}: sha256 ok, {holds} as in its manifest")


def restore_to_scratch(target: Target, app: App, name: str) -> tuple[list[str], str]:
    """Restore `name` where nothing reads it (a scratch database or directory, removed
    after); (how it differs from its manifest, what it holds)."""
    scratch = backups.stamp(datetime.now(UTC))
    if backups.is_data(name):
        expected, extracted = data_archives.load(target, app, name, f"{app.data_dir}.verify_{scratch}", keep=False)
        wrong = ["no manifest to compare with"] if expected is None else data_archives.differences(expected, extracted)
        return wrong, f"{extracted.entries} entries, {extracted.bytes} bytes"
    manifest, restored = backups.load(target, app, name, f"{app.db_name}_verify_{scratch}", keep=False)
    wrong = ["no manifest to compare with"] if manifest is None else backups.differences(manifest, restored)
    return wrong, f"{len(restored.tables)} tables, {sum(restored.tables.values())} rows"


# -- restore ------------------------------------------------------------------------


@ops_task(positional=["name"], help={
    "name": "the backup to restore (from backup.list)",
    "yes": "confirm: the live database is replaced (and kept as <db>_before_<stamp>)",
    "break_lock": "remove a deploy lock whose holder is gone (never one whose work still runs)",
    "lock_wait": "seconds to wait for a running release to finish",
})
def restore(ops, name=None, yes=False, break_lock=False, lock_wait=0):
    """Restore a backup without ever losing the live database: new database, check, swap, gate."""
    name = name or ""  # None, not "": invoke fills a positional argument only while it is None
    backups.validate_name(name)
    app = App.from_settings(ops.settings)
    replaces = (f"backup.restore replaces the data directory {app.data_dir} on {ops.where} with {name} "
                f"(the current one is kept as {app.data_dir}.before_<stamp>)" if backups.is_data(name) else
                f"backup.restore replaces the database {app.db_name} on {ops.where} with {name} "
                f"(the current one is kept as {app.db_name}_before_<stamp>)")
    if ops.dry:
        ops.reporter.info(f"  would restore {name} into a new database, check it, then swap it in: {replaces}")
        return
    if not yes:
        raise UsageError(replaces, "rerun with --yes to confirm")
    if break_lock:
        lock.break_stale(ops.target, app.state_dir)
    with release_lock(ops, app, name, f"backup.restore {name}", wait=int(lock_wait)) as held:
        host = release_facts(ops.target, app)
        problem = preflight_error(host, app, ops.where)
        if problem:
            raise problem
        current = state.current_release(host.log)
        if current is None:
            raise UsageError("nothing has been deployed yet: there is no service to restore into", "run `deploy` first")
        # The api slot nginx sends requests to is the one stopped, restarted and gated around the swap.
        live = host.layout.answering()
        # previous = what serves: a cut-off restore is settled by putting it back up (deploy.recover).
        entry = state.Release(sha=current.sha, kind="restore", previous=current.sha, who=state.operator(), slot=live.name,
                              started=state.now(), schema=state.live_schema(host.log), message=f"backup.restore {name}")
        held.release = entry
        try:
            if backups.is_data(name):
                swap_in_data(ops, app, held, entry, name, live)
            else:
                swap_in(ops, app, held, entry, name, host.log, live)
        except OpsError as exc:
            if exc.keeps_lock:  # cut off: deploy.recover settles it
                raise
            entry.result, entry.finished, entry.phase = state.RESULT_FAILED, state.now(), entry.phase or held.phase
            entry.message = f"backup.restore {name}: {exc.one_line()}"
            held.log(entry)
            raise
        entry.result, entry.finished = state.RESULT_OK, state.now()
        held.log(entry)


def swap_in(ops, app: App, held: lock.HeldLock, entry: state.Release, name: str, log: list[state.Release], live: slots.Slot) -> None:
    when = datetime.now(UTC)
    aside = f"{app.db_name}_before_{backups.stamp(when)}"
    with phase(ops, held, "restore into a new database", reason=name):
        database, manifest = backups.restore_checked(held, app, name, when, ops.reporter)
    try:
        with phase(ops, held, "swap databases", reason=f"{app.db_name} -> {aside}"):
            backups.swap(held, app, database, aside, api=live.service)
    except OpsError as exc:
        if not exc.keeps_lock:
            backups.drop(held, app, database)
        raise
    if manifest and manifest.release:
        entry.schema = state.schema_of(log, manifest.release) or entry.schema
    with phase(ops, held, "health gate"):
        gate = slots.gate(held, app, live)
        if gate.passed:
            ops.reporter.info(f"  {app.db_name} restored from {name}; the database before is kept as {aside}")
            return
        report_failed_gate(ops.reporter, gate)
        entry.phase = "health gate"
        backups.swap(held, app, aside, f"{app.db_name}_failed_{backups.stamp(when)}", api=live.service)
        back = slots.gate(held, app, live)
        raise OpsError(f"restored {name} but /health did not answer 200",
                       "the database before is back in place" + ("" if back.passed else ", but /health still fails: check the api logs"))


def swap_in_data(ops, app: App, held: lock.HeldLock, entry: state.Release, name: str, live: slots.Slot) -> None:
    when = backups.stamp(datetime.now(UTC))
    restored, aside = f"{app.data_dir}.restore_{when}", f"{app.data_dir}.before_{when}"
    with phase(ops, held, "extract into a new directory", reason=name):
        data_archives.restore_checked(held, app, name, restored)
    try:
        with phase(ops, held, "swap directories", reason=f"{app.data_dir} -> {aside}"):
            data_archives.swap(held, app, restored, aside, api=live.service)
    except OpsError as exc:
        if not exc.keeps_lock:
            data_archives.remove(held, app, restored)
        raise
    with phase(ops, held, "health gate"):
        gate = slots.gate(held, app, live)
        if gate.passed:
            ops.reporter.info(f"  {app.data_dir} restored from {name}; the directory before is kept as {aside}")
            return
        report_failed_gate(ops.reporter, gate)
        entry.phase = "health gate"
        data_archives.swap(held, app, aside, f"{app.data_dir}.failed_{when}", api=live.service)
        back = slots.gate(held, app, live)
        raise OpsError(f"restored {name} but /health did not answer 200",
                       "the directory before is back in place" + ("" if back.passed else ", but /health still fails: check the api logs"))


# -- prune --------------------------------------------------------------------------


def prune_facts(target: Target, app: App) -> dict:
    databases = (f"docker exec {shlex.quote(app.db_container)} psql -X -At -U {shlex.quote(app.db_user)} -d postgres "
                 "-c 'SELECT datname FROM pg_database'")
    return gather(target, {"backups": backups.list_command(app.backup_dir), "log": state.read_log_command(app.state_dir),
                           "databases": databases, "directories": data_archives.set_aside_command(app)}, sudo=True)


@ops_task
def prune(ops):
    """Remove backups the retention policy no longer keeps (--dry lists them), with their sidecar files."""
    app = App.from_settings(ops.settings)
    policy = retention.Policy(*(int(ops.settings.require(f"backup.keep_{p}")) for p in ("daily", "weekly", "monthly")))
    facts = prune_facts(ops.target, app)
    if facts["backups"].status == backups.NO_DIRECTORY:
        raise UsageError(f"backup directory {app.backup_dir} is missing on {ops.where}", "run `deploy.setup`")
    found = backups.parse_list(facts["backups"].stdout)
    dumps = [b for b in found if not backups.is_data(b.name)]
    archives = [b for b in found if backups.is_data(b.name)]
    verified = [b.name for b in dumps if b.verified_ok]
    protected = retention.protected_backups(state.parse_log(facts["log"].stdout), app.backup_dir, verified[-1] if verified else "")
    plan = retention.plan_prune([(b.name, b.when) for b in dumps], protected, policy)
    verified = [b.name for b in archives if b.verified_ok]
    data_plan = retention.plan_keep_newest([(b.name, b.when) for b in archives], int(ops.settings.require("backup.keep_data")),
                                           {verified[-1]: "newest verified"} if verified else {})
    moment = datetime.now(UTC)
    stale = retention.stale_set_aside(facts["databases"].lines, app.db_name, moment, policy.daily)
    stale_dirs = retention.stale_set_aside(facts["directories"].lines, app.data_dir, moment, policy.daily, separator=".")
    for name, why in {**plan.keep, **data_plan.keep}.items():
        ops.reporter.info(f"  keep    {name}  ({', '.join(why)})")
    remove = plan.remove + data_plan.remove
    verb = "would remove" if ops.dry else "remove"
    for name in remove:
        ops.reporter.info(f"  {verb}  {name}")
    for database in stale:
        ops.reporter.info(f"  {'would drop' if ops.dry else 'drop'}  database {database}")
    for directory in stale_dirs:
        ops.reporter.info(f"  {verb}  directory {directory}")
    if ops.dry:
        return
    if remove:
        with ops.reporter.phase("remove backups", reason=f"{len(remove)} file(s) and their sidecars"):
            backups.remove(ops.target, app, remove)
    if stale:
        with ops.reporter.phase("drop set-aside databases", reason=", ".join(stale)):
            backups.drop(ops.target, app, *stale)
    if stale_dirs:
        with ops.reporter.phase("remove set-aside directories", reason=", ".join(stale_dirs)):
            data_archives.remove(ops.target, app, *stale_dirs)


ns = Collection("backup")
ns.add_task(now)
ns.add_task(list_, name="list")
ns.add_task(verify)
ns.add_task(restore)
ns.add_task(prune)
# backup.schedule, backup.scheduled (backup_schedule.py), backup.offsite and backup.pull
# (backup_copies.py) join from fabfile/__init__.py
