"""Several hosts at once, on sandbox hosts: the issue's layout proofs.

The fleet (fab -H a,b,c,d,e): monitor.check on five hosts in parallel, one row per host,
one of them down; bad host lists and layouts refused before any connection; a changing
task (deps) bounded by fleet.parallel_changes. Those hosts are made cheaply rather than by
full releases: four of them run the production data tier from examples/app's own compose
file (PostgreSQL and PgBouncer, the sandbox's images), hold one real pg_dump with its
checksum in /backups, and a stand-in answers /health on the api's port (python3's
http.server: the api itself is proven by test_monitor.py). So every check monitor.check
makes passes there for real, and a host that fails or is unreachable is the fan-out's
doing, not the set-up's.

The replica (db.replica): a row written on the primary reaches the standby, the app reads
it through DATABASE_URL_READONLY, and monitor.check reports the lag on both.

The rolling release (`fab release --sha SHA` with roles.lb, roles.app and roles.db, no -H):
examples/app on three app hosts behind an lb host, sharing one db host's PostgreSQL
(db.primary). Under a bounded load through the lb (sandbox.load: this machine's threads,
aimed only at the lb's 10.201.0.x address): a release rolled over all three counts 0
failed requests, migrates the shared database once and backs it up once, on the db host;
a release failing its health gate on the first host stops the roll there, that host out
of the load balancer on the release before, the other two serving, 0 failed requests.
The load balancer's own proofs (lb.out, lb.in, passing over a failed host) are test_lb.py's.
"""

from __future__ import annotations

import json
import os
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
from opsrun import (
    BIN,
    OVERRIDE,
    PROJECT_DIR,
    SHARED_CPU,
    console,
    example_app_served,
    fab,
    fab_many,
    json_lines,
    one_line,
    put,
    ready_for_the_app,
    sh,
    through_nginx,
)

HOSTS = 5
APP_COMPOSE = PROJECT_DIR / "examples" / "app" / "docker-compose.prod.yml"


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


# --- the rolling release: 3 app hosts behind 1 lb, sharing 1 db host -------------------------
# Own xdist group: this layout's hosts are its own, and it runs beside the fleet's tests.

APPS = 3
ROLL_ENV = {"COACHNTT_RATE_LIMIT__RATE": "2000r/s", "COACHNTT_RATE_LIMIT__BURST": "4000",
            "COACHNTT_RELEASE__WATCH_SECONDS": "10", "COACHNTT_MONITOR__WATCH_INTERVAL": "2",
            "COACHNTT_CUTOVER__DRAIN_SECONDS": "5", **SHARED_CPU}
ROLLING = pytest.mark.xdist_group("test_multihost_rolling")
SHARED_SQL = "docker exec ccp_postgres psql -AtX -U coachntt -d coachntt_prod"


class Layout:
    def __init__(self, lb, apps, db, env, repo):
        self.lb, self.apps, self.db, self.env, self.repo, self.commits = lb, apps, db, env, repo, 0

    def release(self, sha: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
        """`fab release` with no -H: the layout's hosts, from roles.*."""
        return subprocess.run([str(BIN / "fab"), "-i", str(self.lb.key), "release", "--sha", sha, *extra], cwd=PROJECT_DIR,
                              capture_output=True, text=True, timeout=1500, env={**os.environ, **self.env, **(env or {})})

    def live(self, host) -> str:
        code, out = console(host, through_nginx("/health"))
        assert code == 0, out
        return json.loads(out)["version"]

    def lb_status(self) -> str:
        result = fab(self.lb, "lb.status", env=self.env)
        return result.stdout + result.stderr

    def last_entry(self, host) -> dict:
        return json.loads(sh(host, "tail -n 1 /var/lib/coachntt-ops/releases.jsonl"))

    def roll_under_load(self, files: dict, what: str, env: dict | None = None) -> tuple[str, str, subprocess.CompletedProcess, Load]:
        """A new commit changing `files`, rolled out while the load runs through the lb:
        (the release serving before, the new sha, the release's result, the load)."""
        before, new = self.live(self.apps[0]), self.new_sha(files)
        with Load(self.lb.ip, workers=3) as load:
            result = self.release(new, env=env)
        print(f"\n{what} {before[:12]} -> {new[:12]} under load: {load.summary()}")
        return before, new, result, load

    def new_sha(self, files: dict) -> str:
        from fabfile.sandbox import example_repo

        self.commits += 1
        return example_repo.commit_change(self.repo, f"rolled {self.commits}", files)


def set_up(host, env: dict, *, roles: bool = True) -> None:
    ready_for_the_app(host, env=env if roles else {k: v for k, v in env.items() if not k.startswith("COACHNTT_ROLES__")})
    result = fab(host, "deploy.setup", user="coachntt", env=env)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def layout(vps_factory_module, tmp_path_factory):
    """1 lb, 3 app hosts and 1 db host: `deploy.setup` everywhere, `db.primary` (the db host's
    PostgreSQL published, each app host's DATABASE_URL naming it), a first deploy on each app
    host in turn, then `nginx` on the lb."""
    with ThreadPoolExecutor(APPS + 2) as pool:
        lb, db_host, *apps = list(pool.map(lambda _: vps_factory_module(flavour="provisioned"), range(APPS + 2)))
    with example_app_served(tmp_path_factory.mktemp("git")) as (repo, first, served):
        env = {**served, **ROLL_ENV, "COACHNTT_ROLES__LB": f"root@{lb.ip}", "COACHNTT_ROLES__DB": f"coachntt@{db_host.ip}",
               "COACHNTT_ROLES__APP": ",".join(f"coachntt@{a.ip}" for a in apps)}
        with ThreadPoolExecutor(APPS + 1) as pool:
            list(pool.map(lambda h: set_up(h, env, roles=h is not db_host), [db_host, *apps]))
        shared = subprocess.run([str(BIN / "fab"), "-i", str(lb.key), "db.primary"], cwd=PROJECT_DIR, capture_output=True,
                                text=True, timeout=600, env={**os.environ, **env})
        assert shared.returncode == 0, shared.stdout + shared.stderr
        for app in apps:  # one at a time: the first migrates the shared database, the others find it current
            deployed = fab(app, "deploy", "--sha", first, user="coachntt", env=env)
            assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        result = fab(lb, "nginx", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        yield Layout(lb, apps, db_host, env, repo)


@ROLLING
def test_a_release_rolled_over_three_app_hosts_sharing_one_db_fails_no_request(layout):
    migration = {"migrations/0004_rolled_once.sql": "CREATE TABLE rolled_once (n int);\nINSERT INTO rolled_once VALUES (1);\n"}
    # The first host alone, then the other two at once (release.roll_parallel 2).
    before, new, result, load = layout.roll_under_load({"RELEASE": "rolled\n", **migration}, "a rolling release",
                                                       env={"COACHNTT_RELEASE__ROLL_PARALLEL": "2"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert not load.failed(), load.summary()
    assert len(load.answers) >= 200 and not load.hit_bound, load.summary()
    assert set(load.versions()) == {before, new} and load.ordered[-1].version == new, load.summary()
    assert [layout.live(a) for a in layout.apps] == [new] * APPS
    rows = re.findall(r"^  (10\.201\.0\.\d+)\s+(\S+)", result.stdout, re.MULTILINE)
    assert rows == [(a.ip, "released") for a in layout.apps], result.stdout
    status = layout.lb_status()
    assert all(re.search(rf"{re.escape(a.ip)}\s+in\s+/health 200", status) for a in layout.apps), status

    # One database, migrated once, backed up once before it, on the db host.
    assert sh(layout.db, f"{SHARED_SQL} -c 'select count(*) from rolled_once'").strip() == "1"
    entries = [layout.last_entry(a) for a in layout.apps]
    assert {e["sha"] for e in entries} == {new} and {e.get("schema") for e in entries} == {"4"}, entries
    backups = {e["backup"] for e in entries}
    assert len(backups) == 1 and f"pre-{new[:12]}" in backups.pop(), entries
    assert sh(layout.db, f"ls /backups | grep -c 'pre-{new[:12]}.dump$' || true").strip() == "1"
    for app in layout.apps:  # no PostgreSQL of their own
        assert "ccp_postgres" not in sh(app, "docker ps -a --format '{{.Names}}'")

    # monitor.check on an app host asks the shared database, and leaves PgBouncer and backups to the db host.
    checked = fab(layout.apps[1], "monitor.check", "--json", user="coachntt", env=layout.env)
    found = {r["check"]: r for r in json_lines(checked.stdout) if "check" in r}
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert found["database"]["status"] == "pass" and found["database"]["detail"].startswith(f"{layout.db.ip}:5432"), found
    assert "pgbouncer" not in found and "backup age" not in found, found


@ROLLING
def test_a_host_failing_its_gate_stops_the_roll_with_the_others_serving(layout):
    before, broken, result, load = layout.roll_under_load(
        {"BROKEN_HEALTH": "this release fails its health gate on purpose\n"}, "a rolling release failing its gate")
    assert result.returncode == 1, result.stdout + result.stderr
    first = layout.apps[0]
    one_line(result, f"the rolling release stopped at {first.ip}", "/health did not answer 200", "rolled back to",
             "out of the load balancer")
    assert not load.failed() and load.versions() == [before], load.summary()
    assert [layout.live(a) for a in layout.apps] == [before] * APPS, "the failed host is back on the release before"
    rows = re.findall(r"^  (10\.201\.0\.\d+)\s+(failed|released|not started)", result.stdout, re.MULTILINE)
    assert rows == [(first.ip, "failed"), (layout.apps[1].ip, "not started"), (layout.apps[2].ip, "not started")], result.stdout
    status = layout.lb_status()
    assert re.search(rf"{re.escape(first.ip)}\s+out\s+/health 200", status), status
    assert all(re.search(rf"{re.escape(a.ip)}\s+in\s+", status) for a in layout.apps[1:]), status

    # The operator puts it back once it is well; the next roll starts only then.
    layout.new_sha({"BROKEN_HEALTH": None})
    refused = layout.release(broken)
    assert refused.returncode == 1
    one_line(refused, "not every app host is in the load balancer", "nothing was changed")
    back = fab(layout.lb, "lb.in", "--host", first.ip, env=layout.env)
    assert back.returncode == 0, back.stdout + back.stderr


@ROLLING
def test_dry_shows_each_hosts_plan_and_moves_nothing(layout):
    before = layout.lb_status()
    sha = layout.new_sha({"RELEASE": "dry\n"})
    result = layout.release(sha, "--dry")
    assert result.returncode == 0, result.stdout + result.stderr
    for app in layout.apps:
        assert f"coachntt@{app.ip}" in result.stdout, result.stdout
    assert layout.lb_status() == before
    assert {layout.live(a) for a in layout.apps} != {sha}
