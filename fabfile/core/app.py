"""The application on the server: its checkout, its Compose stack, its health.

Deploy and rollback both move the app between releases; this module holds the
moves they share, each one round trip:

    preflight      the release log, the checkout, the env file, Docker, the
                   database container and disk, read at once and checked
                   before anything changes
    fetch_sha      git fetch + resolve the wanted sha (unknown sha -> exit 2)
    checkout       the sha in the app directory (what builds and compose read)
    health_gate    poll a slot's /health until 200 or the deadline; on failure, why

Which api slot serves and how a release moves between slots is core/slots.py; the
deploy lock a release runs under and what a cut-off run leaves behind, core/cutoff.py.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from . import database_location, redact, slots, state, templates
from .batch import ProbeResult, gather
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
    disk_free_percent_min: int
    data_dir: str = "/opt/coachntt/data"
    # A backup starts only with the last one's size plus this much free in backup.dir.
    backup_min_free_mb: int = 64
    # The api's two slots (compose services api_a, api_b) publish these loopback ports (core/slots.py).
    slot_ports: tuple[int, int] = (8000, 8002)
    drain_seconds: int = 30

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
            data_dir=s.require("app.data_dir"),
            backup_min_free_mb=int(s.get("backup.min_free_mb", 64)),
            slot_ports=(int(s.require("cutover.port_a")), int(s.require("cutover.port_b"))),
            drain_seconds=int(s.require("cutover.drain_seconds")),
        )

    @property
    def env_path(self) -> str:
        return f"{self.dir}/{self.env_file}"

    def in_dir(self, command: str) -> str:
        return f"cd {shlex.quote(self.dir)} && {command}"

    def compose(self, args: str, sha: str = "") -> str:
        """`docker compose` with our files; APP_VERSION tags the api image by release,
        API_A_PORT / API_B_PORT are the slots' ports (always given: a slot's definition
        must not change between two commands, or compose would recreate it)."""
        files = " ".join(f"-f {shlex.quote(f)}" for f in self.compose_files)
        ports = f"API_A_PORT={int(self.slot_ports[0])} API_B_PORT={int(self.slot_ports[1])} "
        version = f"APP_VERSION={shlex.quote(sha)} " if sha else ""
        # --ansi never: compose's progress escapes would garble logs we print.
        return self.in_dir(f"{ports}{version}docker compose --ansi never {files} {args}")


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


# The checkout is the image's build context: COPY keeps its modes and the app runs as an
# unprivileged user in its container, so code must be world-readable whatever the
# login's umask is (secure's OS baseline sets 027). Secrets get their own modes.
CODE_UMASK = "umask 022"


def checkout(target: Target, app: App, sha: str) -> None:
    """`sha` in the app directory: builds and compose read it, `deploy.status` shows it."""
    target.run(app.in_dir(f"{CODE_UMASK} && git checkout --quiet --force --detach {shlex.quote(sha)}"), user=app.owner, timeout=300)


@dataclass(frozen=True)
class GateResult:
    passed: bool
    responses: list[str]
    logs: str = ""


def health_gate(target: Target, app: App, *, url: str, service: str, deadline: int | None = None) -> GateResult:
    """Poll `url` (a slot's /health, core/slots.py); on failure also fetch the last log
    lines of its compose `service` (same round trip)."""
    script = shlex.quote(templates.script("health-gate.sh"))
    limit = deadline if deadline is not None else app.health_deadline
    result = target.run(
        f"sh -c {script} health-gate {shlex.quote(url)} {shlex.quote(str(limit))} {shlex.quote(str(app.health_interval))}"
        f" || {{ status=$?; echo '--- api logs ---'; {app.compose('logs --no-color --tail 20 ' + shlex.quote(service))} 2>&1; "
        "exit $status; }",
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
    layout: slots.Layout

    @property
    def database_elsewhere(self) -> str:
        """'HOST:PORT' when DATABASE_URL names another host (an app host of a layout whose
        database runs on roles.db), '' when the database container runs here."""
        return database_location.elsewhere(self.facts["database"])


def release_probes(app: App) -> dict[str, str]:
    directory = shlex.quote(app.dir)
    return {
        **slots.probes(app),
        "nginx": "systemctl is-active --quiet nginx",
        "log": state.read_log_command(app.state_dir),
        "head": f"git -C {directory} rev-parse HEAD",
        "env": f"test -f {shlex.quote(app.env_path)}",
        "docker": "docker info --format '{{.ServerVersion}}'",
        "database": database_location.probe(app),
        "disk": f"df -P {directory} {shlex.quote(app.backup_dir)} | awk 'NR > 1 {{print $6, $5}}'",
    }


def release_facts(target: Target, app: App) -> HostState:
    """The release log, the checkout and the preconditions of a release, in one round trip."""
    facts = gather(target, release_probes(app), sudo=False)
    log = state.parse_log(facts["log"].stdout)
    return HostState(log, facts["head"].stdout.strip() if facts["head"].ok else "", facts, slots.layout_from(facts, app))


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
        return ConfigError(f"{app.env_path} is missing on {where}",
                           "restore it from your backup (its secrets belong to the database), or run `deploy.setup` on a new host")
    if not facts["docker"].ok or not facts["docker"].stdout.strip():
        return OpsError(f"Docker is not answering on {where}", "start it (`sudo systemctl start docker`) and rerun; nothing changed")
    elsewhere = host.database_elsewhere
    if elsewhere and not facts["database"].ok:
        return OpsError(f"the database at {elsewhere} (DATABASE_URL) does not answer from {where}",
                        "check the db host (`monitor.check` on it) and the private network between them; nothing changed")
    if not elsewhere and state.current_release(host.log) and not facts["database"].ok:
        return OpsError(f"the database container {app.db_container} is not answering on {where}, but releases exist",
                        "start it (`docker compose up -d postgres` in the app directory) and rerun; nothing changed")
    if not (host.layout.include and host.layout.site_uses_slots):
        return ConfigError(f"nginx on {where} does not send the api through the slot upstream ({slots.UPSTREAM_FILE})",
                           "run `nginx` first: releases switch nginx between the api's two slots; nothing changed")
    if not facts["nginx"].ok:
        return OpsError(f"nginx is not running on {where}", "start it (`sudo systemctl start nginx`) and rerun; nothing changed")
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
