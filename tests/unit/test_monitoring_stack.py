"""monitor.stack as data: the compose file, the sandbox override, rules from thresholds,
the dashboard, the plans of each step, and the verdict on what Prometheus answered."""

from __future__ import annotations

import base64
import json
import re

import pytest
import yaml
from invoke.exceptions import Exit

from fabfile import monitoring_stack as ms
from fabfile.core import prometheus
from fabfile.core import task as task_module
from fabfile.core.batch import ProbeResult
from fabfile.core.errors import ConfigError, OpsError
from fabfile.core.settings import PROJECT_DIR, Settings, validate
from fabfile.sandbox import images
from fabfile.sandbox.monitoring_images import MONITORING, MONITORING_FAMILIES

CONFIGS = PROJECT_DIR / "configs" / "monitoring"
missing = ProbeResult("", 1)


def ok(stdout=""):
    return ProbeResult(stdout, 0)


class ResetLoader(yaml.SafeLoader):
    """Reads compose's `!reset` tag."""


ResetLoader.add_constructor("!reset", lambda loader, node: "!reset")


def load(name: str) -> dict:
    return yaml.load((CONFIGS / name).read_text(), Loader=ResetLoader)


@pytest.fixture
def compose() -> dict:
    return load("docker-compose.monitoring.yml")


@pytest.fixture
def stack(settings) -> ms.Stack:
    return ms.Stack.from_settings(settings)


def stack_with(defaults, **dotted) -> ms.Stack:
    return ms.Stack.from_settings(validate(Settings("production", defaults).with_overrides(dotted)))


def written(change) -> str:
    payload = re.search(r"printf %s (\S+) \| base64 -d", change.command)[1]
    return base64.b64decode(payload).decode()


def memory_mb(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([mg])", value).groups()
    return float(number) * (1024 if unit == "g" else 1)


# --- the compose file ----------------------------------------------------------------------


def test_services_are_the_ones_the_task_knows(compose):
    assert tuple(compose["services"]) == ms.SERVICES
    assert compose["name"] == ms.PROJECT


def test_every_image_is_pinned_to_a_release_never_latest(compose):
    for name, service in compose["services"].items():
        image = service["image"]
        assert "latest" not in image and "@" not in image, f"{name}: {image}"
        assert re.fullmatch(r"[a-z0-9./-]+:v?\d+\.\d+\.\d+", image), f"{name} is not pinned to a release: {image}"
    assert compose["services"]["grafana"]["image"].startswith("grafana/grafana:")
    assert compose["services"]["prometheus"]["image"].startswith("prom/prometheus:v")


def test_everything_listens_on_loopback_only(compose):
    services = compose["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback (Docker bypasses ufw)"
        if service.get("network_mode") == "host":
            flags = [flag for flag in service.get("command", []) if flag.startswith("--web.listen-address=")]
            address = flags[0].split("=", 1)[1] if flags else f"{service['environment']['GF_SERVER_HTTP_ADDR']}:" \
                                                                f"{service['environment']['GF_SERVER_HTTP_PORT']}"
            assert address.startswith("127.0.0.1:"), f"{name} on the host's network listens on {address}"
        else:
            assert "ports" in service and "network_mode" not in service
    assert "--web.listen-address=127.0.0.1:9090" in services["prometheus"]["command"]
    grafana = services["grafana"]["environment"]
    assert f"{grafana['GF_SERVER_HTTP_ADDR']}:{grafana['GF_SERVER_HTTP_PORT']}" == ms.GRAFANA_ADDRESS == "127.0.0.1:3000"


def test_limits_follow_the_plan_one_gigabyte_and_half_a_cpu_in_total(compose):
    limits = [service["deploy"]["resources"]["limits"] for service in compose["services"].values()]
    assert all(set(limit) == {"cpus", "memory"} for limit in limits)
    assert sum(float(limit["cpus"]) for limit in limits) <= 0.5
    assert sum(memory_mb(limit["memory"]) for limit in limits) <= 1024


def test_containers_are_non_root_confined_and_logged(compose):
    for name, service in compose["services"].items():
        assert service["user"].split(":")[0] not in ("", "0", "root"), f"{name} runs as root"
        assert "apparmor=docker-default" in service["security_opt"] and "no-new-privileges:true" in service["security_opt"]
        assert service["logging"]["options"]["max-size"] and service["restart"] == "always"


def test_grafana_reads_the_generated_password_file_as_its_owner(compose):
    grafana = compose["services"]["grafana"]
    assert grafana["user"] == ms.GRAFANA_OWNER
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert grafana["secrets"] == ["grafana_admin_password"]
    assert compose["secrets"]["grafana_admin_password"]["file"] == f"./{ms.PASSWORD_FILE}"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana["environment"], "never the password itself"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def test_mounts_are_directories_so_renamed_files_reach_a_reload(compose):
    prometheus_mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus_mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in compose["services"]["grafana"]["volumes"]
    provider = yaml.safe_load((CONFIGS / "grafana" / "dashboards.yml").read_text())
    assert f"./grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in compose["services"]["grafana"]["volumes"]


def test_postgres_exporter_joins_the_apps_network_and_nginx_exporter_reads_the_status_server(compose):
    app = yaml.safe_load((PROJECT_DIR / "examples" / "app" / "docker-compose.prod.yml").read_text())
    assert compose["networks"]["coachntt"] == {"name": ms.APP_NETWORK, "external": True}
    assert app["networks"]["coachntt"]["name"] == ms.APP_NETWORK
    assert compose["services"]["postgres-exporter"]["env_file"] == ms.EXPORTER_ENV
    status = (CONFIGS / "nginx-status.conf").read_text()
    assert "listen 127.0.0.1:8081;" in status and "stub_status;" in status
    assert "--nginx.scrape-uri=http://127.0.0.1:8081/stub_status" in compose["services"]["nginx-exporter"]["command"]


# --- the sandbox override and its images -----------------------------------------------------


def test_sandbox_override_only_swaps_images_and_drops_cpu_limits(compose):
    override = load("compose.sandbox.yml")
    assert set(override["services"]) == set(compose["services"])
    built = set(MONITORING.tags())
    for name, service in override["services"].items():
        assert service == {"image": service["image"], "deploy": {"resources": {"limits": {"cpus": "!reset"}}}}
        assert service["image"] in built and service["image"].startswith("coachntt-sandbox/"), name
    assert override["services"]["grafana"]["image"] == "coachntt-sandbox/grafana-standin:trixie"
    text = (CONFIGS / "compose.sandbox.yml").read_text()
    assert "SANDBOX ONLY" in text and "STAND-IN" in text and "never for production" in text


def test_sandbox_images_are_their_own_family_keyed_and_non_root():
    assert MONITORING not in images.FAMILIES, "hosts that only run the app never build it"
    assert MONITORING_FAMILIES == (MONITORING,)
    assert len(MONITORING.key()) == 16 and MONITORING.key() == MONITORING.key()
    for image in MONITORING.images:
        assert image.user not in ("", "root", "0"), image.tag
        assert image.tag.endswith(":trixie") and image.entrypoint
    command = MONITORING.mmdebstrap_command(PROJECT_DIR / "out.tar")
    assert any(arg.startswith("--include=prometheus,") for arg in command)


# --- what the task renders -------------------------------------------------------------------


def test_alert_rules_carry_the_thresholds_from_settings(defaults):
    rules = yaml.safe_load(ms.alert_rules(stack_with(defaults).thresholds))["groups"][0]["rules"]
    by_name = {rule["alert"]: rule for rule in rules}
    assert set(by_name) == set(ms.rule_thresholds(stack_with(defaults).thresholds))
    assert by_name["DiskFreeLow"]["expr"].endswith("< 20") and by_name["MemoryHigh"]["expr"].endswith("> 80")
    assert by_name["CpuHigh"]["expr"].endswith("> 70") and by_name["CpuHigh"]["for"] == "10m"
    assert by_name["ErrorRateHigh"]["expr"].endswith("> 5") and 'status="5xx"' in by_name["ErrorRateHigh"]["expr"]
    assert by_name["ApiDown"]["expr"] == 'max(up{job="api"}) == 0', "no api slot up: the stopped idle slot alone is normal"
    for name, rule in by_name.items():
        assert rule["annotations"]["threshold"] == ms.rule_thresholds(stack_with(defaults).thresholds)[name]
        assert "{{ $value" in rule["annotations"]["summary"] or name in ("ApiDown", "PostgresDown")


def test_changed_thresholds_change_the_rules(defaults):
    changed = stack_with(defaults, **{"thresholds.memory_used_percent_max": 75, "thresholds.disk_free_percent_min": 15,
                                      "thresholds.cpu_percent_max": 60, "thresholds.error_rate_percent_max": 2})
    rules = {r["alert"]: r for r in yaml.safe_load(ms.alert_rules(changed.thresholds))["groups"][0]["rules"]}
    assert rules["MemoryHigh"]["expr"].endswith("> 75") and rules["DiskFreeLow"]["expr"].endswith("< 15")
    assert rules["CpuHigh"]["expr"].endswith("> 60") and rules["ErrorRateHigh"]["expr"].endswith("> 2")
    assert ms.rule_thresholds(changed.thresholds)["MemoryHigh"] == "75"


def test_prometheus_scrapes_every_job_with_both_api_slots_from_settings(defaults):
    config = yaml.safe_load(ms.prometheus_config(stack_with(defaults, **{"cutover.port_a": 8010, "cutover.port_b": 8012})))
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert tuple(jobs) == ms.JOBS and jobs["api"] == ["127.0.0.1:8010", "127.0.0.1:8012"]
    assert all(target.startswith("127.0.0.1:") for targets in jobs.values() for target in targets)
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]


def test_the_dashboard_has_the_plans_panels():
    dashboard = json.loads(ms.plain("grafana/coachntt-dashboard.json"))
    datasource = yaml.safe_load(ms.plain("grafana/datasource.yml"))["datasources"][0]
    exprs = {panel["title"]: " ".join(t["expr"] for t in panel["targets"]) for panel in dashboard["panels"]}
    assert "histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket[5m])))" in exprs["API response time"]
    assert "db_query_duration_seconds_bucket" in exprs["Database query time"]
    assert "node_memory_MemAvailable_bytes" in exprs["Memory used"] and 'node_cpu_seconds_total{mode="idle"}' in exprs["CPU"]
    assert "node_filesystem_avail_bytes" in exprs["Disk free"] and 'status="5xx"' in exprs["5xx rate"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    assert {panel["datasource"]["uid"] for panel in dashboard["panels"]} == {datasource["uid"]}
    assert datasource["url"] == prometheus.PROMETHEUS_URL and dashboard["uid"] == "coachntt"


def test_grafana_env_follows_the_certificate():
    assert "GF_SERVER_ROOT_URL=http://metrics.cntt.test/" in ms.grafana_env("metrics.cntt.test", tls=False)
    https = ms.grafana_env("metrics.cntt.test", tls=True)
    assert "GF_SERVER_ROOT_URL=https://metrics.cntt.test/" in https and "GF_SECURITY_COOKIE_SECURE=true" in https


# --- settings ----------------------------------------------------------------------------------


def test_metrics_upstream_must_be_where_grafana_listens(defaults):
    with pytest.raises(ConfigError, match="upstreams.metrics is '127.0.0.1:3001'"):
        stack_with(defaults, **{"upstreams.metrics": "127.0.0.1:3001"})


def test_bad_monitoring_settings_are_refused_before_connecting(refused_before_connecting):
    for env in ({"COACHNTT_MONITOR__STACK__DIR": "/opt/x;rm"}, {"COACHNTT_MONITOR__STACK__COMPOSE_OVERRIDES": "../up.yml"},
                {"COACHNTT_THRESHOLDS__ERROR_RATE_PERCENT_MAX": "101"}, {"COACHNTT_UPSTREAMS__METRICS": "127.0.0.1:9999"}):
        assert refused_before_connecting(ms.stack_task, env=env).code == 2


# --- plans ---------------------------------------------------------------------------------------


def test_preflight_refuses_before_any_change(stack):
    good = {"docker": ok("26.1.5"), "compose": ok("2.26.1"), "network": ok("coachntt"), "app_env": ok(), "nginx": ok("/usr/sbin/nginx")}
    assert not ms.preflight_step(stack).plan(good).changes
    for fact, words in (("docker", "Docker is not answering"), ("network", "deploy the app first"),
                        ("app_env", "deploy.setup"), ("nginx", "run `deps` and `nginx`")):
        with pytest.raises(OpsError) as info:
            ms.preflight_step(stack).plan({**good, fact: missing})
        assert words in info.value.one_line() and info.value.one_line().endswith("nothing changed")


def test_the_password_is_generated_on_the_server_and_never_overwritten(stack):
    step = ms.password_step(stack)
    (change,) = step.plan({"meta": missing}).changes
    assert "grafana-password" in change.command and "/dev/urandom" in change.command
    assert "never printed" in change.summary
    assert not step.plan({"meta": ok("600 472:0 48")}).changes
    (fix,) = step.plan({"meta": ok("644 0:0 48")}).changes
    assert fix.command.startswith("chmod 600 ") and "urandom" not in fix.command
    with pytest.raises(OpsError, match="is empty"):
        step.plan({"meta": ok("600 472:0 0")})


def test_exporter_login_is_derived_on_the_server(stack):
    step = ms.exporter_login_step(stack)
    assert not step.plan({"state": ok("current")}).changes
    (change,) = step.plan({"state": ok("stale")}).changes
    assert "postgres-exporter-env write" in change.command and "/opt/coachntt/.env.production" in change.command
    with pytest.raises(OpsError) as info:
        step.plan({"state": ProbeResult("", 3)})
    assert "POSTGRES_PASSWORD" in info.value.one_line()


def test_prometheus_files_are_checked_with_promtool_restored_on_failure_then_reloaded(stack):
    step = ms.prometheus_step(stack)
    facts = {"content0": missing, "meta0": missing, "content1": ok("old: rules"), "meta1": ok("644 root:root")}
    *writes, check, reload = step.plan(facts).changes
    assert "job_name: api" in written(writes[0]) and "alert: MemoryHigh" in written(writes[1])
    assert "--entrypoint promtool prometheus check config" in check.command
    assert "rm -f /opt/coachntt-monitoring/prometheus/prometheus.yml" in check.command, "a new file goes when the check fails"
    assert "cp -p /var/backups/coachntt-ops/opt__coachntt-monitoring__prometheus__rules__coachntt.yml" in check.command
    assert "kill -s SIGHUP prometheus" in reload.command and "ps -q prometheus" in reload.command
    same = {"content0": ok(ms.prometheus_config(stack).rstrip("\n")), "meta0": ok("644 root:root"),
            "content1": ok(ms.alert_rules(stack.thresholds).rstrip("\n")), "meta1": ok("644 root:root")}
    assert step.plan(same).changes == ()


def test_compose_overrides_reach_every_compose_command(defaults):
    stack = stack_with(defaults, **{"monitor.stack.compose_overrides": ["/etc/coachntt-sandbox/compose.monitoring.sandbox.yml"]})
    assert stack.compose("ps").endswith(
        "docker compose --ansi never -f docker-compose.monitoring.yml -f /etc/coachntt-sandbox/compose.monitoring.sandbox.yml ps")
    assert stack.compose("ps").startswith("cd /opt/coachntt-monitoring && ")


def test_the_stack_is_brought_up_only_when_something_changed():
    running = [f"{service} running" for service in ms.SERVICES]
    assert ms.services_to_start("abc", "abc", running) == ("", [])
    assert ms.services_to_start("abc", "", []) == ("first start", [])
    assert ms.services_to_start("abd", "abc", running) == ("configuration changed", [])
    assert ms.services_to_start("abc", "abc", [*running[:-1], "postgres-exporter exited"]) == ("not running: postgres-exporter", [])
    assert ms.services_to_start("abc", "abc", [*running, "alertmanager running"]) == ("", ["alertmanager"])


def test_stack_step_plans_up_and_records_what_it_applied(stack):
    step = ms.stack_step(stack)
    running = "\n".join(f"{service} running" for service in ms.SERVICES)
    assert not step.plan({"config": ok("h1"), "applied": ok("h1"), "containers": ok(running)}).changes
    (change,) = step.plan({"config": ok("h2"), "applied": ok("h1"), "containers": ok(running)}).changes
    assert "up -d --remove-orphans --wait" in change.command and "> /opt/coachntt-monitoring/.stack-applied" in change.command
    with pytest.raises(OpsError, match="cannot read the project"):
        step.plan({"config": ProbeResult("", 1), "applied": missing, "containers": ok()})


# --- the verdict on Prometheus' answers ------------------------------------------------------


def verify_output(*, healths=None, thresholds=None, grafana="200", nginx="200", idle_slot="down") -> str:
    """Prometheus' answers: one target per job, and job api's second slot (`idle_slot`: its health, or None)."""
    healths = healths or dict.fromkeys(ms.JOBS, "up")
    found = [(job, "127.0.0.1:1", health) for job, health in healths.items()]
    if idle_slot and "api" in healths:
        found.append(("api", "127.0.0.1:8002", idle_slot))
    targets = {"status": "success", "data": {"activeTargets": [
        {"labels": {"job": job, "instance": instance}, "health": health, "lastError": "" if health == "up" else "connection refused"}
        for job, instance, health in found]}}
    rules = {"status": "success", "data": {"groups": [{"name": "coachntt", "rules": [
        {"name": name, "annotations": {"threshold": value}} for name, value in thresholds.items()]}]}}
    return (f"@@targets\n{json.dumps(targets)}\n@@rules\n{json.dumps(rules)}\n@@grafana\n{grafana}\n@@nginx\n{nginx}\n@@seconds 3\n")


def test_a_healthy_stack_is_judged_healthy(stack):
    wanted = ms.rule_thresholds(stack.thresholds)
    verdict = prometheus.judge(verify_output(thresholds=wanted), jobs=ms.JOBS, thresholds=wanted)
    assert verdict.problems() == []
    assert verdict.summary().startswith("5/5 jobs up (api, nginx, node, postgres, prometheus; api 127.0.0.1:8002 down "
                                        "(the idle api slot)), 6 alert rules")
    both = prometheus.judge(verify_output(thresholds=wanted, idle_slot="up"), jobs=ms.JOBS, thresholds=wanted)
    assert both.problems() == [] and both.summary().startswith("5/5 jobs up (api, nginx, node, postgres, prometheus), ")


def test_the_api_is_down_only_when_no_slot_is_up(stack):
    wanted = ms.rule_thresholds(stack.thresholds)
    down = prometheus.judge(verify_output(healths={**dict.fromkeys(ms.JOBS, "up"), "api": "down"}, thresholds=wanted),
                            jobs=ms.JOBS, thresholds=wanted)
    assert down.problems() == ["target(s) not up: api (connection refused)"], "the job once, not each slot"


def test_a_target_down_stale_rules_or_no_grafana_are_problems(stack):
    wanted = ms.rule_thresholds(stack.thresholds)
    down = prometheus.judge(verify_output(healths={**dict.fromkeys(ms.JOBS, "up"), "postgres": "down"}, thresholds=wanted),
                            jobs=ms.JOBS, thresholds=wanted)
    assert down.problems() == ["target(s) not up: postgres (connection refused)"]
    stale = prometheus.judge(verify_output(thresholds={**wanted, "MemoryHigh": "75"}), jobs=ms.JOBS, thresholds=wanted)
    assert stale.problems() == ["Prometheus has not loaded the alert rules written: MemoryHigh (loaded 75, wanted 80)"]
    no_grafana = prometheus.judge(verify_output(thresholds=wanted, grafana="000"), jobs=ms.JOBS, thresholds=wanted)
    assert no_grafana.problems() == ["Grafana's /api/health answers HTTP 000"]
    unscraped = prometheus.judge(verify_output(healths={"prometheus": "up"}, thresholds=wanted), jobs=ms.JOBS, thresholds=wanted)
    assert unscraped.problems() == ["Prometheus does not scrape api, nginx, node, postgres"]
    silent = prometheus.judge("@@targets\n\n@@rules\n\n@@grafana\n000\n", jobs=ms.JOBS, thresholds=wanted)
    assert silent.problems() == ["Prometheus does not answer on http://127.0.0.1:9090"]


def test_the_verify_script_waits_for_every_threshold(stack):
    command = prometheus.verify_command(grafana_url="http://127.0.0.1:3000", domain="metrics.cntt.test", jobs=ms.JOBS,
                                        deadline=120, thresholds=ms.rule_thresholds(stack.thresholds))
    assert command.startswith("sh -c ")
    assert "monitoring-verify http://127.0.0.1:9090 http://127.0.0.1:3000 metrics.cntt.test 5 120" in command
    for value in ("0", "20", "80", "70", "5"):
        assert f"'\"threshold\":\"{value}\"'" in command


# --- the task ------------------------------------------------------------------------------------


def test_dry_run_on_a_new_host_reads_facts_and_changes_nothing(project_context, mocker, fake_host, settings, capsys):
    stack = ms.Stack.from_settings(settings)
    steps = [ms.preflight_step(stack), ms.directories_step(stack), ms.password_step(stack), ms.exporter_login_step(stack),
             ms.compose_step(stack), ms.prometheus_step(stack), ms.grafana_step(stack), ms.nginx_status_step()]
    answers = {"docker": ("26.1.5", 0), "compose": ("2.26.1", 0), "network": ("coachntt", 0), "app_env": ("", 0),
               "nginx": ("/usr/sbin/nginx", 0), "state": ("missing", 0)}
    facts = {command: answers.get(name, ("", 1)) for step in steps for name, command in step.probes.items()}
    host = fake_host(facts=facts)
    mocker.patch.object(task_module, "target_for", return_value=host)
    ms.stack_task(project_context, dry=True)
    out = capsys.readouterr().out
    assert len(host.sent) == 1, "one round trip of facts, nothing else"
    assert "would change  stack up" in out and "would change  grafana admin password" in out
    assert "--show-password prints it" in out


def test_show_password_on_a_dry_run_of_a_new_host_says_it_does_not_exist(project_context, mocker, fake_host, settings):
    stack = ms.Stack.from_settings(settings)
    steps = [ms.preflight_step(stack), ms.directories_step(stack), ms.password_step(stack), ms.exporter_login_step(stack),
             ms.compose_step(stack), ms.prometheus_step(stack), ms.grafana_step(stack), ms.nginx_status_step()]
    answers = {"docker": ("26.1.5", 0), "compose": ("2.26.1", 0), "network": ("coachntt", 0), "app_env": ("", 0),
               "nginx": ("/usr/sbin/nginx", 0), "state": ("missing", 0)}
    facts = {command: answers.get(name, ("", 1)) for step in steps for name, command in step.probes.items()}
    facts["cat /opt/coachntt-monitoring/secrets/grafana_admin_password"] = ("", 1)
    mocker.patch.object(task_module, "target_for", return_value=fake_host(facts=facts))
    with pytest.raises(Exit) as info:
        ms.stack_task(project_context, dry=True, show_password=True)
    assert info.value.code == 1 and "grafana_admin_password does not exist yet" in info.value.message


# --- the sandbox's Grafana stand-in ----------------------------------------------------------------


def test_the_standin_asks_for_the_generated_password_like_grafana(tmp_path, monkeypatch):
    import http.client
    import threading

    from fabfile.sandbox import grafana_standin

    (tmp_path / "password").write_text("s3cret-generated-on-the-server")
    (tmp_path / "provisioning" / "dashboards").mkdir(parents=True)
    (tmp_path / "dashboards").mkdir()
    provider = f"providers:\n  - options:\n      path: {tmp_path / 'dashboards'}\n"
    (tmp_path / "provisioning" / "dashboards" / "coachntt.yml").write_text(provider)
    (tmp_path / "dashboards" / "d.json").write_text(ms.plain("grafana/coachntt-dashboard.json"))
    monkeypatch.setenv("GF_SECURITY_ADMIN_PASSWORD__FILE", str(tmp_path / "password"))
    monkeypatch.setattr(grafana_standin, "PROVISIONING", tmp_path / "provisioning")
    server = grafana_standin.serve("127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def get(path, auth=None):
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
        headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode()

    try:
        assert get("/api/health")[0] == 200
        assert get("/api/search")[0] == 401 and get("/api/search", "admin:wrong")[0] == 401
        assert get("/")[0] == 302
        status, body = get("/api/search", "admin:s3cret-generated-on-the-server")
        assert status == 200 and json.loads(body) == [{"uid": "coachntt", "title": "CoachNTT API", "type": "dash-db"}]
        assert get("/api/search", "root:s3cret-generated-on-the-server")[0] == 401
    finally:
        server.shutdown()
        server.server_close()


def test_hints_name_commands_an_operator_can_paste(stack):
    assert ms.next_step("target(s) not up: api (connection refused)", stack).startswith("the api is the app's (`deploy.status`)")
    assert "`cd /opt/coachntt-monitoring && sudo docker compose -f docker-compose.monitoring.yml ps`" in ms.next_step(
        "target(s) not up: node (x)", stack)
    assert ms.next_step("Grafana's /api/health answers HTTP 000", stack).endswith("logs --tail 30 grafana`")
    assert ms.next_step("Prometheus does not answer on http://127.0.0.1:9090", stack).endswith("logs --tail 30 prometheus`")
