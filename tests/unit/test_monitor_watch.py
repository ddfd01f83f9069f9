"""monitor.watch as data: the interval lines, the Judge's verdict at each line,
watch() over a target, the task's output and exit codes, and the script's own
contract on this machine (an access log written while it runs)."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import time
from dataclasses import replace

import pytest

from fabfile import monitor
from fabfile.core import slots
from fabfile.core import watch as watching
from fabfile.core.errors import OpsError
from fabfile.core.settings import Settings


@pytest.fixture
def cfg(defaults) -> watching.WatchConfig:
    return watching.WatchConfig.from_settings(Settings("production", defaults))


def samples(*rows: tuple[int, int, int, str]) -> list[watching.Sample]:
    return [watching.Sample(*row) for row in rows]


def judged(cfg, window, rows) -> tuple[watching.Verdict | None, int]:
    """The first verdict and how many samples it took."""
    judge = watching.Judge(cfg, window)
    for index, sample in enumerate(samples(*rows), 1):
        verdict = judge.add(sample)
        if verdict:
            return verdict, index
    return None, len(rows)


def test_sample_lines_and_nothing_else_are_samples():
    assert watching.parse_sample("sample 5 12 1 200") == watching.Sample(5, 12, 1, "200", "a")
    assert watching.parse_sample("sample 5 12 1 200 b") == watching.Sample(5, 12, 1, "200", "b"), "the live slot asked"
    assert watching.parse_sample("sample 5 12 1 200 c") is None
    assert watching.parse_sample("sample 10 0 0 000").health == "000"
    for other in ("start 1796083200", "sample 5 12 1", "sample five 1 1 200", "", "warning: x"):
        assert watching.parse_sample(other) is None


def test_the_defaults_are_the_documented_ones(cfg):
    assert (cfg.access_log, cfg.interval, cfg.error_rate_percent_max, cfg.error_rate_min_requests,
            cfg.health_grace_seconds) == ("/var/log/nginx/access.log", 5, 5, 20, 30)


def test_a_quiet_healthy_app_passes_when_the_window_is_over(cfg):
    verdict, taken = judged(cfg, 15, [(5, 0, 0, "200"), (10, 0, 0, "200"), (15, 0, 0, "200"), (20, 0, 0, "200")])
    assert verdict.passed and taken == 3
    assert verdict.reason == "0 of 0 requests were 5xx; /health 200 throughout"


def test_too_many_5xx_fails_at_once(cfg):
    verdict, taken = judged(cfg, 300, [(5, 10, 0, "200"), (10, 15, 3, "200"), (15, 10, 0, "200")])
    assert not verdict.passed and taken == 2
    assert verdict.reason == "3 of 25 requests (12.0%) were 5xx (max 5%)"
    assert (verdict.requests, verdict.errors, verdict.elapsed) == (25, 3, 10)


def test_errors_are_not_judged_before_enough_requests(cfg):
    verdict, taken = judged(cfg, 10, [(5, 3, 3, "200"), (10, 2, 1, "200")])
    assert verdict.passed and "4 of 5 requests were 5xx (80.0%)" in verdict.reason


def test_exactly_the_maximum_share_passes(cfg):
    verdict, _ = judged(cfg, 5, [(5, 100, 5, "200")])
    assert verdict.passed
    verdict, _ = judged(replace(cfg, error_rate_percent_max=0), 5, [(5, 100, 1, "200")])
    assert not verdict.passed, "0 means no 5xx at all"


def test_health_failing_for_the_grace_period_fails(cfg):
    rows = [(5, 0, 0, "200"), (10, 0, 0, "502"), (15, 0, 0, "000"), (40, 0, 0, "000"), (45, 0, 0, "000")]
    verdict, taken = judged(cfg, 300, rows)
    assert not verdict.passed and taken == 4
    assert verdict.reason == "/health failed for 30s in a row (last: no answer; grace 30s)"
    assert verdict.unhealthy_samples == 3


def test_health_that_recovers_within_its_grace_passes(cfg):
    verdict, _ = judged(cfg, 30, [(5, 0, 0, "200"), (10, 0, 0, "503"), (25, 0, 0, "200"), (30, 0, 0, "200")])
    assert verdict.passed and "/health failed in 1 sample(s), within grace" in verdict.reason


def test_health_failing_at_the_end_gets_its_grace_before_a_verdict(cfg):
    rows = [(5, 0, 0, "200"), (10, 0, 0, "503"), (15, 0, 0, "503")]
    verdict, _ = judged(cfg, 10, rows)
    assert verdict is None, "not over while /health fails and its grace runs"
    verdict, taken = judged(cfg, 10, [*rows, (20, 0, 0, "200")])
    assert verdict.passed and taken == 4
    verdict, _ = judged(cfg, 10, [*rows, (40, 0, 0, "503")])
    assert not verdict.passed


def test_a_grace_of_zero_fails_on_the_first_failed_health(cfg):
    verdict, taken = judged(replace(cfg, health_grace_seconds=0), 300, [(5, 0, 0, "200"), (10, 0, 0, "500")])
    assert not verdict.passed and taken == 2


def test_a_watch_cut_short_is_judged_on_what_was_seen(cfg):
    judge = watching.Judge(cfg, 60)
    judge.add(watching.Sample(5, 1, 0, "200"))
    assert judge.finish().reason == "the watch ended after 5s of 60s"
    judge.add(watching.Sample(10, 0, 0, "000"))
    assert not judge.finish().passed


# -- watch() over a target ------------------------------------------------------------


def test_watch_sends_one_command_and_stops_at_the_verdict(cfg, fake_host):
    lines = "start 1796083200\nsample 5 30 0 200\nsample 10 30 9 200\nsample 15 30 0 200\n"
    host = fake_host(replies={"monitor-watch": (0, lines, "")}, is_root=False, login_user="coachntt")
    seen = []
    verdict = watching.watch(host, cfg, 5, on_sample=lambda sample, judge: seen.append((sample.elapsed, judge.errors)))
    assert not verdict.passed and verdict.elapsed == 10
    assert seen == [(5, 0), (10, 9)], "nothing after the verdict"
    assert host.round_trips == 1
    assert host.sent[0].startswith("sudo -n -- sh -c "), "the access log is root's (and adm's) to read"


def test_watch_runs_the_script_past_the_window_by_the_grace(cfg, fake_host):
    import shlex

    host = fake_host(replies={"monitor-watch": (0, "sample 60 0 0 200\n", "")})
    assert watching.watch(host, cfg, 1).passed
    words = shlex.split(host.sent[0])
    assert words[3:] == ["monitor-watch", "/var/log/nginx/access.log", str(60 + 30 + 5), "5",
                         "/etc/nginx/coachntt/api-upstream.conf", "8002", "http://127.0.0.1:8000/health",
                         "http://127.0.0.1:8002/health"]


def test_no_access_log_is_one_line_naming_the_setting(cfg, fake_host):
    host = fake_host(replies={"monitor-watch": (watching.NO_LOG, "", "cannot read /var/log/nginx/access.log")})
    with pytest.raises(OpsError) as info:
        watching.watch(host, cfg, 1)
    assert info.value.one_line().startswith("no readable nginx access log at /var/log/nginx/access.log on deploy@vps; run `nginx`")


def test_a_script_that_could_not_run_says_why(cfg, fake_host):
    host = fake_host(replies={"monitor-watch": (1, "", "sudo: a password is required\n")})
    with pytest.raises(OpsError, match="the watch could not run on deploy@vps: sudo: a password is required"):
        watching.watch(host, cfg, 1)


# -- the task -------------------------------------------------------------------------


@pytest.fixture
def run_watch(project_context, fake_host, mocker, capsys):
    from invoke.exceptions import Exit

    from fabfile.core import task as task_module

    def run(lines: str, **flags):
        host = fake_host(replies={"monitor-watch": (0, lines, "")})
        mocker.patch.object(task_module, "target_for", return_value=host)
        code, message = 0, ""
        try:
            monitor.watch(project_context, **flags)
        except Exit as exc:
            code, message = exc.code, exc.message
        return code, capsys.readouterr().out.splitlines(), message

    return run


def test_the_task_prints_a_line_per_interval_and_passes(run_watch):
    code, lines, _ = run_watch("sample 5 4 0 200\nsample 10 6 0 200\n", minutes="0.15")
    assert code == 0
    assert lines[0].startswith("  watching localhost for 0.15 min, every 5s: fails on 5xx above 5% of at least 20 requests")
    assert lines[1] == "  0:05      4 requests     0 5xx  (so far 0/4   0.0%)  /health 200"
    assert lines[-1] == "localhost: watch passed after 10s: 0 of 10 requests were 5xx (0.0%); /health 200 throughout (1 round trip)"


def test_the_task_fails_with_one_line_and_json_says_so_too(run_watch):
    code, lines, message = run_watch("sample 5 40 30 200 b\n", minutes="1", json=True)
    records = [json.loads(line) for line in lines]
    assert code == 1
    assert message.startswith("error: the release did not hold on localhost (after 5s): 30 of 40 requests (75.0%) were 5xx")
    assert "`rollback`" in message and "`docker compose logs --tail 100 api_b`" in message, "the live slot's service"
    assert records[0] == {"host": "localhost", "elapsed": 5, "requests": 40, "errors": 30, "health": "200"}
    assert records[-1]["watch"] == "fail" and records[-1]["round_trips"] == 1


@pytest.mark.parametrize("minutes", ["0", "-1", "abc", "241", "nan"])
def test_bad_minutes_are_refused_before_connecting(refused_before_connecting, minutes):
    refused = refused_before_connecting(monitor.watch, minutes=minutes)
    assert refused.code == 2 and "--minutes must be a number above 0 and at most 240" in refused.message


def test_a_bad_watch_threshold_is_refused_before_connecting(refused_before_connecting):
    refused = refused_before_connecting(monitor.watch, env={"COACHNTT_THRESHOLDS__ERROR_RATE_PERCENT_MAX": "5%"})
    assert refused.code == 2 and "must be a number, got '5%'" in refused.message


def test_dry_says_what_it_would_watch_without_connecting(project_context, mocker, capsys):
    from fabfile.core import task as task_module

    target_for = mocker.patch.object(task_module, "target_for")
    monitor.watch(project_context, minutes="2", dry=True)
    target_for.assert_not_called()
    assert ("would watch /var/log/nginx/access.log and the live api slot's /health (http://127.0.0.1:8000/health or "
            "http://127.0.0.1:8002/health, by /etc/nginx/coachntt/api-upstream.conf)") in capsys.readouterr().out


# -- the script's contract, run by sh on this machine -----------------------------------

COMBINED = '127.0.0.1 - - [01/Dec/2026:00:00:00 +0000] "GET /{path} HTTP/1.1" {status} 12 "-" "curl/8 \\"quoted\\""\n'


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_script_counts_new_requests_and_5xx_per_interval_and_survives_rotation(cfg, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log = tmp_path / "access.log"
    log.write_text(COMBINED.format(path="before", status=500) * 3)  # before the watch: not counted
    port = server.server_address[1]
    include = tmp_path / "api-upstream.conf"
    include.write_text(slots.render_upstream(slots.Slot("b", port)))  # slot b live, on the test's server
    here = replace(cfg, access_log=str(log), interval=1,
                   health=slots.HealthProbe(("http://127.0.0.1:9/", f"http://127.0.0.1:{port}/"), (9, port), str(include)))
    process = subprocess.Popen(["sh", "-c", watching.command(here, 3)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().startswith("start ")
        with log.open("a") as fh:
            fh.write(COMBINED.format(path="a", status=200) + COMBINED.format(path="b", status=502)
                     + COMBINED.format(path="c", status=404))
        first = watching.parse_sample(process.stdout.readline())
        log.write_text(COMBINED.format(path="rotated", status=503))  # a new, shorter file
        time.sleep(0.2)
        rest = [watching.parse_sample(line) for line in process.stdout]
    finally:
        process.wait(timeout=20)
        server.shutdown()
    assert (first.requests, first.errors, first.health, first.slot) == (3, 1, "200", "b")
    assert sum(s.requests for s in rest) == 1 and sum(s.errors for s in rest) == 1
    assert rest[-1].elapsed >= 3 and process.returncode == 0


def test_the_script_without_a_readable_log_exits_3(cfg, tmp_path):
    here = replace(cfg, access_log=str(tmp_path / "none.log"))
    result = subprocess.run(["sh", "-c", watching.command(here, 1)], capture_output=True, text=True, timeout=20)
    assert result.returncode == watching.NO_LOG and result.stdout == ""
