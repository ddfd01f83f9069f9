"""maintenance: the host's own upkeep, in the maintenance window.

Runbook (`fab -H coachntt@HOST maintenance.patch`):
    0. the window        outside maintenance.window (UTC) refused before connecting:
                         exit 2, nothing changed, saying when it opens next; --force
                         runs anyway
    facts                the upgrades pending (judged against a fresh package index in
                         a scratch directory), the reboot the host asks for, its boot
                         id, the release log, the api slot that serves (core/slots.py)
                         and its /health, the deploy lock: one round trip
    nothing to do        no upgrade pending, no reboot asked: ok, no lock taken
    1. deploy lock       no release runs while the host patches (--lock-wait N)
    2. upgrade packages  once a backup that runs now has finished (the backup timers'
                         flock, held from here on: none starts meanwhile, none is cut);
                         apt-get update + upgrade --with-new-pkgs, non-interactive,
                         changed config files kept (confdef, confold); each package
                         reported from -> to; apt's output in /var/log/coachntt-ops-patch.log
    3. reboot            when the host asks for it (/var/run/reboot-required): the
                         host is asked through systemd, then waited for over a new SSH
                         connection (same host key checks) until its boot id is new,
                         bounded by maintenance.reboot_timeout; a host that does not
                         come back is exit 3, the lock held for `deploy.recover`
    4. health gate       the release that served before answers /health 200 again, on
                         the port of the slot that served it (its container restarts
                         with Docker: `restart: unless-stopped`; the slot kept for
                         rollback stays stopped)
    always               the release log records the patch (kind `patch`) when a
                         release is deployed; the lock is released
`--dry` lists the pending upgrades and whether a reboot is asked; it changes
nothing, not even the host's package index. On the host itself (`inv`) a reboot is
never done: the run says so (exit 1) and leaves it to `fab -H ... maintenance.patch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from invoke import Collection

from .core import backups, lock, patching, reboot, slots, state, window
from .core.app import App, report_failed_gate
from .core.batch import ProbeResult, gather
from .core.cutoff import phase, release_lock
from .core.errors import OpsError
from .core.target import RemoteTarget
from .core.task import ops_task


def now() -> datetime:
    """The clock the window is read with (tests set it)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class HostFacts:
    """What a patch needs to know before it changes anything. Pure to build, from one round trip."""

    pending: patching.AptReport
    reboot_for: tuple[str, ...] | None
    boot: str
    current: state.Release | None
    schema: str
    slot: slots.Slot  # the api slot the requests reach: the one gated after the patch
    health: str  # what its /health answered before the patch
    lock: lock.LockInfo | None

    @property
    def nothing_to_do(self) -> bool:
        return not self.pending.packages and self.reboot_for is None


def probes(app: App) -> dict[str, str]:
    return {
        "pending": patching.pending_command(),
        "reboot": patching.REBOOT_PROBE,
        "boot": reboot.BOOT_ID,
        "log": state.read_log_command(app.state_dir),
        "lock": lock.status_command(app.state_dir),
        **slots.probes(app),
        **slots.health_probes(app),
    }


def read_facts(facts: dict[str, ProbeResult], app: App) -> HostFacts:
    log = state.parse_log(facts["log"].stdout)
    slot = slots.layout_from(facts, app).answering()
    return HostFacts(
        pending=patching.parse(facts["pending"].stdout, record="inst"),
        reboot_for=patching.reboot_asked(facts["reboot"]),
        boot=facts["boot"].stdout.strip(),
        current=state.current_release(log),
        schema=state.live_schema(log),
        slot=slot,
        health=slots.answers(facts, app)[slot.name],
        lock=lock.LockInfo.parse(facts["lock"].stdout) if facts["lock"].ok else None,
    )


def asked_by(packages: tuple[str, ...] | None) -> str:
    return f"asked by {', '.join(packages)}" if packages else "asked"


@ops_task(help={
    "force": "run outside the maintenance window (maintenance.window)",
    "lock_wait": "seconds to wait for a release that holds the deploy lock (default: refuse at once)",
})
def patch(ops, force=False, lock_wait=0):
    """Upgrade the host's packages in the maintenance window, reboot when it asks, health-gate the app."""
    moment = now()
    inside = window.in_window(ops.settings, moment)
    if not inside and not force and not ops.dry:
        window.require_window(ops.settings, moment, "maintenance.patch")  # exit 2 before any connection
    app = App.from_settings(ops.settings)
    reboot_timeout = int(ops.settings.require("maintenance.reboot_timeout"))
    host = read_facts(gather(ops.target, probes(app)), app)
    report_facts(ops, host, inside, moment)
    if ops.dry or host.nothing_to_do:
        return
    if not inside:
        ops.reporter.info(f"  --force: patching outside the maintenance window ({window.window_of(ops.settings)})")

    with release_lock(ops, app, host.current.sha if host.current else "none", "maintenance.patch", wait=int(lock_wait)) as held:
        entry = None
        if host.current:  # a cut-off patch is settled like a release: what served is put back up (deploy.recover)
            entry = state.Release(sha=host.current.sha, kind="patch", previous=host.current.sha, who=state.operator(),
                                  started=state.now(), schema=host.schema, message="maintenance.patch")
        held.release = entry
        try:
            outcome = upgrade(ops, held, app)
            rebooted = ""
            if outcome.reboot_for is not None and isinstance(ops.target, RemoteTarget):
                seconds = reboot_and_wait(ops, held, app, host.boot, outcome.reboot_for, reboot_timeout)
                rebooted, grace = f"; rebooted ({seconds:.0f}s)", max(app.health_deadline, int(reboot_timeout - seconds))
            else:
                grace = app.health_deadline
            gate(ops, held, app, host, deadline=grace)
        except OpsError as exc:
            if exc.keeps_lock or entry is None:  # cut off or host gone: deploy.recover settles it
                raise
            entry.result, entry.finished, entry.phase = state.RESULT_FAILED, state.now(), held.phase
            entry.message = f"maintenance.patch: {exc.one_line()}"
            held.log(entry)
            raise
        summary = f"{len(outcome.packages)} package(s) upgraded{rebooted}"
        if entry is not None:
            entry.result, entry.finished, entry.message = state.RESULT_OK, state.now(), f"maintenance.patch: {summary}"
            held.log(entry)
    ops.reporter.info(f"  patched: {summary}")
    if outcome.reboot_for is not None and not isinstance(ops.target, RemoteTarget):
        raise OpsError(f"the host asks for a reboot ({asked_by(outcome.reboot_for)}), which a run on the host itself "
                       "cannot wait for", f"run `fab -H {app.owner}@HOST maintenance.patch` from your machine: it reboots, "
                       "waits and health-gates the app")


def report_facts(ops, host: HostFacts, inside: bool, moment: datetime) -> None:
    info = ops.reporter.info
    shown = window.window_of(ops.settings)
    if inside:
        closes = window.window_end(shown, moment)
        info(f"  window      inside {shown}" + (f", closes {window.when(closes)}" if closes else ""))
    else:
        info(f"  window      outside {shown}: {window.describe_next(shown, moment)}")
    pending = host.pending.packages
    info(f"  upgrades    {len(pending)} pending" + (f", {host.pending.kept_back} kept back" if host.pending.kept_back else ""))
    for package in pending:
        info(f"      - {package.describe()}")
    info(f"  reboot      {asked_by(host.reboot_for) if host.reboot_for is not None else 'not asked'}")
    serving = f"{host.current.sha[:12]} in {host.slot} (HTTP {host.health})" if host.current else "no release deployed"
    info(f"  app         {serving}")
    if host.lock:
        info(f"  lock        held by {host.lock.describe()}")
    if host.nothing_to_do:
        info("  up to date: nothing to upgrade, no reboot asked")
    elif ops.dry:
        steps = ["take the deploy lock", f"upgrade {len(pending)} package(s)" if pending else "refresh the package index",
                 "reboot (asked now)" if host.reboot_for is not None else "reboot if the upgrade asks for it",
                 "health-gate the app" if host.current else "(no app to health-gate)"]
        info(f"  would {', '.join(steps)}")


def upgrade(ops, held: lock.HeldLock, app: App) -> patching.AptReport:
    with phase(ops, held, "upgrade packages"):
        # Up to an hour for a running backup, then apt: the server ends the phase by then.
        result = held.run(patching.upgrade_command(backups.run_lock(app.state_dir)), user=app.owner, timeout=2 * 3600)
        outcome = patching.parse(result.stdout, record="changed")
    for package in outcome.packages:
        ops.reporter.info(f"      - {package.describe()}")
    if outcome.kept_back:
        ops.reporter.info(f"  note: apt kept back {outcome.kept_back} package(s) that need others removed: "
                          "`apt full-upgrade` by hand when you have checked them")
    return outcome


def reboot_and_wait(ops, held: lock.HeldLock, app: App, boot_before: str, asked: tuple[str, ...], timeout: int) -> float:
    """Reboot, then wait (bounded) for a new boot over a new SSH connection. The lock stays
    held on the server through the reboot: no release starts before the app is gated again."""
    target: RemoteTarget = ops.target
    if not boot_before:  # without it any answer would pass for the host back
        raise OpsError(f"cannot read the boot id of {ops.where} (/proc/sys/kernel/random/boot_id)",
                       "its reboot could not be proven, so it was not rebooted; the packages are upgraded: reboot it by hand")
    with phase(ops, held, "reboot", reason=asked_by(asked)):
        held.run(patching.reboot_command(backups.run_lock(app.state_dir)), user=app.owner, timeout=3600 + 60)
        seconds = reboot.wait_for_new_boot(
            lambda: reboot.boot_id(target), boot_before, timeout, where=ops.where,
            hint=f"check it on the provider's console; the deploy lock stays held: once it answers, "
                 f"run `deploy.recover` on {ops.where} (it brings the app up, gates it and frees the lock)")
    ops.reporter.info(f"  back after {seconds:.0f}s with a new boot id")
    return seconds


def gate(ops, held: lock.HeldLock, app: App, host: HostFacts, *, deadline: int) -> None:
    if host.current is None:
        ops.reporter.info("  no release deployed: no health gate")
        return
    with phase(ops, held, "health gate", reason=f"{host.current.sha[:12]} in {host.slot}"):
        result = slots.gate(held, app, host.slot, deadline=deadline)
        if not result.passed:
            report_failed_gate(ops.reporter, result)
            before = "" if host.health == "200" else f" (it answered HTTP {host.health} before the patch too)"
            raise OpsError(f"after the patch /health did not answer 200 within {deadline}s{before}",
                           "check `deploy.status` and the api logs; `rollback` does not undo packages")


ns = Collection("maintenance")
ns.add_task(patch)
