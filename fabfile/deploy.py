"""deploy: ship one exact sha, gated, locked, recorded, reversible, without dropping a request.

Runbook (`fab -H coachntt@HOST deploy --sha <sha>`):
    0. deploy lock          one release at a time (who/when if refused; --lock-wait N)
       preflight            checkout, env file, Docker, database container, disk, nginx
                            sending the api through the slot upstream: any of them
                            wrong stops here, nothing changed
    1. fetch                git fetch; the sha must exist (else exit 2, nothing changed);
                            a pending migration marked `-- breaking` needs the maintenance
                            window or --force (else exit 2, nothing changed)
       pre_deploy hook      optional; a failure stops here, nothing changed
    2. backup database      pg_dump before anything touches the schema
    3. checkout + build     exactly that sha, for the idle slot; images tagged with it
    4. database up          PostgreSQL and PgBouncer in front of it, wait until healthy
                            (the api slots start with --no-deps: nothing else starts them)
       breaking only:       maintenance on (nginx answers 503 + Retry-After), then the
                            live slot stops: its requests finish, websockets get 1001
    5. migrate              python -m scripts.migrate; the live slot serves on (expand /
                            contract: the release before runs on the new schema)
    6. start                the idle slot on the new sha (core/slots.py)
    7. health gate          /health on that slot's own port: 200 before the deadline
    8. switch               nginx's upstream -> the new slot, nginx -t, graceful reload
    9. drain                the old slot ends its requests and websockets (at most
                            cutover.drain_seconds), then stops; its container stays
    on failure after 2:     automatic rollback: nothing switched to the failed slot, it
                            stops; the checkout and the slot of the last good release
                            are put back (started again after a breaking stop)
    after success:          optional post_deploy hook
    always:                 a release log entry with its phase and slot, written by the
                            command that frees the lock (one round trip, core/lock.py)
    cut off (Ctrl-C, lost   every phase runs on the server where the client cannot
    connection, SIGTERM):   cut it; one Ctrl-C lets it finish and puts back what served
                            before, anything harsher leaves the lock held for
                            `deploy.recover`

`deploy.setup` prepares a host once (checkout, .env.production with generated
secrets, state and backup directories; fabfile/deploy_setup.py). `deploy.history`
shows the release log, `deploy.status` what runs now (which slot serves, what
each holds), `deploy.unlock` breaks a stale lock, and `deploy.recover` settles a
release that was cut off (see core/lock.py).
"""

from __future__ import annotations

import shlex
import time
from contextlib import nullcontext
from datetime import UTC, datetime

from invoke import Collection

from .core import backups, database_location, lock, migrations, slots, state
from .core.app import App, HostState, checkout, fetch_sha, preflight_error, release_facts, report_failed_gate, validate_sha
from .core.batch import gather
from .core.cutoff import phase, release_lock, settle
from .core.errors import LockHeldError, OpsError, UsageError
from .core.fleet import READS
from .core.target import Target
from .core.task import ops_task
from .deploy_setup import setup

# -- deploy -------------------------------------------------------------------------

# Phases that leave the running release as it was: a failure there needs no rollback.
PHASES_BEFORE_CHANGE = ("fetch", "pre_deploy hook", "backup database")


def migrate(target: Target, app: App, sha: str, slot: slots.Slot) -> str:
    """Run the migrations in a one-off container of the new release; return the schema version it reports."""
    # --no-deps: the database is up already (here, or on roles.db for an app host of a layout).
    result = target.run(app.compose(f"run --rm -T --no-deps {slot.service} python -m scripts.migrate", sha),
                        user=app.owner, timeout=600)
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    return last.split(":", 1)[1].strip() if last.startswith("schema version:") else ""


def backup_before_migrate(target: Target, app: App, sha: str, *, first_release: bool) -> str:
    """pg_dump before the schema can change (core/backups.py); '' only on a first
    release with no database container yet."""
    try:
        path, _ = backups.dump(target, app, "pre-" + sha[:12], min_free_mb=app.backup_min_free_mb, tool=backups.TOOL)
    except backups.NoDatabase:
        if first_release:
            return ""
        raise
    return path


def run_hook(ops, target: Target, app: App, name: str, release: state.Release) -> None:
    """An operator's hook (settings app.hooks.<name>), with the release in its environment."""
    command = ops.settings.get(f"app.hooks.{name}")
    if not command:
        return
    env = " ".join(
        f"{key}={shlex.quote(value)}"
        for key, value in (("COACHNTT_HOOK", name), ("COACHNTT_SHA", release.sha),
                           ("COACHNTT_PREVIOUS_SHA", release.previous), ("COACHNTT_WHO", release.who))
    )
    target.run(app.in_dir(f"{env} sh -c {shlex.quote(command)}"), user=app.owner, timeout=600)


def breaking_migrations(ops, target: Target, app: App, sha: str, host: HostState, *, force: bool) -> bool:
    """Whether the release goes stop-the-world: pending migrations marked breaking,
    refused (exit 2, nothing changed) outside the maintenance window unless --force."""
    marked = target.run(app.in_dir(migrations.marked_command(sha)), user=app.owner, timeout=60).stdout
    decision = migrations.decide(marked, host.log, ops.settings, datetime.now(UTC), force=force)
    if decision.breaking and host.database_elsewhere:
        # Stop-the-world on a shared database would need every app host stopped at once.
        raise UsageError(f"{sha[:12]} has breaking migrations ({', '.join(m.name for m in decision.breaking)}), and the database is "
                         f"shared on {host.database_elsewhere}: the other app hosts would run on a schema they "
                         "cannot read", "split them into expand/contract migrations that the release before can "
                         "run on; nothing changed")
    if not decision.allowed:
        current = state.current_release(host.log)
        raise migrations.refusal(decision.breaking, host.layout.serving_sha() or (current.sha if current else ""), ops.settings)
    if decision.breaking:
        ops.reporter.info(f"  {decision.words}")
    return bool(decision.breaking)


@ops_task(default=True, help={
    "sha": "commit to deploy (default: tip of app.branch)",
    "message": "why this release, for the release log",
    "break_lock": "remove a deploy lock whose holder is gone (never one whose work still runs)",
    "lock_wait": "seconds to wait for another release to finish (default: refuse at once)",
    "force": "a release with breaking migrations goes now, outside the maintenance window (503 while it migrates)",
})
def deploy(ops, sha="", message="", break_lock=False, lock_wait=0, force=False):
    """Deploy one exact sha into the idle slot: lock, preflight, fetch, backup, migrate, start, gate, switch, drain, log."""
    sha = validate_sha(sha)
    if not message.isprintable():
        # The release log keeps one entry per line; its reader skips control characters.
        raise UsageError("--message must be one line of text", "leave out newlines and control characters")
    app = App.from_settings(ops.settings)
    if ops.dry:
        dry_run(ops, app, sha, force=force)
        return

    if break_lock:
        lock.break_stale(ops.target, app.state_dir)
    with release_lock(ops, app, sha or app.branch, message, wait=int(lock_wait)) as held:
        # Read under the lock: with --lock-wait the log may have moved meanwhile.
        host = release_facts(ops.target, app)
        problem = preflight_error(host, app, ops.where)
        if problem:
            raise problem
        db_login = database_location.backup_login(ops, host.database_elsewhere)
        current = state.current_release(host.log)
        release = state.Release(sha=sha, kind="deploy", previous=current.sha if current else "",
                                who=state.operator(), started=state.now(), message=message)
        held.release = release if sha else None
        with phase(ops, held, "fetch"):
            release.sha = fetch_sha(held, app, sha)
            stop_the_world = breaking_migrations(ops, held, app, release.sha, host, force=force)
        held.release = release

        if current and current.sha == release.sha and host.head == release.sha:
            check_live_release(ops, app, held, release, host.layout)
        else:
            ship(ops, app, held, release, host, breaking=stop_the_world, first_release=current is None, db_login=db_login)


def dry_run(ops, app: App, sha: str, *, force: bool) -> None:
    """What a deploy would do, from one round trip of facts (and a read of git's objects)."""
    host = release_facts(ops.target, app)
    current = state.current_release(host.log)
    layout = host.layout
    slot, serving = layout.slot_for(sha) if sha else layout.idle(), layout.serving()
    ops.reporter.info(f"  would deploy {sha or 'origin/' + app.branch} over {current.sha[:12] if current else 'nothing'} "
                      f"into {slot}: lock, preflight, fetch, backup, checkout + build, database up, migrate, start, "
                      f"health gate, switch nginx to it" + (f", drain {serving} (at most {app.drain_seconds}s)" if serving else ""))
    problem = preflight_error(host, app, ops.where)
    if problem:
        ops.reporter.info(f"  but preflight refuses now: {problem.one_line()}")
    marked = ops.target.run(app.in_dir(migrations.marked_command(sha)), user=app.owner, check=False, timeout=60) if sha else None
    if marked is not None and marked.ok:  # else not fetched here yet: the real run checks after its fetch
        decision = migrations.decide(marked.stdout, host.log, ops.settings, datetime.now(UTC), force=force)
        if decision.breaking:
            ops.reporter.info(f"  {decision.words}")


def check_live_release(ops, app: App, held: lock.HeldLock, release: state.Release, layout: slots.Layout) -> None:
    """Redeploying what already runs: only the health gate of the slot serving it, and a log entry."""
    release.kind = "verify"
    slot = layout.answering()
    release.slot = slot.name
    with phase(ops, held, "health gate", reason=f"{release.sha[:12]} already live in {slot}: checked only"):
        gate = slots.gate(held, app, slot)
        release.result, release.finished = (state.RESULT_OK if gate.passed else state.RESULT_FAILED), state.now()
        release.phase = "" if gate.passed else "health gate"
        held.log(release)
        if not gate.passed:
            report_failed_gate(ops.reporter, gate)
            raise OpsError(f"{release.sha[:12]} is live but unhealthy", "see the responses above; `rollback` to the previous good release")


def build_and_migrate(held: lock.HeldLock, app: App, release: state.Release, layout: slots.Layout, step: slots.Phase,
                      *, breaking: bool, database_elsewhere: str = "") -> None:
    """The new sha built for its slot and the database migrated (`release` shares this):
    checkout + build, PostgreSQL up, (a breaking release stops the world first,) migrate."""
    sha = release.sha
    slot, serving = layout.slot_for(sha), layout.serving()
    with step("checkout + build", f"for {slot}"):
        checkout(held, app, sha)
        held.run(app.compose(f"build --quiet {slot.service}", sha), user=app.owner, timeout=1800)
    if database_elsewhere:
        with step("database up", f"on {database_elsewhere}, not on this host: nothing to start"):
            pass
    else:
        with step("database up"):
            # PgBouncer too: the slots start with --no-deps, so no other step brings it up.
            held.run(app.compose("up -d --wait postgres pgbouncer", sha), user=app.owner, timeout=300)
    if breaking and serving:
        with step("maintenance on", "nginx answers the api with 503 + Retry-After"):
            slots.switch(held, app, serving, layout.serving_sha(), maintenance=True)
        with step("stop", f"{serving}: the release before cannot run on the new schema"):
            slots.retire(held, app, serving, drain_seconds=slots.DRAIN_SETTLE)
    with step("migrate"):
        if breaking:  # recorded before they run: a cut-off from here on is settled with the backup restored
            release.extra[state.BREAKING_MIGRATED] = True
        release.schema = migrate(held, app, sha, slot)


def ship(ops, app: App, held: lock.HeldLock, release: state.Release, host: HostState, *, breaking: bool, first_release: bool,
         db_login: str = "") -> None:
    """A new sha: hook, backup, checkout + build, database, (stop the world,) migrate, cutover."""
    sha, layout = release.sha, host.layout
    release.slot = layout.slot_for(sha).name
    try:
        with phase(ops, held, "pre_deploy hook"):  # may veto: nothing has changed yet
            run_hook(ops, held, app, "pre_deploy", release)
        with phase(ops, held, "backup database", db_login and f"on {db_login}, where the database runs"), \
                database_location.on_host(ops, held, db_login) as database:
            release.backup = backup_before_migrate(database, app, sha, first_release=first_release and not db_login)
        build_and_migrate(held, app, release, layout, lambda name, reason="": phase(ops, held, name, reason), breaking=breaking,
                          database_elsewhere=host.database_elsewhere)
        # The layout read before anything changed: the new release goes to the idle slot.
        outcome = slots.serve(held, app, sha, lambda name, reason="": phase(ops, held, name, reason), layout=layout)
        if not outcome.gate.passed:
            report_failed_gate(ops.reporter, outcome.gate)
            raise OpsError(f"/health did not answer 200 on {outcome.slot} within {app.health_deadline}s",
                           "nothing was switched to it")
    except OpsError as exc:
        if exc.keeps_lock:  # cut off: nothing to roll back from here, recover settles it
            raise
        roll_back_after_failure(ops, app, held, release, state.good_releases(host.log), exc)
    release.result, release.finished = state.RESULT_OK, state.now()
    held.log(release)
    ops.reporter.info(f"  live: {sha[:12]} in {outcome.slot} (schema {release.schema or '?'}, backup {release.backup or 'none'})")
    if outcome.drained:
        ops.reporter.info(f"  old slot: {outcome.drained}")
    if outcome.warning:
        ops.reporter.info(f"  warning: {outcome.warning}")
    try:
        with phase(ops, held, "post_deploy hook"):
            run_hook(ops, held, app, "post_deploy", release)
    except OpsError as exc:
        ops.reporter.info(f"  warning: the post_deploy hook failed ({exc.one_line()}); the release stays live")


def roll_back_after_failure(ops, app: App, held: lock.HeldLock, release: state.Release, good: list[str], exc: OpsError) -> None:
    """Log the failed attempt with its phase, put the last good release back in
    service when anything had changed, and raise one line that says where things stand."""
    failed_in, why = held.phase, exc.one_line()
    release.result, release.finished, release.message, release.phase = state.RESULT_FAILED, state.now(), why, failed_in
    fallback = next((sha for sha in good if sha != release.sha), "")
    what = f"release {release.sha[:12]} failed during {failed_in}: {exc.what}"
    if failed_in in PHASES_BEFORE_CHANGE:
        held.log(release)
        raise OpsError(what, f"{exc.hint + '; ' if exc.hint else ''}nothing changed, the running release serves on") from None
    if not fallback:
        held.log(release)
        raise OpsError(what, "no earlier good release to roll back to; fix and deploy again") from None
    try:
        with phase(ops, held, f"automatic rollback to {fallback[:12]}"):
            checkout(held, app, fallback)
            # Its slot still serves unless a breaking release stopped it: then it starts again.
            outcome = slots.serve(held, app, fallback, lambda name, reason="": nullcontext())
            if not outcome.gate.passed:
                report_failed_gate(ops.reporter, outcome.gate)
    except OpsError as rollback_exc:
        if rollback_exc.keeps_lock:
            raise
        release.message = f"{why}; the rollback to {fallback[:12]} failed too: {rollback_exc.one_line()}"
        held.log(release)
        raise OpsError(f"{what}; the rollback to {fallback[:12]} failed too ({rollback_exc.what})",
                       f"check `deploy.status`; then `rollback --to {fallback[:12]}`") from None
    release.rolled_back_to = fallback if outcome.gate.passed else ""
    held.log(release)
    if outcome.gate.passed:
        raise OpsError(what, f"rolled back to {fallback[:12]}, which is healthy in {outcome.slot}"
                             + ("" if outcome.switched else " (nginx never left it)")) from None
    raise OpsError(f"{what}; the rollback to {fallback[:12]} is unhealthy too", "check `deploy.status` and the api logs now") from None


@ops_task(help={"wait": "seconds to wait for a phase that still runs on the server (default 600)"})
def recover(ops, wait=600):
    """Settle a release that was cut off: let its phase end, put back what served, log it, free the lock."""
    app = App.from_settings(ops.settings)
    adopted = lock.adopt(ops.target, app.state_dir)
    if adopted is None:
        ops.reporter.info("  the deploy lock is free: nothing to recover")
        return
    held, info = adopted
    for _ in range(5):  # a client that just died takes sshd a moment to notice
        if not info.client_connected or info.client_left:
            break
        time.sleep(1)
        info = lock.read(ops.target, app.state_dir) or info
    if info.client_connected and not info.client_left:
        raise LockHeldError(f"the release of {info.describe()} is still followed by its client",
                            "let it finish; `deploy.recover` is for a run that was cut off")
    if ops.dry:
        ops.reporter.info(f"  would settle the release of {info.describe()}")
        return
    if info.job == "running":
        ops.reporter.info(f"  waiting for '{info.phase}' to finish on the server (up to {int(wait)}s)")
        info = held.wait_for_phase(int(wait))
        if info.job == "running":
            raise LockHeldError(f"'{info.phase}' still runs under the deploy lock", "wait for it, then run `deploy.recover` again")
    healthy, outcome = settle(ops.reporter, app, held, info)
    ops.reporter.info(f"  recovered: {outcome}")
    if not healthy:
        raise OpsError(f"recovered the lock, but {outcome}")


@ops_task
def history(ops):
    """The release log: every deploy and rollback attempt, newest last."""
    app = App.from_settings(ops.settings)
    log = release_facts(ops.target, app).log
    for r in log:
        extra = f" -> rolled back to {r.rolled_back_to[:12]}" if r.rolled_back_to else ""
        where = f" (during {r.phase})" if r.phase else ""
        ops.reporter.info(f"  {r.started or r.finished:<20} {r.kind:<8} {r.sha[:12]:<12} {r.result:<11} "
                          f"slot {r.slot or '-'}  schema {r.schema or '-':<4} {r.who}{where}{extra}")
    if not log:
        ops.reporter.info("  no releases yet")
    if log.skipped:
        ops.reporter.info(f"  warning: skipped {log.skipped} unreadable line(s) of {state.log_path(app.state_dir)}")


@ops_task(fleet=READS)
def status(ops):
    """What runs now: the slot nginx sends the api to, what each slot holds, health, the deploy lock."""
    app = App.from_settings(ops.settings)
    facts = gather(ops.target, {**slots.probes(app), **slots.health_probes(app),
                                "head": f"git -C {shlex.quote(app.dir)} rev-parse --short=12 HEAD",
                                "lock": lock.status_command(app.state_dir)}, sudo=False)
    layout, answers = slots.layout_from(facts, app), slots.answers(facts, app)
    for line in slots.describe(layout, answers):
        ops.reporter.info(f"  {line}")
    ops.reporter.info(f"  checkout    {facts['head'].stdout or 'no checkout'}")
    held = lock.LockInfo.parse(facts["lock"].stdout) if facts["lock"].ok else None
    ops.reporter.info(f"  lock        {held.describe() if held else 'free'}")
    for service, container in sorted(layout.containers.items()):
        ops.reporter.info(f"  container   {service} {container.state}")
    serving = layout.serving()
    if serving is None or (layout.running(serving) and answers[serving.name] != "200") or layout.maintenance:
        raise OpsError(f"the app on {ops.where} is not healthy" + (" (maintenance page on)" if layout.maintenance else ""),
                       "see `deploy.history` and the api logs; `deploy.recover` settles a release that was cut off")


@ops_task(help={"yes": "do not ask for confirmation"})
def unlock(ops, yes=False):
    """Break a deploy lock whose holder is gone (never one whose work still runs)."""
    app = App.from_settings(ops.settings)
    held = lock.read(ops.target, app.state_dir)
    if held is None:
        ops.reporter.info("  lock is free")
        return
    if not yes:
        raise UsageError(f"lock held by {held.describe()}", "rerun with --yes to break it")
    lock.break_stale(ops.target, app.state_dir)
    ops.reporter.info("  lock removed")


ns = Collection("deploy")
ns.add_task(deploy, default=True)
ns.add_task(setup)
ns.add_task(history)
ns.add_task(status)
ns.add_task(unlock)
ns.add_task(recover)
