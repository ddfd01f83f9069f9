"""rollback: put a release that was healthy back in service, without dropping a request.

Runbook (`fab -H coachntt@HOST rollback [--to <sha>] [--with-db]`):
    1. choose the target    --to must be a release that went live (release log);
                            none given = the previous good release; failed
                            releases are never offered
    2. schema check         warn when the target ran on an older schema and name
                            the backup taken before the release being undone
    3. (--with-db)          restore that backup into a new database, check it
                            against its manifest, swap it in (the live one is
                            kept as <db>_before_<stamp>, never dropped)
    4. cutover              the same as a deploy's (core/slots.py): the target's
                            slot still holds its container when it served last,
                            so it only starts (no build); health gate on its own
                            port, nginx switched to it, the slot serving now
                            drained and stopped. A target that fails its gate
                            is never switched to: what serves, serves on
    5. release log entry    with the slot
`rollback.list` shows the candidates.
"""

from __future__ import annotations

import shlex

from invoke import Collection

from .core import backups, lock, slots, state
from .core.app import CODE_UMASK, App, checkout, preflight_error, release_facts, report_failed_gate, validate_sha
from .core.cutoff import phase, release_lock
from .core.errors import OpsError, UsageError
from .core.state import live_schema, schema_of
from .core.task import ops_task


def choose_target(log: list[state.Release], to: str) -> tuple[state.Release, str]:
    """(the release serving now, the sha to roll back to). Pure: tested as data."""
    current = state.current_release(log)
    good = state.good_releases(log)
    if current is None:
        raise UsageError("nothing has been deployed yet", "run `deploy` first")
    recent = ", ".join(sha[:12] for sha in good[:5]) or "none"
    if to:
        matches = [sha for sha in good if sha.startswith(to)]
        if not matches:
            raise UsageError(f"'{to}' is not a release that went live", f"recent good releases: {recent}")
        if len(matches) > 1:
            raise UsageError(f"'{to}' matches {len(matches)} releases", "give more digits of the sha")
        return current, matches[0]
    previous = state.previous_good(log, current.sha)
    if not previous:
        raise UsageError("no earlier good release to roll back to", f"good releases: {recent}")
    return current, previous


@ops_task(default=True, help={
    "to": "sha of a release that went live (default: the previous good one)",
    "with_db": "also restore the database backup taken before the release being undone",
    "yes": "do not ask before restoring the database",
    "break_lock": "remove a deploy lock whose holder is gone (never one whose work still runs)",
    "lock_wait": "seconds to wait for a running release to finish",
})
def rollback(ops, to="", with_db=False, yes=False, break_lock=False, lock_wait=0):
    """Roll back to a previous good release (code + containers, optionally the DB)."""
    validate_sha(to, flag="--to")
    app = App.from_settings(ops.settings)
    if ops.dry:
        host = release_facts(ops.target, app)
        current, target_sha, backup = plan_rollback(ops, host.log, to, with_db, yes=True)
        if with_db:
            backups.split_path(backup, app.backup_dir)
        slot, serving = host.layout.slot_for(target_sha), host.layout.serving()
        warm = "its container is kept: started, not rebuilt" if host.layout.sha(slot) == target_sha else "started there"
        ops.reporter.info(f"  would roll back {current.sha[:12]} -> {target_sha[:12]}" + (f" and restore {backup}" if with_db else "")
                          + f": {slot} ({warm}), health gate, switch nginx to it"
                          + (f", drain {serving} (at most {app.drain_seconds}s)" if serving and serving != slot else ""))
        return

    if break_lock:
        lock.break_stale(ops.target, app.state_dir)
    with release_lock(ops, app, to or "previous", "rollback", wait=int(lock_wait)) as held:
        # Read under the lock: with --lock-wait the log may have moved meanwhile.
        host = release_facts(ops.target, app)
        current, target_sha, backup = plan_rollback(ops, host.log, to, with_db, yes=yes)
        if with_db:
            backups.split_path(backup, app.backup_dir)  # a name of ours, in backup.dir
        problem = preflight_error(host, app, ops.where)
        if problem:
            raise problem
        entry = state.Release(sha=target_sha, kind="rollback", previous=current.sha, who=state.operator(),
                              started=state.now(), slot=host.layout.slot_for(target_sha).name,
                              # The database keeps its schema unless we restore the older dump.
                              schema=schema_of(host.log, target_sha) if with_db else live_schema(host.log))
        held.release = entry
        try:
            if with_db:
                with phase(ops, held, "restore database", reason=backup):
                    backups.restore_in_place(held, app, backup, ops.reporter, api=host.layout.answering().service)
            with phase(ops, held, "checkout", reason=target_sha[:12]):
                checkout(held, app, target_sha)
            outcome = slots.serve(held, app, target_sha, lambda name, reason="": phase(ops, held, name, reason),
                                  layout=None if with_db else host.layout)
            if not outcome.gate.passed:
                report_failed_gate(ops.reporter, outcome.gate)
                raise OpsError(f"{target_sha[:12]} did not answer 200 on {outcome.slot}'s /health within {app.health_deadline}s",
                               f"nothing was switched: {current.sha[:12]} serves on; see the responses above")
        except OpsError as exc:
            if exc.keeps_lock:  # cut off: recover finishes it
                raise
            entry.result, entry.finished, entry.phase, entry.message = state.RESULT_FAILED, state.now(), held.phase, exc.one_line()
            held.log(entry)
            # Nothing was switched: the checkout goes back to what serves (a failure here changes nothing more).
            held.run(app.in_dir(f"{CODE_UMASK} && git checkout --quiet --force --detach {shlex.quote(current.sha)}"), user=app.owner,
                     check=False, timeout=300)
            raise
        entry.result, entry.finished = state.RESULT_OK, state.now()
        held.log(entry)
        ops.reporter.info(f"  live: {target_sha[:12]} in {outcome.slot}" + (f"; old slot: {outcome.drained}" if outcome.drained else ""))
        if outcome.warning:
            ops.reporter.info(f"  warning: {outcome.warning}")


def plan_rollback(ops, log: list[state.Release], to: str, with_db: bool, *, yes: bool) -> tuple[state.Release, str, str]:
    """(the release serving now, the sha to go to, the backup --with-db restores), with the warnings."""
    current, target_sha = choose_target(log, to)
    backup = state.backup_undoing(log, current.sha)
    now_schema, then_schema = live_schema(log), schema_of(log, target_sha)
    if now_schema and then_schema and now_schema != then_schema and not with_db:
        ops.reporter.info(f"  warning: {target_sha[:12]} ran on schema {then_schema}, the database is at {now_schema}; "
                          f"old code may not run on it. Matching backup: {backup or 'none recorded'} (use --with-db)")
    if with_db:
        if not backup:
            raise UsageError(f"no backup recorded before {current.sha[:12]}",
                             "roll back without --with-db, or restore one with backup.restore")
        if not yes:
            raise UsageError(f"--with-db replaces the database with {backup}", "rerun with --yes to confirm")
    return current, target_sha, backup


@ops_task(name="list")
def list_(ops):
    """Releases you can roll back to, newest first."""
    app = App.from_settings(ops.settings)
    log = release_facts(ops.target, app).log
    current = state.current_release(log)
    for sha in state.good_releases(log):
        marker = "  (live)" if current and sha == current.sha else ""
        ops.reporter.info(f"  {sha[:12]}  schema {schema_of(log, sha) or '-'}{marker}")


ns = Collection("rollback")
ns.add_task(rollback, default=True)
ns.add_task(list_, name="list")
