"""monitor.check and monitor.watch on a real sandbox host with examples/app deployed
behind nginx, a real PostgreSQL and PgBouncer.

The host runs its second release: slot b (127.0.0.1:8002) serves, slot a is stopped
and kept for rollback, so every check must follow the live slot (its port, its
compose service api_b in the remedies) and take the stopped slot for what it is.

One host, in order: the healthy app passes every check in one command (counted by
the client and in sshd's own log); the check fails naming what broke when the api
is stopped, when the database is stopped, when a small filesystem made for the test
passes its threshold, when memory, certificate or backup thresholds are set to
fail; bad thresholds are refused before any SSH session; `inv monitor.check` works
on the server itself; monitor.watch passes on a quiet app and fails on 5xx made on
purpose and on a /health outage longer than its grace. Every failure is exit 1 and
one line on stderr, never a traceback.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from fabfile.sandbox import example_repo
from opsrun import (
    BIN,
    PROJECT_DIR,
    console,
    example_app_served,
    fab,
    install_tool_on_host,
    json_lines,
    one_line,
    ready_for_the_app,
    through_nginx,
)

# The sandbox's /proc/stat and load average are this build machine's, shared with
# other work, so its CPU says nothing about the app: CPU is judged in the unit tests
# (tests/unit/test_monitor_checks.py); 100 can never be passed.
SHARED_CPU = {"COACHNTT_THRESHOLDS__CPU_PERCENT_MAX": "100"}
CERT_DIR = "/etc/letsencrypt/live/coachntt"
# After the second release: the live slot's container, and the one kept for rollback.
LIVE, IDLE = "api_b", "api_a"
SMALL_DISK = "/srv/monitor-small"


class Monitored:
    def __init__(self, host, env: dict):
        self.host, self.env = host, env

    def fab(self, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
        return fab(self.host, *args, user="coachntt", env={**self.env, **SHARED_CPU, **(env or {})}, timeout=timeout)

    def sh(self, command: str) -> str:
        code, out = console(self.host, command)
        assert code == 0, out
        return out

    def check(self, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict[str, dict], dict]:
        """monitor.check --json: (the run, each check by name, the summary)."""
        result = self.fab("monitor.check", "--json", env=env)
        records = json_lines(result.stdout)
        assert records, result.stdout + result.stderr
        return result, {r["check"]: r for r in records if "check" in r}, records[-1]

    def failing(self, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
        result, found, _ = self.check(env)
        assert result.returncode == 1, result.stdout + result.stderr
        return result, {name: r for name, r in found.items() if r["status"] == "fail"}

    def sessions_since(self, cursor: str) -> list[str]:
        """sshd's own log of sessions opened since `cursor` (LogLevel VERBOSE, set by `secure`)."""
        out = self.sh(f"journalctl --no-pager -o cat --after-cursor='{cursor}' | grep 'Starting session: ' || true")
        return [line for line in out.splitlines() if line.strip()]

    def cursor(self) -> str:
        out = self.sh("journalctl --no-pager -n 0 --show-cursor")
        return out.strip().rsplit("-- cursor: ", 1)[1].strip()

    def settled(self, seconds: int = 120) -> None:
        """/health 200 through nginx and every container but the idle slot's running and healthy."""
        deadline = time.monotonic() + seconds
        while True:
            code, health = console(self.host, through_nginx("/health", curl="curl -o /dev/null -w '%{http_code}'"))
            _, states = console(self.host, "docker ps -a --filter label=com.docker.compose.oneoff=False "
                                           "--format '{{.Label \"com.docker.compose.service\"}} {{.Status}}'")
            serving = [line for line in states.splitlines() if line.split(" ", 1)[0] != IDLE]
            if health.strip() == "200" and serving and all("(healthy)" in s for s in serving):
                return
            assert time.monotonic() < deadline, f"the app did not settle: /health {health}, {states}"
            time.sleep(1)


@pytest.fixture(scope="module")
def app(vps_factory_module, tmp_path_factory):
    host = vps_factory_module(flavour="provisioned")
    ready_for_the_app(host)
    with example_app_served(tmp_path_factory.mktemp("git")) as (repo, first, env):
        monitored = Monitored(host, env)
        second = example_repo.commit_change(repo, "second release", {"RELEASE": "2\n"})
        for args in (("deploy.setup",), ("deploy", "--sha", first), ("deploy", "--sha", second), ("nginx",), ("backup.now",)):
            result = monitored.fab(*args)
            assert result.returncode == 0, result.stdout + result.stderr
    monitored.settled()
    return monitored


@pytest.fixture
def healthy_after(app):
    """The test may break the app; it is whole and settled again afterwards."""
    yield app
    app.sh(f"docker start ccp_postgres $(docker ps -aq --filter label=com.docker.compose.service={LIVE}) >/dev/null")
    app.settled()


# -- monitor.check ------------------------------------------------------------------------


def test_the_healthy_app_passes_every_check_in_one_command(app):
    cursor = app.cursor()
    result, found, summary = app.check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert list(found) == ["api health", "database", "pgbouncer", "services", "disk /", "disk /var/lib/docker", "memory",
                           "cpu", "certificate", "backup age"]
    statuses = {name: r["status"] for name, r in found.items()}
    assert statuses == {**{name: "pass" for name in found}, "certificate": "warn"}, found
    assert found["certificate"]["detail"] == f"no certificate yet at {CERT_DIR}/fullchain.pem"
    assert found["api health"]["detail"].startswith("http://127.0.0.1:8002/health 200 in "), "the live slot's port"
    assert found["services"]["detail"] == "api_a stopped (idle slot), api_b healthy, pgbouncer healthy, postgres healthy"
    assert found["pgbouncer"]["detail"] == "answers on 127.0.0.1:6432"
    assert found["backup age"]["detail"].startswith("db_") and found["backup age"]["value"] < 1
    assert summary["summary"] == {"pass": 9, "warn": 1, "fail": 0}
    assert summary["round_trips"] == 1, "the client sent exactly one command"
    sessions = app.sessions_since(cursor)
    assert len(sessions) == 1 and "Starting session: command for coachntt" in sessions[0], sessions


def test_the_table_for_people_has_no_colour_codes_without_a_terminal(app):
    result = app.fab("monitor.check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "\x1b[" not in result.stdout
    assert result.stdout.splitlines()[0].startswith("  pass  api health")
    assert result.stdout.splitlines()[-1].endswith("(1 round trip)")


def test_a_stopped_api_fails_naming_it(healthy_after):
    app = healthy_after
    app.sh(f"docker stop $(docker ps -q --filter label=com.docker.compose.service={LIVE}) >/dev/null")
    result, failed = app.failing()
    assert set(failed) == {"api health", "services"}, failed
    assert failed["api health"]["detail"] == "http://127.0.0.1:8002/health: no answer"
    assert "`docker compose restart api_b`" in failed["api health"]["remedy"]
    assert failed["services"]["detail"] == "api_b exited", "the idle slot a, stopped too, is no failure"
    one_line(result, "2 of 10 checks fail", "api health, services")


def test_a_stopped_database_fails_naming_it(healthy_after):
    app = healthy_after
    app.sh("docker stop ccp_postgres >/dev/null")
    result, failed = app.failing()
    assert "database" in failed and "services" in failed, failed
    assert "ccp_postgres" in failed["database"]["detail"] and "is not running" in failed["database"]["detail"]
    assert "docker compose up -d postgres" in failed["database"]["remedy"]
    assert "postgres exited" in failed["services"]["detail"]
    assert set(failed) <= {"database", "services", "api health"}, "PgBouncer answers by itself, the disks are fine"
    one_line(result, "database")


def test_a_filesystem_past_its_threshold_fails_naming_it(app):
    # A 8 MiB tmpfs filled to ~90%, not the machine's disk.
    app.sh(f"mkdir -p {SMALL_DISK} && mount -t tmpfs -o size=8m tmpfs {SMALL_DISK} && "
           f"dd if=/dev/zero of={SMALL_DISK}/ballast bs=1M count=7 status=none")
    try:
        result, failed = app.failing(env={"COACHNTT_MONITOR__DISK_PATHS": f"/,{SMALL_DISK}"})
        assert list(failed) == [f"disk {SMALL_DISK}"], failed
        assert failed[f"disk {SMALL_DISK}"]["detail"].startswith("12% free (1 MiB of 8 MiB; min 20%)")
        assert "backup.prune" in failed[f"disk {SMALL_DISK}"]["remedy"]
        one_line(result, f"1 of 10 checks fail on coachntt@{app.host.ip}: disk {SMALL_DISK}")
        app.sh(f"rm {SMALL_DISK}/ballast")
        result, found, _ = app.check(env={"COACHNTT_MONITOR__DISK_PATHS": f"/,{SMALL_DISK}"})
        assert result.returncode == 0 and found[f"disk {SMALL_DISK}"]["status"] == "pass", result.stdout
    finally:
        app.sh(f"umount {SMALL_DISK}")


def test_memory_over_its_threshold_fails_with_the_plans_remedy(app):
    result, failed = app.failing(env={"COACHNTT_THRESHOLDS__MEMORY_USED_PERCENT_MAX": "1"})
    assert list(failed) == ["memory"], failed
    assert failed["memory"]["limit"] == 1 and failed["memory"]["value"] > 1
    assert "restart the api container" in failed["memory"]["remedy"] and "memory leaks" in failed["memory"]["remedy"]
    one_line(result, "memory")


def test_the_certificate_is_read_as_root_and_judged_by_its_days_left(app):
    missing, failed = app.failing(env={"COACHNTT_MONITOR__CERTIFICATE_MISSING": "fail"})
    assert list(failed) == ["certificate"] and "ssl.issue" in failed["certificate"]["remedy"], failed
    # Where certbot puts it, root-only like certbot's live directory: the deploy user reads it through sudo.
    app.sh(f"mkdir -p {CERT_DIR} && chmod 700 /etc/letsencrypt/live && "
           f"openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=api.coachntt.ai "
           f"-keyout {CERT_DIR}/privkey.pem -out {CERT_DIR}/fullchain.pem 2>/dev/null")
    try:
        result, found, _ = app.check()
        assert result.returncode == 0, result.stdout + result.stderr
        assert found["certificate"]["status"] == "pass" and found["certificate"]["value"] in (29, 30), found["certificate"]
        result, failed = app.failing(env={"COACHNTT_THRESHOLDS__CERTIFICATE_DAYS_MIN": "45"})
        assert list(failed) == ["certificate"], failed
        assert failed["certificate"]["remedy"].startswith("`ssl.renew`")
        one_line(result, "certificate")
    finally:
        app.sh("rm -rf /etc/letsencrypt/live/coachntt")


def test_a_backup_without_its_checksum_is_not_a_good_backup(app):
    # The backup.now dump and the one the second release took before migrating: none keeps its checksum.
    names = app.sh("cd /backups && ls db_*.dump").split()
    app.sh("cd /backups && for f in db_*.dump.sha256; do mv \"$f\" \"$f.away\"; done")
    try:
        result, failed = app.failing()
        assert list(failed) == ["backup age"], failed
        assert failed["backup age"]["detail"] == (f"no good database backup in /backups ({len(names)} without a .sha256 "
                                                  "or failing verification)")
        assert failed["backup age"]["remedy"].startswith("`backup.now`")
    finally:
        app.sh("cd /backups && for f in db_*.dump.sha256.away; do mv \"$f\" \"${f%.away}\"; done")


@pytest.mark.parametrize("env,words", [
    ({"COACHNTT_THRESHOLDS__DISK_FREE_PERCENT_MIN": "lots"}, "COACHNTT_THRESHOLDS__DISK_FREE_PERCENT_MIN must be a number"),
    ({"COACHNTT_THRESHOLDS__MEMORY_USED_PERCENT_MAX": "0"}, "thresholds.memory_used_percent_max must be a whole number"),
    ({"COACHNTT_MONITOR__DISK_PATHS": "/,/tmp;reboot"}, "monitor.disk_paths must be a list of absolute paths"),
])
def test_a_bad_threshold_is_refused_before_any_ssh_session(app, env, words):
    cursor = app.cursor()
    result = app.fab("monitor.check", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    one_line(result, words)
    assert app.sessions_since(cursor) == [], "refused before connecting"


def test_inv_monitor_check_on_the_server_itself(app):
    install_tool_on_host(app.host)
    code, out = console(app.host, "cd /opt/coachntt-ops && su coachntt -c "
                                  "'COACHNTT_THRESHOLDS__CPU_PERCENT_MAX=100 inv monitor.check' 2>&1")
    assert code == 0, out
    assert "localhost: 9 pass, 1 warn, 0 fail" in out and "(1 round trip)" in out, out
    assert "\x1b[" not in out


# -- monitor.watch ------------------------------------------------------------------------


def test_watch_passes_on_a_quiet_healthy_app(app):
    result = app.fab("monitor.watch", "--minutes", "0.25", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    records = json_lines(result.stdout)
    samples, summary = records[:-1], records[-1]
    assert len(samples) >= 3 and all(s["health"] == "200" for s in samples), samples
    assert summary["watch"] == "pass" and summary["errors"] == 0 and summary["round_trips"] == 1, summary
    assert summary["elapsed"] >= 15


def test_watch_fails_when_requests_answer_5xx(app):
    """25 requests to the staging site, whose upstream (127.0.0.1:8001) is not running: nginx answers 502.
    Sent on the sandbox host itself, 5 a second (under the rate limit), while /health stays 200."""
    watch = subprocess.Popen(
        [str(BIN / "fab"), "-H", f"coachntt@{app.host.ip}", "-i", str(app.host.key), "monitor.watch", "--minutes", "2"],
        cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **app.env, **SHARED_CPU},
    )
    try:
        assert watch.stdout.readline().startswith("  watching coachntt@"), "the watch began"
        started = time.monotonic()
        sent = app.sh("for i in $(seq 25); do curl -s -o /dev/null -w '%{http_code} ' -H 'Host: staging.api.coachntt.ai' "
                      "http://127.0.0.1/; sleep 0.2; done")
        assert sent.split() == ["502"] * 25, sent
        out, err = watch.communicate(timeout=60)
    finally:
        if watch.poll() is None:
            watch.kill()  # our own child, by its pid
            watch.wait()
    assert watch.returncode == 1, out + err
    assert time.monotonic() - started < 30, "it stopped at the verdict, not after 2 minutes"
    line = one_line(subprocess.CompletedProcess([], 1, out, err), "the release did not hold", "were 5xx (max 5%)", "`rollback`")
    assert "/health 200" in out
    assert int(line.split(": ", 2)[-1].split()[0]) >= 20, line


def test_watch_fails_when_health_is_down_past_its_grace(healthy_after):
    app = healthy_after
    app.sh(f"docker stop $(docker ps -q --filter label=com.docker.compose.service={LIVE}) >/dev/null")
    started = time.monotonic()
    result = app.fab("monitor.watch", "--minutes", "1", "--json",
                     env={"COACHNTT_THRESHOLDS__HEALTH_GRACE_SECONDS": "4", "COACHNTT_MONITOR__WATCH_INTERVAL": "2"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - started < 40
    summary = json_lines(result.stdout)[-1]
    assert summary["watch"] == "fail" and summary["reason"].startswith("/health failed for "), summary
    one_line(result, "(last: no answer; grace 4s)", "`docker compose logs --tail 100 api_b`")


def test_watch_without_an_access_log_says_so(app):
    result = app.fab("monitor.watch", "--minutes", "0.1", env={"COACHNTT_MONITOR__ACCESS_LOG": "/var/log/nginx/none.log"})
    assert result.returncode == 1, result.stdout + result.stderr
    one_line(result, "no readable nginx access log at /var/log/nginx/none.log")

