"""Releases without downtime, on a real sandbox host: the slot cutover under load.

One host lives through a service's releases, in order: deploy and rollback while a
bounded load runs through nginx (0 failed requests), a release failing its health gate
(never switched to), a websocket held across a cutover (echoes through the drain, then
a clean 1001 close), `--dry` (nothing changes), a client killed after the switch
(`deploy.recover` settles on a healthy slot), and a breaking migration (refused
outside the maintenance window, behind the 503 page with --force, then back).

The load: `Load` (fabfile/sandbox/load.py, shared with the rehearsal), a thread pool on this machine aimed only at the sandbox host's
10.201.0.x address, port 80, with the api's Host header; each request on a connection
of its own; bounded by a request count and a time limit, and stopped when the command
under test ends. A failure is any answer but 2xx, or no answer (refused, reset,
timeout). nginx's rate limit is raised on this host, so only a cutover can fail one.

Then the same host lives through `release`, the checklist around that cutover (tests
named test_release_*, `-k test_release_` selects them alone, on a fresh host): two
releases under the load (0 failed, one log entry each), one failing its health gate and
one whose watch sees 5xx (both end with the old release serving, the log saying why),
a breaking release failing after its migration (the database restored, the old release
back), one cut off after its migration (`deploy.recover` restores the database before it
puts the old release back), `--dry` and `--json`, an unknown sha and a held lock refused with nothing changed,
and the live sha again as a fast no-op.

Every cutover test is named test_cutover_*; `-k release` selects this module (with
`-k test_release`, only it: test_deploy.py has order-dependent tests with "release" in
their names).
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import select
import signal
import struct
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from fabfile.core import settings, window
from fabfile.sandbox import example_repo
from fabfile.sandbox.load import Load
from opsrun import (
    API_DOMAIN,
    PROJECT_DIR,
    console,
    example_app_served,
    fab,
    fab_in_background,
    json_lines,
    ready_for_the_app,
    through_nginx,
)

STATE = "/var/lib/coachntt-ops"
UPSTREAM = "/etc/nginx/coachntt/api-upstream.conf"
DRAIN_SECONDS = 30  # cutover.drain_seconds, the default
# Only a cutover may fail a request here: nginx's per-client limit (10 r/s) would turn
# a load from one address into 429s.
ENV = {"COACHNTT_RATE_LIMIT__RATE": "2000r/s", "COACHNTT_RATE_LIMIT__BURST": "4000"}

_probe = importlib.util.spec_from_file_location("ws_probe", PROJECT_DIR / "examples" / "app" / "scripts" / "ws_probe.py")
ws = importlib.util.module_from_spec(_probe)
_probe.loader.exec_module(ws)


# --------------------------------------------------------------------------- the service


class Service:
    def __init__(self, host, repo: Path, env: dict):
        self.host, self.repo, self.env = host, repo, {**env, **ENV}
        self.commits = 0

    def fab(self, *args: str) -> subprocess.CompletedProcess:
        return fab(self.host, *args, user="coachntt", env=self.env)

    def start(self, *args: str) -> subprocess.Popen:
        return fab_in_background(self.host, *args, env=self.env)

    def sh(self, command: str) -> str:
        code, out = console(self.host, command)
        assert code == 0, f"{command}: {out}"
        return out

    def live(self) -> str:
        """The release nginx serves the api from."""
        return json.loads(self.sh(through_nginx("/health")))["version"]

    def log(self) -> list[dict]:
        return [json.loads(line) for line in self.sh(f"cat {STATE}/releases.jsonl").splitlines() if line.startswith("{")]

    def upstream(self) -> str:
        return self.sh(f"cat {UPSTREAM}")

    def lock_held(self) -> bool:
        return console(self.host, f"test -d {STATE}/deploy.lock")[0] == 0

    def slots(self) -> dict[str, str]:
        """compose service -> 'state image'."""
        out = self.sh("docker ps -a --filter label=com.docker.compose.service --format "
                      "'{{.Label \"com.docker.compose.service\"}} {{.State}} {{.Image}}'")
        return {line.split()[0]: " ".join(line.split()[1:]) for line in out.splitlines() if line.startswith("api_")}

    def fingerprint(self) -> dict:
        """What a release may change: nginx's include and workers, the log, the checkout, the containers."""
        return {
            "files": self.sh(f"sha256sum {UPSTREAM} {STATE}/releases.jsonl"),
            "head": self.sh("sudo -u coachntt git -C /opt/coachntt rev-parse HEAD"),
            "containers": self.sh("docker ps -a --format '{{.Names}} {{.State}} {{.Image}} {{.CreatedAt}}' | sort"),
            "nginx workers": self.sh("pgrep -P $(cat /run/nginx.pid) | sort"),
        }

    def new_sha(self, files: dict | None = None) -> str:
        self.commits += 1
        return example_repo.commit_change(self.repo, f"release {self.commits}", files or {"RELEASE": f"{self.commits}\n"})


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def service(vps_factory_module, tmp_path_factory):
    host = vps_factory_module(flavour="provisioned")
    ready_for_the_app(host, env=ENV)
    with example_app_served(tmp_path_factory.mktemp("git")) as (repo, first, env):
        svc = Service(host, repo, env)
        for args in (("deploy.setup",), ("deploy", "--sha", first)):
            result = svc.fab(*args)
            assert result.returncode == 0, result.stdout + result.stderr
        yield svc


# --------------------------------------------------------------------------- deploy and rollback under load


def test_cutover_deploy_under_load_fails_no_request(service):
    before, new = service.live(), service.new_sha()
    with Load(service.host.ip) as load:
        result = service.fab("deploy", "--sha", new)
    print(f"\ndeploy {before[:12]} -> {new[:12]} under load: {load.summary()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not load.failed(), load.summary()
    assert not load.hit_bound and len(load.answers) >= 200, f"the load must cover the whole deploy: {load.summary()}"
    assert load.versions() == [before, new], f"the old release answered until the switch, then the new one: {load.summary()}"
    assert load.ordered[-1].version == new

    assert service.live() == new
    assert "server 127.0.0.1:8002;" in service.upstream(), "the second release went to slot b"
    assert service.slots() == {"api_a": f"exited coachntt/api:{before}", "api_b": f"running coachntt/api:{new}"}, \
        "the old slot is stopped, its container kept for a rollback"
    for step in ("start", "health gate", "switch", "drain"):
        assert f" {step} " in result.stdout, result.stdout
    entry = service.log()[-1]
    assert (entry["sha"], entry["result"], entry["slot"]) == (new, "ok", "b"), entry
    status = service.fab("deploy.status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"running     {new[:12]}" in status.stdout and "api -> slot b (127.0.0.1:8002)" in status.stdout, status.stdout
    assert f"{before[:12]}  HTTP 000 on 127.0.0.1:8000  (kept for rollback)" in status.stdout, status.stdout


def test_cutover_rollback_under_load_fails_no_request(service):
    now, previous = service.live(), service.log()[-2]["sha"]
    with Load(service.host.ip) as load:
        result = service.fab("rollback")
    print(f"\nrollback {now[:12]} -> {previous[:12]} under load: {load.summary()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not load.failed(), load.summary()
    assert not load.hit_bound and len(load.answers) >= 100, load.summary()
    assert load.versions() == [now, previous], load.summary()
    assert service.live() == previous
    assert "already running" not in result.stdout and "build" not in result.stdout, "the kept container starts, nothing builds"
    assert service.slots() == {"api_a": f"running coachntt/api:{previous}", "api_b": f"exited coachntt/api:{now}"}
    entry = service.log()[-1]
    assert (entry["kind"], entry["sha"], entry["result"], entry["slot"]) == ("rollback", previous, "ok", "a"), entry
    history = service.fab("deploy.history")
    assert "rollback" in history.stdout.splitlines()[-1] and "slot a" in history.stdout.splitlines()[-1], history.stdout


def test_cutover_a_release_failing_its_gate_is_never_switched_to(service):
    before = service.live()
    upstream = service.upstream()
    broken = service.new_sha({"BROKEN_HEALTH": "this release fails its health gate on purpose\n"})
    with Load(service.host.ip) as load:
        result = service.fab("deploy", "--sha", broken)
    print(f"\na release failing its gate, under load: {load.summary()}")
    assert result.returncode == 1, result.stdout + result.stderr
    line = one_line(result.stderr)
    assert "failed during health gate" in line and f"rolled back to {before[:12]}" in line, line
    assert "nginx never left it" in line, line
    assert not load.failed() and load.versions() == [before], load.summary()
    assert service.live() == before and service.upstream() == upstream, "nginx never moved"
    assert service.slots()["api_b"] == f"exited coachntt/api:{broken}", "the failed slot is stopped again"
    entry = service.log()[-1]
    assert (entry["sha"], entry["result"], entry["phase"], entry["slot"]) == (broken, "failed", "health gate", "b"), entry
    assert "/health did not answer 200 on slot b (127.0.0.1:8002)" in entry["message"], entry
    assert entry["rolled_back_to"] == before
    assert " 500 " in result.stdout, "the failed gate shows what /health answered"
    service.new_sha({"BROKEN_HEALTH": None})  # the next releases are healthy again


# --------------------------------------------------------------------------- a websocket across a cutover


def next_frame(conn) -> tuple[int, bytes]:
    """The next data or close frame; pings (the app's heartbeat) are answered on the way."""
    while True:
        opcode, payload = ws.read_frame(conn)
        if opcode == 0x9:
            ws.send_frame(conn, 0xA, payload)
            continue
        return opcode, payload


def version_through_nginx(ip: str) -> str:
    connection = http.client.HTTPConnection(ip, 80, timeout=5)
    try:
        connection.request("GET", "/health", headers={"Host": API_DOMAIN, "Connection": "close"})
        return json.loads(connection.getresponse().read()).get("version", "")
    finally:
        connection.close()


def test_cutover_websocket_keeps_echoing_through_the_drain_then_closes_with_1001(service):
    before, new = service.live(), service.new_sha()
    conn = ws.connect(f"ws://{service.host.ip}/ws", 10, None, API_DOMAIN)
    run = None
    try:
        assert json.loads(ws.read_message(conn)) == {"type": "hello", "version": before}
        run = service.start("deploy", "--sha", new)
        began, switched, echoes, after_switch, closed = time.monotonic(), None, 0, 0, None
        crossed = False  # the close frame answered an echo of ours: both were in flight at once
        while time.monotonic() - began < 300 and not closed:
            token = f"echo {echoes}"
            ws.send_frame(conn, 0x1, token.encode())
            opcode, payload = next_frame(conn)
            if opcode == 0x8:
                closed, crossed = (struct.unpack("!H", payload[:2])[0], payload[2:].decode(), time.monotonic()), True
                break
            assert payload.decode() == token, payload
            echoes += 1
            after_switch += switched is not None
            if switched is None and version_through_nginx(service.host.ip) == new:
                switched = time.monotonic()
            # Half a second with nothing of ours in flight: a close frame sent now must end in order.
            idle_until = time.monotonic() + 0.5
            while not closed and (left := idle_until - time.monotonic()) > 0:
                if conn.pending or select.select([conn.sock], [], [], left)[0]:
                    opcode, payload = ws.read_frame(conn)
                    if opcode == 0x9:  # the app's heartbeat
                        ws.send_frame(conn, 0xA, payload)
                        continue
                    assert opcode == 0x8, f"unasked frame {opcode}: {payload!r}"
                    closed = (struct.unpack("!H", payload[:2])[0], payload[2:].decode(), time.monotonic())
        if not closed:
            out, err = run.communicate(timeout=300)
            pytest.fail(f"no close frame within 300s ({echoes} echoes, switched: {switched is not None}); the deploy said:\n"
                        f"{out}{err}\n{service.sh('docker ps -a; cat ' + UPSTREAM + '; ss -Htn state established')}")
        # The frame, then the end of the stream in order (FIN: recv gives b""), never a reset, unless
        # the close crossed an echo of ours on the wire: a socket closed with that unread may answer RST.
        try:
            tail = conn.sock.recv(16)
        except ConnectionResetError:
            assert crossed, "after its close frame (nothing of ours in flight) the server reset the connection"
            tail = b""
        assert tail == b"", "after its close frame the server ends the connection in order"
    finally:
        conn.close()
        if run is not None and run.returncode is None:
            out, err = run.communicate(timeout=300)  # never leave the deploy running under the next test
    assert run.returncode == 0, out + err
    code, reason, at = closed
    print(f"\nwebsocket: {echoes} echoes, {after_switch} after the switch; closed {at - switched:.1f}s after it "
          f"with {code} {reason!r}")
    assert (code, reason) == (1001, "going away")
    assert switched is not None and after_switch >= 10, "the old slot kept echoing after the switch, while it drained"
    assert at - switched >= DRAIN_SECONDS - 5, "the websocket was given the drain time before its slot stopped"
    assert "still open to 127.0.0.1:8000 (websockets): closed as the slot stops" in out, out
    fresh = ws.connect(f"ws://{service.host.ip}/ws", 10, None, API_DOMAIN)
    try:
        assert json.loads(ws.read_message(fresh))["version"] == new, "a client reconnecting lands on the new release"
    finally:
        fresh.close()


# --------------------------------------------------------------------------- --dry, and a run cut off after the switch


def test_cutover_dry_run_changes_nothing(service):
    before = service.fingerprint()
    new = service.new_sha()
    for args in (("deploy", "--sha", new, "--dry"), ("rollback", "--dry"), ("deploy", "--dry")):
        result = service.fab(*args)
        assert result.returncode == 0, f"{args}: {result.stdout + result.stderr}"
        assert "would " in result.stdout and "slot" in result.stdout, result.stdout
    assert service.fingerprint() == before, "no file, container, checkout or nginx worker changed"


def test_cutover_cut_off_after_the_switch_is_settled_by_recover(service):
    before, new = service.live(), service.new_sha()
    # An open websocket keeps the old slot draining for DRAIN_SECONDS: the kill lands in the drain.
    conn = ws.connect(f"ws://{service.host.ip}/ws", 10, None, API_DOMAIN)
    try:
        run = service.start("deploy", "--sha", new)
        deadline = time.monotonic() + 300
        while console(service.host, f"cat {STATE}/deploy.lock/job.phase")[1].strip() != "drain":
            assert time.monotonic() < deadline and run.poll() is None, "the deploy never reached the drain"
            time.sleep(0.3)
        assert new[:12] in service.upstream(), "switched before the drain"
        os.killpg(run.pid, signal.SIGKILL)
        run.communicate(timeout=30)
        assert service.lock_held(), "the drain still runs on the server: the lock stays"
        assert service.live() == new, "the new release serves while the old slot drains"
        recovered = service.fab("deploy.recover")
    finally:
        conn.close()
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert f"{before[:12]} is back and healthy" in recovered.stdout, recovered.stdout
    assert not service.lock_held() and service.live() == before
    assert before[:12] in service.upstream() and "default 0;" in service.upstream(), "nginx on a healthy slot, no 503 page"
    interrupted = next(e for e in reversed(service.log()) if e["sha"] == new)
    assert (interrupted["result"], interrupted["phase"]) == ("interrupted", "drain"), interrupted
    # The way back is in the log: on the interrupted entry (recover's wait took over the phase)
    # or as a rollback after it (the phase had recorded the interruption itself).
    last = service.log()[-1]
    assert ((last["sha"], last["result"], last.get("rolled_back_to")) == (new, "interrupted", before)
            or (last["kind"], last["sha"], last["result"]) == ("rollback", before, "ok")), last


# --------------------------------------------------------------------------- a breaking migration


def breaking_release(service) -> str:
    """notes.text renamed in one step, and the code that reads the new name: the release
    before cannot run on that schema, and the migration says so."""
    main = (service.repo / "app" / "main.py").read_text()
    return service.new_sha({
        "migrations/0004_rename_text_to_content.sql":
            "-- breaking: renames notes.text in one step; the release before reads notes.text\n"
            "ALTER TABLE notes RENAME COLUMN text TO content;\n",
        "app/main.py": main.replace("text AS body", "content AS body").replace("INSERT INTO notes (text)", "INSERT INTO notes (content)"),
    })


def test_cutover_breaking_migration_is_refused_outside_the_window_and_goes_behind_a_503_page_with_force(service):
    before = service.live()
    note = service.sh(through_nginx("/api/notes", curl="curl -X POST -H 'Content-Type: application/json' "
                                                       "-d '{\"body\": \"written before the breaking release\"}'"))
    assert "written before" in note, note
    new = breaking_release(service)
    configured = settings.load(yaml.safe_load((PROJECT_DIR / "invoke.yaml").read_text())["coachntt"], service.env)
    inside = window.in_window(configured, datetime.now(UTC))
    if not inside:
        unchanged = service.fingerprint()
        refused = service.fab("deploy", "--sha", new)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        line = one_line(refused.stderr)
        assert "migrations/0004_rename_text_to_content.sql (renames notes.text in one step;" in line, line
        assert "maintenance window (Sun 02:00-04:00 UTC)" in line and "--force" in line and "nothing changed" in line, line
        assert service.fingerprint() == unchanged and service.live() == before
    # Outside the window only --force lets it go; inside, it goes without.
    args = ("deploy", "--sha", new, "--force") if not inside else ("deploy", "--sha", new)
    with Load(service.host.ip, workers=2, pause=0.1) as load:
        result = service.fab(*args)
    print(f"\nbreaking release ({'--force' if not inside else 'in the window'}): {load.summary()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "maintenance on" in result.stdout and " stop " in result.stdout, result.stdout
    down = load.failed()
    assert down and {a.status for a in down} == {503}, f"only the 503 page while it migrates: {load.summary()}"
    assert {a.retry_after for a in down} == {"300"}, "every 503 says when to come back (cutover.retry_after)"
    assert load.versions() == [before, new] and load.ordered[-1].version == new, load.summary()
    first_503, last_503 = min(a.at for a in down), max(a.at for a in down)
    assert all(a.version == before for a in load.answers if a.at < first_503 and a.status == 200)
    assert all(a.version == new for a in load.answers if a.at > last_503 and a.status == 200), "back on the new release"
    assert service.live() == new and "default 0;" in service.upstream(), "the 503 page is off again"
    assert "written before the breaking release" in service.sh(through_nginx("/api/notes")), "no row lost"
    entry = service.log()[-1]
    assert (entry["sha"], entry["result"], entry["schema"]) == (new, "ok", "4"), entry


# --------------------------------------------------------------------------- `release`: the checklist as one command
#
# The same host, after the cutover tests: `release` around deploy's cutover, watched for a
# few seconds (release.watch_seconds) so the module stays within minutes.

PHASES = ("preflight", "backup", "staging", "deploy", "verify", "watch", "drain")
RELEASE_ENV = {"COACHNTT_RELEASE__WATCH_SECONDS": "12", "COACHNTT_MONITOR__WATCH_INTERVAL": "2"}
BACKUPS = "/backups"


def release(service, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return fab(service.host, "release", *args, user="coachntt", env={**service.env, **RELEASE_ENV, **(env or {})})


def phase_lines(stdout: str) -> dict[str, str]:
    """The checklist's step lines: phase -> its result word."""
    found = {}
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] in PHASES and fields[2].endswith("s") and fields[0] not in PHASES:
            found.setdefault(fields[1], fields[0])
    return found


def phases_of(entry: dict) -> dict[str, str]:
    """The release log entry's phases, in the order they ran: phase -> result."""
    return {p["phase"]: p["result"] for p in entry["extra"]["phases"]}


def backups_on(service) -> str:
    return service.sh(f"ls {BACKUPS}")


def test_release_a_then_b_under_load_fails_no_request_and_logs_one_entry_each(service):
    for _ in range(2):
        before, new, count = service.live(), service.new_sha(), len(service.log())
        with Load(service.host.ip) as load:
            result = release(service, "--sha", new, "--message", "a release under load")
        print(f"\nrelease {before[:12]} -> {new[:12]} under load: {load.summary()}")
        assert result.returncode == 0, result.stdout + result.stderr
        assert not load.failed(), load.summary()
        assert not load.hit_bound and len(load.answers) >= 200, load.summary()
        assert load.versions() == [before, new] and load.ordered[-1].version == new, load.summary()
        assert service.live() == new
        assert phase_lines(result.stdout) == {"preflight": "ok", "backup": "changed", "staging": "skipped", "deploy": "changed",
                                              "verify": "ok", "watch": "ok", "drain": "changed"}, result.stdout
        assert "staging is not set up on" in result.stdout, "staging skipped with its reason: " + result.stdout
        log = service.log()
        assert len(log) == count + 1, "exactly one release log entry per release"
        assert [e["kind"] for e in log if e["sha"] == new] == ["release"], log
        assert not service.lock_held(), "the entry is written and the lock freed by one command"
        entry = log[-1]
        assert (entry["kind"], entry["sha"], entry["result"], entry["previous"]) == ("release", new, "ok", before), entry
        assert entry["message"] == "a release under load" and list(phases_of(entry)) == list(PHASES), entry
        assert console(service.host, f"test -s {entry['backup']}")[0] == 0, "the backup the log names is on the host"
        assert service.sh(f"cat {entry['backup']}.verified").startswith("ok "), "the backup was restored and checked"
        live_slot = entry["slot"]
        other = "a" if live_slot == "b" else "b"
        assert service.slots()[f"api_{other}"].startswith("exited") and service.slots()[f"api_{live_slot}"].startswith("running"), \
            "after the watch the old slot drained and stopped, its container kept"
        for word in ("sha before", "sha after", "backup", "url         https://api.coachntt.ai"):
            assert word in result.stdout, result.stdout


def test_release_failing_its_health_gate_ends_with_the_old_release_serving_and_says_why(service):
    before, upstream, count = service.live(), service.upstream(), len(service.log())
    broken = service.new_sha({"BROKEN_HEALTH": "this release fails its health gate on purpose\n"})
    with Load(service.host.ip) as load:
        result = release(service, "--sha", broken)
    print(f"\na release failing its gate, under load: {load.summary()}")
    assert result.returncode == 1, result.stdout + result.stderr
    line = one_line(result.stderr)
    assert f"release {broken[:12]} failed during deploy" in line and f"rolled back to {before[:12]}" in line, line
    assert not load.failed() and load.versions() == [before], load.summary()
    assert service.live() == before and service.upstream() == upstream, "nginx never moved"
    log = service.log()
    assert len(log) == count + 1
    entry = log[-1]
    assert (entry["kind"], entry["sha"], entry["result"], entry["phase"], entry["rolled_back_to"]) == \
        ("release", broken, "failed", "deploy", before), entry
    assert "/health did not answer 200" in entry["message"], entry
    assert list(phases_of(entry)) == ["preflight", "backup", "staging", "deploy", "rollback", "verify", "watch", "drain"], entry
    assert (phases_of(entry)["deploy"], phases_of(entry)["rollback"], phases_of(entry)["verify"]) == \
        ("failed", "changed", "skipped"), entry
    assert service.sh("sudo -u coachntt git -C /opt/coachntt rev-parse HEAD").strip() == before, "the checkout is back"
    service.new_sha({"BROKEN_HEALTH": None})


def test_release_whose_watch_sees_5xx_is_rolled_back_automatically(service):
    before, count = service.live(), len(service.log())
    main = service.repo / "app" / "main.py"
    good = main.read_text()
    assert "FROM notes ORDER BY" in good
    bad = service.new_sha({"app/main.py": good.replace("FROM notes ORDER BY", "FROM no_such_table ORDER BY")})
    # Four connections at a time in all, as elsewhere here: more would exhaust the app's own database pool (503).
    with Load(service.host.ip, workers=3) as health, Load(service.host.ip, path="/api/notes", workers=1) as notes:
        result = release(service, "--sha", bad)
    print(f"\na release answering 5xx on /api/notes: /health {health.summary()}\n/api/notes {notes.summary()}")
    assert result.returncode == 1, result.stdout + result.stderr
    line = one_line(result.stderr)
    assert f"release {bad[:12]} failed during watch" in line and "5xx" in line, line
    assert f"rolled back to {before[:12]}" in line and "nginx went straight back" in line, line
    assert not health.failed(), f"/health answered throughout, from one release or the other: {health.summary()}"
    assert health.versions() == [before, bad] and health.ordered[-1].version == before, health.summary()
    # The broken query is a database error to the app: 503, only while the bad release served.
    assert notes.failed() and {a.status for a in notes.failed()} <= {500, 503}, notes.summary()
    assert service.live() == before
    assert "notes" in service.sh(through_nginx("/api/notes")), "the old release answers /api/notes again"
    entry = service.log()[-1]
    assert len(service.log()) == count + 1
    assert (entry["kind"], entry["sha"], entry["result"], entry["phase"], entry["rolled_back_to"]) == \
        ("release", bad, "failed", "watch", before), entry
    assert "5xx" in entry["message"], entry
    service.new_sha({"app/main.py": good})


def post_note(service, body: str) -> None:
    note = service.sh(through_nginx("/api/notes", curl="curl -X POST -H 'Content-Type: application/json' "
                                                       f"-d '{{\"body\": \"{body}\"}}'"))
    assert body in note, note


def breaking_failing_release(service, renamed_to: str, why: str) -> tuple[str, dict]:
    """A release whose migration renames the notes column in one step (declared breaking)
    with the code that reads the new name, and a health gate that fails on purpose.
    Returns its sha and the files that undo it in the repository (for service.new_sha)."""
    good = (service.repo / "app" / "main.py").read_text()
    column = "content" if "content AS body" in good else "text"
    number = 1 + max(int(p.name[:4]) for p in (service.repo / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql"))
    migration = f"migrations/{number:04d}_rename_{column}_to_{renamed_to}.sql"
    sha = service.new_sha({
        migration: f"-- breaking: renames notes.{column} in one step\nALTER TABLE notes RENAME COLUMN {column} TO {renamed_to};\n",
        "app/main.py": good.replace(f"{column} AS body", f"{renamed_to} AS body").replace(f"INSERT INTO notes ({column})",
                                                                                         f"INSERT INTO notes ({renamed_to})"),
        "BROKEN_HEALTH": f"{why}\n",
    })
    return sha, {migration: None, "BROKEN_HEALTH": None, "app/main.py": good}


def test_release_with_breaking_migrations_failing_after_them_restores_the_database_and_the_old_release(service):
    before = service.live()
    post_note(service, "kept by the restore")
    broken, undo = breaking_failing_release(service, "body_text", "the release after a breaking migration fails its gate on purpose")
    result = release(service, "--sha", broken, "--force")
    assert result.returncode == 1, result.stdout + result.stderr
    line = one_line(result.stderr)
    assert f"release {broken[:12]} failed during deploy" in line and f"rolled back to {before[:12]}" in line, line
    assert "the database went back to the backup taken before" in line, line
    for step in ("maintenance on", "stop", "migrate", "restore database", "start old slot", "health gate old slot", "switch back"):
        assert f"      {step} " in result.stdout, result.stdout
    assert service.live() == before and "default 0;" in service.upstream(), "the old release serves, no 503 page"
    assert "kept by the restore" in service.sh(through_nginx("/api/notes")), "the old code reads the restored schema"
    entry = service.log()[-1]
    assert (entry["kind"], entry["sha"], entry["result"], entry["phase"], entry["rolled_back_to"]) == \
        ("release", broken, "failed", "deploy", before), entry
    assert "schema" not in entry, "the database is back where it was: the failed release's schema is not recorded"
    service.new_sha(undo)


def test_release_with_breaking_migrations_cut_off_after_them_is_settled_by_recover_with_the_database_back(service):
    before = service.live()
    post_note(service, "written before the cut-off release")
    # Its gate fails on purpose: the kill lands while it runs, after the migration.
    broken, undo = breaking_failing_release(service, "cut_text", "cut off during its health gate on purpose")
    run = service.start("release", "--sha", broken, "--force")
    deadline = time.monotonic() + 600
    while console(service.host, f"cat {STATE}/deploy.lock/job.phase")[1].strip() != "health gate":
        assert time.monotonic() < deadline and run.poll() is None, f"the release never reached its health gate: {run.communicate()}"
        time.sleep(0.3)
    os.killpg(run.pid, signal.SIGKILL)
    run.communicate(timeout=30)
    assert service.lock_held(), "the gate still runs on the server: the lock stays"
    recovered = service.fab("deploy.recover")
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert "restore db_" in recovered.stdout and "had started breaking migrations" in recovered.stdout, recovered.stdout
    assert f"{before[:12]} is back and healthy" in recovered.stdout, recovered.stdout
    assert not service.lock_held() and service.live() == before
    assert before[:12] in service.upstream() and "default 0;" in service.upstream(), "nginx on the old release, no 503 page"
    # The old code reads and writes the schema it knows: the database went back.
    post_note(service, "written after the recover")
    assert "written before the cut-off release" in service.sh(through_nginx("/api/notes")), "no row from before it lost"
    interrupted = next(e for e in reversed(service.log()) if e["sha"] == broken)
    assert (interrupted["result"], interrupted["phase"]) == ("interrupted", "health gate"), interrupted
    service.new_sha(undo)


def test_release_dry_run_changes_nothing(service):
    before, backups = service.fingerprint(), backups_on(service)
    new = service.new_sha()
    result = release(service, "--sha", new, "--dry")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(f" {p} " in result.stdout for p in PHASES) and "would " in result.stdout, result.stdout
    as_json = release(service, "--sha", new, "--dry", "--json")
    assert as_json.returncode == 0, as_json.stdout + as_json.stderr
    steps = [line["step"] for line in json_lines(as_json.stdout) if "step" in line]
    assert steps == list(PHASES), as_json.stdout
    assert service.fingerprint() == before and backups_on(service) == backups, "no file, container, checkout or backup changed"


def test_release_refuses_an_unknown_sha_and_a_held_lock_changing_nothing(service):
    before, backups = service.fingerprint(), backups_on(service)
    unknown = release(service, "--sha", "0123456789abcdef0123456789abcdef01234567")
    assert unknown.returncode == 2, unknown.stdout + unknown.stderr
    assert "unknown sha" in one_line(unknown.stderr)
    service.sh(f"mkdir {STATE}/deploy.lock && printf 'holder=someone@laptop\\nsince=2026-01-01T00:00:00Z\\nsha=abc\\n"
               f"message=m\\ntoken=t\\n' > {STATE}/deploy.lock/info && chown -R coachntt: {STATE}/deploy.lock")
    try:
        locked = release(service, "--sha", service.new_sha())
    finally:
        service.sh(f"rm -rf {STATE}/deploy.lock")
    assert locked.returncode == 4, locked.stdout + locked.stderr
    assert "deploy lock held by someone@laptop" in one_line(locked.stderr)
    window = release(service, "--sha", service.live(), env={"COACHNTT_MAINTENANCE__WINDOW": "whenever"})
    assert window.returncode == 2 and "maintenance.window" in one_line(window.stderr), window.stderr
    assert service.fingerprint() == before and backups_on(service) == backups, "nothing changed"


def test_release_of_the_live_sha_again_is_a_fast_no_op_that_only_verifies(service):
    live, count = service.live(), len(service.log())
    before, backups = service.fingerprint(), backups_on(service)
    began = time.monotonic()
    result = release(service, "--sha", live, "--json")
    took = time.monotonic() - began
    assert result.returncode == 0, result.stdout + result.stderr
    lines = json_lines(result.stdout)
    phases = [line for line in lines if "step" in line]
    assert [p["step"] for p in phases] == list(PHASES), result.stdout
    assert {p["step"]: p["status"] for p in phases} == {"preflight": "ok", "backup": "skipped", "staging": "skipped",
                                                        "deploy": "skipped", "verify": "ok", "watch": "skipped",
                                                        "drain": "skipped"}, result.stdout
    assert all(set(p) == {"host", "step", "status", "seconds", "reason", "changes"} for p in phases)
    summary = next(line["release"] for line in lines if "release" in line)
    assert (summary["result"], summary["sha_before"], summary["sha_after"]) == ("verified", live, live), summary
    print(f"\nthe live sha again: {took:.1f}s")
    assert took < 60, "a no-op builds, backs up and watches nothing"
    log = service.log()
    assert len(log) == count + 1
    assert (log[-1]["kind"], log[-1]["sha"], log[-1]["result"]) == ("verify", live, "ok"), log[-1]
    assert not service.lock_held(), "the verify entry and the lock's release went together"
    after = service.fingerprint()
    assert {k: v for k, v in after.items() if k != "files"} == {k: v for k, v in before.items() if k != "files"}
    assert backups_on(service) == backups, "no backup for a release that changes nothing"


# --------------------------------------------------------------------------- staging first


def staging_version(service) -> str:
    return json.loads(service.sh("curl -s -m 5 http://127.0.0.1:8001/health"))["version"]


def test_release_with_staging_set_up_tries_the_sha_there_first(service):
    setup = service.fab("staging.setup")
    assert setup.returncode == 0, setup.stdout + setup.stderr
    count, new = len(service.log()), service.new_sha()
    result = release(service, "--sha", new)
    assert result.returncode == 0, result.stdout + result.stderr
    assert phase_lines(result.stdout)["staging"] == "ok", result.stdout
    assert "smoke 200 GET http://staging.api.coachntt.ai/api/notes" in result.stdout, result.stdout
    assert staging_version(service) == new, "staging runs the released sha"
    assert service.live() == new
    log = service.log()
    assert len(log) == count + 1 and phases_of(log[-1])["staging"] == "ok", log[-1]


def test_release_whose_staging_fails_ends_with_the_old_release_serving_and_says_why(service):
    before, upstream, count = service.live(), service.upstream(), len(service.log())
    containers = ("docker ps -a --filter label=com.docker.compose.project.working_dir=/opt/coachntt "
                  "--format '{{.Names}} {{.State}} {{.Image}} {{.CreatedAt}}' | sort")
    production = {"head": service.sh("sudo -u coachntt git -C /opt/coachntt rev-parse HEAD"), "containers": service.sh(containers)}
    broken = service.new_sha({"BROKEN_HEALTH": "this release fails its health gate on purpose\n"})
    with Load(service.host.ip) as load:
        result = release(service, "--sha", broken)
    assert result.returncode == 1, result.stdout + result.stderr
    line = one_line(result.stderr)
    assert f"release {broken[:12]} failed during staging" in line, line
    assert not load.failed() and load.versions() == [before], load.summary()
    assert service.live() == before and service.upstream() == upstream, "production never moved"
    assert service.sh("sudo -u coachntt git -C /opt/coachntt rev-parse HEAD").strip() == production["head"].strip()
    assert service.sh(containers) == production["containers"], "no production container was touched"
    log = service.log()
    assert len(log) == count + 1
    entry = log[-1]
    assert (entry["kind"], entry["sha"], entry["result"], entry["phase"]) == ("release", broken, "failed", "staging"), entry
    assert phases_of(entry)["deploy"] == "skipped", entry
    service.new_sha({"BROKEN_HEALTH": None})
