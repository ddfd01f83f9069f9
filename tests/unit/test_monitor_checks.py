"""monitor.check as data: the script's frames turned into checks, thresholds at their
edges, each failure's remedy, the table and the JSON, settings refused before
connecting, the task's one round trip, and the script's own contract on this machine."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import subprocess
import threading
from dataclasses import replace
from urllib.parse import urlsplit

import pytest

from fabfile import monitor
from fabfile.core import checks, slots, templates
from fabfile.core.batch import ProbeResult, parse_batch
from fabfile.core.settings import Settings

NOW = 1796083200  # 2026-12-01 00:00:00 UTC
ANSI = re.compile(r"\x1b\[")


@pytest.fixture
def cfg(defaults) -> checks.CheckConfig:
    return checks.CheckConfig.from_settings(Settings("production", defaults))


def container(service: str, state: str = "running", status: str = "Up 5 minutes (healthy)", oneoff: str = "False") -> dict:
    return {"Names": [f"/coachntt-{service}-1"], "State": state, "Status": status,
            "Labels": {"com.docker.compose.service": service, "com.docker.compose.oneoff": oneoff,
                       "com.docker.compose.project.working_dir": "/opt/coachntt"}}


# After a cutover: slot b serves, slot a is stopped (kept for rollback).
HEALTHY_SERVICES = [container("postgres"), container("pgbouncer"), container("api_b"),
                    container("api_a", "exited", "Exited (0) 2 hours ago")]
GOOD_BACKUP = "db_20261130_020000_daily.dump\t2048\t1796004000\tyes\tyes\tok 2026-11-30T03:00:00Z"


def healthy(**overrides: tuple[str, int]) -> dict[str, ProbeResult]:
    """What monitor-check.sh reports on a healthy host; `overrides` replace single probes."""
    facts = {
        "now": (str(NOW), 0),
        "health": ("200 0.012 b", 0),
        "database": ("accepting connections", 0),
        "pgbouncer": ("N", 0),
        "services": (json.dumps(HEALTHY_SERVICES), 0),
        "disk": ("/ / 30000000 70000000\n/var/lib/docker / 30000000 70000000\n/backups /backups 1000 9000", 0),
        "memory": ("MemTotal:       8000000 kB\nMemAvailable:   6000000 kB", 0),
        "cpu": ("cpu  1000 0 500 8000 100 0 10 0 0 0\ncpu  1010 0 505 8080 105 0 10 0 0 0\n0.35 0.30 0.25 1/200 999\ncpus 2\n"
                "window 180", 0),
        "certificate": ("notAfter=Feb 28 12:00:00 2027 GMT", 0),
        "backups": (GOOD_BACKUP, 0),
    }
    facts.update(overrides)
    return {name: ProbeResult(out, status) for name, (out, status) in facts.items()}


def by_name(found: list[checks.Check]) -> dict[str, checks.Check]:
    return {c.name: c for c in found}


# -- the checks -----------------------------------------------------------------------


def test_a_healthy_host_passes_every_check_in_the_plans_order(cfg):
    found = checks.evaluate(healthy(), cfg)
    assert [c.name for c in found] == ["api health", "database", "pgbouncer", "services", "disk /",
                                       "disk /backups", "memory", "cpu", "certificate", "backup age"]
    assert {c.status for c in found} == {checks.PASS}, [c for c in found if c.status != checks.PASS]
    assert all(c.remedy == "" for c in found)
    shown = by_name(found)
    assert shown["api health"].detail == "http://127.0.0.1:8002/health 200 in 0.012s", "the live slot's port"
    assert shown["services"].detail == "api_a stopped (idle slot), api_b healthy, pgbouncer healthy, postgres healthy"
    assert shown["memory"].detail == "25% used of 7.6 GiB (max 80%)"
    assert shown["certificate"].detail == "89 days left (until 2027-02-28; min 14)"
    assert shown["backup age"].detail == "db_20261130_020000_daily.dump, 22.0h old (max 26h)"


@pytest.mark.parametrize("probe,answer,check,words,remedy", [
    ("health", ("000 0.000 b", 0), "api health", "http://127.0.0.1:8002/health: no answer", "docker compose restart api_b`"),
    ("health", ("503 0.020 b", 0), "api health", "HTTP 503", "rollback"),
    ("database", ("no response from 172.20.0.2:5432", 2), "database", "no response", "docker compose up -d postgres"),
    ("database", ("ccp_postgres is not running (paused)", 2), "database", "is not running (paused)",
     "docker logs --tail 50 ccp_postgres"),
    ("database", ("rejecting connections: the database system is starting up", 1), "database", "starting up",
     "docker logs --tail 50 ccp_postgres"),
    ("database", ("", 124), "database", "no answer within 5s", "restart the database"),
    ("pgbouncer", ("", 1), "pgbouncer", "no PostgreSQL answer on 127.0.0.1:6432", "PgBouncer's logs"),
    ("pgbouncer", ("HTTP/1.1 400", 0), "pgbouncer", "no PostgreSQL answer", "max_client_conn"),
    ("services", ("", 7), "services", "Docker is not answering", "systemctl start docker"),
    ("services", ("[]", 0), "services", "no containers of the compose project in /opt/coachntt", "docker compose up -d"),
    ("services", (json.dumps([container("postgres"), container("api_b", "exited", "Exited (1) 2 minutes ago")]), 0),
     "services", "api_b exited", "docker compose logs SERVICE"),
    ("services", (json.dumps([container("postgres", status="Up 1 hour (unhealthy)")]), 0), "services", "postgres unhealthy",
     "docker compose ps"),
    ("services", (json.dumps([container("api", "paused", "Up 2 hours (Paused)")]), 0), "services", "api paused", "up -d"),
    ("disk", ("/ / 85000000 15000000", 0), "disk /", "15% free (14.3 GiB of 95.4 GiB; min 20%)", "backup.prune"),
    ("disk", ("/srv/small /srv/small 9000 1000", 0), "disk /srv/small", "10% free", "docker image prune -a"),
    ("disk", ("/nowhere -", 0), "disk /nowhere", "/nowhere does not exist", "monitor.disk_paths"),
    ("memory", ("MemTotal:       8000000 kB\nMemAvailable:   1000000 kB", 0), "memory", "88% used",
     "restart the api container (`docker compose restart api_b`"),
    ("memory", ("", 1), "memory", "cannot read /proc/meminfo", "memory leaks"),
    ("cpu", ("cpu  0 0 0 0 0 0 0 0\ncpu  90 0 5 5 0 0 0 0\n1.80 1.5 1.0 3/200 9\ncpus 2", 0), "cpu",
     "95% busy over 100 ms, load 90% of 2 CPUs over 1 min (max 70%)", "`top`"),
    ("certificate", ("notAfter=Dec 11 00:00:00 2026 GMT", 0), "certificate", "10 days left (until 2026-12-11; min 14)",
     "ssl.renew"),
    ("certificate", ("notAfter=Nov 28 00:00:00 2026 GMT", 0), "certificate", "expired 3 day(s) ago", "certbot.timer"),
    ("certificate", ("sudo: a password is required", 1), "certificate", "cannot read /etc/letsencrypt/live/coachntt",
     "passwordless sudo"),
    ("backups", ("db_20261129_020000_daily.dump\t2048\t1795917600\tyes\tyes\t", 0), "backup age",
     "db_20261129_020000_daily.dump, 46.0h old (max 26h)", "backup.now"),
    ("backups", ("", 0), "backup age", "no good database backup in /backups", "backup.schedule"),
    ("backups", ("", 4), "backup age", "no backup directory /backups", "deploy.setup"),
])
def test_each_failure_names_its_check_what_was_seen_and_the_remedy(cfg, probe, answer, check, words, remedy):
    found = by_name(checks.evaluate(healthy(**{probe: answer}), cfg))
    failed = [c for c in found.values() if c.status == checks.FAIL]
    assert [c.name for c in failed] == [check], failed
    assert words in failed[0].detail
    assert remedy in failed[0].remedy


def test_the_remedies_are_the_plans_common_issues(cfg):
    fix = checks.remedies(cfg)
    assert "restart the api container" in fix["memory"] and "memory leaks" in fix["memory"]
    assert "PgBouncer's logs" in fix["pgbouncer"] and "connection limits" in fix["pgbouncer"]
    assert fix["certificate"].startswith("`ssl.renew`")
    assert "backup.prune" in fix["disk"] and "docker image prune" in fix["disk"]
    assert fix["backup age"].startswith("`backup.now`") and "timer" in fix["backup age"]


# -- thresholds at their edges ------------------------------------------------------


def test_disk_at_exactly_the_minimum_passes_and_just_below_fails(cfg):
    at = by_name(checks.evaluate(healthy(disk=("/ / 80 20", 0)), cfg))["disk /"]
    below = by_name(checks.evaluate(healthy(disk=("/ / 81 19", 0)), cfg))["disk /"]
    assert (at.status, at.value, at.limit) == (checks.PASS, 20.0, 20)
    assert (below.status, below.value) == (checks.FAIL, 19.0)


def test_near_its_limit_a_value_is_shown_to_a_tenth_so_a_failure_is_never_unexplained(cfg):
    found = by_name(checks.evaluate(healthy(memory=("MemTotal: 1000 kB\nMemAvailable: 196 kB", 0),
                                            disk=("/ / 804 196", 0)), cfg))
    assert found["memory"].status == checks.FAIL and found["memory"].detail.startswith("80.4% used")
    assert found["disk /"].status == checks.FAIL and found["disk /"].detail.startswith("19.6% free")


def test_paths_on_one_filesystem_are_one_check_named_by_its_mount(cfg):
    found = checks.disks(ProbeResult("/backups / 10 90\n/var/lib/docker / 10 90\n/srv/x /srv 50 50", 0), cfg,
                         checks.remedies(cfg))
    assert [c.name for c in found] == ["disk / (/backups)", "disk /srv (/srv/x)"]


def test_memory_at_the_maximum_passes(cfg):
    assert by_name(checks.evaluate(healthy(memory=("MemTotal: 100 kB\nMemAvailable: 20 kB", 0)), cfg))["memory"].status == checks.PASS
    tighter = replace(cfg, memory_used_percent_max=79)
    assert by_name(checks.evaluate(healthy(memory=("MemTotal: 100 kB\nMemAvailable: 20 kB", 0)), tighter))["memory"].status == checks.FAIL


@pytest.mark.parametrize("busy_line,load,status", [
    ("cpu  90 0 5 5 0 0 0 0", "1.80", checks.FAIL),  # busy now and over the last minute: sustained
    ("cpu  90 0 5 5 0 0 0 0", "0.20", checks.PASS),  # a spike (our own probes among them) is not sustained
    ("cpu  5 0 5 90 0 0 0 0", "1.80", checks.PASS),  # load of tasks waiting on I/O while the CPUs idle
    ("cpu  60 0 10 30 0 0 0 0", "1.40", checks.PASS),  # 70% exactly is not above 70%
])
def test_cpu_fails_only_when_busy_now_and_over_the_last_minute(cfg, busy_line, load, status):
    fact = ProbeResult(f"cpu  0 0 0 0 0 0 0 0\n{busy_line}\n{load} 1.0 1.0 2/100 5\ncpus 2", 0)
    assert checks.cpu(fact, cfg, checks.remedies(cfg)).status == status


def test_cpu_busy_counts_steal_and_leaves_out_iowait():
    assert checks.cpu_busy_percent("cpu  0 0 0 0 0 0 0 0", "cpu  10 0 10 50 20 0 0 10") == pytest.approx(100 * 30 / 100)
    assert checks.cpu_busy_percent("cpu  5 0 0 5 0 0 0 0", "cpu  5 0 0 5 0 0 0 0") is None
    assert checks.cpu_busy_percent("garbage", "cpu  1 2 3 4") is None


def test_no_cpu_sample_is_a_warning_not_a_failure(cfg):
    assert checks.cpu(ProbeResult("cpus 2", 0), cfg, checks.remedies(cfg)).status == checks.WARN


def test_a_certificate_with_exactly_the_minimum_days_passes(cfg):
    fact = ProbeResult("notAfter=Dec 15 00:00:00 2026 GMT", 0)
    found = checks.certificate(fact, cfg, checks.remedies(cfg), NOW)
    assert (found.status, found.value) == (checks.PASS, 14)


def test_no_certificate_yet_warns_by_default_and_fails_when_set_to(cfg):
    missing = ProbeResult("", checks.NO_CERTIFICATE)
    warned = checks.certificate(missing, cfg, checks.remedies(cfg), NOW)
    failed = checks.certificate(missing, replace(cfg, certificate_missing="fail"), checks.remedies(cfg), NOW)
    assert (warned.status, failed.status) == (checks.WARN, checks.FAIL)
    assert warned.detail == "no certificate yet at /etc/letsencrypt/live/coachntt/fullchain.pem"
    assert "ssl.issue" in warned.remedy


def test_openssls_date_is_read_as_utc():
    assert checks.certificate_expiry("notAfter=Mar  1 12:00:00 2027 GMT").isoformat() == "2027-03-01T12:00:00+00:00"
    assert checks.certificate_expiry("unable to load certificate") is None


def test_the_newest_good_backup_counts_not_the_newest_file(cfg):
    listing = "\n".join([
        GOOD_BACKUP,
        "db_20261130_230000_manual.dump\t2048\t1796079600\tno\tno\t",  # no .sha256: not good
        "db_20261130_220000_manual.dump\t2048\t1796076000\tyes\tyes\tfailed 2026-11-30T23:00:00Z sha256 mismatch",
        "data_20261130_235000_weekly.tar.gz\t2048\t1796082600\tyes\tyes\t",  # an archive of app.data_dir
        "db_20261130_210000_old.sql.gz\t2048\t1796072400\tyes\tno\t",  # a plain dump of an earlier version
    ])
    found = checks.backup_age(ProbeResult(listing, 0), cfg, checks.remedies(cfg), NOW)
    assert found.detail.startswith("db_20261130_020000_daily.dump, 22.0h old")


def test_only_bad_backups_say_how_many_were_found(cfg):
    listing = "db_20261130_230000_manual.dump\t2048\t1796079600\tno\tno\t"
    found = checks.backup_age(ProbeResult(listing, 0), cfg, checks.remedies(cfg), NOW)
    assert found.status == checks.FAIL
    assert found.detail == "no good database backup in /backups (1 without a .sha256 or failing verification)"


def test_the_health_check_asks_the_slot_the_script_found_live_and_only_the_other_may_be_stopped(cfg):
    """Slot a live (the include names it, or there is none): its port, its service; slot b idle."""
    stopped_a = json.dumps([container("postgres"), container("api_a", "exited", "Exited (1) 1 minute ago"),
                            container("api_b", "exited", "Exited (0) 1 hour ago")])
    found = by_name(checks.evaluate(healthy(health=("000 0.000 a", 0), services=(stopped_a, 0)), cfg))
    assert found["api health"].detail == "http://127.0.0.1:8000/health: no answer"
    assert "`docker compose logs --tail 50 api_a`" in found["api health"].remedy
    assert "`docker compose restart api_a`" in found["api health"].remedy
    assert found["services"].status == checks.FAIL and found["services"].detail == "api_a exited", "api_b is the idle slot"
    old_script = by_name(checks.evaluate(healthy(health=("200 0.010", 0)), cfg))["api health"]
    assert old_script.detail == "http://127.0.0.1:8000/health 200 in 0.010s", "no slot word: slot a"


def test_a_service_still_starting_warns_and_a_one_off_container_is_not_a_service(cfg):
    answer = json.dumps([*HEALTHY_SERVICES[:2], container("api", status="Up 3 seconds (health: starting)"),
                         container("api", "exited", "Exited (0) 1 minute ago", oneoff="True")])
    found = checks.services(ProbeResult(answer, 0), cfg, checks.remedies(cfg))
    assert found.status == checks.WARN and found.detail == "api still starting (health check not passed yet)"


def test_a_service_without_a_health_check_passes_while_running(cfg):
    answer = json.dumps([container("worker", status="Up 2 days")])
    assert checks.services(ProbeResult(answer, 0), cfg, checks.remedies(cfg)).detail == "worker running"


# -- output -------------------------------------------------------------------------


def test_the_table_has_no_colour_codes_unless_asked_and_a_remedy_under_each_failure(cfg):
    found = checks.evaluate(healthy(health=("503 0.1", 0)), cfg)
    plain = checks.table(found)
    assert not any(ANSI.search(line) for line in plain)
    assert re.fullmatch(r"  FAIL  api health +http://127\.0\.0\.1:8000/health: HTTP 503", plain[0]), "no slot said: slot a"
    assert plain[1].strip().startswith("-> read the api's logs")
    assert plain[2].startswith("  pass  database")
    coloured = checks.table(found, colour=True)
    assert coloured[0].startswith("  \x1b[31mFAIL\x1b[0m")


def test_json_is_one_object_per_check(cfg):
    found = checks.evaluate(healthy(memory=("MemTotal: 8000000 kB\nMemAvailable: 800000 kB", 0)), cfg)
    records = [json.loads(line) for line in checks.json_lines(found, "coachntt@vps")]
    assert [r["check"] for r in records] == [c.name for c in found]
    memory = next(r for r in records if r["check"] == "memory")
    assert memory == {"host": "coachntt@vps", "check": "memory", "status": "fail", "detail": "90% used of 7.6 GiB (max 80%)",
                      "remedy": checks.remedies(cfg, "api_b")["memory"], "value": 90.0, "limit": 80}


# -- the command and settings ---------------------------------------------------------


def test_the_command_is_the_script_with_every_value_as_one_word(cfg):
    odd = replace(cfg, disk_paths=("/", "/srv/a b"), backup_dir="/backups")
    words = shlex.split(checks.command(odd, "@@m"))
    assert words[:3] == ["bash", "-c", "\n".join(templates.script(name) for name in
                                                  ("database-location.sh", "live-slot.sh", "monitor-check.sh"))]
    assert words[3:] == ["monitor-check", "@@m", "/etc/nginx/coachntt/api-upstream.conf", "8002",
                         "http://127.0.0.1:8000/health", "http://127.0.0.1:8002/health", "ccp_postgres", "coachntt",
                         "coachntt_prod", "127.0.0.1", "6432", "/opt/coachntt",
                         "/etc/letsencrypt/live/coachntt/fullchain.pem", "/backups", "100", "replication=no",
                         "env=/opt/coachntt/.env.production",
                         "/", "/srv/a b"]


@pytest.mark.parametrize("env,words", [
    ({"COACHNTT_THRESHOLDS__MEMORY_USED_PERCENT_MAX": "eighty"}, "must be a number, got 'eighty'"),
    ({"COACHNTT_THRESHOLDS__CERTIFICATE_DAYS_MIN": "-3"}, "thresholds.certificate_days_min must be a whole number of days"),
    ({"COACHNTT_THRESHOLDS__BACKUP_AGE_HOURS_MAX": "0"}, "thresholds.backup_age_hours_max must be a whole number of hours"),
    ({"COACHNTT_THRESHOLDS__DISK_FREE_PERCENT_MIN": "120"}, "thresholds.disk_free_percent_min must be a whole number from 1 to 100"),
    ({"COACHNTT_MONITOR__CERTIFICATE_MISSING": "ignore"}, "monitor.certificate_missing must be warn or fail"),
    ({"COACHNTT_MONITOR__DISK_PATHS": "/,/srv/$(id)"}, "monitor.disk_paths must be a list of absolute paths"),
    ({"COACHNTT_MONITOR__PGBOUNCER": "pgbouncer"}, "monitor.pgbouncer must be host:port"),
    ({"COACHNTT_MONITOR__CPU_SAMPLE_MS": "10"}, "monitor.cpu_sample_ms must be a whole number of ms from 50"),
])
def test_a_bad_threshold_is_one_line_exit_2_before_connecting(refused_before_connecting, env, words):
    refused = refused_before_connecting(monitor.check, env=env)
    assert refused.code == 2
    assert words in refused.message and "\n" not in refused.message


# -- the task ---------------------------------------------------------------------------


def framed(facts: dict[str, ProbeResult], marker: str) -> str:
    return "".join(f"{marker} begin {name}\n{fact.stdout}\n{marker} end {name} {fact.status}\n" for name, fact in facts.items())


@pytest.fixture
def run_check(project_context, fake_host, mocker, capsys):
    """monitor.check against a FakeHost answering `facts`; (exit code, stdout lines, host)."""
    from invoke.exceptions import Exit

    from fabfile.core import task as task_module

    def run(facts, **flags):
        mocker.patch.object(checks.secrets, "token_hex", return_value="feed")
        host = fake_host(replies={"monitor-check": (0, framed(facts, "@@coachntt-feed"), "")}, label="coachntt@vps")
        mocker.patch.object(task_module, "target_for", return_value=host)
        code, message = 0, ""
        try:
            monitor.check(project_context, **flags)
        except Exit as exc:
            code, message = exc.code, exc.message
        return code, capsys.readouterr().out.splitlines(), message, host

    return run


def test_the_task_sends_one_command_and_exits_0_when_all_pass(run_check):
    code, lines, _, host = run_check(healthy())
    assert code == 0 and host.round_trips == 1 and len(host.sent) == 1
    assert "monitor-check" in host.sent[0]
    assert re.fullmatch(r"localhost: 10 pass, 0 warn, 0 fail in \d+\.\ds \(1 round trip\)", lines[-1])
    assert not any(ANSI.search(line) for line in lines), "no colour when stdout is not a terminal"


def test_a_warning_alone_still_exits_0(run_check):
    code, lines, _, _ = run_check(healthy(certificate=("", checks.NO_CERTIFICATE)))
    assert code == 0 and "9 pass, 1 warn, 0 fail" in lines[-1]


def test_any_failure_is_exit_1_with_one_line_naming_the_checks(run_check):
    code, lines, message, _ = run_check(healthy(health=("000 0 b", 0), database=("no response", 2)))
    assert code == 1
    assert message == "error: 2 of 10 checks fail on localhost: api health, database; each one's remedy is shown above"
    assert any(line.strip().startswith("-> start it (`docker compose up -d postgres`") for line in lines)


def test_json_is_one_object_per_check_then_a_summary_with_round_trips(run_check):
    code, lines, message, _ = run_check(healthy(memory=("MemTotal: 100 kB\nMemAvailable: 1 kB", 0)), json=True)
    records = [json.loads(line) for line in lines]
    assert code == 1 and "in its JSON object" in message
    assert len(records) == 11 and records[-1]["summary"] == {"pass": 9, "warn": 0, "fail": 1}
    assert records[-1]["round_trips"] == 1
    assert next(r for r in records if r.get("check") == "memory")["status"] == "fail"


def test_a_script_that_died_is_one_line_without_its_text(project_context, fake_host, mocker):
    from invoke.exceptions import Exit

    from fabfile.core import task as task_module

    host = fake_host(replies={"monitor-check": (127, "", "bash: not found")})
    mocker.patch.object(task_module, "target_for", return_value=host)
    with pytest.raises(Exit) as info:
        monitor.check(project_context)
    assert info.value.code == 1
    assert info.value.message.startswith("error: the checks could not run on deploy@vps (exit 127)")
    assert "monitor-check" not in info.value.message


# -- the script's contract, run by bash on this machine --------------------------------


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def health_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/health"
    server.shutdown()


def slot_b_live_at(url: str, tmp_path) -> slots.HealthProbe:
    """Slot b live on the test's own server (the include names its port); slot a's port answers nothing."""
    port = urlsplit(url).port
    include = tmp_path / "api-upstream.conf"
    include.write_text(slots.render_upstream(slots.Slot("b", port)))
    return slots.HealthProbe(("http://127.0.0.1:9/health", url), (9, port), include=str(include))


def test_the_script_frames_every_probe_with_its_status(cfg, health_url, tmp_path):
    backups = tmp_path / "backups"
    backups.mkdir()
    for name in ("db_20261130_020000_daily.dump", "db_20261130_020000_daily.dump.sha256", "data_20261130_030000_w.tar.gz"):
        (backups / name).write_text("x")
    (backups / "db_20261130_020000_daily.dump.verified").write_text("ok 2026-11-30T03:00:00Z\n")
    here = replace(cfg, health=slot_b_live_at(health_url, tmp_path), db_container="no-such-container-for-tests",
                   pgbouncer="127.0.0.1:9", app_dir=str(tmp_path), cert_file=str(tmp_path / "none.pem"), backup_dir=str(backups),
                   disk_paths=(str(tmp_path), str(tmp_path / "missing")), cpu_sample_ms=100)
    result = subprocess.run(["sh", "-c", checks.command(here, "@@t")], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    facts = parse_batch(result.stdout, "@@t")
    assert list(facts) == list(checks.PROBES)
    assert facts["health"].stdout.startswith("200 ") and facts["health"].stdout.endswith(" b") and facts["health"].ok
    assert not facts["database"].ok and not facts["pgbouncer"].ok
    assert facts["certificate"].status == checks.NO_CERTIFICATE
    assert facts["backups"].lines == ["db_20261130_020000_daily.dump\t1\t"
                                      + str(int((backups / "db_20261130_020000_daily.dump").stat().st_mtime))
                                      + "\tyes\tno\tok 2026-11-30T03:00:00Z"]
    disk = facts["disk"].lines
    assert disk[0].split()[0] == str(tmp_path) and disk[1] == f"{tmp_path / 'missing'} -"
    cpu = facts["cpu"].lines
    assert cpu[0].startswith("cpu ") and cpu[1].startswith("cpu ") and cpu[3].startswith("cpus ")
    assert cpu[4].startswith("window ") and int(cpu[4].split()[1]) >= 100, "at least cpu_sample_ms"
    assert facts["now"].stdout.isdigit()
    found = by_name(checks.evaluate(facts, here))
    assert found["api health"].status == checks.PASS
    assert found[f"disk {tmp_path / 'missing'}"].status == checks.FAIL
    assert found["backup age"].status in (checks.PASS, checks.FAIL)


def test_the_script_on_a_missing_backup_directory_says_so(cfg, health_url, tmp_path):
    here = replace(cfg, health=slot_b_live_at(health_url, tmp_path), db_container="no-such-container-for-tests",
                   pgbouncer="127.0.0.1:9", cert_file=str(tmp_path / "none.pem"), backup_dir=str(tmp_path / "nope"),
                   disk_paths=("/",), cpu_sample_ms=50)
    result = subprocess.run(["sh", "-c", checks.command(here, "@@t")], capture_output=True, text=True, timeout=60)
    assert parse_batch(result.stdout, "@@t")["backups"].status == checks.NO_BACKUP_DIR
