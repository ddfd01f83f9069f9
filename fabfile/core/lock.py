"""The deploy lock, and the work done under it where the client cannot cut it.

The lock is a directory in the state directory on the server (mkdir is atomic):

    deploy.lock/info          holder, since, sha, message, and this run's token
    deploy.lock/release.json  the release being made, as its log line would read if cut off now
    deploy.lock/job.*         the phase running now: name, pid, output, exit status

Every command a release runs under the lock goes through scripts/deploy-lock.sh:
the phase runs in its own session on the server, so Ctrl-C, a killed CI job or
a cut connection never stops a migration halfway. The lock is released only by
the run that holds it (its token) and only when no phase still runs; a run that
is cut off leaves the lock held with its phase, for `deploy.recover`.

A release ends in one command (deploy-lock.sh finish): its log entry appended
and the lock freed together, so a client that dies never leaves a finished
release logged under a held lock. Until then the entry waits on the client
(HeldLock.log), and any phase run after it records that entry, not an
interruption, if the client is gone: `deploy.recover` then only frees the lock.
"""

from __future__ import annotations

import secrets
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from . import state, templates
from .errors import ConnectionLost, LockHeldError, OpsError, RemoteCommandError, from_connection_failure
from .target import Result, Target, command_failed

LOCK_SCRIPT = f"sh -c {shlex.quote(templates.script('deploy-lock.sh'))} deploy-lock"
# A phase with no timeout of its own still ends: nothing under the lock runs forever.
DEFAULT_PHASE_TIMEOUT = 600
# The waiter gets this much longer than the phase, so the server's timeout speaks first.
CLIENT_MARGIN = 60


def status_command(state_dir: str) -> str:
    return f"{LOCK_SCRIPT} status {shlex.quote(state_dir)}"


@dataclass(frozen=True)
class LockInfo:
    """What `deploy-lock.sh status` says about a held lock."""

    holder: str = "unknown"
    since: str = "?"
    sha: str = ""
    message: str = ""
    token: str = ""
    job: str = "none"  # running | finished | none
    phase: str = ""
    recorded: bool = False
    client_left: bool = False
    client_connected: bool = False
    release: state.Release | None = None

    @classmethod
    def parse(cls, text: str) -> LockInfo:
        fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        inflight = state.parse_log(fields.get("release", ""))
        return cls(
            holder=fields.get("holder", "unknown"), since=fields.get("since", "?"), sha=fields.get("sha", ""),
            message=fields.get("message", ""), token=fields.get("token", ""), job=fields.get("job", "none"),
            phase=fields.get("phase", ""),
            recorded=fields.get("recorded") == "yes", client_left=fields.get("client_left") == "yes",
            client_connected=fields.get("client") == "connected",
            release=inflight[0] if inflight else None,
        )

    @property
    def finished(self) -> bool:
        """The release under the lock had its final entry (ok or failed): nothing to undo."""
        return self.release is not None and self.release.result in (state.RESULT_OK, state.RESULT_FAILED)

    def describe(self) -> str:
        work = {"running": f", phase '{self.phase}' still running", "finished": f", stopped after phase '{self.phase}'"}
        return f"{self.holder} since {self.since} (sha {self.sha[:12] or '?'}{work.get(self.job, '')})"


def read(target: Target, state_dir: str) -> LockInfo | None:
    result = target.run(status_command(state_dir), check=False, timeout=30)
    return LockInfo.parse(result.stdout) if result.ok else None


class HeldLock(Target):
    """The lock this run holds. As a Target, it runs every command as a phase
    job on the server (deploy-lock.sh run), so callers need not know about it."""

    def __init__(self, target: Target, state_dir: str, token: str):
        super().__init__()
        self.target, self.state_dir, self.token = target, state_dir, token
        self.label, self.login_user, self.is_root = target.label, target.login_user, target.is_root
        self.phase = "start"
        self.release: state.Release | None = None
        self.final: list[state.Release] = []  # written as the lock is freed (release_lock)

    def log(self, entry: state.Release) -> None:
        """The release's final log entry: appended by the same command that frees the lock."""
        self.final.append(entry)

    def interrupted_entry(self, status: str = "@STATUS@") -> str:
        """The log line(s) for this release if it is cut off in the current phase: its
        final entry once it has one (the release had finished), else an interruption."""
        if self.final:
            return "\n".join(entry.to_json() for entry in self.final)
        if self.release is None:
            return ""
        return replace(
            self.release, result=state.RESULT_INTERRUPTED, phase=self.phase, finished="@FINISHED@",
            message=f"cut off during {self.phase}; the phase ended on the server with exit {status}",
        ).to_json()

    def run(self, command: str, *, sudo: bool = False, user: str = "", check: bool = True, timeout: int | None = None) -> Result:
        limit = timeout or DEFAULT_PHASE_TIMEOUT
        job = (f"{LOCK_SCRIPT} run {shlex.quote(self.state_dir)} {shlex.quote(self.phase)} {limit} "
               f"{shlex.quote(self.interrupted_entry())} {shlex.quote(command)}")
        try:
            outcome = self.target.run(job, sudo=sudo, user=user, check=False, timeout=limit + CLIENT_MARGIN)
        except RemoteCommandError as exc:
            # Only the client gave up (the server ends the phase at `limit`): it may still run there.
            raise self.lost(str(exc.what)) from None
        except OpsError:
            raise
        except Exception as exc:  # the connection died under us (socket, SSH transport)
            if from_connection_failure(exc, self.label) is None:
                raise
            raise self.lost(str(exc) or type(exc).__name__) from None
        result = Result(command, outcome.stdout, outcome.stderr.strip(), outcome.exit_status)
        if check and not result.ok:
            raise command_failed(result, self.label)
        return result

    def lost(self, why: str) -> ConnectionLost:
        return ConnectionLost(f"lost contact with {self.label} during {self.phase} ({why})",
                              "the phase goes on on the server under the deploy lock; when the host answers, "
                              "run `deploy.recover` to settle it and free the lock")

    def wait_for_phase(self, seconds: int) -> LockInfo:
        """Let the phase running now finish on the server (bounded); the lock's state after."""
        self.target.run(f"{LOCK_SCRIPT} wait {shlex.quote(self.state_dir)} {int(seconds)}", check=False, timeout=seconds + 30)
        return read(self.target, self.state_dir) or LockInfo()

    def abandon(self) -> None:
        """This client leaves: the release is recorded as interrupted now, or by
        the running phase when it ends. The lock stays held."""
        self.target.run(f"{LOCK_SCRIPT} abandon {shlex.quote(self.state_dir)} {shlex.quote(self.interrupted_entry('-'))}",
                        check=False, timeout=15)

    def release_lock(self) -> None:
        """Free the lock, appending the final entry (if any) in the same command."""
        result = self.target.run(finish_command(self.state_dir, self.token, self.final), check=False, timeout=30)
        if result.exit_status == 5:
            entry = self.final[0] if self.final else None
            unlogged = f"; {entry.sha[:12]}'s {entry.result} entry was not written to the release log" if entry else ""
            raise LockHeldError(f"the deploy lock was taken from this run: {LockInfo.parse(result.stderr).describe()}",
                                f"someone broke it while this release ran; check `deploy.status` and `deploy.history`{unlogged}")
        if not result.ok:
            raise command_failed(result, self.label, what="releasing the deploy lock")
        self.final = []


def finish_command(state_dir: str, token: str, entries: list[state.Release]) -> str:
    """One command: the entries appended to the release log and the lock freed, if the lock is ours."""
    lines = "\n".join(entry.to_json() for entry in entries)
    return f"{LOCK_SCRIPT} finish {shlex.quote(state_dir)} {shlex.quote(token)} {shlex.quote(lines)}"


@contextmanager
def deploy_lock(target: Target, state_dir: str, sha: str, message: str, *, wait: int = 0) -> Iterator[HeldLock]:
    """Hold the deploy lock for the block.

    Released when the block ends or raises an OpsError (its failure is
    recorded by then); kept when the block is cut off (Ctrl-C, a lost
    connection, an error that `keeps_lock`), because a phase may still run.
    `wait` seconds: keep asking (every 2 s) while another release holds it.
    """
    token = secrets.token_hex(8)
    acquire = (f"{LOCK_SCRIPT} acquire {shlex.quote(state_dir)} {shlex.quote(token)} "
               f"{shlex.quote(state.operator())} {shlex.quote(sha)} {shlex.quote(message)}")
    deadline = time.monotonic() + wait
    result = target.run(acquire, check=False, timeout=30)
    while result.exit_status == 4 and time.monotonic() < deadline:
        time.sleep(2)
        result = target.run(acquire, check=False, timeout=30)
    if result.exit_status == 4:
        raise held_error(LockInfo.parse(result.stdout))
    if not result.ok:
        raise command_failed(result, target.label, what="taking the deploy lock")
    held = HeldLock(target, state_dir, token)
    try:
        yield held
    except OpsError as exc:
        if not exc.keeps_lock:
            held.release_lock()
        raise
    held.release_lock()


def held_error(info: LockInfo) -> LockHeldError:
    if info.job == "running":
        hint = "wait for it (--lock-wait N) or follow it with `deploy.status`"
    elif info.finished:
        hint = "its client is gone after the release finished: run `deploy.recover` to log it and free the lock"
    elif info.release is not None:
        hint = "its client is gone and the release is half done: run `deploy.recover`"
    else:
        hint = "its client is gone and nothing runs under it: run `deploy.recover` (or rerun with --break-lock)"
    return LockHeldError(f"deploy lock held by {info.describe()}", hint)


def break_stale(target: Target, state_dir: str) -> None:
    """--break-lock: remove a lock whose holder is gone, never one whose work still
    runs, never one over a half-done release (that needs `deploy.recover`)."""
    info = read(target, state_dir)
    if info is None:
        return
    if info.job == "running" or info.release is not None:
        raise held_error(info)
    result = target.run(f"{LOCK_SCRIPT} break {shlex.quote(state_dir)}", check=False, timeout=30)
    if result.exit_status == 4:
        raise held_error(LockInfo.parse(result.stdout))
    if not result.ok:
        raise command_failed(result, target.label, what="breaking the deploy lock")


def adopt(target: Target, state_dir: str) -> tuple[HeldLock, LockInfo] | None:
    """Take over the lock of a run that is gone (for `deploy.recover`)."""
    info = read(target, state_dir)
    if info is None:
        return None
    held = HeldLock(target, state_dir, info.token)
    held.release, held.phase = info.release, info.phase or "start"
    return held, info
