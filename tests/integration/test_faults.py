"""Faults injected into real runs on sandbox hosts: nothing lost, nothing left unsaid.

Every fault asserts the same invariants where they apply:
  (a) a release serves (/health 200), or one line says what is down and what fixes it;
  (b) the release log says what happened (result and phase);
  (c) the deploy lock is never free while work may still run on the server;
and: exit code as documented, exactly one line on stderr, no traceback, no row lost.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fabfile.sandbox import example_repo
from fabfile.sandbox.hosts import veth_name
from fabfile.sandbox.network import port_open
from opsrun import (
    OVERRIDE_ON_HOST,
    console,
    example_app_served,
    fab,
    fab_in_background,
    host_state,
    ready_for_the_app,
    ssh,
    ssh_retrying,
    through_nginx,
)

# =============================================================================
# deploy and rollback: interrupted, cut off, out of disk, missing preconditions
# =============================================================================

STATE = "/var/lib/coachntt-ops"
LOCK = f"{STATE}/deploy.lock"
# What serves: the api through nginx, which sends it to the live slot (/usr/bin/curl: not the shim below).
HEALTH = through_nginx("/health", curl="/usr/bin/curl")

# Test equipment, not product: shims in front of git, docker and curl on the host
# that hold one command (matched by a shell pattern) until the test lets it go,
# so a signal reaches the client exactly while that phase runs on the server.
HOLD_SHIM = r"""#!/bin/sh
name=$(basename "$0")
for hold in /run/fault-hold/*.hold; do
    [ -f "$hold" ] || continue
    pattern=$(cat "$hold")
    case "$name $*" in
    $pattern)
        : > "${hold%.hold}.reached"
        while [ -f "$hold" ]; do sleep 0.2; done
        ;;
    esac
done
exec "/usr/bin/$name" "$@"
"""
PHASE_PATTERNS = {
    "fetch": "git*fetch*",
    "backup database": "docker exec*pg_dump*",
    "checkout + build": "docker compose*build*",
    "migrate": "docker compose*scripts.migrate*",
    "start": "docker compose*up -d --no-deps*",
    "health gate": "curl*/health*",
    # After the switch: the new release serves, the old slot is being stopped.
    "drain": "docker compose*stop*",
}


class Service:
    """The host, the repo it deploys from, and every output the tool printed."""

    def __init__(self, host, repo: Path, env: dict):
        self.host, self.repo, self.env = host, repo, env
        self.outputs: list[str] = []
        self.commits = 0

    def fab(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        result = fab(self.host, *args, user="coachntt", env={**self.env, **(env or {})})
        self.outputs.append(result.stdout + result.stderr)
        return result

    def start(self, *args: str) -> subprocess.Popen:
        return fab_in_background(self.host, *args, env=self.env)

    def sh(self, command: str) -> str:
        code, out = console(self.host, command)
        assert code == 0, f"{command}: {out}"
        return out

    def health(self) -> dict:
        code, out = console(self.host, HEALTH)
        assert code == 0 and out, f"/health does not answer: {out}"
        return json.loads(out)

    def live(self) -> str:
        return self.health()["version"]

    def log(self) -> list[dict]:
        code, out = console(self.host, f"cat {STATE}/releases.jsonl")
        entries = []
        for line in out.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def lock_held(self) -> bool:
        return console(self.host, f"test -d {LOCK}")[0] == 0

    def new_sha(self, files: dict | None = None) -> str:
        self.commits += 1
        return example_repo.commit_change(self.repo, f"release {self.commits}", files or {"RELEASE": f"{self.commits}\n"})

    def note(self, body: str) -> None:
        out = self.sh(through_nginx("/api/notes", curl=f"/usr/bin/curl -X POST -H 'Content-Type: application/json' "
                                                      f"-d '{json.dumps({'body': body})}'"))
        assert body in out, out

    def notes(self) -> str:
        return self.sh(through_nginx("/api/notes", curl="/usr/bin/curl"))

    # -- holding a phase on the server

    def hold(self, phase: str) -> str:
        name = phase.replace(" ", "_").replace("+", "")
        self.sh(f"mkdir -p -m 1777 /run/fault-hold && chmod 1777 /run/fault-hold && rm -f /run/fault-hold/{name}.reached && "
                f"printf '%s' {sh_quote(PHASE_PATTERNS[phase])} > /run/fault-hold/{name}.hold")
        return name

    def wait_reached(self, name: str, process: subprocess.Popen | None = None, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if console(self.host, f"test -e /run/fault-hold/{name}.reached")[0] == 0:
                return
            if process is not None and process.poll() is not None:
                pytest.fail(f"the run ended before reaching {name}: {process.stdout.read()} {process.stderr.read()}")
            time.sleep(0.3)
        pytest.fail(f"the run never reached {name}")

    def let_go(self, name: str) -> None:
        self.sh(f"rm -f /run/fault-hold/{name}.hold")

    def assert_settled(self, live: str) -> None:
        """The invariants after a fault has been dealt with."""
        assert not self.lock_held(), "the lock is free once the release is settled"
        assert self.live() == live, f"{live[:12]} serves"


def sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def assert_one_line(err: str, *needles: str, out: str = "") -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}\n{out}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}\n{out}"
    return lines[0]


@pytest.fixture(scope="module")
def service(vps_factory_module, tmp_path_factory):
    host = vps_factory_module(flavour="provisioned")
    ready_for_the_app(host)
    shim = base64.b64encode(HOLD_SHIM.encode()).decode()
    code, out = console(host, f"echo {shim} | base64 -d > /usr/local/lib/fault-hold && chmod 755 /usr/local/lib/fault-hold && "
                              "for c in git docker curl; do ln -sf /usr/local/lib/fault-hold /usr/local/bin/$c; done")
    assert code == 0, out

    with example_app_served(tmp_path_factory.mktemp("git")) as (repo, first, env):
        svc = Service(host, repo, env)
        for args in (("deploy.setup",), ("deploy", "--sha", first)):
            result = svc.fab(*args)
            assert result.returncode == 0, result.stdout + result.stderr
        svc.note("written before any fault")
        yield svc


@pytest.mark.parametrize("phase", list(PHASE_PATTERNS))
def test_one_ctrl_c_in_each_phase_lets_it_finish_then_puts_back_what_served(service, phase):
    before, new = service.live(), service.new_sha()
    service.note(f"written before a Ctrl-C in {phase}")
    name = service.hold(phase)
    run = service.start("deploy", "--sha", new)
    service.wait_reached(name, run)
    os.killpg(run.pid, signal.SIGINT)
    time.sleep(2)
    assert run.poll() is None, "one Ctrl-C lets the phase finish before leaving"
    assert service.lock_held(), "(c) the lock stays held while the phase still runs on the server"
    # (a) a release serves meanwhile: the old one until the switch (the new one is gated on
    # its own slot's port first), the new one while the old slot drains.
    assert service.live() == (new if phase == "drain" else before)
    service.let_go(name)

    code, out, err = finish(run)
    assert code == 130, out + err
    assert_one_line(err, f"interrupted during {phase}", f"{before[:12]} is back and healthy")
    service.assert_settled(before)
    last = service.log()[-1]
    assert (last["sha"], last["result"], last["phase"]) == (new, "interrupted", phase), last
    assert last.get("rolled_back_to") == before, last
    assert f"written before a Ctrl-C in {phase}" in service.notes(), "no row written before the fault is lost"


def test_sigkill_mid_migration_keeps_the_lock_until_recover_settles_it(service):
    before, new = service.live(), service.new_sha()
    name = service.hold("migrate")
    run = service.start("deploy", "--sha", new)
    service.wait_reached(name, run)
    os.killpg(run.pid, signal.SIGKILL)
    run.communicate(timeout=30)
    assert service.live() == before, "(a) the old release serves while the migration is held"
    assert service.lock_held(), "(c) the lock stays held: the migration still runs"
    refused = service.fab("deploy", "--sha", new)
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert_one_line(refused.stderr, "deploy lock held by", "migrate")
    service.let_go(name)

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(e.get("result") == "interrupted" and e["sha"] == new for e in service.log()):
        time.sleep(1)
    entry = next(e for e in reversed(service.log()) if e["sha"] == new)
    assert (entry["result"], entry["phase"]) == ("interrupted", "migrate"), "(b) the phase recorded the lost client"
    assert service.lock_held(), "(c) recorded, but the lock waits for recover"

    recovered = service.fab("deploy.recover")
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert "is back and healthy" in recovered.stdout
    service.assert_settled(before)
    assert "written before any fault" in service.notes()
    status = service.fab("deploy.status")
    assert f"running     {before[:12]}" in status.stdout, "status names what runs, not only the checkout"


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT, signal.SIGINT)], ids=["sigterm-as-ci-sends-it", "two-ctrl-c"])
def test_leaving_at_once_keeps_the_lock_and_recover_settles(service, signals):
    before, new = service.live(), service.new_sha()
    name = service.hold("checkout + build")
    run = service.start("deploy", "--sha", new)
    service.wait_reached(name, run)
    for sig in signals:
        os.killpg(run.pid, sig)
        time.sleep(1)
    code, out, err = finish(run, timeout=60)
    assert code == 130, out + err
    assert_one_line(err, "interrupted during checkout + build", "deploy.recover", out=out)
    assert service.lock_held(), "(c) the build still runs: the lock stays"
    service.let_go(name)
    recovered = service.fab("deploy.recover")
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    service.assert_settled(before)
    entries = [e for e in service.log() if e["sha"] == new]
    assert entries and entries[-1]["result"] == "interrupted" and entries[-1]["phase"] == "checkout + build", entries


def cut_link(host, up: bool) -> None:
    """The host's cable: its veth on this machine's bridge, down or up again."""
    subprocess.run(["ip", "link", "set", veth_name(host.name), "up" if up else "down"], check=True)
    # Neighbour entries that failed during the cut take a moment to return. A real
    # login probes it: a bare TCP probe would earn a PerSourcePenalties refusal.
    deadline = time.monotonic() + 30
    while up and ssh(host, "true", user="coachntt").returncode != 0 and time.monotonic() < deadline:
        time.sleep(1)


def test_network_cut_mid_deploy_is_reported_and_recovered_when_it_is_back(service):
    before, new = service.live(), service.new_sha()
    name = service.hold("migrate")
    run = service.start("deploy", "--sha", new)
    service.wait_reached(name, run)
    cut_link(service.host, up=False)
    try:
        service.let_go(name)  # through the console: the migration ends on the host meanwhile
        code, out, err = finish(run, timeout=150)
    finally:
        cut_link(service.host, up=True)
    assert code == 3, out + err
    assert_one_line(err, "lost contact", "during migrate", "deploy.recover", out=out)
    assert service.live() == before, "(a) the old release served throughout"
    assert service.lock_held(), "(c) the client could not settle it: the lock stays"
    recovered = service.fab("deploy.recover")
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    service.assert_settled(before)
    assert any(e["sha"] == new and e.get("result") == "interrupted" for e in service.log()), "(b)"


def test_network_cut_mid_rollback_is_finished_by_recover(service):
    before, new = service.live(), service.new_sha()
    deployed = service.fab("deploy", "--sha", new)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    # A rollback starts the target's slot again (its container was kept): hold that command.
    name = service.hold("start")
    run = service.start("rollback", "--to", before)
    service.wait_reached(name, run)
    cut_link(service.host, up=False)
    try:
        service.let_go(name)
        code, out, err = finish(run, timeout=150)
    finally:
        cut_link(service.host, up=True)
    assert code == 3, out + err
    assert_one_line(err, "lost contact", "deploy.recover")
    assert service.lock_held()
    recovered = service.fab("deploy.recover")
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    service.assert_settled(before)
    last = service.log()[-1]
    assert (last["kind"], last["sha"], last["result"]) == ("rollback", before, "ok"), last


def test_sshd_stopped_mid_run_the_release_finishes_on_its_open_connection(service):
    before, new = service.live(), service.new_sha()
    name = service.hold("migrate")
    run = service.start("deploy", "--sha", new)
    service.wait_reached(name, run)
    service.sh("systemctl stop ssh.service ssh.socket 2>/dev/null; systemctl stop ssh.service")
    try:
        service.let_go(name)
        code, out, err = finish(run)
        assert code == 0, out + err
        assert service.live() == new, "the release finished over the connection it had"
        refused = service.fab("deploy.status")
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert_one_line(refused.stderr, "cannot reach")
    finally:
        service.sh("systemctl start ssh.socket 2>/dev/null; systemctl start ssh.service")
    assert not service.lock_held()
    assert service.log()[-1]["result"] == "ok"
    assert before != new


def test_disk_full_during_backup_stops_before_any_change(service):
    before, new = service.live(), service.new_sha()
    # Rows that compress badly, so the dump outgrows what is left on /backups.
    service.sh("docker exec ccp_postgres psql -q -U coachntt -d coachntt_prod -c "
               "\"CREATE TABLE IF NOT EXISTS ballast AS SELECT md5(random()::text) || md5(random()::text) AS x "
               "FROM generate_series(1, 60000)\"")
    service.sh("cp -a /backups /tmp/backups-saved && mount -t tmpfs -o size=2m,mode=700 tmpfs /backups && "
               "chown coachntt:coachntt /backups")
    try:
        result = service.fab("deploy", "--sha", new, env={"COACHNTT_THRESHOLDS__DISK_FREE_PERCENT_MIN": "1"})
        assert result.returncode == 1, result.stdout + result.stderr
        line = assert_one_line(result.stderr, "during backup database", "nothing changed")
        assert "space" in line.lower(), line
        assert service.sh("ls -A /backups") == "", "no partial dump that looks like a backup"
    finally:
        service.sh("umount /backups && rm -rf /tmp/backups-saved && "
                   "docker exec ccp_postgres psql -q -U coachntt -d coachntt_prod -c 'DROP TABLE ballast'")
    service.assert_settled(before)
    assert service.sh("sudo -u coachntt git -C /opt/coachntt rev-parse HEAD").strip() == before, "the checkout did not move"
    last = service.log()[-1]
    assert (last["sha"], last["result"], last["phase"]) == (new, "failed", "backup database"), last


def test_disk_full_during_build_rolls_back_to_what_served(service):
    before = service.live()
    new = service.new_sha({"assets/blob.bin": os.urandom(2 * 1024 * 1024)})
    service.sh("install -d -o coachntt -g coachntt /opt/coachntt/assets && "
               "mount -t tmpfs -o size=512k tmpfs /opt/coachntt/assets && chown coachntt:coachntt /opt/coachntt/assets")
    try:
        result = service.fab("deploy", "--sha", new)
        assert result.returncode == 1, result.stdout + result.stderr
        assert_one_line(result.stderr, "during checkout + build", f"rolled back to {before[:12]}")
    finally:
        service.sh("umount /opt/coachntt/assets")
    service.assert_settled(before)
    last = service.log()[-1]
    assert (last["result"], last["phase"]) == ("failed", "checkout + build"), last
    assert "written before any fault" in service.notes()


@pytest.mark.parametrize("fault,undo,expected_code,words", [
    ("mv /opt/coachntt/.env.production /root/env.saved", "mv /root/env.saved /opt/coachntt/.env.production",
     2, ".env.production is missing"),
    ("systemctl stop docker.service docker.socket", "systemctl start docker.socket docker.service && "
     "cd /opt/coachntt && sudo -u coachntt docker compose -f docker-compose.prod.yml -f " + OVERRIDE_ON_HOST + " start",
     1, "Docker is not answering"),
    ("docker stop ccp_postgres", "docker start ccp_postgres", 1, "database container ccp_postgres is not answering"),
    ("docker pause ccp_postgres", "docker unpause ccp_postgres", 1, "database container ccp_postgres is not answering"),
], ids=["env-file-missing", "docker-stopped", "database-container-stopped", "postgresql-down"])
def test_missing_preconditions_are_refused_in_preflight_changing_nothing(service, fault, undo, expected_code, words):
    before, new = service.live(), service.new_sha()
    log_before = service.sh(f"sha256sum {STATE}/releases.jsonl")
    service.sh(fault)
    try:
        result = service.fab("deploy", "--sha", new)
        assert result.returncode == expected_code, result.stdout + result.stderr
        assert_one_line(result.stderr, words)
        assert service.sh("sudo -u coachntt git -C /opt/coachntt rev-parse HEAD").strip() == before, "nothing changed"
        assert service.sh(f"sha256sum {STATE}/releases.jsonl") == log_before
        assert not service.lock_held()
    finally:
        service.sh(undo)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and console(service.host, HEALTH)[1].find('"ok"') < 0:
        time.sleep(1)
    service.assert_settled(before)


@pytest.mark.parametrize("bad_lines", [
    ['{"sha": "' + "a" * 40 + '", "kind": "deploy", "res'],
    ["null", "[1]", "7", '"text"', "{}", '{"kind": "deploy"}', '{"sha": 5, "kind": "deploy", "result": "ok"}'],
    ['{"sha": "$(touch /tmp/pwned)", "kind": "deploy", "result": "ok"}',
     '{"sha": "' + "b" * 40 + '", "kind": "deploy", "result": "ok", "message": "\\u001b[2J; `touch /tmp/pwned`"}',
     '{"sha": "' + "c" * 40 + '", "kind": "rollback; rm -rf /", "result": "ok"}'],
], ids=["torn", "not-objects", "hostile"])
def test_bad_release_log_lines_are_skipped_never_a_traceback(service, bad_lines):
    before = service.live()
    payload = base64.b64encode(("\n".join(bad_lines) + "\n").encode()).decode()
    service.sh(f"echo {payload} | base64 -d >> {STATE}/releases.jsonl")
    for args in (("deploy.history",), ("rollback.list",), ("deploy", "--sha", before)):
        result = service.fab(*args)
        assert "Traceback" not in result.stderr + result.stdout
        assert result.returncode == 0, f"{args}: {result.stdout + result.stderr}"
    assert console(service.host, "test -e /tmp/pwned")[0] != 0, "nothing from the log ran"
    service.assert_settled(before)


def test_a_lock_held_by_a_live_release_is_never_broken(service):
    before, new = service.live(), service.new_sha()
    name = service.hold("checkout + build")
    run = service.start("deploy", "--sha", new)
    service.wait_reached(name, run)
    try:
        for args in (("deploy", "--sha", before), ("deploy", "--sha", before, "--break-lock"),
                     ("deploy.unlock", "--yes"), ("deploy.recover",), ("rollback", "--break-lock")):
            refused = service.fab(*args)
            assert refused.returncode == 4, f"{args}: {refused.stdout + refused.stderr}"
            assert_one_line(refused.stderr, "checkout + build")
            assert service.lock_held()
    finally:
        service.let_go(name)
    code, out, err = finish(run)
    assert code == 0, out + err
    service.assert_settled(new)


def test_a_lock_left_by_a_dead_run_is_named_and_can_be_broken(service):
    before = service.live()
    service.sh(f"mkdir {LOCK} && printf 'holder=gone@laptop\\nsince=2026-01-01T00:00:00Z\\nsha=abc\\ntoken=dead\\n' > {LOCK}/info "
               f"&& chown -R coachntt:coachntt {LOCK}")
    refused = service.fab("deploy", "--sha", before)
    assert refused.returncode == 4
    assert_one_line(refused.stderr, "gone@laptop", "--break-lock")
    result = service.fab("deploy", "--sha", before, "--break-lock")
    assert result.returncode == 0, result.stdout + result.stderr
    service.assert_settled(before)


# =============================================================================
# Bad settings: refused before any connection
#
# A setting that would reach a shell on the host (here as root) is refused with
# exit 2 and one error line, for `--dry` too, and no SSH session is opened.
# =============================================================================

HOSTILE_SETTINGS = [
    # (variable, value, setting named in the error, file the value would create)
    ("COACHNTT_DEPLOY_USER", "coachntt;touch /tmp/x", "deploy_user", "/tmp/x"),
    ("COACHNTT_BACKUP__DB_NAME", "x$(touch /tmp/y)", "backup.db_name", "/tmp/y"),
]


def accepted_ssh_logins(host) -> int:
    """Logins sshd accepted so far, read from the host's journal through the console."""
    code, out = console(host, "journalctl --no-pager -o cat | grep -c 'Accepted publickey' || true")
    assert code == 0, out
    return int(out.strip().splitlines()[-1])


def wait_for_logins(host, at_least: int, seconds: float = 10) -> int:
    """journald may take a moment to show a login: poll, bounded."""
    deadline = time.monotonic() + seconds
    count = accepted_ssh_logins(host)
    while count < at_least and time.monotonic() < deadline:
        time.sleep(0.5)
        count = accepted_ssh_logins(host)
    return count


def test_a_hostile_setting_is_refused_before_any_ssh_session(vps_factory):
    host = vps_factory(flavour="fresh")
    # The counter must see a real login, or "no new login" below proves nothing.
    before = accepted_ssh_logins(host)
    assert ssh(host, "true").returncode == 0
    before = wait_for_logins(host, before + 1)
    assert before >= 1, "the journal shows no accepted SSH login even after one"

    for variable, value, setting, witness in HOSTILE_SETTINGS:
        for task in (("secure", "--dry"), ("deploy", "--dry")):
            result = fab(host, *task, env={variable: value})
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2, (task, variable, result.stdout + result.stderr)
            assert "Traceback" not in result.stderr, result.stderr
            assert len(lines) == 1 and lines[0].startswith(f"error: {setting} must be "), result.stderr
            assert f"got '{value}'" in lines[0] and variable in lines[0], lines[0]
            assert console(host, f"test -e {witness}")[0] != 0, f"{witness} was created on the host"

    time.sleep(2)  # what journald would still show of a login
    assert accepted_ssh_logins(host) == before, "a refused run opened an SSH session"


# =============================================================================
# secure and nginx under faults: the operator is never locked out
#
# secure over another SSH port, a hardening that refuses the deploy user (undone),
# a vendor drop-in that already breaks sshd (refused before any change), a second
# operator's key (merged, never replacing), port 80 held by another program, and
# one connection per host for a whole multi-task run.
# =============================================================================

HARDENING_DROP_IN = "/etc/ssh/sshd_config.d/00-coachntt-hardening.conf"
DEPLOY_KEYS = "/home/coachntt/.ssh/authorized_keys"


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """A failed run ends with exactly one line on stderr and never a traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def on_port(host, port: int, tmp_path: Path, key: Path | None = None) -> tuple[SimpleNamespace, SimpleNamespace, dict]:
    """(host for fab, host for ssh, env) reaching `host` on `port` with its pinned keys.

    Host keys on another port are recorded as [ip]:port: a private known_hosts file
    keeps them out of the shared one (whose entries the sandbox manages).
    """
    known = tmp_path / f"known_hosts_{port}"
    lines = Path(host.known_hosts).read_text().splitlines()
    entries = [line.split(" ", 1)[1] for line in lines if line.split(" ", 1)[0] == host.ip]
    assert entries, f"no pinned host keys for {host.ip}"
    known.write_text("".join(f"[{host.ip}]:{port} {entry}\n{host.ip} {entry}\n" for entry in entries))
    key = key or host.key
    for_fab = SimpleNamespace(ip=f"{host.ip}:{port}", key=key)
    for_ssh = SimpleNamespace(ip=host.ip, key=key, known_hosts=known)
    return for_fab, for_ssh, {"COACHNTT_KNOWN_HOSTS": str(known)}


def sshd_only_on(host, port: int) -> None:
    """Through the console, as a provider's image or an admin would: sshd listens on `port` only."""
    code, out = console(host, f"printf 'Port {port}\\n' > /etc/ssh/sshd_config.d/10-port.conf && "
                              "systemctl is-active --quiet ssh.socket && echo socket || echo service")
    assert code == 0, out
    if out.strip().splitlines()[-1] == "socket":
        # ssh.socket (Ubuntu 24.04) owns the listening socket: move its ListenStream too.
        command = (f"mkdir -p /etc/systemd/system/ssh.socket.d && "
                   f"printf '[Socket]\\nListenStream=\\nListenStream={port}\\n' > /etc/systemd/system/ssh.socket.d/port.conf && "
                   "systemctl daemon-reload && systemctl stop ssh.service; systemctl restart ssh.socket")
    else:
        command = "systemctl reload ssh.service"
    code, out = console(host, command)
    assert code == 0, out
    deadline = time.monotonic() + 10
    while not port_open(host.ip, port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert port_open(host.ip, port) and not port_open(host.ip, 22), f"sshd should listen on {port} only"


@pytest.mark.parametrize("flavour", ["fresh", "ubuntu-like"])
def test_secure_over_port_2222_keeps_the_operator_in(vps_factory, tmp_path, flavour):
    host = vps_factory(flavour=flavour)
    sshd_only_on(host, 2222)
    for_fab, for_ssh, env = on_port(host, 2222, tmp_path)

    # firewall.allow without 22: the SSH port comes from the host and this connection.
    result = fab(for_fab, "secure", env={**env, "COACHNTT_FIREWALL__ALLOW": "80/tcp,443/tcp"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "allow 2222/tcp (SSH: " in result.stdout, result.stdout

    deploy = ssh_retrying(for_ssh, "sudo -n id -u", user="coachntt", extra=("-p", "2222"))
    assert deploy.returncode == 0 and deploy.stdout.strip() == "0", deploy.stderr
    code, ufw = console(host, "ufw status")
    assert code == 0 and "Status: active" in ufw, ufw
    rules = {line.split()[0] for line in ufw.splitlines() if " ALLOW " in f" {line} "}
    assert "2222/tcp" in rules and "22/tcp" not in rules, ufw

    audit = fab(for_fab, "secure.audit", user="coachntt", env=env)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_a_hardening_that_refuses_the_deploy_user_is_undone(vps_factory):
    """A team host: coachntt's home is writable by a shared group, which a vendor drop-in's
    `StrictModes no` tolerated. Our hardening says `StrictModes yes` (first value wins), so
    sshd now refuses coachntt's key: the login proof after the reload must catch it and put
    the previous drop-in (an older coachntt-ops version) back."""
    host = vps_factory(flavour="fresh")
    older = "# written by an older coachntt-ops\nPasswordAuthentication no\n"
    code, out = console(
        host,
        f"printf '{older}' > {HARDENING_DROP_IN} && printf 'StrictModes no\\n' > /etc/ssh/sshd_config.d/60-vendor.conf && "
        "useradd --create-home --shell /bin/bash coachntt && groupadd team && useradd -M -G team alice && "
        "usermod -aG team coachntt && chgrp team /home/coachntt && chmod 2775 /home/coachntt && "
        f"systemctl reload ssh.service && cat {HARDENING_DROP_IN} | sha256sum",
    )
    assert code == 0, out
    older_sum = out.strip().splitlines()[-1]

    result = fab(host, "secure")
    line = one_error_line(result)
    assert result.returncode == 1, line
    assert line.startswith("error: a new login as coachntt failed after hardening sshd (authentication failed"), line
    assert f"restored the previous {HARDENING_DROP_IN} and reloaded sshd" in line, line

    code, out = console(host, f"cat {HARDENING_DROP_IN} | sha256sum; sshd -T | grep -E '^(strictmodes|permitrootlogin) '")
    assert code == 0 and out.splitlines()[0] == older_sum, out
    assert "strictmodes no" in out and "permitrootlogin no" not in out, out
    assert ssh_retrying(host, "true", user="root").returncode == 0, "the operator must still get in as root"
    assert ssh_retrying(host, "true", user="coachntt").returncode == 0, "and coachntt as before the run"
    code, ufw = console(host, "ufw status")
    assert "Status: inactive" in ufw, "the run stopped before the firewall"


VENDOR_DROP_IN = "/etc/ssh/sshd_config.d/60-vendor.conf"


def test_a_broken_vendor_sshd_dropin_stops_secure_before_any_change(vps_factory):
    host = vps_factory(flavour="fresh")
    code, out = console(host, f"printf '# vendor agent\\nVendorTelemetry yes\\n' > {VENDOR_DROP_IN}")
    assert code == 0, out
    before = host_state(host)

    result = fab(host, "secure")
    line = one_error_line(result)
    assert result.returncode == 1, line
    assert f"{VENDOR_DROP_IN}: line 2: Bad configuration option: VendorTelemetry" in line, line
    assert "nothing was changed" in line, line

    assert host_state(host) == before, "nothing may change"
    assert ssh_retrying(host, "true", user="root").returncode == 0, "sshd keeps serving logins"


def test_two_operators_keys_are_both_kept(vps_factory, tmp_path):
    host = vps_factory(flavour="fresh")
    key_b = tmp_path / "operator_b"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "operator-b", "-f", str(key_b)], check=True)
    ci_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDvYJdaKkBzbdPPL1ztG3Te2yRAXX4LBpQp/bxLmuVdm ci@coachntt"
    pub_b = Path(f"{key_b}.pub").read_text().strip()
    code, out = console(host, f"echo '{pub_b}' >> /root/.ssh/authorized_keys")
    assert code == 0, out
    operator_b = SimpleNamespace(ip=host.ip, key=key_b, known_hosts=host.known_hosts)

    first = fab(host, "secure", env={"COACHNTT_AUTHORIZED_KEYS": ci_key})
    assert first.returncode == 0, first.stdout + first.stderr
    # Operator B's first contact comes while root may log in (here: root login turned
    # back on through the console, as after a rebuilt sshd config).
    code, out = console(host, f"rm {HARDENING_DROP_IN} && systemctl reload ssh.service")
    assert code == 0, out

    second = fab(operator_b, "secure")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "add 1 key(s) to /home/coachntt/.ssh/authorized_keys, keeping the 2 already there" in second.stdout, second.stdout

    for key_holder in (host, operator_b):
        login = ssh_retrying(key_holder, "true", user="coachntt")
        assert login.returncode == 0, f"{key_holder.key}: {login.stderr}"
    code, keys = console(host, f"cat {DEPLOY_KEYS}")
    assert code == 0 and ci_key in keys.splitlines(), keys
    assert len([line for line in keys.splitlines() if line.strip()]) == 3, keys


def root_logins(host) -> int:
    """Root logins sshd accepted so far, from the host's journal (read through the console)."""
    code, out = console(host, "journalctl --no-pager -o cat | grep -c 'Accepted publickey for root' || true")
    assert code == 0, out
    return int(out.strip().splitlines()[-1])


def test_one_run_keeps_one_connection_across_tasks(vps_factory):
    host = vps_factory(flavour="fresh")
    time.sleep(1)  # the sandbox's own boot-time login reaches the journal
    before = root_logins(host)
    result = fab(host, "secure", "secure.audit")
    assert result.returncode == 0, result.stdout + result.stderr
    # 6 of secure's own, 9 of the OS baseline of which a container skips sysctl, auditd, acct.
    assert "all 12 hardening items pass, 3 skipped" in result.stdout, result.stdout

    deadline = time.monotonic() + 5
    while root_logins(host) == before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert root_logins(host) == before + 1, "both tasks must share one root login"

    # A later run as root is refused, and the error says how to continue.
    again = fab(host, "secure.audit")
    line = one_error_line(again)
    assert again.returncode == 3, line
    assert f"root login is now off: continue with fab -H coachntt@{host.ip}" in line, line


def test_port_80_taken_is_refused_naming_the_holder(vps_factory):
    host = vps_factory(flavour="provisioned")
    code, out = console(host, "systemctl stop nginx && systemd-run --unit fake80 python3 -m http.server 80")
    assert code == 0, out
    try:
        deadline = time.monotonic() + 10
        while not port_open(host.ip, 80) and time.monotonic() < deadline:
            time.sleep(0.2)
        code, pid = console(host, "systemctl show -p MainPID --value fake80")
        assert code == 0 and pid.strip().isdigit() and pid.strip() != "0", pid
        pid = pid.strip()
        before = host_state(host)

        refused = fab(host, "nginx")
        line = one_error_line(refused)
        assert refused.returncode == 1, line
        assert line == f"error: port 80 is held by python3 (pid {pid}); stop it or move it, then rerun", line
        assert host_state(host) == before, "nothing may change"
        assert console(host, "test -e /etc/nginx/conf.d/coachntt.conf")[0] != 0

        status = fab(host, "nginx.status")
        line = one_error_line(status)
        assert status.returncode == 1, line
        assert f"answered by python3 (pid {pid}), not nginx" in line, line
        assert "NOT nginx" in status.stdout, status.stdout
    finally:
        console(host, "systemctl stop fake80")

    installed = fab(host, "nginx")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    status = fab(host, "nginx.status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert any(line.split()[:3] == ["port", "80", "nginx"] for line in status.stdout.splitlines()), status.stdout
