"""staging: the release production is about to get, run first on its own copy beside it.

Runbook (`fab -H coachntt@HOST staging.deploy --sha <sha>`):
    0. facts            one round trip: staging set up (staging.dir), its checkout, its env
                        file, Docker, nginx serving domains.staging, the certificate
       skipped          staging.enabled false, or never set up (no staging.dir): said, exit 0
       preflight        checkout or env file missing, nginx not serving staging, a name
                        shared with production: one line, exit 2, nothing changed
    1. fetch            git fetch in staging.dir; the sha must exist (else exit 2)
    2. checkout + build exactly that sha; the compose override regenerated; image
                        coachntt-staging/api:<sha> (never a tag production runs)
    3. database up      staging's own PostgreSQL (staging.db_container, its own volume)
    4. migrate          python -m scripts.migrate against staging's database
    5. start            api_a of project staging.project on upstreams.staging (127.0.0.1:8001)
    6. health gate      /health there: 200 before app.health_deadline
    7. smoke            GET staging.smoke_path through nginx as domains.staging (HTTPS,
                        verified, once the certificate names it): 200
    the same sha again  when staging runs it already (checkout, container, override):
                        only 6 and 7, every step `ok`
    on failure          one line naming the phase and that production was not touched,
                        exit 1; staging keeps what it runs (it is staging)

Every compose command is `docker compose -p <staging.project>` with the app's files plus
the generated override (core/staging.py): none names production's project, containers,
network, volume, image or ports, so production's containers are never recreated.
`staging.setup` prepares a host once (checkout, env file with generated secrets),
`staging.status` shows what staging runs and whether it answers.

For `release` (fabfile/release.py), before production:

    deploy_staging(target, settings, sha, reporter, where="") -> StagingResult

    StagingResult.status   "ok", or "skipped" with .reason (print it: staging off or never set up)
    .sha .health .smoke    the full sha staging runs, "200 on <url>", "200 GET <url>"
    .seconds               how long staging took
    raises OpsError        staging failed (exit 1) or is not ready (ConfigError, exit 2): one
                           line that says production was not touched; connection errors as ever
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from invoke import Collection

from .core import staging as plan
from .core.app import checkout, fetch_sha, health_gate, report_failed_gate, validate_sha
from .core.batch import gather
from .core.errors import ConfigError, OpsError
from .core.remote import write_file_command
from .core.settings import Settings
from .core.staging import SERVICE, UNTOUCHED, Staging, StagingApp
from .core.steps import Change, Facts, Plan, Reporter, Step
from .core.target import Target
from .core.task import ops_task
from .deploy_setup import checkout_step, env_file_step

OK, SKIPPED = "ok", "skipped"


@dataclass(frozen=True)
class StagingResult:
    status: str  # ok | skipped
    sha: str = ""
    reason: str = ""  # why it was skipped
    health: str = ""
    smoke: str = ""
    seconds: float = 0.0

    @property
    def skipped(self) -> bool:
        return self.status == SKIPPED

    def describe(self) -> str:
        if self.skipped:
            return f"staging skipped: {self.reason}"
        return f"staging ok: {self.sha[:12]}, health {self.health}, smoke {self.smoke} ({self.seconds:.0f}s)"


def deploy_staging(target: Target, settings: Settings, sha: str, reporter: Reporter, where: str = "") -> StagingResult:
    """`sha` on staging, gated and smoke-tested through nginx; production is never touched.
    Skipped (not an error) when staging is off or was never set up on this host."""
    started = time.monotonic()
    sha = validate_sha(sha)
    staging, where = Staging.from_settings(settings), where or target.label
    if not staging.enabled:
        return StagingResult(SKIPPED, sha, reason="staging.enabled is false")
    facts = gather(target, plan.probes(staging), sudo=False)
    skip = plan.not_set_up(staging, facts, where)
    if skip:
        return StagingResult(SKIPPED, sha, reason=skip)
    problem = plan.preflight_error(staging, facts, where)
    if problem:
        raise problem
    app, tls = staging.compose_app(), plan.uses_tls(staging, facts)
    override = plan.render_override(staging)
    current = {"phase": "fetch"}

    @contextmanager
    def phase(name: str, reason: str = "", *, changes: bool = True) -> Iterator[None]:
        """A reported step of staging; one that only reads or checks is `ok` when it passes."""
        current["phase"] = name
        if changes:
            with reporter.phase(f"staging {name}", reason=reason):
                yield
            return
        began = time.monotonic()
        try:
            yield
        except OpsError as exc:
            reporter.step(f"staging {name}", "failed", time.monotonic() - began, reason=exc.one_line())
            raise
        reporter.step(f"staging {name}", "ok", time.monotonic() - began, reason=reason)

    url = plan.smoke_url(staging, tls=tls)
    try:
        with phase("fetch", staging.dir, changes=False):
            sha = fetch_sha(target, app, sha)
        if plan.already_runs(staging, facts, sha, override):
            reporter.step("staging start", "ok", 0.0, reason=f"{sha[:12]} already runs in {staging.project}: checked only")
        else:
            ship(target, staging, app, sha, override, facts, phase)
        with phase("health gate", staging.health_url, changes=False):
            gate = health_gate(target, app, url=staging.health_url, service=SERVICE)
            if not gate.passed:
                report_failed_gate(reporter, gate)
                raise OpsError(f"/health did not answer 200 on 127.0.0.1:{staging.port} within {app.health_deadline}s")
        with phase("smoke", f"GET {url} through nginx", changes=False):
            answer = target.run(plan.smoke_command(staging, tls=tls), user=app.owner, check=False, timeout=60)
            # curl's error is its first line; advice on how to fix TLS follows it.
            code, why = answer.stdout.strip(), (answer.stderr.strip().splitlines() or [""])[0]
            if code != "200":
                said = code if code not in ("", "000") else f"nothing{' (' + why + ')' if why else ''}"
                raise OpsError(f"GET {url} through nginx answered {said}, not 200")
    except OpsError as exc:
        if exc.keeps_lock:
            raise
        raise failed(current["phase"], exc) from None
    return StagingResult(OK, sha, health=f"200 on {staging.health_url}", smoke=f"200 GET {url}",
                         seconds=round(time.monotonic() - started, 1))


def ship(target: Target, staging: Staging, app: StagingApp, sha: str, override: str, facts: Facts, phase: Callable) -> None:
    """A sha staging does not run yet: checkout + build, its database, migrations, its api slot."""
    with phase("checkout + build", f"{sha[:12]}, compose project {staging.project}"):
        if facts["override"].stdout.strip() != override.strip():
            owner = f"{app.owner}:{app.owner}"
            target.run(write_file_command(staging.override_path, override, "0644", owner), sudo=True, timeout=60)
        checkout(target, app, sha)
        target.run(plan.build_command(app, sha), user=app.owner, timeout=1800)
    with phase("database up", staging.db_container):
        target.run(app.compose("up -d --wait postgres", sha), user=app.owner, timeout=300)
    with phase("migrate", f"{staging.db_name} in {staging.db_container}"):
        target.run(app.compose(f"run --rm -T {SERVICE} python -m scripts.migrate", sha), user=app.owner, timeout=600)
    with phase("start", f"{SERVICE} of {staging.project} on 127.0.0.1:{staging.port}"):
        target.run(app.compose(f"up -d --no-deps {SERVICE}", sha), user=app.owner, timeout=600)


def failed(phase: str, exc: OpsError) -> OpsError:
    """One line: staging, its phase, what went wrong, production untouched; the cause's exit code."""
    error = OpsError(f"staging failed during {phase}: {exc.what}", f"{exc.hint + '; ' if exc.hint else ''}{UNTOUCHED}")
    error.exit_code = exc.exit_code
    return error


# -- tasks --------------------------------------------------------------------------


@ops_task(default=True, help={"sha": "commit to run on staging (default: tip of app.branch)"})
def deploy(ops, sha=""):
    """The sha on staging (own checkout, compose project, database), health-gated and smoke-tested through nginx."""
    if ops.dry:
        dry_run(ops, validate_sha(sha))
        return
    result = deploy_staging(ops.target, ops.settings, sha, ops.reporter, ops.where)
    ops.reporter.info(f"  {result.describe()}")


def dry_run(ops, sha: str) -> None:
    staging = Staging.from_settings(ops.settings)
    if not staging.enabled:
        ops.reporter.info("  staging skipped: staging.enabled is false")
        return
    facts = gather(ops.target, plan.probes(staging), sudo=False)
    skip = plan.not_set_up(staging, facts, ops.where)
    if skip:
        ops.reporter.info(f"  staging skipped: {skip}")
        return
    problem = plan.preflight_error(staging, facts, ops.where)
    url = plan.smoke_url(staging, tls=plan.uses_tls(staging, facts))
    ops.reporter.info(f"  would run {sha or 'origin/' + staging.app.branch} "
                      f"in {staging.dir} (project {staging.project}): fetch, checkout + build, database up "
                      f"({staging.db_container}), migrate, start on 127.0.0.1:{staging.port}, health gate, smoke GET {url}")
    if problem:
        ops.reporter.info(f"  but preflight refuses now: {problem.one_line()}")


def env_step(staging: Staging) -> Step:
    """deploy.setup's env file (make-env.sh: secrets generated on the server, never printed),
    then pointed at staging's own database name."""
    base = env_file_step(staging.compose_app())

    def plan_env(facts) -> Plan:
        planned = base.plan(facts)
        if not planned.changes:
            return planned
        made = planned.changes[0]
        return Plan.change(Change(f"{made.summary}, database {staging.db_name}",
                                  f"{made.command} && {plan.env_db_command(staging)}"))

    return Step("staging env file + secrets", probes=base.probes, plan=plan_env)


@ops_task
def setup(ops):
    """Prepare staging once: its own clone of app.repo in staging.dir, its env file with generated secrets."""
    staging = Staging.from_settings(ops.settings)
    if not staging.enabled:
        ops.reporter.info("  staging.enabled is false: nothing to set up")
        return
    shared = plan.collisions(staging)
    if shared:
        raise ConfigError(f"staging would share production's resources: {shared[0]}", "change the staging.* settings")
    clone = checkout_step(staging.compose_app())
    ops.run_steps([Step("staging checkout", probes=clone.probes, plan=clone.plan)])
    ops.run_steps([env_step(staging)])


@ops_task
def status(ops):
    """What staging runs, whether its /health and the smoke request through nginx answer 200."""
    staging = Staging.from_settings(ops.settings)
    if not staging.enabled:
        ops.reporter.info("  staging    off (staging.enabled is false)")
        return
    probes = {**plan.probes(staging),
              "health": f"curl -s -m 5 -w '\\n%{{http_code}}' {shlex.quote(staging.health_url)}",
              "smoke_http": plan.smoke_command(staging, tls=False), "smoke_tls": plan.smoke_command(staging, tls=True)}
    facts = gather(ops.target, probes, sudo=False)
    skip = plan.not_set_up(staging, facts, ops.where)
    if skip:
        ops.reporter.info(f"  staging    {skip}")
        return
    tls = plan.uses_tls(staging, facts)
    body, _, code = facts["health"].stdout.rpartition("\n")
    try:
        version = str(json.loads(body).get("version", ""))
    except (ValueError, AttributeError):
        version = ""
    smoke = facts["smoke_tls" if tls else "smoke_http"].stdout.strip() or "000"
    ops.reporter.info(f"  checkout   {staging.dir} at {facts['head'].stdout.strip()[:12] or 'no checkout'}")
    ops.reporter.info(f"  project    {staging.project} ({staging.db_container}, volume {staging.volume})")
    for service, container in sorted(plan.slots.parse_containers(facts["containers"].stdout).items()):
        ops.reporter.info(f"  container  {service} {container.state} {container.sha[:12]}")
    ops.reporter.info(f"  health     HTTP {code.strip() or '000'} on {staging.health_url}"
                      + (f" (version {version[:12]})" if version else ""))
    ops.reporter.info(f"  smoke      HTTP {smoke} GET {plan.smoke_url(staging, tls=tls)} through nginx")
    problem = plan.preflight_error(staging, facts, ops.where)
    if problem:
        raise problem
    if code.strip() != "200" or smoke != "200":
        raise OpsError(f"staging on {ops.where} is not healthy", "see `staging.status` above; `staging.deploy` puts a release there")


ns = Collection("staging")
ns.add_task(deploy, default=True)
ns.add_task(setup)
ns.add_task(status)
