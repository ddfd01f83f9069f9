"""monitor.stack: Prometheus, Grafana and the exporters beside the app, on loopback only.

Runbook (`fab -H coachntt@HOST monitor.stack [--show-password]`):
    0. preflight           Docker and compose answer, the app's network and env file exist
                           (deploy the app first), nginx is installed (`deps`): else nothing
                           changes
    1. directories         monitor.stack.dir (/opt/coachntt-monitoring), secrets/ mode 700
    2. grafana password    generated ON the server once (mode 600, Grafana's uid): never
                           sent from here, never overwritten, never printed
    3. exporter login      postgres-exporter.env (mode 600) derived on the server from the
                           app's env file; rewritten only when that changes
    4. compose project     configs/monitoring/docker-compose.monitoring.yml (pinned images,
                           limits, 127.0.0.1 only) and grafana.env (metrics.<domain>)
    5. prometheus config   scrape targets and alert rules rendered from thresholds.*;
                           checked with promtool before they stay, then reloaded (SIGHUP).
                           Job `api` scrapes both api slots (cutover.port_a/port_b): the
                           idle one is stopped after a cutover, so it is down, and that is
                           normal; the alerts judge the job (no slot up, 5xx summed)
    6. grafana files       datasource and the dashboard, provisioned (grafana restarted)
    7. nginx stub_status   on 127.0.0.1:8081 for the nginx exporter (nginx -t, reload)
    8. stack up            `docker compose up -d` only when a service is missing, stopped or
                           its configuration changed (facts read again after 1-7)
    9. verify              on the server, through Prometheus' HTTP API: every job has a
                           target up (for the api: the live slot), the loaded rules carry
                           the configured thresholds; Grafana answers
nginx serves Grafana at metrics.<domain> (the `nginx` task; TLS once `ssl.issue` made it:
rerun monitor.stack then, so grafana.env gives Grafana its https address).
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass

from .core import prometheus, redact, remote, slots, templates
from .core.batch import gather
from .core.errors import ConfigError, OpsError
from .core.settings import Settings
from .core.steps import Change, Facts, Plan, Step
from .core.task import ops_task

COMPOSE_FILE = "docker-compose.monitoring.yml"
PROJECT = "coachntt-monitoring"
# The app's compose network (examples/app/docker-compose.prod.yml); the postgres exporter joins it.
APP_NETWORK = "coachntt"
# Where Grafana listens (docker-compose.monitoring.yml): nginx's metrics upstream must be it.
GRAFANA_ADDRESS = "127.0.0.1:3000"
# Grafana's user in its container (compose `user: "472:0"`): it reads the password file.
GRAFANA_OWNER = "472:0"
PASSWORD_FILE = "secrets/grafana_admin_password"
EXPORTER_ENV = "postgres-exporter.env"
# The hash of the configuration compose resolved when the stack was last brought up.
APPLIED = ".stack-applied"
SERVICES = ("prometheus", "grafana", "node-exporter", "nginx-exporter", "postgres-exporter")
JOBS = ("prometheus", "api", "node", "postgres", "nginx")
NGINX_STATUS_FILE = "/etc/nginx/conf.d/coachntt-status.conf"


@dataclass(frozen=True)
class Stack:
    """monitor.stack's settings, read once."""

    dir: str
    overrides: tuple[str, ...]
    app_env: str
    db_host: str
    api: tuple[str, ...]  # the api slots' addresses, both scraped (job api)
    domain: str
    thresholds: dict
    owner: str
    verify_deadline: int

    @classmethod
    def from_settings(cls, s: Settings) -> Stack:
        if s.require("upstreams.metrics") != GRAFANA_ADDRESS:
            raise ConfigError(f"upstreams.metrics is '{s.require('upstreams.metrics')}', but Grafana listens on {GRAFANA_ADDRESS}",
                              f"set COACHNTT_UPSTREAMS__METRICS={GRAFANA_ADDRESS} (configs/monitoring/{COMPOSE_FILE} binds it)")
        return cls(
            dir=s.require("monitor.stack.dir").rstrip("/"),
            overrides=tuple(s.get("monitor.stack.compose_overrides") or ()),
            app_env=f"{s.require('app.dir').rstrip('/')}/{s.require('app.env_file')}",
            db_host=s.require("backup.db_container"),
            api=tuple(slot.address for slot in slots.slots_of_ports(int(s.require("cutover.port_a")),
                                                                     int(s.require("cutover.port_b")))),
            domain=s.require("domains.metrics"),
            thresholds={
                "disk_free": int(s.require("thresholds.disk_free_percent_min")),
                "memory_used": int(s.require("thresholds.memory_used_percent_max")),
                "cpu": int(s.require("thresholds.cpu_percent_max")),
                "error_rate": int(s.require("thresholds.error_rate_percent_max")),
            },
            owner=s.require("deploy_user"),
            verify_deadline=int(s.require("monitor.stack.verify_deadline")),
        )

    def path(self, relative: str) -> str:
        return f"{self.dir}/{relative}"

    def compose(self, args: str) -> str:
        files = " ".join(f"-f {shlex.quote(f)}" for f in (COMPOSE_FILE, *self.overrides))
        return f"cd {shlex.quote(self.dir)} && docker compose --ansi never {files} {args}"

    def by_hand(self, args: str) -> str:
        """The same compose command for an operator's hint (sudo: the env file and secrets are private)."""
        files = " ".join(f"-f {shlex.quote(f)}" for f in (COMPOSE_FILE, *self.overrides))
        return f"cd {shlex.quote(self.dir)} && sudo docker compose {files} {args}"

    def if_running(self, service: str, command: str) -> str:
        """`command` only when the service runs: a stack not up yet reads its files when it starts."""
        return f'if [ -n "$({self.compose("ps -q " + service)} 2>/dev/null)" ]; then {self.compose(command)}; fi'


# -- what lands on the server (pure) -------------------------------------------------------


def alert_rules(thresholds: dict) -> str:
    return templates.render("monitoring/alerts.yml.j2", **thresholds)


def rule_thresholds(thresholds: dict) -> dict[str, str]:
    """The `threshold` annotation each alert rule must carry once Prometheus loaded the rules."""
    return {"ApiDown": "0", "PostgresDown": "0", "DiskFreeLow": str(thresholds["disk_free"]),
            "MemoryHigh": str(thresholds["memory_used"]), "CpuHigh": str(thresholds["cpu"]),
            "ErrorRateHigh": str(thresholds["error_rate"])}


def prometheus_config(stack: Stack) -> str:
    return templates.render("monitoring/prometheus.yml.j2", api=list(stack.api))


def grafana_env(domain: str, *, tls: bool) -> str:
    return templates.render("monitoring/grafana-env.j2", domain=domain, scheme="https" if tls else "http")


def plain(name: str) -> str:
    """A file of configs/monitoring as it is (Grafana's legends use {{ }} too: not a template)."""
    return (templates.CONFIGS_DIR / "monitoring" / name).read_text()


# -- steps ------------------------------------------------------------------------------------


def preflight_step(stack: Stack) -> Step:
    """What the stack needs and does not install itself; refused before any change."""
    probes = {
        "docker": "docker info --format '{{.ServerVersion}}'",
        "compose": "docker compose version --short",
        "network": f"docker network inspect --format '{{{{.Name}}}}' {APP_NETWORK}",
        "app_env": f"test -r {shlex.quote(stack.app_env)}",
        "nginx": "command -v nginx",
    }

    def plan(facts: Facts) -> Plan:
        if not facts["docker"].ok or not facts["docker"].stdout.strip():
            raise OpsError("Docker is not answering", "run `deps` (or `sudo systemctl start docker`) and rerun; nothing changed")
        if not facts["compose"].ok:
            raise OpsError("docker compose is missing", "run `deps` and rerun; nothing changed")
        if not facts["network"].ok:
            raise OpsError(f"the app's Docker network '{APP_NETWORK}' does not exist yet (the postgres exporter joins it)",
                           "deploy the app first (`deploy.setup`, `deploy`); nothing changed")
        if not facts["app_env"].ok:
            raise OpsError(f"{stack.app_env} is missing (the postgres exporter's login comes from it)",
                           "run `deploy.setup` first; nothing changed")
        if not facts["nginx"].ok:
            raise OpsError("nginx is not installed (it serves Grafana and its stub_status feeds the exporter)",
                           "run `deps` and `nginx` first; nothing changed")
        return Plan.ok(f"Docker {facts['docker'].stdout.strip()}, compose {facts['compose'].stdout.strip()}, "
                       f"network {APP_NETWORK}, nginx")

    return Step("preflight", probes=probes, plan=plan)


def directories_step(stack: Stack) -> Step:
    wanted = {stack.dir: "755", stack.path("prometheus/rules"): "755", stack.path("grafana/provisioning/datasources"): "755",
              stack.path("grafana/provisioning/dashboards"): "755", stack.path("grafana/dashboards"): "755",
              stack.path("secrets"): "700"}

    def plan(facts: Facts) -> Plan:
        changes = [Change(f"directory {path} (mode {mode}, root)", f"install -d -m {mode} -o root -g root {shlex.quote(path)}")
                   for index, (path, mode) in enumerate(wanted.items()) if facts[f"d{index}"].stdout.strip() != f"{mode} root"]
        return Plan.change(*changes) if changes else Plan.ok(f"{stack.dir} and its directories ready")

    return Step("monitoring directories", probes={f"d{i}": f"stat -c '%a %U' {shlex.quote(p)}" for i, p in enumerate(wanted)},
                plan=plan)


def password_step(stack: Stack) -> Step:
    """Generated on the server, once; only its mode and owner are ever corrected."""
    path = stack.path(PASSWORD_FILE)
    wanted = f"600 {GRAFANA_OWNER} "

    def plan(facts: Facts) -> Plan:
        if not facts["meta"].ok:
            return Plan.change(Change(
                f"generate {path} on the server (mode 600, Grafana's uid; never printed)",
                f"sh -c {shlex.quote(templates.script('grafana-password.sh'))} grafana-password "
                f"{shlex.quote(path)} {shlex.quote(GRAFANA_OWNER)}",
            ))
        meta = facts["meta"].stdout.strip()
        if meta.endswith(" 0"):
            raise OpsError(f"{path} is empty", "remove it and rerun to generate a new one (Grafana keeps the password it "
                                               "first started with: reset it with `grafana cli admin reset-admin-password`)")
        if not meta.startswith(wanted):
            return Plan.change(Change(f"set {path} to mode 600, owner {GRAFANA_OWNER} (was {meta.rsplit(' ', 1)[0]})",
                                      f"chmod 600 {shlex.quote(path)} && chown {shlex.quote(GRAFANA_OWNER)} {shlex.quote(path)}"))
        return Plan.ok(f"{path} exists (mode 600, never overwritten)")

    return Step("grafana admin password", probes={"meta": f"stat -c '%a %u:%g %s' {shlex.quote(path)}"}, plan=plan)


def exporter_login_step(stack: Stack) -> Step:
    script = shlex.quote(templates.script("postgres-exporter-env.sh"))
    owner = f"{stack.owner}:{stack.owner}"
    args = " ".join(shlex.quote(a) for a in (stack.app_env, stack.path(EXPORTER_ENV), stack.db_host, owner))

    def plan(facts: Facts) -> Plan:
        state = facts["state"].stdout.strip()
        if state == "current":
            return Plan.ok(f"{stack.path(EXPORTER_ENV)} matches {stack.app_env}")
        if state not in ("missing", "stale"):
            raise OpsError(f"cannot derive the postgres exporter's login from {stack.app_env}",
                           "it needs POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB; nothing changed")
        verb = "create" if state == "missing" else "update"
        return Plan.change(Change(f"{verb} {stack.path(EXPORTER_ENV)} from {stack.app_env} (mode 600, {owner})",
                                  f"sh -c {script} postgres-exporter-env write {args}"))

    return Step("postgres exporter login", probes={"state": f"sh -c {script} postgres-exporter-env check {args}"}, plan=plan)


def compose_step(stack: Stack) -> Step:
    compose_path, env_path = stack.path(COMPOSE_FILE), stack.path("grafana.env")
    domain = stack.domain

    def render(facts: Facts) -> dict[str, str]:
        # Grafana's public address follows nginx: https once ssl.issue put the certificate there.
        return {compose_path: plain(COMPOSE_FILE), env_path: grafana_env(domain, tls=facts["certificate"].ok)}

    return remote.files_step("compose project", {compose_path: "", env_path: ""}, render=render,
                      extra_probes={"certificate": f"test -d {shlex.quote('/etc/letsencrypt/live/' + domain)}"})


def prometheus_step(stack: Stack) -> Step:
    files = {stack.path("prometheus/prometheus.yml"): prometheus_config(stack),
             stack.path("prometheus/rules/coachntt.yml"): alert_rules(stack.thresholds)}
    promtool = stack.compose("run --rm --no-deps -T --entrypoint promtool prometheus check config /etc/prometheus/prometheus.yml")
    return remote.files_step("prometheus config + alert rules", files, validate=("check them with promtool", promtool),
                      then=("reload prometheus (SIGHUP) if it runs", stack.if_running("prometheus", "kill -s SIGHUP prometheus")))


def grafana_step(stack: Stack) -> Step:
    files = {stack.path("grafana/provisioning/datasources/prometheus.yml"): plain("grafana/datasource.yml"),
             stack.path("grafana/provisioning/dashboards/coachntt.yml"): plain("grafana/dashboards.yml"),
             stack.path("grafana/dashboards/coachntt.json"): plain("grafana/coachntt-dashboard.json")}
    return remote.files_step("grafana datasource + dashboard", files,
                      then=("restart grafana if it runs (it reads provisioning at start)", stack.if_running("grafana", "restart grafana")))


def nginx_status_step() -> Step:
    return remote.file_step("nginx stub_status (127.0.0.1:8081)", NGINX_STATUS_FILE, plain("nginx-status.conf"),
                            validate="nginx -t -q", then=remote.RELOAD_NGINX)


def services_to_start(config: str, applied: str, containers: list[str]) -> tuple[str, list[str]]:
    """Why the stack must be brought up ('' when it need not) and the containers of services
    no longer in the file. Pure.

    config: hash of the configuration compose resolves now; applied: the one last brought
    up; containers: "service state" lines of the project's containers. Compose's own
    per-service hash is no help: `config --hash` disagrees with what `up` labels for
    services with env_file or secrets, so `up -d` itself decides what to recreate.
    """
    states = dict(line.split()[:2] for line in containers if len(line.split()) >= 2)
    orphans = sorted(set(states) - set(SERVICES))
    if not applied:
        return "first start", orphans
    if config != applied:
        return "configuration changed", orphans
    stopped = [service for service in SERVICES if states.get(service) != "running"]
    return (f"not running: {', '.join(stopped)}" if stopped else ""), orphans


def stack_step(stack: Stack) -> Step:
    applied = shlex.quote(stack.path(APPLIED))
    config_hash = f"c=$({stack.compose('config')} 2>/dev/null) && printf '%s' \"$c\" | sha256sum | cut -c1-64"
    probes = {
        "config": config_hash,
        "applied": f"cat {applied}",
        "containers": f"docker ps -a --filter label=com.docker.compose.project={PROJECT} "
                      "--format '{{.Label \"com.docker.compose.service\"}} {{.State}}'",
    }

    def plan(facts: Facts) -> Plan:
        if not facts["config"].ok or not facts["config"].stdout.strip():
            raise OpsError(f"docker compose cannot read the project in {stack.dir}",
                           f"run `{stack.by_hand('config -q')}` to see why")
        why, orphans = services_to_start(facts["config"].stdout.strip(), facts["applied"].stdout.strip(), facts["containers"].lines)
        if not why and not orphans:
            return Plan.ok(f"{len(SERVICES)} services running with the configuration last applied")
        what = "; ".join(([why] if why else []) + ([f"remove {', '.join(orphans)}"] if orphans else []))
        return Plan.change(Change(
            f"docker compose up -d ({what})",
            f"{stack.compose('up -d --remove-orphans --wait --wait-timeout 180')} && {{ {config_hash} > {applied}; }}",
        ))

    return Step("stack up", probes=probes, plan=plan)


# -- verify -----------------------------------------------------------------------------------


def next_step(problem: str, stack: Stack) -> str:
    """What to look at for the first problem found."""
    if problem.startswith("target(s) not up"):
        return (f"the api is the app's (`deploy.status`); the others run in {stack.dir}: "
                f"`{stack.by_hand('ps')}`, then `... logs <service>`")
    service = "grafana" if problem.startswith("Grafana") else "prometheus"
    return f"see `{stack.by_hand('logs --tail 30 ' + service)}`"


def verify(ops, stack: Stack) -> None:
    """Ask Prometheus on the server (one round trip; the script polls there until the deadline)."""
    started = time.monotonic()
    wanted = rule_thresholds(stack.thresholds)
    command = prometheus.verify_command(grafana_url=f"http://{GRAFANA_ADDRESS}", domain=stack.domain, jobs=JOBS,
                                        deadline=stack.verify_deadline, thresholds=wanted)
    result = ops.target.run(command, check=False, timeout=stack.verify_deadline + 60)
    verdict = prometheus.judge(result.stdout, jobs=JOBS, thresholds=wanted)
    name = "verify: targets up, rules loaded"
    problems = verdict.problems()
    if problems:
        ops.reporter.step(name, "failed", time.monotonic() - started, reason="; ".join(problems))
        raise OpsError(f"the monitoring stack on {ops.where} is not healthy: {problems[0]}", next_step(problems[0], stack))
    ops.reporter.step(name, "ok", time.monotonic() - started, reason=verdict.summary())
    if verdict.nginx in ("200", "301", "308"):  # 301: nginx sends it to https (ssl.issue ran)
        ops.reporter.info(f"  grafana: http{'' if verdict.nginx == '200' else 's'}://{stack.domain}/ (user admin)")
    else:
        ops.reporter.info(f"  note: nginx does not serve {stack.domain} yet (HTTP {verdict.nginx or '---'}): run `nginx`")


# -- the task ---------------------------------------------------------------------------------


@ops_task(name="stack", help={"show_password": "print the Grafana admin password (read on the server) once"})
def stack_task(ops, show_password=False):
    """Prometheus + Grafana + exporters (compose, 127.0.0.1 only), alert rules from thresholds.*, verified."""
    stack = Stack.from_settings(ops.settings)
    if "GRAFANA_ADMIN_PASSWORD" in ops.settings.secrets:
        ops.reporter.info("  note: GRAFANA_ADMIN_PASSWORD in your settings is not used: the server generates its own")
    planned = ops.plan([
        preflight_step(stack), directories_step(stack), password_step(stack), exporter_login_step(stack),
        compose_step(stack), prometheus_step(stack), grafana_step(stack), nginx_status_step(),
    ])
    ops.apply(planned)
    if ops.dry and any(plan.changes for _, plan in planned):
        ops.reporter.step("stack up", "would change", 0.0, reason="after the changes above: docker compose up -d where they apply")
    else:
        # Read again: what the steps above wrote decides whether a service must be recreated.
        ops.run_steps([stack_step(stack)])
    if not ops.dry:
        verify(ops, stack)
    password = stack.path(PASSWORD_FILE)
    if show_password:
        found = gather(ops.target, {"password": f"cat {shlex.quote(password)}"})["password"]
        if not found.ok:
            raise OpsError(f"{password} does not exist yet", "run monitor.stack without --dry first")
        value = found.stdout.strip()
        print(json.dumps({"host": ops.where, "grafana_admin_password": value}) if ops.json else f"  grafana admin password: {value}",
              flush=True)
        redact.register(value)  # printed once, on request; masked in anything after
    else:
        ops.reporter.info(f"  admin password: {password} on the server (mode 600); --show-password prints it")

