"""backup: dumps of the app database that are whole, checked, restorable and pruned.

Runbook:
    backup.now [--label L]        pg_dump (custom format) of the app database in one
                                  round trip: refused when backup.dir lacks the last
                                  backup's size plus backup.min_free_mb; written under a
                                  temporary name, read back whole, sha256 + manifest
                                  (tables, row counts, release, versions), then renamed.
                                  A failure leaves no file. Warns when the dump is under
                                  half the previous one.
    backup.list                   name, kind, size, age, checksum, last verification
    backup.verify NAME|latest     checksum, restore into a scratch database, tables and
                                  row counts against the manifest, scratch dropped, the
                                  outcome recorded beside the backup
    backup.restore NAME --yes     under the deploy lock, in phases:
                                  1. restore into <db>_restore_<stamp>, check it
                                  2. swap: writers stopped, live renamed <db>_before_<stamp>,
                                     restored renamed live, writers started (always)
                                  3. health gate; failing, the database before is swapped
                                     back in. The live database is never dropped.
                                  Cut off: `deploy.recover` settles it like a release.
    backup.prune [--dry]          retention (core/retention.py): backup.keep_daily /
                                  keep_weekly / keep_monthly; never the newest verified
                                  one nor a dump `rollback --with-db` may still need;
                                  <db>_before_* databases older than keep_daily days and
                                  leftovers of cut-off restores older than a day dropped
`backup.schedule` and `backup.pull` arrive with the rest of the backup issue.
"""

from __future__ import annotations

import shlex
from datetime import UTC, datetime

from invoke import Collection

from .core import backups, lock, retention, state
from .core.app import App, health_gate, phase, preflight_error, release_facts, release_lock, report_failed_gate
from .core.batch import gather
from .core.errors import OpsError, UsageError
from .core.target import Target
from .core.task import not_implemented, ops_task

# -- now ----------------------------------------------------------------------------


@ops_task(help={"label": "a word in the backup's name (default manual)"})
def now(ops, label="manual"):
    """Dump the app database to backup.dir: whole or not at all, with sha256 and manifest."""
    label = backups.validate_label(label)
    app = App.from_settings(ops.settings)
    if ops.dry:
        ops.reporter.info(f"  would dump {app.db_name} from {app.db_container} to {app.backup_dir}/db_<now>_{label}.dump")
        return
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
    if name == LATEST:
        found = read_backups(ops.target, app)
        if not found:
            raise UsageError(f"no backups in {app.backup_dir} on {ops.where}", "take one with `backup.now`")
        return found[-1].name
    return name


# invoke has no optional positional arguments: NAME is required, and `latest` names the newest.
LATEST = "latest"


@ops_task(positional=["name"], help={"name": "the backup (from backup.list), or `latest` for the newest"})
def verify(ops, name=None):
    """Prove a backup restores: checksum, restore into a scratch database, compare with its manifest."""
    name = name or ""  # None, not "": invoke fills a positional argument only while it is None
    if name != LATEST:
        backups.validate_name(name)
    app = App.from_settings(ops.settings)
    name = chosen(ops, app, name)
    if ops.dry:
        ops.reporter.info(f"  would restore {name} into a scratch database, compare it with its manifest and drop it")
        return
    scratch = f"{app.db_name}_verify_{backups.stamp(datetime.now(UTC))}"
    with ops.reporter.phase("verify", reason=name):
        try:
            manifest, restored = backups.load(ops.target, app, name, scratch, keep=False)
        except (UsageError, backups.NoDatabase):
            raise  # nothing learned about the backup itself
        except OpsError as exc:
            backups.record(ops.target, app, name, False, exc.what)
            raise
        wrong = ["no manifest to compare with"] if manifest is None else backups.differences(manifest, restored)
        backups.record(ops.target, app, name, not wrong, "; ".join(wrong))
        if wrong:
            raise OpsError(f"{name} restores, but not as its manifest says: {'; '.join(wrong[:3])}",
                           "take a new backup with `backup.now`")
    ops.reporter.info(f"  {name}: sha256 ok, {len(restored.tables)} tables, "
                      f"{sum(restored.tables.values())} rows as in its manifest")


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
    replaces = (f"backup.restore replaces the database {app.db_name} on {ops.where} with {name} "
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
        # previous = what serves: a cut-off restore is settled by putting it back up (deploy.recover).
        entry = state.Release(sha=current.sha, kind="restore", previous=current.sha, who=state.operator(),
                              started=state.now(), schema=state.live_schema(host.log), message=f"backup.restore {name}")
        held.release = entry
        try:
            swap_in(ops, app, held, entry, name, host.log)
        except OpsError as exc:
            if exc.keeps_lock:  # cut off: deploy.recover settles it
                raise
            entry.result, entry.finished, entry.phase = state.RESULT_FAILED, state.now(), entry.phase or held.phase
            entry.message = f"backup.restore {name}: {exc.one_line()}"
            state.append(ops.target, app.state_dir, entry)
            raise
        entry.result, entry.finished = state.RESULT_OK, state.now()
        state.append(ops.target, app.state_dir, entry)


def swap_in(ops, app: App, held: lock.HeldLock, entry: state.Release, name: str, log: list[state.Release]) -> None:
    when = datetime.now(UTC)
    aside = f"{app.db_name}_before_{backups.stamp(when)}"
    with phase(ops, held, "restore into a new database", reason=name):
        database, manifest = backups.restore_checked(held, app, name, when, ops.reporter)
    try:
        with phase(ops, held, "swap databases", reason=f"{app.db_name} -> {aside}"):
            backups.swap(held, app, database, aside)
    except OpsError as exc:
        if not exc.keeps_lock:
            backups.drop(held, app, database)
        raise
    if manifest and manifest.release:
        entry.schema = state.schema_of(log, manifest.release) or entry.schema
    with phase(ops, held, "health gate"):
        gate = health_gate(held, app)
        if gate.passed:
            ops.reporter.info(f"  {app.db_name} restored from {name}; the database before is kept as {aside}")
            return
        report_failed_gate(ops.reporter, gate)
        entry.phase = "health gate"
        backups.swap(held, app, aside, f"{app.db_name}_failed_{backups.stamp(when)}")
        back = health_gate(held, app)
        raise OpsError(f"restored {name} but /health did not answer 200",
                       "the database before is back in place" + ("" if back.passed else ", but /health still fails: check the api logs"))


# -- prune --------------------------------------------------------------------------


def prune_facts(target: Target, app: App) -> dict:
    databases = (f"docker exec {shlex.quote(app.db_container)} psql -X -At -U {shlex.quote(app.db_user)} -d postgres "
                 "-c 'SELECT datname FROM pg_database'")
    return gather(target, {"backups": backups.list_command(app.backup_dir), "log": state.read_log_command(app.state_dir),
                           "databases": databases}, sudo=True)


@ops_task
def prune(ops):
    """Remove backups the retention policy no longer keeps (--dry lists them), with their sidecar files."""
    app = App.from_settings(ops.settings)
    policy = retention.Policy(*(int(ops.settings.require(f"backup.keep_{p}")) for p in ("daily", "weekly", "monthly")))
    facts = prune_facts(ops.target, app)
    if facts["backups"].status == backups.NO_DIRECTORY:
        raise UsageError(f"backup directory {app.backup_dir} is missing on {ops.where}", "run `deploy.setup`")
    found = backups.parse_list(facts["backups"].stdout)
    verified = [b.name for b in found if b.verified_ok]
    protected = retention.protected_backups(state.parse_log(facts["log"].stdout), app.backup_dir, verified[-1] if verified else "")
    plan = retention.plan_prune([(b.name, b.when) for b in found], protected, policy)
    stale = retention.stale_set_aside(facts["databases"].lines, app.db_name, datetime.now(UTC), policy.daily)
    for name, why in plan.keep.items():
        ops.reporter.info(f"  keep    {name}  ({', '.join(why)})")
    verb = "would remove" if ops.dry else "remove"
    for name in plan.remove:
        ops.reporter.info(f"  {verb}  {name}")
    for database in stale:
        ops.reporter.info(f"  {'would drop' if ops.dry else 'drop'}  database {database}")
    if ops.dry:
        return
    if plan.remove:
        with ops.reporter.phase("remove backups", reason=f"{len(plan.remove)} file(s) and their sidecars"):
            backups.remove(ops.target, app, plan.remove)
    if stale:
        with ops.reporter.phase("drop set-aside databases", reason=", ".join(stale)):
            backups.drop(ops.target, app, *stale)


ns = Collection("backup")
ns.add_task(now)
ns.add_task(list_, name="list")
ns.add_task(verify)
ns.add_task(restore)
ns.add_task(prune)
for _name in ("schedule", "pull"):
    ns.add_task(not_implemented(f"backup.{_name}", "the rest of the backup issue"), name=_name)
