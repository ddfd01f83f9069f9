"""A release cut off halfway: the deploy lock a release runs under, and how what it
left behind is settled.

    release_lock   the lock for a whole release; Ctrl-C, SIGTERM and a lost
                   connection each end in a known state (below)
    phase          a reported phase whose commands run on the server, named
    settle         after a cut-off run (its phase has ended on the server): put
                   back what served before, through a cutover, log it, free the
                   lock. A release that had started breaking migrations gets
                   its database back first, from the backup it took: the code
                   before cannot run on the new schema. A release that had its
                   final entry (it finished) is only logged, lock freed.

`deploy.recover`, an interrupted `deploy`/`release`/`rollback` and `maintenance.patch`
all end here.
"""

from __future__ import annotations

import posixpath
import signal
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace

from . import backups, lock, slots, state
from .app import App, checkout, report_failed_gate
from .errors import Interrupted, LeftRunning, OpsError, Stop, from_connection_failure


@contextmanager
def release_lock(ops, app: App, sha: str, message: str, *, wait: int = 0) -> Iterator[lock.HeldLock]:
    """The deploy lock for a release, and what happens when the run is cut off:

    first Ctrl-C      the running phase finishes on the server, then settle()
                      puts back what served before, logs it, frees the lock
    a second Ctrl-C,  leave at once: the release is logged as interrupted (now,
    SIGTERM (CI)      or by the phase when it ends) and the lock stays held
                      for `deploy.recover`
    lost connection   the same, said by lock.HeldLock
    """
    with lock.deploy_lock(ops.target, app.state_dir, sha, message, wait=wait) as held:
        try:
            yield held
        except KeyboardInterrupt as stop:
            stop_cleanly(ops, app, held, stop)
        except OpsError:
            raise
        except Exception as exc:  # the connection died between two phases
            if from_connection_failure(exc, held.label) is None:
                raise
            raise held.lost(str(exc) or type(exc).__name__) from None


@contextmanager
def phase(ops, held: lock.HeldLock, name: str, reason: str = "") -> Iterator[None]:
    """A reported phase of a release; its commands run on the server under the lock, named."""
    held.phase = name
    with ops.reporter.phase(name, reason=reason):
        yield


def stop_cleanly(ops, app: App, held: lock.HeldLock, stop: KeyboardInterrupt) -> None:
    phase = held.phase
    if held.final:  # the release had finished: log it, free the lock; nothing to put back
        try:
            _, outcome = settle(ops.reporter, app, held, held.wait_for_phase(60))
        except (KeyboardInterrupt, Exception):
            leave_now(ops, held, phase)
        raise Interrupted(f"interrupted during {phase}; {outcome}") from None
    if held.release is None:  # nothing has changed yet: let a running read end, free the lock
        try:
            settle(ops.reporter, app, held, held.wait_for_phase(60))
        except (KeyboardInterrupt, Exception):
            leave_now(ops, held, phase)
        raise Interrupted(f"interrupted during {phase}, before anything changed", "rerun when ready") from None
    if not isinstance(stop, Stop):
        ops.reporter.info(f"  interrupted: letting '{phase}' finish on the server, then putting back what served before "
                          "(Ctrl-C again to leave now)")
        try:
            info = held.wait_for_phase(3600)
            _, outcome = settle(ops.reporter, app, held, info)
        except KeyboardInterrupt:
            pass
        else:
            raise Interrupted(f"interrupted during {phase}; {outcome}") from None
    leave_now(ops, held, phase)


def leave_now(ops, held: lock.HeldLock, phase: str) -> None:
    """Record the release as interrupted and go, the lock held: a phase may still run."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        held.abandon()
        hint = f"run `deploy.recover` on {ops.where} to settle it and free the lock"
    except Exception:
        hint = f"could not record it on {ops.where}; when the host answers, run `deploy.recover`"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    raise LeftRunning(f"interrupted during {phase}: it goes on on the server under the deploy lock", hint) from None


def settle(reporter, app: App, held: lock.HeldLock, info: lock.LockInfo) -> tuple[bool, str]:
    """After a cut-off release (its phase has ended): put back a release that
    serves — the one before a deploy, the target of a rollback — through a
    cutover (core/slots.py), log what happened, free the lock. When that one
    fails its health gate, the other release of the run serves if it passes
    its own: nginx ends up on a healthy slot whenever there is one, and the
    maintenance page is off. Returns (healthy, what it did in words)."""
    release, phase = held.release, info.phase or held.phase
    if held.final or info.finished:
        return log_finished(held, info)
    if release is None:
        held.release_lock()
        return True, "nothing had changed"
    goal = release.sha if release.kind == "rollback" else release.previous
    fallback = release.previous if release.kind == "rollback" else release.sha
    entry = replace(release, result=state.RESULT_INTERRUPTED, phase=phase, finished=state.now(),
                    message=f"interrupted during {phase}")
    served = ""
    if goal:
        held.phase = "recover"
        # The release before cannot run on a schema its successor's breaking migrations changed.
        schema_back = release.kind == "rollback" or not state.breaking_migrated(release) or database_back(held, reporter, app, release)
        if schema_back and put_back(held, reporter, app, goal):
            served = goal
        elif fallback and fallback != goal and put_back(held, reporter, app, fallback):
            served = fallback
    if release.kind == "rollback":
        entry.result = state.RESULT_OK if served == goal else state.RESULT_FAILED
        entry.message = (f"finished after an interruption during {phase}" if served == goal
                         else f"interrupted during {phase}; {goal[:12]} did not pass its health gate")
    elif goal and served == goal:
        entry.rolled_back_to = goal
    if info.recorded and release.kind != "rollback" and goal:
        # The interruption is in the log already: add the way back to it.
        entry = state.Release(sha=goal, kind="rollback", previous=release.sha, who=state.operator(), started=entry.finished,
                              finished=state.now(), result=state.RESULT_OK if served == goal else state.RESULT_FAILED,
                              message=f"recover: put back after {release.sha[:12]} was interrupted during {phase}")
    if goal or not info.recorded:
        held.log(entry)
    if served and served != goal:
        held.log(state.Release(
            sha=served, kind="verify", result=state.RESULT_OK, previous=goal, who=state.operator(), started=entry.finished,
            finished=state.now(), message=f"recover: {goal[:12]} could not be put back, {served[:12]} serves"))
    held.release_lock()
    if not goal:
        return False, f"nothing served before {release.sha[:12]}: deploy again"
    if served == goal:
        return True, f"{goal[:12]} is back and healthy"
    if served:
        return True, f"{goal[:12]} could not be put back; {served[:12]} serves and is healthy"
    return False, (f"{goal[:12]} did not pass its health gate{' (nor ' + fallback[:12] + ')' if fallback else ''}: "
                   "check `deploy.status` and the api logs now")


def log_finished(held: lock.HeldLock, info: lock.LockInfo) -> tuple[bool, str]:
    """A release that had its final entry before it was cut off: that entry in the
    log (once: a phase whose client was gone may have recorded it) and the lock
    freed, in one command. Nothing is undone: the release had finished."""
    entries = held.final or [info.release]
    held.final = [] if info.recorded else entries
    held.release_lock()
    entry = entries[0]
    # Its own run said how it ended (and put back what served if it failed): recover has nothing to add.
    return True, f"{entry.sha[:12]} had finished ({entry.result}) and is logged: nothing to put back"


def database_back(held: lock.HeldLock, reporter, app: App, release: state.Release) -> bool:
    """The database as it was before `release`, from the backup it took: restored into a
    new database, checked, swapped in (core/backups.py). False, said why, when it cannot be:
    the live database is then as the release left it."""
    name = posixpath.basename(release.backup) or "no backup"
    try:
        with reporter.phase(f"restore {name}", reason=f"{release.sha[:12]} had started breaking migrations"):
            if not release.backup:
                raise OpsError(f"{release.sha[:12]} recorded no backup to restore")
            slot_a, slot_b = slots.slots_of(app)
            writer = slot_b if release.slot == "b" else slot_a  # the release's own slot writes
            backups.restore_in_place(held, app, release.backup, reporter, api=writer.service)
    except OpsError as exc:
        if exc.keeps_lock:
            raise
        return False
    return True


def put_back(held: lock.HeldLock, reporter, app: App, sha: str) -> bool:
    """`sha` checked out and served through a cutover; False (said why) when it
    does not pass its health gate or the cutover fails."""
    try:
        with reporter.phase(f"put back {sha[:12]}"):  # one step: the cutover's own steps are not reported
            checkout(held, app, sha)
            outcome = slots.serve(held, app, sha, lambda name, reason="": nullcontext())
    except OpsError as exc:
        if exc.keeps_lock:
            raise
        return False
    if not outcome.gate.passed:
        report_failed_gate(reporter, outcome.gate)
    elif outcome.warning:
        reporter.info(f"  warning: {outcome.warning}")
    return outcome.gate.passed
