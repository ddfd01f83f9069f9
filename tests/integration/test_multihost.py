"""Several hosts at once (fab -H a,b,c,d,e): monitor.check on five sandbox hosts in
parallel, one row per host, one of them down; bad host lists and layouts refused before
any connection; a changing task (deps) bounded by fleet.parallel_changes.

The hosts are made cheaply rather than by full releases: four of them run the production
data tier from examples/app's own compose file (PostgreSQL and PgBouncer, the sandbox's
images), holds one real pg_dump with its checksum in /backups, and a stand-in answers
/health on the api's port (python3's http.server: the api itself is proven by
test_monitor.py). So every check monitor.check makes passes there for real, and
a host that fails or is unreachable is the fan-out's doing, not the set-up's.
"""

from __future__ import annotations

import base64
import re
import secrets
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest

from fabfile import sandbox
from fabfile.sandbox import images
from fabfile.sandbox.load import Load
from fabfile.sandbox.network import port_open
from opsrun import BIN, OVERRIDE, PROJECT_DIR, console, json_lines, one_line

HOSTS = 5
# The sandbox's /proc/stat is this shared build machine's (see test_monitor.py).
SHARED_CPU = {"COACHNTT_THRESHOLDS__CPU_PERCENT_MAX": "100"}
APP_COMPOSE = PROJECT_DIR / "examples" / "app" / "docker-compose.prod.yml"


def fab_many(hosts, *args: str, env: dict | None = None, timeout: int = 300) -> tuple[subprocess.CompletedProcess, float]:
    """The real CLI over several hosts (`fab -H a,b,c`), and how long it took."""
    import os

    command = [str(BIN / "fab"), "-H", ",".join(f"root@{h.ip}" for h in hosts), "-i", str(hosts[0].key), *args]
    started = time.monotonic()
    result = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **SHARED_CPU, **(env or {})})
    return result, time.monotonic() - started


def sh(host, command: str, timeout: float = 300) -> str:
    code, out = console(host, command) if timeout <= 120 else _long_console(host, command, timeout)
    assert code == 0, out
    return out


def _long_console(host, command: str, timeout: float) -> tuple[int, str]:
    result = sandbox.hosts.enter(host.name, command, timeout=timeout)
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace")


def put(host, path: str, data: bytes, mode: str = "644") -> None:
    payload = base64.b64encode(data).decode()
    sh(host, f"mkdir -p $(dirname {path}) && echo {payload} | base64 -d > {path} && chmod {mode} {path}")


def data_tier(host) -> None:
    """PostgreSQL + PgBouncer from the app's compose file, a real dump in /backups, a
    stand-in answering /health on 127.0.0.1:8000."""
    images.load_images(host, families=(images.POSTGRES,))
    put(host, "/opt/coachntt/docker-compose.prod.yml", APP_COMPOSE.read_bytes())
    put(host, "/opt/coachntt/compose.sandbox.yml", OVERRIDE.read_bytes())
    password = secrets.token_hex(12)
    put(host, "/opt/coachntt/.env.production",
        f"POSTGRES_USER=coachntt\nPOSTGRES_PASSWORD={password}\nPOSTGRES_DB=coachntt_prod\n".encode(), mode="600")
    sh(host, "cd /opt/coachntt && docker compose -f docker-compose.prod.yml -f compose.sandbox.yml "
             "up -d --wait --wait-timeout 120 postgres pgbouncer >/dev/null 2>&1 || "
             "{ cd /opt/coachntt && docker compose -f docker-compose.prod.yml ps -a; exit 1; }", timeout=300)
    stamp = datetime.now(UTC).strftime("%Y%m%d_%H%M%S")
    dump = f"/backups/db_{stamp}_fleet.dump"
    sh(host, f"mkdir -p /backups && docker exec ccp_postgres pg_dump -Fc -U coachntt coachntt_prod > {dump} "
             f"&& cd /backups && sha256sum {dump.rsplit('/', 1)[1]} > {dump}.sha256")
    put(host, "/srv/health-standin/health", b"ok\n")
    sh(host, "systemd-run --unit=health-standin --property=Restart=always "
             "python3 -m http.server --bind 127.0.0.1 --directory /srv/health-standin 8000 >/dev/null && "
             "for i in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:8000/health && exit 0; sleep 0.2; done; exit 1")


@pytest.fixture(scope="module")
def five(vps_factory_module):
    """Five hosts; the first four run the data tier. The fifth is the one that goes down."""
    with ThreadPoolExecutor(HOSTS) as pool:
        hosts = list(pool.map(lambda _: vps_factory_module(flavour="provisioned"), range(HOSTS)))
    with ThreadPoolExecutor(HOSTS - 1) as pool:
        list(pool.map(data_tier, hosts[:-1]))
    return hosts


def records_by_host(output: str) -> tuple[dict[str, dict], list[dict], dict]:
    """--json over several hosts: (each host's result object, the checks, the run's counts)."""
    records = json_lines(output)
    results = {r["host"]: r for r in records if "result" in r}
    return results, [r for r in records if "check" in r], records[-1]


def test_four_hosts_pass_in_about_the_time_of_one(five):
    ready = five[:-1]
    result, _ = fab_many(ready, "monitor.check", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    results, found, summary = records_by_host(result.stdout)
    assert sorted(results) == sorted(f"root@{h.ip}" for h in ready)
    assert {r["result"] for r in results.values()} == {"ok"}
    assert summary["ok"] == len(ready) and summary["exit_code"] == 0
    # Every host really ran every check, once: nothing failed, the api's /health answered.
    for host in ready:
        mine = [r for r in found if r["host"] == f"root@{host.ip}"]
        assert {r["check"]: r["status"] for r in mine}["api health"] == "pass", mine
        assert "fail" not in {r["status"] for r in mine}, mine
        assert len(mine) == len({r["check"] for r in mine})
    assert_parallel(summary, [r["seconds"] for r in results.values()])


def assert_parallel(summary: dict, each: list[float]) -> None:
    """The run took about as long as its slowest host: within a second of it, and nearer to
    it than to the hosts' sum (what one host after another would take), however uneven."""
    total, slowest = summary["seconds"], max(each)
    assert total < slowest + 1.0, (summary, each)
    assert total - slowest < (sum(each) - slowest) / 2, (summary, each)


def test_a_host_given_twice_is_refused_before_any_connection(five):
    cursor = sh(five[0], "journalctl --no-pager -n 0 --show-cursor").strip().rsplit("cursor: ", 1)[-1]
    result, _ = fab_many([five[0], five[1], five[0]], "monitor.check")
    assert result.returncode == 2, result.stdout + result.stderr
    one_line(result, f"root@{five[0].ip}", "twice")
    assert result.stdout == ""
    logins = sh(five[0], f"journalctl --no-pager -o cat --after-cursor='{cursor}' | grep -c 'Accepted publickey' || true")
    assert logins.strip() == "0", logins


@pytest.mark.parametrize("env, words", [
    ({"COACHNTT_ROLES__APP": "root@{a}", "COACHNTT_ROLES__WEB": "root@{b}"}, ["unknown role 'web'"]),
    ({"COACHNTT_ROLES__LB": "root@{a}"}, ["roles.lb", "roles.app is empty"]),
    ({"COACHNTT_ROLES__APP": "root@{a}", "COACHNTT_ROLES__REPLICA": "root@{b}"}, ["replica needs a primary"]),
    ({"COACHNTT_ROLES__APP": "root@{a},root@{a}"}, ["listed twice in roles.app"]),
])
def test_a_bad_layout_is_one_line_and_exit_2_before_any_connection(five, env, words):
    a, b = five[0].ip, five[1].ip
    cursor = sh(five[0], "journalctl --no-pager -n 0 --show-cursor").strip().rsplit("cursor: ", 1)[-1]
    result, _ = fab_many(five[:2], "monitor.check", env={k: v.format(a=a, b=b) for k, v in env.items()})
    assert result.returncode == 2, result.stdout + result.stderr
    one_line(result, *words)
    logins = sh(five[0], f"journalctl --no-pager -o cat --after-cursor='{cursor}' | grep -c 'Accepted publickey' || true")
    assert logins.strip() == "0", logins


def test_the_layout_names_the_hosts_and_their_roles(five):
    """Without -H, a fleet task runs on every host of roles.*, each row with its roles."""
    import os

    app, lb, db, replica = five[:2], five[2], five[3], five[4]
    env = {**os.environ, **SHARED_CPU, "COACHNTT_ROLES__APP": ",".join(f"root@{h.ip}" for h in app),
           "COACHNTT_ROLES__LB": f"root@{lb.ip}", "COACHNTT_ROLES__DB": f"root@{db.ip}",
           "COACHNTT_ROLES__REPLICA": f"root@{replica.ip}"}
    result = subprocess.run([str(BIN / "fab"), "-i", str(five[0].key), "deps.check"], cwd=PROJECT_DIR,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in result.stdout.splitlines() if line.startswith("  root@")}
    assert rows == {f"root@{app[0].ip}": ["app", "ok"], f"root@{app[1].ip}": ["app", "ok"],
                    f"root@{lb.ip}": ["lb", "ok"], f"root@{db.ip}": ["db", "ok"],
                    f"root@{replica.ip}": ["replica", "ok"]}, result.stdout


def test_a_changing_task_runs_at_most_parallel_changes_hosts_at_once(five):
    result, _ = fab_many(five[:4], "deps", "--json", env={"COACHNTT_FLEET__PARALLEL_CHANGES": "2"})
    assert result.returncode == 0, result.stdout + result.stderr
    results, _, summary = records_by_host(result.stdout)
    assert summary["ok"] == 4
    # (start, end) of each host; ends lose up to 2 ms to rounding: a host that starts when
    # another ends is not running beside it.
    spans = [(r["started"], r["started"] + r["seconds"] - 0.005) for r in results.values()]
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most == 2, spans
    # Each host's own step lines (one JSON object per step) came through, under its name.
    steps = [r for r in json_lines(result.stdout) if "step" in r]
    assert {s["host"] for s in steps} == {f"root@{h.ip}" for h in five[:4]}, steps[:3]


def test_one_host_down_is_reported_unreachable_and_the_others_still_pass(five):
    """The issue's proof: 4 ok, 1 unreachable, exit non-zero, in about one host's time."""
    down = five[-1]
    sandbox.down(down.name, instance=down.instance)
    result, _ = fab_many(five, "monitor.check", env={"COACHNTT_SSH__CONNECT_TIMEOUT": "3"})
    assert result.returncode == 3, result.stdout + result.stderr
    line = one_line(result, "1 of 5 hosts", "unreachable", f"root@{down.ip}")
    assert "failed" not in line
    rows = {row.split()[0]: row.split()[2] for row in result.stdout.splitlines() if row.startswith("  root@")}
    assert rows == {**{f"root@{h.ip}": "ok" for h in five[:-1]}, f"root@{down.ip}": "unreachable"}, result.stdout
    assert "monitor.check on 5 hosts" in result.stdout and "4 ok, 0 failed, 1 unreachable" in result.stdout

    as_json, _ = fab_many(five, "monitor.check", "--json", env={"COACHNTT_SSH__CONNECT_TIMEOUT": "3"})
    assert as_json.returncode == 3, as_json.stderr
    results, found, summary = records_by_host(as_json.stdout)
    assert results[f"root@{down.ip}"]["result"] == "unreachable" and results[f"root@{down.ip}"]["exit_code"] == 3
    assert f"cannot reach root@{down.ip}" in results[f"root@{down.ip}"]["error"]
    assert (summary["ok"], summary["failed"], summary["unreachable"]) == (4, 0, 1)
    assert {r["host"] for r in found} == {f"root@{h.ip}" for h in five[:-1]}
    # The unreachable host costs its connect attempt, not a turn after the others.
    assert_parallel(summary, [r["seconds"] for r in results.values()])


# --- db.replica: the primary's rows on a standby, read through the read-only URL ----------

SQL = "docker exec ccp_postgres psql -AtX -U coachntt -d coachntt_prod"


def test_a_replica_streams_the_primarys_rows_and_the_app_reads_them_read_only(five):
    """The issue's proof: a row written on the primary is on the replica, the app's
    read-only URL reads it there and cannot write, and a replica host's own database is
    refused, not overwritten. Last in the module: it turns five[1] into a standby."""
    primary, replica = five[0], five[1]
    env = {"COACHNTT_ROLES__DB": f"root@{primary.ip}", "COACHNTT_ROLES__REPLICA": f"root@{replica.ip}",
           "COACHNTT_APP__COMPOSE_OVERRIDES": "/opt/coachntt/compose.sandbox.yml"}
    # The app's connection string, as deploy.setup's env file holds it.
    sh(primary, "cd /opt/coachntt && pw=$(sed -n 's/^POSTGRES_PASSWORD=//p' .env.production) && "
                "echo \"DATABASE_URL=postgresql://coachntt:$pw@postgres:5432/coachntt_prod\" >> .env.production")
    sh(replica, f"{SQL} -c 'create table own_data (x text); insert into own_data values ($$kept$$)'")

    refused, _ = fab_many([replica], "db.replica", env=env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    one_line(refused, "holds a database of its own", "nothing was changed")
    assert sh(replica, f"{SQL} -c 'select x from own_data'").strip() == "kept"
    assert "REPLICATION_PASSWORD" not in sh(primary, "cat /opt/coachntt/.env.production"), "the primary was changed"

    # The operator's remedy: the replica host's database goes (here: it held nothing of value).
    sh(replica, "cd /opt/coachntt && docker compose -f docker-compose.prod.yml -f compose.sandbox.yml rm -sf postgres "
                ">/dev/null 2>&1 && docker volume rm coachntt_pgdata >/dev/null")
    done, _ = fab_many([replica], "db.replica", env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for step in ("published", "password", "replication", "standby copy", "streaming", "read-only URL"):
        assert re.search(rf"^  changed +{step} ", done.stdout, re.MULTILINE), done.stdout
    password = sh(primary, "sed -n 's/^REPLICATION_PASSWORD=//p' /opt/coachntt/.env.production").strip()
    assert len(password) == 64 and password not in done.stdout + done.stderr

    again, _ = fab_many([replica], "db.replica", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert not re.search(r"^  changed ", again.stdout, re.MULTILINE) and again.stdout.count(" 0 changed") == 3, again.stdout

    token = secrets.token_hex(6)
    sh(primary, f"{SQL} -c 'create table notes_replicated (x text); insert into notes_replicated values ($${token}$$)'")
    deadline, seen = time.monotonic() + 30, ""
    while time.monotonic() < deadline and seen != token:
        _, seen = console(replica, f"{SQL} -c 'select x from notes_replicated' 2>/dev/null")
        seen = seen.strip()
        time.sleep(0.5)
    assert seen == token, "the row written on the primary never reached the replica"

    # The app host (the primary's, with no roles.app) reads through DATABASE_URL_READONLY:
    # the replica answers, and refuses a write.
    with_url = "set -a && . /opt/coachntt/.env.production && psql \"$DATABASE_URL_READONLY\" -AtX"
    assert sh(primary, f"{with_url} -c 'select x from notes_replicated'").strip() == token
    code, out = console(primary, f"{with_url} -c \"insert into notes_replicated values ('no')\"")
    assert code != 0 and "read-only transaction" in out, out
    assert sh(primary, f"{with_url} -c 'select pg_is_in_recovery()'").strip() == "t"

    # monitor.check on both: the primary counts its streaming replica, the standby its lag.
    checked, _ = fab_many([primary, replica], "monitor.check", "--json", env=env)
    _, found, _ = records_by_host(checked.stdout)
    rows = {r["host"]: r for r in found if r["check"] == "replication"}
    on_primary, on_replica = rows[f"root@{primary.ip}"], rows[f"root@{replica.ip}"]
    assert on_primary["status"] == "pass" and on_primary["streaming"] == 1, on_primary
    assert on_replica["status"] == "pass" and "streaming" in on_replica["detail"], on_replica
    assert isinstance(on_replica["lag_seconds"], int | float) and on_replica["lag_bytes"] >= 0, on_replica


# --- the load balancer: an lb host in front of two app hosts ------------------------------

LB_ENV = {"COACHNTT_RATE_LIMIT__RATE": "2000r/s", "COACHNTT_RATE_LIMIT__BURST": "4000"}


def api_standin(host) -> None:
    """What answers on the api's slot port: /health naming its host (as `version`, the field
    sandbox.load reads), so the answers say which app host served them."""
    put(host, "/srv/api-standin/health", f'{{"status": "ok", "version": "{host.name}"}}'.encode())
    sh(host, "systemd-run --unit=api-standin --property=Restart=always "
             "python3 -m http.server --bind 127.0.0.1 --directory /srv/api-standin 8000 >/dev/null && "
             "for i in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:8000/health && exit 0; sleep 0.2; done; exit 1")


@pytest.fixture(scope="module")
def balanced(vps_factory_module):
    """An lb host and two app hosts, `nginx` run on all three with the layout's roles; the
    app hosts' ufw on (SSH allowed), so only what `nginx` opens for the lb gets through."""
    with ThreadPoolExecutor(3) as pool:
        lb, *apps = list(pool.map(lambda _: vps_factory_module(flavour="provisioned"), range(3)))
    for app in apps:
        api_standin(app)
        sh(app, "ufw allow 22/tcp >/dev/null && ufw --force enable >/dev/null")
    env = {**LB_ENV, "COACHNTT_ROLES__LB": f"root@{lb.ip}", "COACHNTT_ROLES__APP": ",".join(f"root@{a.ip}" for a in apps)}
    result, _ = fab_many([lb, *apps], "nginx", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return lb, apps, env


def test_the_lb_sends_requests_to_every_app_host_and_only_it_reaches_them(balanced):
    lb, apps, env = balanced
    with Load(lb.ip, workers=2, limit=40, seconds=30) as load:
        while load.sent < 40 and time.monotonic() - load.began < 30:
            time.sleep(0.2)
    assert not load.failed(), load.failed()[:3]
    assert set(load.versions()) == {a.name for a in apps}, load.versions()
    # This machine is not the lb: ufw on the app hosts does not let it reach their lb port.
    assert not port_open(apps[0].ip, 8080)
    # A second run changes nothing on any host.
    again, _ = fab_many([lb, *apps], "nginx", env=env)
    assert again.returncode == 0 and not re.search(r"^\s+changed ", again.stdout, re.MULTILINE), again.stdout


def test_an_app_host_that_fails_is_passed_over_without_a_failed_request(balanced):
    lb, apps, _ = balanced
    down, up = apps
    with Load(lb.ip, workers=2, limit=200, seconds=60) as load:
        while load.sent < 30:
            time.sleep(0.1)
        sh(down, "systemctl stop api-standin")  # its nginx now answers 502: the lb retries the other host
        stopped_at = time.monotonic() - load.began
        while load.sent < 200 and time.monotonic() - load.began < 60:
            time.sleep(0.2)
    api_standin(down)  # a transient unit is gone once stopped: a new one
    assert load.sent == 200 and not load.failed(), load.failed()[:3]
    after = [a.version for a in load.ordered if a.at > stopped_at + 1]
    assert after and set(after) == {up.name}, set(after)


def test_an_app_host_taken_out_gets_no_new_requests_and_comes_back_only_when_it_answers(balanced):
    lb, (first, second), env = balanced
    with Load(lb.ip, workers=2, limit=300, seconds=90) as load:
        while load.sent < 20:
            time.sleep(0.1)
        taken, _ = fab_many([lb], "lb.out", "--host", first.ip, env=env)
        after_out = time.monotonic() - load.began
        while load.sent < 150 and time.monotonic() - load.began < 90:
            time.sleep(0.2)
    assert taken.returncode == 0, taken.stdout + taken.stderr
    assert not load.failed(), load.failed()[:3]
    assert {a.version for a in load.answers if a.at > after_out} == {second.name}

    status, _ = fab_many([lb], "lb.status", env=env)
    assert status.returncode == 0 and re.search(rf"{re.escape(first.ip)}\s+out\s+/health 200", status.stdout), status.stdout
    # `nginx` keeps it out; the last host in is never taken out.
    kept, _ = fab_many([lb, first, second], "nginx", env=env)
    assert kept.returncode == 0 and not re.search(r"^\s+changed ", kept.stdout, re.MULTILINE), kept.stdout
    last, _ = fab_many([lb], "lb.out", "--host", second.ip, env=env)
    assert last.returncode == 1
    one_line(last, "last app host in the load balancer")

    # Back in only when it answers the lb.
    sh(first, "systemctl stop api-standin")
    refused, _ = fab_many([lb], "lb.in", "--host", first.ip, env=env)
    assert refused.returncode == 1
    one_line(refused, f"{first.ip} answers the load balancer 502", "stays out")
    api_standin(first)
    back, _ = fab_many([lb], "lb.in", "--host", first.ip, env=env)
    assert back.returncode == 0, back.stdout + back.stderr
    with Load(lb.ip, workers=2, limit=40, seconds=30) as load:
        while load.sent < 40 and time.monotonic() - load.began < 30:
            time.sleep(0.2)
    assert not load.failed() and set(load.versions()) == {first.name, second.name}, load.versions()
