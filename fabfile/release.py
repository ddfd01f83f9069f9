"""release: the production checklist as one command that cannot skip a step and
leaves the service up whatever fails.

Runbook (`fab -H coachntt@HOST release --sha SHA`, `inv release --sha SHA` on the
server, the Actions workflow's `coachntt-inv release`: one release log entry each):
    preflight   the deploy lock (held: exit 4); one round trip of facts: checkout, env
                file, Docker, database, nginx on the slot upstream, and monitor.check's
                disk, memory and certificate thresholds (no certificate yet: a
                warning, as monitor.check says); fetch: an unknown sha is exit 2; a
                migration marked `-- breaking` outside maintenance.window is exit 2
                unless --force. Nothing has changed if it fails. The sha already
                live: the release only verifies (a `verify` log entry)
    backup      the pre_deploy hook (app.hooks.pre_deploy: a veto before anything
                changes), backup.now's dump, then restored into a scratch database and held
                against its manifest (backup.verify's check): a backup we cannot read
                stops the release before anything changes
    staging     the same sha on staging (fabfile/staging.py: its own checkout, compose
                project and database), gated and smoke-tested through nginx; skipped,
                and said why, when staging is off or not set up on the host. A failure
                stops the release before production changes
    deploy      deploy's build + migrate, then start the idle slot, gate it, switch
                nginx to it; the old slot keeps running
    verify      monitor.check's checks on the new release (CPU only warns: a
                release's own build loads it)
    watch       monitor.watch's 5xx share and /health for release.watch_seconds
    drain       the release held: the old slot drains and stops (container kept);
                then the post_deploy hook (a failure there only warns)
    on a failure from deploy on: the release before is put back (core/release_checklist.py
    decides how, as data): nginx switched straight back to the old slot while it still
    runs; the database backup restored only when breaking migrations ran. The log entry
    says which phase failed and why, and where it was rolled back to.
    summary     phase, result, time; sha before/after; the backup; the URL
`--dry` prints the plan from one round trip of facts; `--json` prints one object per
phase, then the release as one object.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Iterator
from contextlib import contextmanager

from invoke import Collection

from . import backup as backup_task
from . import deploy as deploy_task
from . import rolling_release
from .core import backups, checks, database_location, lock, redact, slots, state
from .core import release_checklist as checklist
from .core import watch as watching
from .core.app import App, HostState, checkout, fetch_sha, preflight_error, report_failed_gate, validate_sha
from .core.cutoff import release_lock
from .core.errors import OpsError, UsageError
from .core.release_facts import Config, preflight_facts
from .core.steps import DetailReporter
from .core.target import Target
from .core.task import ops_task
from .staging import deploy_staging

# -- the run ------------------------------------------------------------------------


class Run:
    """One release: its phases in order, what they changed, and the way back."""

    def __init__(self, ops, app: App, cfg: Config, *, shared_backup: str = ""):
        self.ops, self.app, self.cfg = ops, app, cfg
        # A rolling release past its first host: the shared database's backup it took (on roles.db).
        self.shared_backup = shared_backup
        self.db_login = ""  # roles.db's login when the database runs there (core/database_location.py)
        self.results: list[checklist.PhaseResult] = []
        self.held: lock.HeldLock | None = None
        self.entry: state.Release | None = None
        self.before = ""
        self.failed_phase = ""
        self.reached: set[str] = set()  # the deploy phase's steps that began
        self.layout: slots.Layout | None = None
        self.new_slot: slots.Slot | None = None
        self.old_slot: slots.Slot | None = None
        self.new_running = self.switched = self.breaking = False

    # -- reporting

    def record(self, name: str, status: str, seconds: float = 0.0, reason: str = "") -> None:
        self.results.append(checklist.PhaseResult(name, status, seconds, reason))
        self.ops.reporter.step(name, status, seconds, reason=reason)

    @contextmanager
    def phase(self, name: str) -> Iterator[dict]:
        """One checklist phase, one step line; the body may set its status and reason."""
        if self.held is not None:
            self.held.phase = name
        said = {"status": "changed", "reason": ""}
        started = time.monotonic()
        try:
            yield said
        except OpsError as exc:
            self.failed_phase = self.failed_phase or name
            self.record(name, "interrupted" if exc.keeps_lock else "failed", time.monotonic() - started, exc.one_line())
            raise
        except KeyboardInterrupt:
            self.record(name, "interrupted", time.monotonic() - started)
            raise
        except Exception:
            self.record(name, "failed", time.monotonic() - started, "lost contact with the host")
            raise
        self.record(name, said["status"], time.monotonic() - started, said["reason"])

    @contextmanager
    def step(self, name: str, reason: str = "") -> Iterator[None]:
        """A step inside a phase: named on the server (lock job), a detail line for people."""
        self.held.phase = name
        self.reached.add(name)
        started = time.monotonic()
        yield
        self.ops.reporter.info(f"      {name:<34} {time.monotonic() - started:6.1f}s  {reason}".rstrip())

    # -- the checklist

    def go(self, held: lock.HeldLock, sha: str, message: str, force: bool) -> None:
        ops, app = self.ops, self.app
        self.held = held
        with self.phase("preflight") as said:
            host, found = preflight_facts(ops.target, app, self.cfg)
            problem = preflight_error(host, app, ops.where)
            if problem:
                raise problem
            self.db_login = database_location.backup_login(ops, host.database_elsewhere)
            failures, warnings = checklist.preflight_verdict(found)
            if failures:
                raise OpsError(f"the host is past its thresholds: {checklist.words(failures)}",
                               "fix that (monitor.check shows each remedy) and rerun; nothing changed")
            current = state.current_release(host.log)
            self.layout = host.layout
            self.before = host.layout.serving_sha() or (current.sha if current else "")
            # The release that is logged, checked out and served at once; given in full, nothing to fetch.
            live_sha = current.sha if current and current.sha == host.head == host.layout.serving_sha() else ""
            full = sha if live_sha and sha == live_sha else fetch_sha(held, app, sha)
            live = bool(live_sha) and full == live_sha
            self.breaking = not live and deploy_task.breaking_migrations(ops, held, app, full, host, force=force)
            self.entry = state.Release(sha=full, kind="verify" if live else "release", previous=current.sha if current else "",
                                       who=state.operator(), started=state.now(), message=message)
            said["status"] = "ok"
            said["reason"] = (f"{full[:12]} over {self.before[:12] or 'nothing'}" + (", breaking migrations" if self.breaking else "")
                              + (f"; warning: {checklist.words(warnings)}" if warnings else ""))
        if live:
            self.verify_only(host, found)
        else:
            self.ship(host, first_release=current is None)

    def verify_only(self, host: HostState, found: list[checks.Check]) -> None:
        """The sha serves already: check it, change nothing, log a `verify`.

        `found` are monitor.check's checks the preflight read under the lock a moment ago:
        nothing has changed since, so they are the verify's checks (one round trip and one
        run of the check script fewer)."""
        entry, slot = self.entry, host.layout.serving()
        entry.slot = slot.name
        self.record("backup", "skipped", reason="already live: nothing to back up")
        self.record("staging", "skipped", reason="already live: nothing new to try")
        self.record("deploy", "skipped", reason=f"{entry.sha[:12]} already serves from {slot}")
        try:
            self.verify(found=found)
        except OpsError as exc:
            self.finish(state.RESULT_FAILED, "verify", exc.one_line())
            raise OpsError(f"{entry.sha[:12]} is live but fails its checks: {exc.what}", exc.hint) from None
        self.record("watch", "skipped", reason="already live: nothing new to watch")
        self.record("drain", "skipped", reason="nothing was switched")
        self.finish(state.RESULT_OK, why="" if entry.message else "already live: verified only")

    def ship(self, host: HostState, *, first_release: bool) -> None:
        app, held, entry = self.app, self.held, self.entry
        layout = host.layout
        self.old_slot, self.new_slot = layout.serving(), layout.slot_for(entry.sha)
        entry.slot = self.new_slot.name
        held.release = entry  # from here a cut-off run is settled by `deploy.recover`
        try:
            with self.phase("backup") as said:
                with self.step("pre_deploy hook"):  # the operator's veto (app.hooks.pre_deploy), before anything changes
                    deploy_task.run_hook(self.ops, held, app, "pre_deploy", entry)
                said["reason"] = self.back_up(first_release)
            with self.phase("staging") as said:
                tried = deploy_staging(held, self.ops.settings, entry.sha, DetailReporter(self.ops.reporter), self.ops.where)
                said["status"] = "skipped" if tried.skipped else "ok"
                said["reason"] = tried.reason if tried.skipped else f"health {tried.health}, smoke {tried.smoke}"
            with self.phase("deploy") as said:
                deploy_task.build_and_migrate(held, app, entry, layout, self.step, breaking=self.breaking,
                                              database_elsewhere=host.database_elsewhere)
                self.cutover(layout)
                said["reason"] = f"{entry.sha[:12]} serves from {self.new_slot} (schema {entry.schema or '?'})"
            self.verify(first_release=first_release)
            with self.phase("watch") as said:
                said["status"], said["reason"] = "ok", self.watch()
        except OpsError as exc:
            if exc.keeps_lock:  # cut off: deploy.recover settles it
                raise
            self.fail(exc)
        self.drain(layout)
        try:
            with self.step("post_deploy hook"):
                deploy_task.run_hook(self.ops, held, app, "post_deploy", entry)
        except OpsError as exc:
            if exc.keeps_lock:
                raise
            self.ops.reporter.info(f"  warning: the post_deploy hook failed ({exc.one_line()}); the release stays live")
        self.finish(state.RESULT_OK)

    def back_up(self, first_release: bool) -> str:
        """backup.now's dump where the database runs (here, or roles.db's host), then verified.
        A rolling release backs a shared database up once, on its first host."""
        entry, db_login = self.entry, self.db_login
        if db_login and self.shared_backup:
            entry.backup = self.shared_backup
            return f"the shared database was backed up by this roll's first host: {self.shared_backup}"
        with database_location.on_host(self.ops, self.held, db_login) as database:
            entry.backup = deploy_task.backup_before_migrate(database, self.app, entry.sha,
                                                             first_release=first_release and not db_login)
            where = f" on {db_login}" if db_login else ""
            return self.check_backup(database, entry.backup) + where if entry.backup else "first release: no database yet"

    def check_backup(self, database: Target, path: str) -> str:
        """backup.verify's proof on the dump just taken: restored into a scratch database, held against its manifest."""
        name = posixpath.basename(path)
        with self.step("verify backup", name):
            wrong, holds = backup_task.restore_to_scratch(database, self.app, name)
            backups.record(database, self.app, name, not wrong, "; ".join(wrong))
        if wrong:
            raise OpsError(f"{name} does not restore as its manifest says: {'; '.join(wrong[:3])}",
                           "nothing changed; take a backup by hand (`backup.now`) and see why")
        return f"{path}: restores, {holds} as in its manifest"

    def cutover(self, layout: slots.Layout) -> None:
        """deploy's cutover up to the switch: start the new slot, gate it on its own port,
        switch nginx. The old slot keeps running: the way back until the watch is over."""
        held, app, sha, slot = self.held, self.app, self.entry.sha, self.new_slot
        fresh = not (layout.running(slot) and layout.sha(slot) == sha)
        with self.step("start", f"{sha[:12]} in {slot}" + ("" if fresh else ", already running")):
            if fresh:
                self.new_running = True
                slots.start(held, app, slot, sha)
        self.new_running = True
        with self.step("health gate", slots.health_url(app, slot)):
            gate = slots.gate(held, app, slot)
        if not gate.passed:
            report_failed_gate(self.ops.reporter, gate)
            raise OpsError(f"/health did not answer 200 on {slot} within {app.health_deadline}s", "nothing was switched to it")
        with self.step("switch", f"nginx -> {slot}"):
            self.switched = True
            slots.switch(held, app, slot, sha)

    def verify(self, first_release: bool = False, found: list[checks.Check] | None = None) -> None:
        with self.phase("verify") as said:
            if found is None:  # read now: /health of the slot nginx names, the new one
                found = checks.read(self.ops.target, self.cfg.checks)
            failures, warnings = checklist.verify_verdict(found, first_release=first_release)
            if failures:
                raise OpsError(f"{len(failures)} of {len(found)} checks fail: {checklist.words(failures)}",
                               "each one's remedy: `monitor.check`")
            said["status"] = "ok"
            said["reason"] = f"{len(found) - len(warnings)} of {len(found)} checks pass" + (
                f"; warning: {checklist.words(warnings)}" if warnings else "")

    def watch(self) -> str:
        cfg = self.cfg.watch  # its /health follows the slot nginx names: the new one

        def show(sample: watching.Sample, judge: watching.Judge) -> None:
            self.ops.reporter.info(f"      {sample.elapsed:>4}s  {sample.requests:>5} requests  {sample.errors:>4} 5xx  "
                                   f"(so far {judge.errors}/{judge.requests})  /health {sample.health}")

        self.held.phase = "watch"
        verdict = watching.watch(self.ops.target, cfg, self.cfg.watch_seconds / 60, on_sample=show)
        if not verdict.passed:
            raise OpsError(f"the release did not hold after {verdict.elapsed}s: {verdict.reason}",
                           "the api's logs (`docker compose logs --tail 100`) say why")
        return verdict.reason

    def drain(self, layout: slots.Layout) -> None:
        old = self.old_slot
        if old is None or old == self.new_slot or not (layout.running(old) or layout.legacy):
            self.record("drain", "skipped", reason="no other slot ran")
            return
        with self.phase("drain") as said:
            legacy = (self.new_slot, self.entry.sha) if layout.legacy and old == layout.slots[0] else None
            try:
                said["reason"] = slots.retire(self.held, self.app, old, drain_seconds=self.app.drain_seconds, legacy_keep=legacy)
            except OpsError as exc:
                if exc.keeps_lock:
                    raise
                # The release held and serves: an old slot that will not stop is no reason to undo it.
                said["status"], said["reason"] = "ok", f"warning: {old} did not stop ({exc.one_line()})"

    # -- the way back

    def fail(self, exc: OpsError) -> None:
        entry, failed_in = self.entry, self.failed_phase or self.held.phase
        fallback = self.before
        recovery = checklist.recovery_for(
            failed_in,
            nginx_moved=self.switched or "maintenance on" in self.reached,
            old_running=self.old_slot is not None and "stop" not in self.reached,
            new_running=self.new_running and self.new_slot != self.old_slot,
            breaking_migrated=state.breaking_migrated(self.entry),  # recorded as the breaking migrations began
            fallback=fallback, backup=entry.backup)
        why = exc.one_line()
        what = f"release {entry.sha[:12]} failed during {failed_in}: {exc.what}"
        if not recovery.needed:
            self.finish(state.RESULT_FAILED, failed_in, why)
            raise OpsError(what, f"{exc.hint + '; ' if exc.hint else ''}{recovery.why}") from None
        try:
            with self.phase("rollback") as said:
                self.roll_back(recovery, fallback)
                said["reason"] = f"{fallback[:12]} serves again: {recovery.why}"
        except OpsError as undo:
            if undo.keeps_lock:
                raise
            self.finish(state.RESULT_FAILED, failed_in, f"{why}; the rollback to {fallback[:12]} failed too: {undo.one_line()}")
            raise OpsError(f"{what}; the rollback to {fallback[:12]} failed too ({undo.what})",
                           f"check `deploy.status`; then `rollback --to {fallback[:12]}`") from None
        entry.rolled_back_to = fallback
        if recovery.restore_database:
            entry.schema = ""  # the database is back at the schema before: the log must not claim the new one
        self.finish(state.RESULT_FAILED, failed_in, why)
        raise OpsError(what, f"rolled back to {fallback[:12]}, which serves ({recovery.why})") from None

    def roll_back(self, recovery: checklist.Recovery, fallback: str) -> None:
        held, app = self.held, self.app
        old = self.old_slot or self.layout.other(self.new_slot)
        for name in recovery.steps:
            with self.step(name):
                if name == checklist.RESTORE:
                    writer = self.new_slot if self.new_running else old
                    backups.restore_in_place(held, app, self.entry.backup, self.ops.reporter, api=writer.service)
                elif name == checklist.CHECKOUT_OLD:
                    checkout(held, app, fallback)
                elif name == checklist.START_OLD:
                    slots.start(held, app, old, fallback)
                elif name == checklist.GATE_OLD:
                    gate = slots.gate(held, app, old)
                    if not gate.passed:
                        report_failed_gate(self.ops.reporter, gate)
                        raise OpsError(f"{fallback[:12]} did not answer 200 on {old}'s /health")
                elif name == checklist.SWITCH_BACK:
                    slots.switch(held, app, old, fallback)
                elif name == checklist.STOP_NEW:
                    # nginx is back on the old slot: the new one ends what it holds and stops, its container kept.
                    slots.retire(held, app, self.new_slot, drain_seconds=slots.DRAIN_SETTLE)

    # -- the end

    def finish(self, result: str, phase: str = "", why: str = "") -> None:
        """The one log entry of this release (written by the command that frees the lock), then the summary."""
        entry = self.entry
        entry.result, entry.finished, entry.phase = result, state.now(), phase
        if why:
            entry.message = why
        if result == state.RESULT_OK or entry.kind == "verify":
            after = entry.sha
        else:
            after = entry.rolled_back_to or self.before
        shown = [*self.results, *checklist.not_run(self.results, f"not run: {phase} failed")] if phase else self.results
        entry.extra = checklist.log_phases(shown)
        self.held.log(entry)
        if result == state.RESULT_OK:
            words = "verified" if entry.kind == "verify" else "ok"
        else:
            words = "rolled back" if entry.rolled_back_to else "failed"
        summary = checklist.Summary(self.ops.where, words, self.before, after, entry.backup, self.cfg.url, tuple(shown),
                                    phase, why if phase else "")
        if self.ops.json:
            print(redact.redact(checklist.summary_record(summary)), flush=True)
        else:
            for line in checklist.table(summary):
                self.ops.reporter.info(line)


# -- the task -----------------------------------------------------------------------


@ops_task(default=True, help={
    "sha": "commit to release (default: tip of app.branch)",
    "message": "why this release, for the release log",
    "force": "a release with breaking migrations goes now, outside maintenance.window (503 while it migrates)",
    "lock_wait": "seconds to wait for another release to finish (default: refuse at once, exit 4)",
})
def release(ops, sha="", message="", force=False, lock_wait=0):
    """The production checklist: preflight, backup, staging, deploy, verify, watch; rolled back on any failure."""
    sha = validate_sha(sha)
    if not message.isprintable():
        raise UsageError("--message must be one line of text", "leave out newlines and control characters")
    if rolling_release.applies(ops):
        # Several app hosts behind the load balancer: each one out, released, back in.
        rolling_release.roll(ops, sha, release_here, message=message, force=force, lock_wait=lock_wait)
        return
    release_here(ops, sha, message, force, lock_wait)


def release_here(ops, sha="", message="", force=False, lock_wait=0, shared_backup="") -> str:
    """The checklist on the host `ops` works on; the backup it took (or was given: `shared_backup`)."""
    app = App.from_settings(ops.settings)
    cfg = Config.from_settings(ops.settings)
    if ops.dry:
        dry_run(ops, app, cfg, sha)
        return ""
    run = Run(ops, app, cfg, shared_backup=shared_backup)
    with release_lock(ops, app, sha or app.branch, message, wait=int(lock_wait)) as held:
        run.go(held, sha, message, bool(force))
    return run.entry.backup if run.entry and run.db_login else ""


def dry_run(ops, app: App, cfg: Config, sha: str) -> None:
    """The plan from one round trip of facts: nothing is taken, fetched or changed."""
    host, found = preflight_facts(ops.target, app, cfg)
    layout, current = host.layout, state.current_release(host.log)
    serving, before = layout.serving(), layout.serving_sha() or (current.sha if current else "")
    wanted = sha or f"origin/{app.branch}"
    problem = preflight_error(host, app, ops.where)
    failures, warnings = checklist.preflight_verdict(found)
    refusal = problem.one_line() if problem else (checklist.words(failures) if failures else "")
    live = bool(sha and before.startswith(sha) and host.head.startswith(sha))
    slot = layout.idle()
    plan = [
        ("preflight", "ok" if not refusal else "failed",
         f"would take the lock, fetch {wanted}, read its breaking migrations" + (f"; refuses now: {refusal}" if refusal else "")
         + (f"; warning: {checklist.words(warnings)}" if warnings else "")),
        ("backup", "skipped" if live else "would change", "already live" if live else
         f"would dump {app.db_name} to {app.backup_dir} and restore it into a scratch database"),
        ("staging", "skipped" if live else "would change", "already live" if live else
         f"would run {wanted} on staging first when it is set up (staging.enabled, staging.dir)"),
        ("deploy", "skipped" if live else "would change", "already live" if live else
         f"would build, migrate, start {wanted} in {slot}, gate it, switch nginx to it (over {before[:12] or 'nothing'})"),
        ("verify", "would change", f"would run monitor.check's {len(found)} checks on the live slot"),
        ("watch", "skipped" if live else "would change", "already live" if live else
         f"would watch 5xx and /health for {cfg.watch_seconds}s; on failure switch back to {serving or 'the old slot'}"),
        ("drain", "skipped" if live or not serving else "would change", "" if live or not serving else
         f"would drain {serving} (at most {app.drain_seconds}s) once the release held"),
    ]
    for name, status, reason in plan:
        ops.reporter.step(name, status, 0.0, reason=reason)


ns = Collection("release")
ns.add_task(release, name="release", default=True)
