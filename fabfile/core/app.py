"""The application on the server: its checkout, its Compose stack, its health.

Deploy and rollback both move the app between releases; this module holds the
moves they share, each one round trip:

    preflight      the release log, the checkout, the env file, Docker, the
                   database container and disk, read at once and checked
                   before anything changes
    fetch_sha      git fetch + resolve the wanted sha (unknown sha -> exit 2)
    switch_to      checkout the sha, (re)create the containers
    health_gate    poll /health until 200 or the deadline; on failure, why
    release_lock   the deploy lock, and what a cut-off run leaves behind:
                   settle() puts back a release that serves and records it
"""

from __future__ import annotations

import re
import shlex
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from . import lock, redact, state, templates
from .batch import ProbeResult, gather
from .errors import ConfigError, Interrupted, LeftRunning, OpsError, Stop, UsageError, from_connection_failure
from .settings import Settings
from .target import Target, command_failed

_SHA = re.compile(r"^[0-9a-f]{7,40}$")
_FULL_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1 or SHA-256 repositories


def validate_sha(sha: str, flag: str = "--sha") -> str:
    """Fail before connecting when the sha cannot be a commit id."""
    if sha and not _SHA.match(sha):
        raise UsageError(f"{flag} must be a commit id (7-40 hex digits), got '{sha}'", "copy it from `git log` or the release log")
    return sha


@dataclass(frozen=True)
class App:
    dir: str
    repo: str
    branch: str
    compose_files: tuple[str, ...]
    env_file: str
    health_url: str
    health_deadline: int
    health_interval: int
    state_dir: str
    backup_dir: str
    db_container: str
    db_user: str
    db_name: str
    owner: str
    disk_free_percent_min: int
    # A backup starts only with the last one's size plus this much free in backup.dir.
    backup_min_free_mb: int = 64

    @classmethod
    def from_settings(cls, s: Settings) -> App:
        overrides = s.get("app.compose_overrides") or []
        return cls(
            dir=s.require("app.dir"),
            repo=s.get("app.repo") or "",
            branch=s.require("app.branch"),
            compose_files=(s.require("app.compose_file"), *overrides),
            env_file=s.require("app.env_file"),
            health_url=s.require("app.health_url"),
            health_deadline=int(s.require("app.health_deadline")),
            health_interval=int(s.require("app.health_interval")),
            state_dir=s.require("state_dir"),
            backup_dir=s.require("backup.dir"),
            db_container=s.require("backup.db_container"),
            db_user=s.require("backup.db_user"),
            db_name=s.require("backup.db_name"),
            owner=s.require("deploy_user"),
            disk_free_percent_min=int(s.require("thresholds.disk_free_percent_min")),
            backup_min_free_mb=int(s.get("backup.min_free_mb", 64)),
        )

    def in_dir(self, command: str) -> str:
        return f"cd {shlex.quote(self.dir)} && {command}"

    def compose(self, args: str, sha: str = "") -> str:
        """`docker compose` with our files; APP_VERSION tags the api image by release."""
        files = " ".join(f"-f {shlex.quote(f)}" for f in self.compose_files)
        version = f"APP_VERSION={shlex.quote(sha)} " if sha else ""
        # --ansi never: compose's progress escapes would garble logs we print.
        return self.in_dir(f"{version}docker compose --ansi never {files} {args}")


# fetch_sha's own exit codes: the fetch failed, or it worked and the commit is not there.
FETCH_FAILED, NOT_FOUND = 90, 91


def fetch_sha(target: Target, app: App, sha: str) -> str:
    """Fetch from origin and resolve `sha` (default: the branch tip) to a full commit id.

    One round trip; a fetch that fails (network, deploy key) is exit 1, a commit
    missing after a good fetch is bad input (exit 2).
    """
    wanted = sha or f"origin/{app.branch}"
    result = target.run(
        app.in_dir(
            f"{{ if ! git fetch --quiet origin; then git remote get-url origin; exit {FETCH_FAILED}; fi; "
            f"git rev-parse --verify --quiet {shlex.quote(wanted + '^{commit}')} || exit {NOT_FOUND}; }}"
        ),
        check=False,
        user=app.owner,
    )
    # On a failed fetch the command prints origin's URL: name what we could not reach.
    fetched_from = result.stdout.strip() if result.exit_status == FETCH_FAILED else ""
    repo = redact.url(fetched_from or app.repo) or "origin"
    if result.exit_status == FETCH_FAILED:
        why = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "git fetch failed"
        raise OpsError(f"cannot fetch from {repo}: {why}", "check the network / deploy key")
    if result.exit_status == NOT_FOUND and sha:
        raise UsageError(f"unknown sha '{sha}': not found in {repo}", f"push it first, or pick one from `git log origin/{app.branch}`")
    if result.exit_status == NOT_FOUND:
        raise ConfigError(f"branch '{app.branch}' not found in {repo}", "check app.branch, or push the branch first")
    if not result.ok:
        raise command_failed(result, target.label, what=f"fetching in {app.dir}")
    full_sha = result.stdout.strip()
    if not _FULL_SHA.fullmatch(full_sha):
        raise OpsError(f"git answered {full_sha[:80]!r} for {wanted} in {app.dir}", "check the checkout by hand")
    return full_sha


def switch_to(target: Target, app: App, sha: str, *, recreate: bool = False) -> None:
    """Check out `sha` and bring the whole stack up on it."""
    flags = "--force-recreate " if recreate else ""
    target.run(app.in_dir(f"git checkout --quiet --force --detach {shlex.quote(sha)}"), user=app.owner, timeout=300)
    target.run(app.compose(f"up -d --remove-orphans {flags}", sha), user=app.owner, timeout=600)


@dataclass(frozen=True)
class GateResult:
    passed: bool
    responses: list[str]
    logs: str = ""


def health_gate(target: Target, app: App, *, deadline: int | None = None) -> GateResult:
    """Poll /health; on failure also fetch the api's last log lines (same round trip)."""
    script = shlex.quote(templates.script("health-gate.sh"))
    url, limit = shlex.quote(app.health_url), deadline if deadline is not None else app.health_deadline
    result = target.run(
        f"sh -c {script} health-gate {url} {shlex.quote(str(limit))} {shlex.quote(str(app.health_interval))}"
        f" || {{ status=$?; echo '--- api logs ---'; {app.compose('logs --no-color --tail 20 api')} 2>&1; exit $status; }}",
        check=False,
        user=app.owner,
        timeout=limit + 120,
    )
    responses, _, logs = result.stdout.partition("--- api logs ---")
    return GateResult(result.ok, responses.strip().splitlines(), logs.strip())


@dataclass(frozen=True)
class HostState:
    """What a release needs to know before it changes anything (one round trip)."""

    log: state.ReleaseLog
    head: str
    facts: dict[str, ProbeResult]


def release_probes(app: App) -> dict[str, str]:
    directory = shlex.quote(app.dir)
    return {
        "log": state.read_log_command(app.state_dir),
        "head": f"git -C {directory} rev-parse HEAD",
        "env": f"test -f {shlex.quote(app.dir + '/' + app.env_file)}",
        "docker": "docker info --format '{{.ServerVersion}}'",
        # pg_isready inside the container: a paused or wedged PostgreSQL fails this too.
        "database": f"docker exec {shlex.quote(app.db_container)} pg_isready -q -t 3 "
                    f"-U {shlex.quote(app.db_user)} -d {shlex.quote(app.db_name)}",
        "disk": f"df -P {directory} {shlex.quote(app.backup_dir)} | awk 'NR > 1 {{print $6, $5}}'",
    }


def release_facts(target: Target, app: App) -> HostState:
    """The release log, the checkout and the preconditions of a release, in one round trip."""
    facts = gather(target, release_probes(app), sudo=False)
    log = state.parse_log(facts["log"].stdout)
    return HostState(log, facts["head"].stdout.strip() if facts["head"].ok else "", facts)


def preflight_error(host: HostState, app: App, where: str) -> OpsError | None:
    """Why a release must not start here, or None. Pure: tested as data.

    Whether this is the first release comes from the release log, never from
    a missing container: a database that should be there and is not stops
    the release before anything changes.
    """
    facts = host.facts
    if not facts["head"].ok:
        return ConfigError(f"no checkout in {app.dir} on {where}", "run `deploy.setup` first")
    if not facts["env"].ok:
        return ConfigError(f"{app.dir}/{app.env_file} is missing on {where}",
                           "restore it from your backup (its secrets belong to the database), or run `deploy.setup` on a new host")
    if not facts["docker"].ok or not facts["docker"].stdout.strip():
        return OpsError(f"Docker is not answering on {where}", "start it (`sudo systemctl start docker`) and rerun; nothing changed")
    if state.current_release(host.log) and not facts["database"].ok:
        return OpsError(f"the database container {app.db_container} is not answering on {where}, but releases exist",
                        "start it (`docker compose up -d postgres` in the app directory) and rerun; nothing changed")
    for line in facts["disk"].lines:  # "<mount> <used>%"
        mount, _, used = line.rpartition(" ")
        if not used.rstrip("%").isdigit():
            continue
        free = 100 - int(used.rstrip("%"))
        if free < app.disk_free_percent_min:
            return OpsError(f"only {free}% free on {mount} on {where} (below {app.disk_free_percent_min}%)",
                            "free space (old images: `docker image prune`, old backups) and rerun; nothing changed")
    return None


def report_failed_gate(reporter, gate: GateResult) -> None:
    """What the service really said: the last health responses and the api's last log lines."""
    reporter.info("  last health responses:")
    for line in gate.responses[-5:]:
        reporter.info(f"    {line}")
    if gate.logs:
        reporter.info("  api container, last log lines:")
        for line in gate.logs.splitlines()[-20:]:
            reporter.info(f"    {line}")


def gate_and_record(target: Target, reporter, app: App, release: state.Release, failure: OpsError,
                    *, log_target: Target | None = None) -> None:
    """Health gate, then the release's log entry with its result; a failed gate
    shows what the service said and raises `failure`."""
    gate = health_gate(target, app)
    release.result, release.finished = (state.RESULT_OK if gate.passed else state.RESULT_FAILED), state.now()
    if not gate.passed:
        release.phase = "health gate"
    state.append(log_target or target, app.state_dir, release)
    if not gate.passed:
        report_failed_gate(reporter, gate)
        raise failure


# -- a release cut off halfway ------------------------------------------------------


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
    if held.release is None:  # nothing has changed yet: let a running read end, free the lock
        try:
            settle(ops.target, ops.reporter, app, held, held.wait_for_phase(60))
        except (KeyboardInterrupt, Exception):
            leave_now(ops, held, phase)
        raise Interrupted(f"interrupted during {phase}, before anything changed", "rerun when ready") from None
    if not isinstance(stop, Stop):
        ops.reporter.info(f"  interrupted: letting '{phase}' finish on the server, then putting back what served before "
                          "(Ctrl-C again to leave now)")
        try:
            info = held.wait_for_phase(3600)
            _, outcome = settle(ops.target, ops.reporter, app, held, info)
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


def settle(target: Target, reporter, app: App, held: lock.HeldLock, info: lock.LockInfo) -> tuple[bool, str]:
    """After a cut-off release (its phase has ended): put back a release that
    serves — the one before a deploy, the target of a rollback — gate it,
    log what happened, free the lock. Returns (healthy, what it did in words)."""
    release, phase = held.release, info.phase or held.phase
    if release is None:
        held.release_lock()
        return True, "nothing had changed"
    goal = release.sha if release.kind == "rollback" else release.previous
    entry = replace(release, result=state.RESULT_INTERRUPTED, phase=phase, finished=state.now(),
                    message=f"interrupted during {phase}")
    passed = False
    if goal:
        held.phase = "recover"
        with reporter.phase(f"put back {goal[:12]}"):
            switch_to(held, app, goal)
            gate = health_gate(held, app)
        passed = gate.passed
        if not passed:
            report_failed_gate(reporter, gate)
    if release.kind == "rollback":
        entry.result = state.RESULT_OK if passed else state.RESULT_FAILED
        entry.message = f"finished after an interruption during {phase}"
    elif passed:
        entry.rolled_back_to = goal
    if info.recorded and release.kind != "rollback":
        # The interruption is in the log already: add the way back to it.
        entry = state.Release(sha=goal, kind="rollback", previous=release.sha, who=state.operator(), started=entry.finished,
                              finished=state.now(), result=state.RESULT_OK if passed else state.RESULT_FAILED,
                              message=f"recover: put back after {release.sha[:12]} was interrupted during {phase}")
    if goal or not info.recorded:
        state.append(target, app.state_dir, entry)
    held.release_lock()
    if not goal:
        return False, f"nothing served before {release.sha[:12]}: deploy again"
    if passed:
        return True, f"{goal[:12]} is back and healthy"
    return False, f"{goal[:12]} is back but /health does not answer 200: check `deploy.status` and the api logs now"
