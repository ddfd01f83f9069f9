"""monitor.stack on a real sandbox host with examples/app deployed and `nginx` run.

Prometheus and the exporters are real (Debian trixie's packages, built registry-free by
fabfile/sandbox/monitoring_images.py and swapped in by configs/monitoring/compose.sandbox.yml);
Grafana is the sandbox's STAND-IN (a password-protected page on Grafana's port reading the
same generated password), so what is proven about Grafana is routing and secret handling.

One host for the module, in order of the fixture: secure, deploy.setup, two releases
(slot b serves, slot a is stopped and kept for rollback), nginx, monitor.stack. The
tests then check, from outside and inside the host: every job up in Prometheus (job api
scrapes both slots: the live one up, the idle one down, which is normal and fires
nothing), alert rules that follow the threshold settings (and fire on real node
metrics), metrics.<domain> through nginx only with the password, Prometheus and Grafana
on loopback only, the password file private and never printed, the dashboard's queries
valid on the real Prometheus; a missing prerequisite refused with nothing changed, a
stopped service started again, the live api slot stopped named in a one-line failure;
and a second run that changes nothing. Names are sandbox only (*.cntt.test); the host
is reached by IP with a Host header, never by name.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import subprocess
import time
import urllib.parse

import pytest

from fabfile.sandbox import example_repo, images
from fabfile.sandbox.monitoring_images import MONITORING_FAMILIES
from opsrun import PROJECT_DIR, console, example_app_served, fab, json_lines, ready_for_the_app

OVERRIDE = PROJECT_DIR / "configs" / "monitoring" / "compose.sandbox.yml"
OVERRIDE_ON_HOST = "/etc/coachntt-sandbox/compose.monitoring.sandbox.yml"
METRICS = "metrics.cntt.test"
DOMAINS = {"COACHNTT_DOMAINS__API": "api.cntt.test", "COACHNTT_DOMAINS__METRICS": METRICS,
           "COACHNTT_DOMAINS__STAGING": "staging.cntt.test"}
STACK_DIR = "/opt/coachntt-monitoring"
PASSWORD_FILE = f"{STACK_DIR}/secrets/grafana_admin_password"
JOBS = {"prometheus", "api", "node", "postgres", "nginx"}
# After the second release: slot b serves, slot a is stopped (kept for rollback).
LIVE, IDLE = ("api_b", "127.0.0.1:8002"), ("api_a", "127.0.0.1:8000")
# The api as a client reaches it, through nginx, by this module's api domain (whichever slot serves).
THROUGH_NGINX = f"-s -m 5 -H 'Host: {DOMAINS['COACHNTT_DOMAINS__API']}' http://127.0.0.1"
UP = "5/5 jobs up (api, nginx, node, postgres, prometheus; api 127.0.0.1:8000 down (the idle api slot))"


class Monitored:
    def __init__(self, host, env: dict):
        self.host, self.env = host, env
        self.outputs: list[str] = []  # everything every run printed, to look for the password
        self.first: subprocess.CompletedProcess | None = None

    def fab(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        result = fab(self.host, *args, user="coachntt", env={**self.env, **(env or {})})
        self.outputs.append(result.stdout + result.stderr)
        return result

    def stack(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        result = self.fab("monitor.stack", *args, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        return result

    def sh(self, command: str) -> str:
        code, out = console(self.host, command)
        assert code == 0, out
        return out

    def prometheus(self, path: str, **query: str) -> dict:
        url = f"http://127.0.0.1:9090{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        answer = json.loads(self.sh(f"curl -s -m 5 '{url}'"))
        assert answer["status"] == "success", answer
        return answer["data"]

    def password(self) -> str:
        return self.sh(f"cat {PASSWORD_FILE}").strip()


@pytest.fixture(scope="module")
def monitored(vps_factory_module, tmp_path_factory):
    host = vps_factory_module(flavour="provisioned")
    ready_for_the_app(host)
    images.load_images(host, families=MONITORING_FAMILIES)
    payload = base64.b64encode(OVERRIDE.read_bytes()).decode()
    code, out = console(host, f"mkdir -p /etc/coachntt-sandbox && echo {payload} | base64 -d > {OVERRIDE_ON_HOST}")
    assert code == 0, out
    with example_app_served(tmp_path_factory.mktemp("git")) as (repo, first, env):
        service = Monitored(host, {**env, **DOMAINS, "COACHNTT_MONITOR__STACK__COMPOSE_OVERRIDES": OVERRIDE_ON_HOST})
        second = example_repo.commit_change(repo, "second release", {"RELEASE": "2\n"})
        for args in (("deploy.setup",), ("deploy", "--sha", first), ("deploy", "--sha", second), ("nginx",)):
            result = service.fab(*args)
            assert result.returncode == 0, result.stdout + result.stderr
        service.first = service.stack()
        yield service


def step_lines(output: str) -> dict[str, str]:
    """Step name -> its status word, from the text report."""
    found = {}
    for line in output.splitlines():
        for name in ("prometheus config + alert rules", "stack up", "grafana admin password", "verify: targets up, rules loaded"):
            if line[16:].startswith(name):
                found[name] = line.split()[0]
    return found


def metrics_site(host, path: str, auth: str | None = None) -> tuple[int, str]:
    """nginx on the host's bridge address, asked for the metrics domain by Host header (no name is resolved)."""
    connection = http.client.HTTPConnection(host.ip, 80, timeout=10)
    headers = {"Host": METRICS}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    return response.status, response.read().decode(errors="replace")


def test_the_first_run_brings_the_stack_up_and_verifies_it(monitored):
    steps = step_lines(monitored.first.stdout)
    assert steps["grafana admin password"] == "changed" and steps["stack up"] == "changed", monitored.first.stdout
    assert steps["verify: targets up, rules loaded"] == "ok", monitored.first.stdout
    assert UP in monitored.first.stdout, "the stopped slot a is no failure"
    assert f"grafana: http://{METRICS}/ (user admin)" in monitored.first.stdout
    states = monitored.sh(f"cd {STACK_DIR} && docker compose -f docker-compose.monitoring.yml -f {OVERRIDE_ON_HOST} "
                          "ps --format '{{.Service}} {{.State}} {{.Image}}'")
    assert sorted(line.split()[0] for line in states.splitlines()) == [
        "grafana", "nginx-exporter", "node-exporter", "postgres-exporter", "prometheus"]
    assert all(line.split()[1] == "running" and line.split()[2].startswith("coachntt-sandbox/") for line in states.splitlines())


def scraped_targets(monitored, seconds: float = 45) -> list[dict]:
    """Prometheus' active targets once each has been scraped at least once: it spreads the
    first scrapes over the 15 s interval, and an unscraped one has no `up` sample yet."""
    deadline = time.monotonic() + seconds
    while True:
        targets = monitored.prometheus("/api/v1/targets", state="active")["activeTargets"]
        if all(t["health"] != "unknown" for t in targets) or time.monotonic() > deadline:
            return targets
        time.sleep(1)


def test_prometheus_reports_every_job_up_and_only_the_idle_api_slot_down(monitored):
    targets = scraped_targets(monitored)
    assert {t["labels"]["job"] for t in targets} == JOBS
    down = [(t["labels"]["job"], t["labels"]["instance"]) for t in targets if t["health"] != "up"]
    assert down == [("api", IDLE[1])], [(t["labels"]["instance"], t["lastError"]) for t in targets]
    api = {r["metric"]["instance"]: r["value"][1] for r in monitored.prometheus("/api/v1/query", query='up{job="api"}')["result"]}
    assert api == {LIVE[1]: "1", IDLE[1]: "0"}, "both slots scraped: the live one answers"
    up = monitored.prometheus("/api/v1/query", query="max by (job) (up)")["result"]
    assert sorted(r["metric"]["job"] for r in up) == sorted(JOBS) and {r["value"][1] for r in up} == {"1"}
    (api_down,) = monitored.prometheus("/api/v1/query", query='max(up{job="api"}) == 0')["result"] or [None]
    assert api_down is None, "ApiDown's expression: quiet while the live slot answers"
    # each exporter really reaches what it watches
    for query in ("pg_up", "nginx_up"):
        (sample,) = monitored.prometheus("/api/v1/query", query=query)["result"]
        assert sample["value"][1] == "1", query


def alert_rules(monitored) -> dict[str, dict]:
    groups = monitored.prometheus("/api/v1/rules", type="alert")["groups"]
    return {rule["name"]: rule for group in groups for rule in group["rules"]}


def test_alert_rules_follow_the_threshold_settings(monitored):
    rules = alert_rules(monitored)
    assert rules["MemoryHigh"]["query"].endswith("> 80") and rules["MemoryHigh"]["annotations"]["threshold"] == "80"
    assert rules["DiskFreeLow"]["query"].endswith("< 20") and rules["CpuHigh"]["query"].endswith("> 70")
    assert rules["ErrorRateHigh"]["query"].endswith("> 5") and rules["ApiDown"]["query"] == 'max(up{job="api"}) == 0'
    assert rules["ApiDown"]["state"] == "inactive", "the stopped idle slot does not fire it"
    assert rules["CpuHigh"]["duration"] == 600

    # 1 % memory: the rule changes, and real node_exporter readings make it fire (pending, `for: 5m`)
    changed = monitored.stack(env={"COACHNTT_THRESHOLDS__MEMORY_USED_PERCENT_MAX": "1"})
    assert step_lines(changed.stdout)["prometheus config + alert rules"] == "changed", changed.stdout
    assert "check them with promtool" in changed.stdout and "reload prometheus (SIGHUP) if it runs" in changed.stdout
    assert step_lines(changed.stdout)["stack up"] == "ok", "a reload, not a restart"
    assert "> 1\n" in monitored.sh(f"cat {STACK_DIR}/prometheus/rules/coachntt.yml")
    rules = alert_rules(monitored)
    assert rules["MemoryHigh"]["query"].endswith("> 1") and rules["MemoryHigh"]["annotations"]["threshold"] == "1"
    deadline = time.monotonic() + 60
    while alert_rules(monitored)["MemoryHigh"]["state"] == "inactive":
        assert time.monotonic() < deadline, "MemoryHigh never left 'inactive' with a 1 % threshold"
        time.sleep(3)

    back = monitored.stack()
    assert step_lines(back.stdout)["prometheus config + alert rules"] == "changed"
    assert alert_rules(monitored)["MemoryHigh"]["query"].endswith("> 80")
    deadline = time.monotonic() + 60  # the pending alert is carried over the reload until the next evaluation
    while alert_rules(monitored)["MemoryHigh"]["state"] != "inactive":
        assert time.monotonic() < deadline, "MemoryHigh still pending with the 80 % threshold back"
        time.sleep(3)


def test_metrics_domain_through_nginx_refuses_without_the_password(monitored):
    assert metrics_site(monitored.host, "/api/health")[0] == 200
    assert metrics_site(monitored.host, "/api/search")[0] == 401
    assert metrics_site(monitored.host, "/api/search", "admin:not-the-password")[0] == 401
    assert metrics_site(monitored.host, "/api/search", "root:" + monitored.password())[0] == 401
    status, body = metrics_site(monitored.host, "/api/search", "admin:" + monitored.password())
    assert status == 200, body
    assert {"uid": "coachntt", "title": "CoachNTT API", "type": "dash-db"} in json.loads(body), "the provisioned dashboard"


def refused_or_filtered(ip: str, port: int) -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        return probe.connect_ex((ip, port)) != 0  # ECONNREFUSED, or no answer at all (ufw drops)
    finally:
        probe.close()


def test_prometheus_grafana_and_exporters_answer_on_loopback_only(monitored):
    for port in (9090, 3000, 9100, 9113, 9187, 8081):
        assert refused_or_filtered(monitored.host.ip, port), f"port {port} answers on {monitored.host.ip}"
    listening = monitored.sh("ss -Hltn")
    for port in (9090, 3000, 9100, 9113, 9187, 8081):
        assert f"127.0.0.1:{port} " in listening, listening
        assert f"0.0.0.0:{port} " not in listening and f"*:{port} " not in listening and f"[::]:{port} " not in listening
    assert monitored.sh("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:9090/-/ready") == "200"
    assert monitored.sh("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:3000/api/health") == "200"


def test_the_password_file_is_private_and_printed_only_on_request(monitored):
    assert monitored.sh(f"stat -c '%a %u %g' {PASSWORD_FILE}").strip() == "600 472 0"
    assert monitored.sh(f"stat -c '%a %U' {STACK_DIR}/secrets").strip() == "700 root"
    assert monitored.sh(f"stat -c '%a' {STACK_DIR}/postgres-exporter.env").strip() == "600"
    password = monitored.password()
    assert len(password) == 48
    earlier = list(monitored.outputs)
    assert earlier and not [output for output in earlier if password in output]
    shown = monitored.stack("--show-password")
    assert shown.stdout.count(password) == 1 and f"  grafana admin password: {password}\n" in shown.stdout
    assert password not in shown.stderr
    again = monitored.stack()
    assert password not in again.stdout + again.stderr
    assert monitored.password() == password, "never regenerated"


def test_the_dashboards_queries_run_on_the_real_prometheus(monitored):
    dashboard = json.loads((PROJECT_DIR / "configs" / "monitoring" / "grafana" / "coachntt-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    for expr in exprs:
        monitored.prometheus("/api/v1/query", query=expr)  # status success: valid PromQL
    for expr in ("node_memory_MemAvailable_bytes", "sum by (state) (pg_stat_activity_count)", "nginx_connections_active",
                 "http_requests_total"):
        assert monitored.prometheus("/api/v1/query", query=expr)["result"], f"{expr} has no data"
    # the api's latency histogram becomes the response-time panel once two scrapes saw requests
    response_time = next(expr for expr in exprs if "http_request_duration_seconds_bucket" in expr)
    deadline = time.monotonic() + 60
    while True:
        monitored.sh(f"for i in $(seq 20); do curl -o /dev/null {THROUGH_NGINX}/api/notes; done")
        result = monitored.prometheus("/api/v1/query", query=response_time)["result"]
        if result and result[0]["value"][1] not in ("NaN", "0"):
            break
        assert time.monotonic() < deadline, f"no response time from {response_time}"
        time.sleep(5)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_without_the_apps_env_file_nothing_changes(monitored):
    before = monitored.sh(f"find {STACK_DIR} /etc/nginx -type f -exec sha256sum {{}} + | sort")
    refused = monitored.fab("monitor.stack", env={"COACHNTT_APP__ENV_FILE": ".env.missing"})
    assert refused.returncode == 1
    line = one_error_line(refused)
    assert "/opt/coachntt/.env.missing is missing" in line and line.endswith("nothing changed"), line
    assert monitored.sh(f"find {STACK_DIR} /etc/nginx -type f -exec sha256sum {{}} + | sort") == before


def test_a_stopped_service_is_started_again(monitored):
    monitored.sh(f"cd {STACK_DIR} && docker compose -f docker-compose.monitoring.yml -f {OVERRIDE_ON_HOST} stop node-exporter")
    result = monitored.stack()
    assert step_lines(result.stdout)["stack up"] == "changed" and "(not running: node-exporter)" in result.stdout, result.stdout
    assert UP in result.stdout


def test_a_target_that_is_down_fails_the_run_with_its_name(monitored):
    app = "cd /opt/coachntt && docker compose -f docker-compose.prod.yml -f /etc/coachntt-sandbox/compose.sandbox.yml"
    monitored.sh(f"{app} stop {LIVE[0]}")  # the live slot: now no api slot answers
    try:
        # Prometheus reports a target as of its last scrape (every 15 s): wait until it saw the stop.
        deadline = time.monotonic() + 60
        while monitored.prometheus("/api/v1/query", query='max(up{job="api"})')["result"][0]["value"][1] != "0":
            assert time.monotonic() < deadline, "Prometheus never saw the stopped api as down"
            time.sleep(2)
        failed = monitored.fab("monitor.stack", env={"COACHNTT_MONITOR__STACK__VERIFY_DEADLINE": "20"})
    finally:
        monitored.sh(f"{app} start {LIVE[0]}")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    line = one_error_line(failed)
    assert line.startswith("error: the monitoring stack on ") and "target(s) not up: api (" in line, line
    assert "FAILED        verify: targets up, rules loaded" in failed.stdout
    deadline = time.monotonic() + 60
    while console(monitored.host, f"curl -o /dev/null -w '%{{http_code}}' {THROUGH_NGINX}/health")[1] != "200":
        assert time.monotonic() < deadline, "the api did not come back"
        time.sleep(1)


def test_a_second_run_is_all_ok_and_recreates_nothing(monitored):
    compose_ps = f"cd {STACK_DIR} && docker compose -f docker-compose.monitoring.yml -f {OVERRIDE_ON_HOST} ps -q | sort"
    before = monitored.sh(compose_ps)
    result = monitored.stack("--json")
    records = json_lines(result.stdout)
    statuses = {record["step"]: record["status"] for record in records if "step" in record}
    assert set(statuses.values()) == {"ok"}, statuses
    assert records[-1]["summary"]["changed"] == 0 and records[-1]["summary"]["ok"] == len(statuses) == 10
    assert monitored.sh(compose_ps) == before, "no container recreated"
