"""The slot cutover as data: settings, the upstream include, which slot is idle, the
commands and their order (start, gate, switch, drain, stop), breaking migrations."""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from invoke.exceptions import Exit

from fabfile import deploy as deploy_module
from fabfile import nginx
from fabfile import rollback as rollback_module
from fabfile.core import lock, migrations, slots, state, window
from fabfile.core import task as task_module
from fabfile.core.app import App
from fabfile.core.cutoff import settle
from fabfile.core.errors import ConfigError
from fabfile.core.settings import Settings, load, validate

A, B, C = "a" * 40, "b" * 40, "c" * 40
SLOT_A, SLOT_B = slots.Slot("a", 8000), slots.Slot("b", 8002)


@pytest.fixture
def app(settings):
    return App.from_settings(settings)


def container(service: str, state_: str, sha: str = "") -> dict:
    return {"Service": service, "State": state_, "Image": f"coachntt/api:{sha or 'latest'}"}


def layout(live=SLOT_A, *found: dict, maintenance=False) -> slots.Layout:
    return slots.Layout(slots=(SLOT_A, SLOT_B), live=live, maintenance=maintenance, include=live is not None,
                        site_uses_slots=True, containers=slots.parse_containers("\n".join(json.dumps(f) for f in found)))


# --- settings ------------------------------------------------------------------------


def test_the_slots_default_to_8000_and_8002_and_the_drain_to_30s(app):
    assert app.slot_ports == (8000, 8002) and app.drain_seconds == 30
    assert slots.slots_of(app) == (SLOT_A, SLOT_B)
    assert (SLOT_B.service, SLOT_B.address, str(SLOT_B)) == ("api_b", "127.0.0.1:8002", "slot b (127.0.0.1:8002)")


@pytest.mark.parametrize("overrides,message", [
    ({"port_b": 8001}, "cutover.port_b is 8001, which upstreams.staging (127.0.0.1:8001) uses"),
    ({"port_a": 3000}, "cutover.port_a is 3000, which upstreams.metrics (127.0.0.1:3000) uses"),
    ({"port_a": 8002}, "cutover.port_a and cutover.port_b must differ, both are 8002"),
])
def test_slot_ports_that_collide_are_refused_naming_both_settings(defaults, overrides, message):
    defaults["cutover"].update(overrides)
    with pytest.raises(ConfigError) as info:
        validate(Settings("production", defaults))
    assert info.value.what == message and info.value.exit_code == 2


def test_a_slot_port_below_1024_is_refused(defaults):
    defaults["cutover"]["port_a"] = 80
    with pytest.raises(ConfigError, match="cutover.port_a must be a port number from 1024 to 65535, got '80'"):
        validate(Settings("production", defaults))


def test_a_colliding_port_stops_a_deploy_before_connecting(refused_before_connecting):
    exit_ = refused_before_connecting(deploy_module.deploy, env={"COACHNTT_CUTOVER__PORT_B": "8001"}, dry=True)
    assert exit_.code == 2 and "upstreams.staging" in exit_.message


# --- the include nginx reads -----------------------------------------------------------


def test_the_include_names_the_slot_its_release_and_the_maintenance_flag():
    text = slots.render_upstream(SLOT_B, B)
    assert "upstream coachntt_api {\n    server 127.0.0.1:8002;\n}" in text
    assert f"# slot b, release {B[:12]}" in text and "default 0;" in text
    assert "default 1;" in slots.render_upstream(SLOT_B, B, maintenance=True)


@pytest.mark.parametrize("slot", [SLOT_A, SLOT_B])
@pytest.mark.parametrize("maintenance", [False, True])
def test_the_include_reads_back_as_what_was_written(slot, maintenance):
    assert slots.parse_upstream(slots.render_upstream(slot, A, maintenance=maintenance), (SLOT_A, SLOT_B)) == (slot, maintenance)


def test_an_include_naming_no_slot_of_ours_reads_as_none():
    assert slots.parse_upstream("upstream coachntt_api { server 127.0.0.1:9999; }", (SLOT_A, SLOT_B)) == (None, False)


def rendered_site(settings) -> str:
    from fabfile.core.batch import ProbeResult

    return nginx.render_site(settings, {"certificate": ProbeResult("", 1), "nginx_version": ProbeResult("nginx/1.26.3", 0)})


def server_of(config: str, domain: str) -> str:
    return next(block for block in re.split(r"\n(?=server \{)", config) if f"server_name {domain};" in block)


def test_the_api_site_goes_to_the_slot_upstream_and_the_others_do_not(settings):
    config = rendered_site(settings)
    assert "include /etc/nginx/coachntt/api-upstream.conf;" in config
    api, staging = server_of(config, "api.coachntt.ai"), server_of(config, "staging.api.coachntt.ai")
    assert set(re.findall(r"proxy_pass (\S+);", api)) == {"http://coachntt_api"}
    assert set(re.findall(r"proxy_pass (\S+);", staging)) == {"http://127.0.0.1:8001"}


def test_the_maintenance_page_is_a_503_with_retry_after_for_the_api_only(settings):
    config = rendered_site(settings)
    api, metrics = server_of(config, "api.coachntt.ai"), server_of(config, "metrics.coachntt.ai")
    assert api.count("if ($coachntt_api_maintenance) { return 503; }") == 2, "both / and /ws"
    assert "error_page 503 @maintenance;" in api and "add_header Retry-After 300 always;" in api
    assert "root /etc/nginx/coachntt;" in api and "rewrite ^ /maintenance.html break;" in api
    assert "coachntt_api_maintenance" not in metrics
    acme = re.search(r"location /\.well-known/acme-challenge/ \{[^}]*\}", api)[0]
    assert "503" not in acme, "certificate renewals still validate during maintenance"


def test_retry_after_comes_from_the_setting(defaults):
    defaults["cutover"]["retry_after"] = 120
    assert "add_header Retry-After 120 always;" in rendered_site(Settings("production", defaults))


def test_nginx_writes_the_include_once_naming_slot_a_and_never_overwrites_it(settings):
    from fabfile.core.batch import ProbeResult

    step = nginx.upstream_step(settings)
    plan = step.plan({"include": ProbeResult("", 1)})
    assert [c.summary for c in plan.changes] == [
        "create /etc/nginx/coachntt/api-upstream.conf (api -> slot a (127.0.0.1:8000), before the first release)"]
    assert "api-upstream.conf" in plan.changes[0].command
    assert not step.plan({"include": ProbeResult("", 0)}).changes, "deploy and rollback own it once it exists"


def test_old_nginx_workers_get_longer_than_a_cutover_needs(defaults):
    assert slots.nginx_shutdown_seconds(30) == 30 + slots.STOP_GRACE + slots.NGINX_SHUTDOWN_MARGIN == 80
    defaults["cutover"]["drain_seconds"] = 100
    step = nginx.shutdown_step(Settings("production", defaults))
    from fabfile.core.batch import ProbeResult

    plan = step.plan({"content": ProbeResult("", 1), "meta": ProbeResult("", 1)})
    assert "/etc/nginx/modules-enabled/90-coachntt-shutdown.conf" in plan.changes[0].summary
    assert "worker_shutdown_timeout 150s;" in plan.changes[0].diff


# --- which slot ------------------------------------------------------------------------


def test_a_new_host_starts_its_first_release_in_slot_a():
    empty = layout(SLOT_A)
    assert empty.serving() is None and empty.idle() == SLOT_A and empty.slot_for(A) == SLOT_A


def test_the_idle_slot_is_the_one_nginx_does_not_send_to():
    assert layout(SLOT_A, container("api_a", "running", A)).idle() == SLOT_B
    assert layout(SLOT_B, container("api_a", "exited", A), container("api_b", "running", B)).idle() == SLOT_A


def test_a_release_whose_container_is_kept_goes_back_to_its_own_slot():
    now = layout(SLOT_B, container("api_a", "exited", A), container("api_b", "running", B))
    assert now.slot_for(A) == SLOT_A, "warm: started, not rebuilt"
    assert now.slot_for(B) == SLOT_B, "what serves already"
    assert now.slot_for(C) == SLOT_A, "anything else: the idle slot"
    assert now.serving_sha() == B


def test_a_slot_nginx_names_but_nothing_runs_in_is_the_idle_one():
    stopped = layout(SLOT_A, container("api_a", "exited", A), container("api_b", "running", B))
    assert stopped.serving() is None and stopped.idle() == SLOT_A


def test_an_api_container_from_before_slots_serves_slot_a_so_the_first_release_goes_to_b():
    legacy = layout(SLOT_A, container("api", "running", A), container("postgres", "running"))
    assert legacy.serving() == SLOT_A and legacy.idle() == SLOT_B and legacy.slot_for(B) == SLOT_B
    assert legacy.serving_sha() == A


def test_compose_ps_is_read_in_either_of_its_formats_and_garbage_is_nothing():
    line = json.dumps(container("api_b", "running", B))
    assert slots.parse_containers(line) == slots.parse_containers(f"[{line}]") == {"api_b": slots.Container("api_b", "running", B)}
    assert slots.parse_containers('{"Service": "api_a", "State": "running", "Image": "coachntt/api:latest"}')["api_a"].sha == ""
    assert slots.parse_containers("not json") == {} and slots.parse_containers("[1, null]") == {}
    twice = "\n".join(json.dumps(c) for c in (container("api_a", "running", A), container("api_a", "exited", C)))
    assert slots.parse_containers(twice)["api_a"].state == "running"


def test_status_says_which_slot_serves_and_what_each_holds():
    lines = slots.describe(layout(SLOT_B, container("api_a", "exited", A), container("api_b", "running", B)),
                           {"a": "000", "b": "200"})
    assert lines[0] == f"running     {B[:12]}"
    assert lines[1] == "nginx       api -> slot b (127.0.0.1:8002)"
    assert lines[2] == f"slot a      exited       {A[:12]}  HTTP 000 on 127.0.0.1:8000  (kept for rollback)"
    assert lines[3] == f"slot b      running      {B[:12]}  HTTP 200 on 127.0.0.1:8002  (live)"
    assert "MAINTENANCE" in slots.describe(layout(SLOT_A, maintenance=True), {})[1]


# --- commands ------------------------------------------------------------------------


def test_starting_a_slot_touches_nothing_else(app):
    command = slots.start_command(app, SLOT_B, B)
    assert command.endswith(f"APP_VERSION={B} docker compose --ansi never -f docker-compose.prod.yml up -d --no-deps api_b")
    assert "API_A_PORT=8000 API_B_PORT=8002" in command
    assert slots.stop_command(app, SLOT_A).endswith(f"stop -t {slots.STOP_GRACE} api_a")


def test_the_switch_runs_its_script_as_root_with_the_include_as_one_argument():
    command = slots.switch_command(slots.render_upstream(SLOT_B, B))
    assert command.startswith("sudo -n sh -c ") and " switch-upstream /etc/nginx/coachntt/api-upstream.conf '" in command
    assert command.endswith("'") and "server 127.0.0.1:8002;" in command


def test_the_drain_waits_at_least_the_settle_time_and_at_most_its_limit():
    assert slots.drain_command(SLOT_A, 30).endswith(" drain-slot 8000 30 2")
    assert slots.drain_command(SLOT_A, 1).endswith(" drain-slot 8000 1 1")


def test_a_slots_health_is_asked_on_its_own_port(app):
    assert slots.health_url(app, SLOT_B) == "http://127.0.0.1:8002/health"
    deep = dataclasses.replace(app, health_url="http://localhost:8000/healthz?deep=1")
    assert slots.health_url(deep, SLOT_A) == "http://127.0.0.1:8000/healthz?deep=1", "the path and query are kept"


# --- the cutover's order -------------------------------------------------------------------


def cutover_host(fake_host, *, gate_ok=True, stop_fails=False):
    return fake_host(replies={
        "health-gate": (0, "0s 200 ok\n", "") if gate_ok else (1, "25s 500 broken\n--- api logs ---\nboom\n", ""),
        "switch-upstream": (0, "switched\n", ""),
        "drain-slot": (0, "drained in 2s: no connection left to 127.0.0.1:8000\n", ""),
        **({"stop -t": (1, "", "cannot stop")} if stop_fails else {}),
    })


def steps_of(sent: list[str]) -> list[str]:
    marks = [("up -d --no-deps --remove-orphans", "remove legacy"), ("up -d --no-deps api_a", "start a"),
             ("up -d --no-deps api_b", "start b"), ("health-gate http://127.0.0.1:8000", "gate a"),
             ("health-gate http://127.0.0.1:8002", "gate b"), ("switch-upstream", "switch"),
             ("drain-slot 8000", "drain a"), ("drain-slot 8002", "drain b"), ("stop -t 20 api_a", "stop a"),
             ("stop -t 20 api_b", "stop b")]
    return [next(name for needle, name in marks if needle in command) for command in sent
            if any(needle in command for needle, _ in marks)]


def no_phase(name, reason=""):
    from contextlib import nullcontext

    return nullcontext()


def test_a_cutover_starts_gates_switches_then_drains_and_stops_the_old_slot(app, fake_host):
    host = cutover_host(fake_host)
    outcome = slots.serve(host, app, B, no_phase, layout=layout(SLOT_A, container("api_a", "running", A)))
    assert steps_of(host.sent) == ["start b", "gate b", "switch", "drain a", "stop a"]
    switch = next(c for c in host.sent if "switch-upstream" in c)
    assert "server 127.0.0.1:8002;" in switch and "default 0;" in switch, "the maintenance page goes off with the switch"
    assert outcome.gate.passed and outcome.switched and outcome.slot == SLOT_B and not outcome.warning
    assert outcome.drained == "drained in 2s: no connection left to 127.0.0.1:8000"


def test_a_slot_failing_its_gate_is_never_switched_to_and_stops_again(app, fake_host):
    host = cutover_host(fake_host, gate_ok=False)
    outcome = slots.serve(host, app, B, no_phase, layout=layout(SLOT_A, container("api_a", "running", A)))
    assert steps_of(host.sent) == ["start b", "gate b", "stop b"]
    assert not outcome.gate.passed and outcome.gate.logs == "boom" and not outcome.switched


def test_a_release_already_serving_is_only_gated_and_nothing_is_drained(app, fake_host):
    host = fake_host(replies={"health-gate": (0, "0s 200 ok\n", ""), "switch-upstream": (0, "unchanged\n", "")})
    outcome = slots.serve(host, app, A, no_phase, layout=layout(SLOT_A, container("api_a", "running", A)))
    assert steps_of(host.sent) == ["gate a", "switch"] and not outcome.switched


def test_an_old_slot_that_will_not_stop_is_a_warning_not_a_failed_release(app, fake_host):
    host = cutover_host(fake_host, stop_fails=True)
    outcome = slots.serve(host, app, B, no_phase, layout=layout(SLOT_A, container("api_a", "running", A)))
    assert outcome.gate.passed and outcome.warning.startswith("slot a (127.0.0.1:8000) did not stop")


def test_the_api_container_from_before_slots_is_drained_then_removed(app, fake_host):
    host = cutover_host(fake_host)
    slots.serve(host, app, B, no_phase, layout=layout(SLOT_A, container("api", "running", A)))
    assert steps_of(host.sent) == ["start b", "gate b", "switch", "drain a", "stop a", "remove legacy"]
    assert any(f"APP_VERSION={B}" in c and "--remove-orphans api_b" in c for c in host.sent), "api_b itself is left as it is"


# --- a deploy, command by command ------------------------------------------------------------


def deploy_replies(grep: str = "") -> dict:
    return {
        "git fetch --quiet origin": (0, B + "\n", ""),
        "git grep": (0, grep, ""),
        "backup-db dump": (0, "/backups/db_20261201_101010_pre-bbbbbbbbbbbb.dump\n", ""),
        "scripts.migrate": (0, "applied 0004_x.sql\nschema version: 4\n", ""),
        "health-gate": (0, "0s 200 ok\n", ""),
        "switch-upstream": (0, "switched\n", ""),
        "drain-slot": (0, "drained in 2s: no connection left to 127.0.0.1:8000\n", ""),
    }


LOG_APPEND = "deploy-lock finish "  # the entry appended and the lock freed, one command


def deploy_order(sent: list[str]) -> list[str]:
    marks = [("git fetch", "fetch"), ("git grep", "breaking?"), ("backup-db dump", "backup"), ("git checkout", "checkout"),
             ("build --quiet api_b", "build b"), ("up -d --wait postgres pgbouncer", "database"), ("scripts.migrate", "migrate"),
             ("up -d --no-deps api_b", "start b"), ("up -d --no-deps api_a", "start a"),
             ("health-gate http://127.0.0.1:8002", "gate b"), ("health-gate http://127.0.0.1:8000", "gate a"),
             ("default 1;", "maintenance on"), ("switch-upstream", "switch"), ("drain-slot 8000 2 2", "stop a now"),
             ("drain-slot 8000 30", "drain a"), ("stop -t 20 api_a", "stop a"), ("stop -t 20 api_b", "stop b")]
    found = []
    for command in sent:
        if "@@coachntt-" in command:  # a batch of read-only probes
            continue
        if LOG_APPEND in command:  # the entry (it may quote any command) written as the lock is freed
            found.append("log")
            continue
        for needle, name in marks:
            if needle in command and not command.startswith("tail"):
                found.append(name)
                break
    return found


@pytest.fixture
def run_deploy(project_context, mocker, release_host):
    def run(grep: str = "", **kwargs):
        host = release_host(state.Release(A, "deploy", "ok", schema="3", slot="a").to_json(), A, replies=deploy_replies(grep))
        mocker.patch.object(task_module, "target_for", return_value=host)
        deploy_module.deploy(project_context, sha=B, **kwargs)
        return host
    return run


def test_a_deploy_migrates_while_the_old_slot_serves_then_cuts_over(run_deploy, logged):
    host = run_deploy()
    assert deploy_order(host.sent) == ["fetch", "breaking?", "backup", "checkout", "build b", "database", "migrate",
                                       "start b", "gate b", "switch", "drain a", "stop a", "log"]
    (entry,) = logged(host.sent)
    assert (entry.sha, entry.result, entry.slot, entry.schema) == (B, "ok", "b", "4")


MARKED = f"{B}:migrations/0004_rename.sql:-- breaking: renames notes.text in one step\n"


def test_a_breaking_release_outside_the_window_is_refused_before_anything_changes(run_deploy, mocker):
    mocker.patch.object(window, "in_window", return_value=False)
    with pytest.raises(Exit) as info:
        run_deploy(MARKED)
    assert info.value.code == 2
    assert info.value.message == (
        f"error: migrations/0004_rename.sql (renames notes.text in one step) is marked breaking: {A[:12]} cannot run on it, "
        "so this release stops the api behind a 503 page, which is allowed only in the maintenance window "
        "(Sun 02:00-04:00 UTC); deploy then, or now with --force; nothing changed")


def test_a_forced_breaking_release_stops_the_world_behind_the_503_page(run_deploy, mocker):
    mocker.patch.object(window, "in_window", return_value=False)
    host = run_deploy(MARKED, force=True)
    assert deploy_order(host.sent) == ["fetch", "breaking?", "backup", "checkout", "build b", "database", "maintenance on",
                                       "stop a now", "stop a", "migrate", "start b", "gate b", "switch", "drain a", "stop a",
                                       "log"]
    maintenance, switch = (c for c in host.sent if "switch-upstream" in c)
    assert "server 127.0.0.1:8000;" in maintenance and "default 1;" in maintenance, "503 page while slot a still named"
    assert "server 127.0.0.1:8002;" in switch and "default 0;" in switch


def test_inside_the_window_a_breaking_release_goes_without_force(run_deploy, mocker):
    mocker.patch.object(window, "in_window", return_value=True)
    assert "maintenance on" in deploy_order(run_deploy(MARKED).sent)


def test_a_deploy_whose_slot_fails_its_gate_never_switches_and_puts_the_checkout_back(project_context, mocker, release_host):
    # Slot a's include is what it was: the switch back finds nothing to change.
    replies = {"health-gate http://127.0.0.1:8002": (1, "25s 500 broken\n", ""),
               **deploy_replies(), "switch-upstream": (0, "unchanged\n", "")}
    host = release_host(state.Release(A, "deploy", "ok", schema="3", slot="a").to_json(), A, replies=replies)
    mocker.patch.object(task_module, "target_for", return_value=host)
    mocker.patch.object(slots, "read", return_value=layout(SLOT_A, container("api_a", "running", A),
                                                           container("api_b", "exited", B)))
    with pytest.raises(Exit) as info:
        deploy_module.deploy(project_context, sha=B)
    assert info.value.code == 1
    assert "failed during health gate" in info.value.message and "(nginx never left it)" in info.value.message
    order = deploy_order(host.sent)
    assert order[order.index("gate b"):] == ["gate b", "stop b", "checkout", "gate a", "switch", "log"], order
    assert f"--detach {A}" in [c for c in host.sent if "git checkout" in c][-1]


# --- recover ---------------------------------------------------------------------------------


def test_recover_puts_back_what_served_else_serves_the_other_release_if_it_is_healthy(app, fake_host, mocker, logged):
    host = fake_host(replies={"health-gate http://127.0.0.1:8000": (1, "25s 500\n", ""),
                              "health-gate http://127.0.0.1:8002": (0, "0s 200 ok\n", ""),
                              "switch-upstream": (0, "switched\n", "")})
    mocker.patch.object(slots, "read", return_value=layout(SLOT_B, container("api_a", "exited", A),
                                                           container("api_b", "running", B)))
    held = lock.HeldLock(host, app.state_dir, "t0ken")
    held.release = state.Release(B, "deploy", previous=A, slot="b")
    reporter = mocker.Mock()
    reporter.phase.return_value.__enter__ = lambda *a: None
    reporter.phase.return_value.__exit__ = lambda *a: None
    healthy, said = settle(reporter, app, held, lock.LockInfo(phase="drain"))
    assert healthy and said == f"{A[:12]} could not be put back; {B[:12]} serves and is healthy"
    entries = logged(host.sent)
    assert [(r.sha, r.kind, r.result) for r in entries] == [(B, "deploy", "interrupted"), (B, "verify", "ok")]
    assert state.current_release(entries).sha == B
    assert sum(LOG_APPEND in c for c in host.sent) == 1 and LOG_APPEND in host.sent[-1], \
        "both entries go with the lock's release, in one command"


# --- breaking migrations ----------------------------------------------------------------------


@pytest.mark.parametrize("moment,inside", [
    (datetime(2026, 12, 6, 2, 0, tzinfo=UTC), True),  # a Sunday: the start is inside
    (datetime(2026, 12, 6, 3, 59, tzinfo=UTC), True),
    (datetime(2026, 12, 6, 4, 0, tzinfo=UTC), False),  # the end is outside
    (datetime(2026, 12, 6, 1, 59, tzinfo=UTC), False),
    (datetime(2026, 12, 5, 2, 30, tzinfo=UTC), False),  # Saturday
    (datetime(2026, 12, 6, 4, 30, tzinfo=timezone(timedelta(hours=2))), True),  # 02:30 UTC
])
def test_breaking_migrations_obey_the_maintenance_window_of_maintenance_patch(settings, moment, inside):
    """core/window.py decides, from maintenance.window (default Sun 02:00-04:00 UTC): one window for both."""
    log = state.parse_log(state.Release(A, "deploy", "ok", schema="3").to_json())
    decision = migrations.decide(MARKED, log, settings, moment, force=False)
    assert decision.inside_window is decision.allowed is window.in_window(settings, moment) is inside
    assert decision.window == "the maintenance window (Sun 02:00-04:00 UTC)"


def test_breaking_migrations_follow_the_window_setting(defaults, tmp_path):
    moved = load(defaults, {"COACHNTT_MAINTENANCE__WINDOW": "Sat 01:00-02:00"}, project_dir=tmp_path)
    log = state.parse_log(state.Release(A, "deploy", "ok", schema="3").to_json())
    saturday, sunday = datetime(2026, 12, 5, 1, 30, tzinfo=UTC), datetime(2026, 12, 6, 2, 30, tzinfo=UTC)
    assert migrations.decide(MARKED, log, moved, saturday, force=False).allowed is True
    refused = migrations.decide(MARKED, log, moved, sunday, force=False)
    assert refused.allowed is False and "refused outside the maintenance window (Sat 01:00-02:00 UTC)" in refused.words
    assert "(Sat 01:00-02:00 UTC)" in migrations.refusal(refused.breaking, A, moved).what
    always = load(defaults, {"COACHNTT_MAINTENANCE__WINDOW": "always"}, project_dir=tmp_path)
    assert migrations.decide(MARKED, log, always, sunday, force=False).allowed is True


def test_marked_migrations_are_read_with_their_reason():
    output = (f"{B}:migrations/0004_rename.sql:-- breaking: renames notes.text in one step\n"
              f"{B}:migrations/0005_drop.sql:--BREAKING\n"
              f"{B}:migrations/0005_drop.sql:-- breaking again\n"
              f"{B}:other/0006_x.sql:-- breaking\n")
    assert migrations.parse_marked(output) == [
        migrations.Breaking(4, "migrations/0004_rename.sql", "renames notes.text in one step"),
        migrations.Breaking(5, "migrations/0005_drop.sql", "")]


def test_only_marked_migrations_above_the_live_schema_are_pending():
    marked = [migrations.Breaking(3, "migrations/0003_x.sql", ""), migrations.Breaking(4, "migrations/0004_y.sql", "")]
    assert [m.number for m in migrations.pending(marked, "3", first_release=False)] == [4]
    assert migrations.pending(marked, "4", first_release=False) == []
    assert migrations.pending(marked, "", first_release=False) == marked, "an unknown schema counts them all"
    assert migrations.pending(marked, "", first_release=True) == [], "nothing runs before a first release"


def test_the_decision_needs_the_window_or_force(settings):
    log = state.parse_log(state.Release(A, "deploy", "ok", schema="3").to_json())
    sunday, monday = datetime(2026, 12, 6, 2, 30, tzinfo=UTC), datetime(2026, 12, 7, 2, 30, tzinfo=UTC)
    assert migrations.decide(MARKED, log, settings, monday, force=False).allowed is False
    assert migrations.decide(MARKED, log, settings, monday, force=True).allowed is True
    assert migrations.decide(MARKED, log, settings, sunday, force=False).allowed is True
    assert migrations.decide("", log, settings, monday, force=False) == migrations.Decision([], True, False)


def test_the_marker_search_reads_gits_objects_and_accepts_no_match():
    command = migrations.marked_command(B)
    assert command.startswith(f"git grep -I -i -E '^--[[:space:]]*breaking' {B} -- 'migrations/*.sql'")
    assert command.endswith("; test $? -le 1")


# --- the release log -------------------------------------------------------------------------


def test_the_log_records_the_slot_and_refuses_one_that_is_not_ours():
    good = state.Release(A, "deploy", "ok", slot="b").to_json()
    assert '"slot": "b"' in good and state.parse_log(good)[0].slot == "b"
    bad = good.replace('"slot": "b"', '"slot": "c; rm -rf /"')
    assert state.parse_log(bad) == [] and state.parse_log(bad).skipped == 1


def test_rollback_dry_names_the_slot_it_would_start(project_context, mocker, release_host, capsys):
    log = "\n".join(r.to_json() for r in [state.Release(A, "deploy", "ok", slot="a"), state.Release(B, "deploy", "ok", slot="b")])
    host = release_host(log, B, containers=("\n".join(json.dumps(c) for c in (
        container("api_a", "exited", A), container("api_b", "running", B))), 0),
        upstream=(slots.render_upstream(SLOT_B, B), 0))
    mocker.patch.object(task_module, "target_for", return_value=host)
    rollback_module.rollback(project_context, dry=True)
    out = capsys.readouterr().out
    assert f"would roll back {B[:12]} -> {A[:12]}: slot a (127.0.0.1:8000) (its container is kept: started, not rebuilt)" in out
    assert "drain slot b (127.0.0.1:8002) (at most 30s)" in out
    assert not host.changes_sent, "--dry only reads"


# --- the live slot, found by scripts on their own (scripts/live-slot.sh) ------------------------


@pytest.mark.parametrize("include,live", [
    (None, "a"),  # no include yet: slot a, where app.health_url pointed before slots
    (slots.render_upstream(SLOT_A), "a"),
    (slots.render_upstream(SLOT_B, "f" * 40, maintenance=True), "b"),
    ("upstream coachntt_api {\n    server 127.0.0.1:9999;\n}\n", "a"),  # neither slot's port
])
def test_the_shell_helper_finds_the_live_slot_by_the_rule_of_the_layout(settings, app, tmp_path, include, live):
    import subprocess

    from fabfile.core.batch import ProbeResult

    probe = dataclasses.replace(slots.HealthProbe.from_settings(settings), include=str(tmp_path / "inc"))
    if include is not None:
        (tmp_path / "inc").write_text(include)
    facts = {"upstream": ProbeResult(include or "", 0 if include is not None else 1), "site_slots": ProbeResult("", 0),
             "containers": ProbeResult("", 0)}
    assert slots.layout_from(facts, app).answering().name == live, "the Python rule"
    script = slots.templates.script("live-slot.sh") + '\nlive_slot "$@"; echo "$live_name $live_url"'
    said = subprocess.run(["sh", "-c", script, "live-slot", *probe.args()], capture_output=True, text=True, timeout=10)
    assert said.stdout.split() == [live, probe.url(live)], said.stderr


def recover_reporter(mocker):
    reporter = mocker.Mock()
    reporter.phase.return_value.__enter__ = lambda *a: None
    reporter.phase.return_value.__exit__ = lambda *a: None
    return reporter


def settle_breaking_cut_off(app, host, mocker) -> tuple[bool, str]:
    """B cut off in its health gate after its breaking migrations ran, behind the 503 page; A stopped."""
    mocker.patch.object(slots, "read", return_value=layout(None, container("api_a", "exited", A),
                                                           container("api_b", "running", B), maintenance=True))
    held = lock.HeldLock(host, app.state_dir, "t0ken")
    held.release = state.Release(B, "release", previous=A, slot="b", backup="/backups/db_20261201_101010_pre-bbbbbbbbbbbb.dump",
                                 extra={state.BREAKING_MIGRATED: True})
    return settle(recover_reporter(mocker), app, held, lock.LockInfo(phase="health gate"))


def test_recover_of_a_release_cut_off_after_breaking_migrations_restores_its_backup_before_the_old_code_runs(
        app, fake_host, mocker):
    counts = '{"postgres": "16", "tables": [{"table": "public.notes", "rows": 2}]}'
    host = fake_host(replies={"backup-db load": (0, f"restored={counts}\nmanifest={counts}\n", ""),
                              "health-gate": (0, "0s 200 ok\n", ""), "switch-upstream": (0, "switched\n", "")})
    healthy, said = settle_breaking_cut_off(app, host, mocker)
    assert healthy and said == f"{A[:12]} is back and healthy"
    sent = host.sent
    # The swap stops the writers around it: the new release's slot (b) and pgbouncer.
    swap = next(i for i, c in enumerate(sent) if "stop api_b pgbouncer" in c)
    first_of_a = next(i for i, c in enumerate(sent) if "up -d --no-deps api_a" in c or "health-gate http://127.0.0.1:8000" in c)
    assert swap < first_of_a, "the database is back before the old code starts"


def test_recover_never_puts_the_old_code_on_a_schema_it_cannot_read_when_the_restore_fails(app, fake_host, mocker):
    host = fake_host(replies={"backup-db load": (1, "", "pg_restore: error: could not read input file"),
                              "health-gate": (0, "0s 200 ok\n", ""), "switch-upstream": (0, "switched\n", "")})
    healthy, said = settle_breaking_cut_off(app, host, mocker)
    assert healthy and said == f"{A[:12]} could not be put back; {B[:12]} serves and is healthy"
    assert not any("health-gate http://127.0.0.1:8000" in c for c in host.sent), "slot a (the old code) never started"


def test_recover_of_a_non_breaking_release_restores_nothing(app, fake_host, mocker):
    host = fake_host(replies={"health-gate": (0, "0s 200 ok\n", ""), "switch-upstream": (0, "switched\n", "")})
    mocker.patch.object(slots, "read", return_value=layout(SLOT_B, container("api_a", "exited", A),
                                                           container("api_b", "running", B)))
    held = lock.HeldLock(host, app.state_dir, "t0ken")
    held.release = state.Release(B, "release", previous=A, slot="b", backup="/backups/db_20261201_101010_pre-bbbbbbbbbbbb.dump")
    healthy, _ = settle(recover_reporter(mocker), app, held, lock.LockInfo(phase="drain"))
    assert healthy and not any("backup-db" in c for c in host.sent)
