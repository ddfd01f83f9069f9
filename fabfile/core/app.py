"""The application on the server: its checkout, its Compose stack, its health.

Deploy and rollback both move the app between releases; this module holds the
moves they share, each one round trip:

    fetch_sha      git fetch + resolve the wanted sha (unknown sha -> exit 2)
    switch_to      checkout the sha, (re)create the containers
    health_gate    poll /health until 200 or the deadline; on failure, why
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from . import redact, state, templates
from .batch import gather
from .errors import ConfigError, OpsError, UsageError
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
    target.run(app.in_dir(f"git checkout --quiet --detach {shlex.quote(sha)}"), user=app.owner)
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


def release_facts(target: Target, app: App) -> tuple[state.ReleaseLog, str]:
    """The release log (well-formed entries only) and the checked-out sha, in one round trip."""
    facts = gather(target, {
        "log": state.read_log_command(app.state_dir),
        "head": f"git -C {shlex.quote(app.dir)} rev-parse HEAD",
    }, sudo=False)
    return state.parse_log(facts["log"].stdout), facts["head"].stdout.strip() if facts["head"].ok else ""


def report_failed_gate(reporter, gate: GateResult) -> None:
    """What the service really said: the last health responses and the api's last log lines."""
    reporter.info("  last health responses:")
    for line in gate.responses[-5:]:
        reporter.info(f"    {line}")
    if gate.logs:
        reporter.info("  api container, last log lines:")
        for line in gate.logs.splitlines()[-20:]:
            reporter.info(f"    {line}")


def gate_and_record(target: Target, reporter, app: App, release: state.Release, failure: OpsError) -> None:
    """Health gate, then the release's log entry with its result; a failed gate
    shows what the service said and raises `failure`."""
    gate = health_gate(target, app)
    release.result, release.finished = (state.RESULT_OK if gate.passed else state.RESULT_FAILED), state.now()
    state.append(target, app.state_dir, release)
    if not gate.passed:
        report_failed_gate(reporter, gate)
        raise failure
