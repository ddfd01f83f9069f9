"""maintenance.patch on a real sandbox host with examples/app deployed.

The host's apt sources are test equipment here: one local repository (file:, no
network) holding two small packages, so every run upgrades exactly what the test
published. `coachntt-patch-plain` has a config file the operator changed; its 1.1
changes it too, and holds its upgrade (preinst) until the test says go.
`coachntt-patch-probe` 1.1 asks for a reboot the way Ubuntu's kernel packages do
(/var/run/reboot-required and .pkgs).

The host runs its second release, so slot b (127.0.0.1:8002) serves and slot a (8000)
is stopped, kept for rollback: every /health the patch asks and gates is the live
slot's, and after the reboot the live slot's container is back (Docker's
`restart: unless-stopped`) while the retired one stays stopped.

In order, on one host: outside the window refused (exit 2, nothing changed);
--dry lists the upgrade and leaves even the host's package index as it was; a
patch without a reboot, under the deploy lock (a deploy meanwhile is refused,
exit 4), config file kept, logged; a patch whose package asks for a reboot: the
host really restarts (a new boot id), the lock is held the
whole time, the app is gated afterwards and serves; a second run is up to date;
a backup that runs (the timers' flock) ends before apt starts; a host whose sshd
does not come back after the reboot: exit 3, the lock held, and `deploy.recover`
settles it once sshd is back.

The reboot is real: the sandbox runs each host's systemd-nspawn in a loop that
starts it again when the guest reboots (exit 133), as a VPS's hypervisor would.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from fabfile import sandbox
from fabfile.core.window import DAYS
from fabfile.sandbox import example_repo
from opsrun import BIN, PROJECT_DIR, console, example_app_served, fab, one_line, ready_for_the_app, through_nginx

REPO_ON_HOST = "/srv/coachntt-test-repo"
PLAIN_CONF = "/etc/coachntt-patch-plain.conf"
GO = "/run/coachntt-test-go"
LOCK = "/var/lib/coachntt-ops/deploy.lock"
LOG = "/var/lib/coachntt-ops/releases.jsonl"
BACKUP_LOCK = "/var/lib/coachntt-ops/backup.lock"


def window_around(now: datetime, *, contains: bool) -> str:
    """A window (UTC) that holds `now`, or one that opens two hours later."""
    start = now - timedelta(hours=1) if contains else now + timedelta(hours=2)
    end = start + timedelta(hours=3 if contains else 1)
    return f"{DAYS[start.weekday()]} {start:%H:%M}-{end:%H:%M}"


# --------------------------------------------------------------------------- the test repository


def build_deb(workdir: Path, name: str, version: str, files: dict[str, str], *, conffiles=(), scripts=None) -> Path:
    root = workdir / f"{name}_{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: coachntt-ops tests <tests@coachntt.invalid>\n"
        f"Description: test equipment for maintenance.patch\n")
    if conffiles:
        (root / "DEBIAN" / "conffiles").write_text("".join(f"{path}\n" for path in conffiles))
    for script, text in (scripts or {}).items():
        (root / "DEBIAN" / script).write_text(text)
        (root / "DEBIAN" / script).chmod(0o755)
    for path, text in files.items():
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_text(text)
    deb = workdir / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True, capture_output=True)
    return deb


def repository(debs: list[Path]) -> bytes:
    """A flat apt repository (Packages + Release) as a tar stream."""
    stanzas = []
    for deb in debs:
        control = subprocess.run(["dpkg-deb", "-f", str(deb)], check=True, capture_output=True, text=True).stdout.strip()
        data = deb.read_bytes()
        stanzas.append(f"{control}\nFilename: ./{deb.name}\nSize: {len(data)}\nSHA256: {hashlib.sha256(data).hexdigest()}\n")
    packages = "\n".join(stanzas).encode()
    release = (f"Origin: coachntt-test\nLabel: coachntt-test\nSuite: test\nCodename: test\n"
               f"Date: {format_datetime(datetime.now(UTC), usegmt=True)}\nArchitectures: all\n"
               f"SHA256:\n {hashlib.sha256(packages).hexdigest()} {len(packages)} Packages\n").encode()
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w") as tar:
        for name, data in [("Packages", packages), ("Release", release), *((deb.name, deb.read_bytes()) for deb in debs)]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return stream.getvalue()


ASK_REBOOT = """#!/bin/sh
set -e
# As Ubuntu's kernel packages do (update-notifier's notify-reboot-required).
if [ "$1" = configure ]; then
    touch /var/run/reboot-required
    echo coachntt-patch-probe >> /var/run/reboot-required.pkgs
fi
"""
HOLD_UNTIL_GO = f"""#!/bin/sh
# Test equipment: the upgrade waits here (bounded) until the test says go.
i=0
while [ ! -e {GO} ] && [ $i -lt 900 ]; do sleep 0.2; i=$((i + 1)); done
exit 0
"""


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    work = tmp_path_factory.mktemp("debs")
    return {
        ("plain", "1.0"): build_deb(work, "coachntt-patch-plain", "1.0", {PLAIN_CONF: "setting = 1\n"}, conffiles=[PLAIN_CONF]),
        ("plain", "1.1"): build_deb(work, "coachntt-patch-plain", "1.1", {PLAIN_CONF: "setting = 2\n"}, conffiles=[PLAIN_CONF],
                                    scripts={"preinst": HOLD_UNTIL_GO}),
        ("plain", "1.2"): build_deb(work, "coachntt-patch-plain", "1.2", {PLAIN_CONF: "setting = 2\n"}, conffiles=[PLAIN_CONF]),
        ("probe", "1.0"): build_deb(work, "coachntt-patch-probe", "1.0", {"/usr/share/coachntt-patch-probe/version": "1.0\n"}),
        ("probe", "1.1"): build_deb(work, "coachntt-patch-probe", "1.1", {"/usr/share/coachntt-patch-probe/version": "1.1\n"},
                                    scripts={"postinst": ASK_REBOOT}),
    }


# --------------------------------------------------------------------------- the host


class Server:
    def __init__(self, host, env: dict, sha: str, debs: dict):
        self.host, self.env, self.sha, self.debs = host, env, sha, debs

    def fab(self, *args: str, window: bool = True, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
        spec = window_around(datetime.now(UTC), contains=window)
        return fab(self.host, *args, user="coachntt", env={**self.env, "COACHNTT_MAINTENANCE__WINDOW": spec, **(env or {})},
                   timeout=timeout)

    def ok(self, *args: str, **kw) -> subprocess.CompletedProcess:
        result = self.fab(*args, **kw)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        return result

    def sh(self, command: str) -> str:
        code, out = console(self.host, command)
        assert code == 0, out
        return out

    def publish(self, *which: tuple[str, str]) -> None:
        stream = repository([self.debs[key] for key in which])
        done = sandbox.hosts.enter(self.host.name, f"rm -rf {REPO_ON_HOST} && mkdir -p {REPO_ON_HOST} && tar -x -C {REPO_ON_HOST}",
                                   stdin=stream)
        assert done.returncode == 0, done.stderr

    def version(self, package: str) -> str:
        return self.sh(f"dpkg-query -W -f '${{Version}}' {package}").strip()

    def boot_id(self) -> str:
        return self.sh("cat /proc/sys/kernel/random/boot_id").strip()

    def log(self) -> list[str]:
        return self.sh(f"cat {LOG}").splitlines()

    def lock_held(self) -> bool:
        return console(self.host, f"test -d {LOCK}")[0] == 0

    def health(self) -> str:
        """/health as a client gets it: through nginx, from whichever slot serves."""
        return self.sh(through_nginx("/health"))

    def slots(self) -> dict[str, str]:
        """Compose service -> state of the api's two slot containers."""
        out = self.sh("docker ps -a --filter label=com.docker.compose.project=coachntt "
                      "--format '{{.Label \"com.docker.compose.service\"}} {{.State}}'")
        return {service: state for service, state in (line.split() for line in out.splitlines()) if service.startswith("api_")}

    def start_patch(self) -> subprocess.Popen:
        return subprocess.Popen(
            [str(BIN / "fab"), "-H", f"coachntt@{self.host.ip}", "-i", str(self.host.key), "maintenance.patch"],
            cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **self.env, "COACHNTT_MAINTENANCE__WINDOW": window_around(datetime.now(UTC), contains=True)})

    def wait_for_phase(self, patching: subprocess.Popen, name: str) -> None:
        deadline = time.monotonic() + 300
        while console(self.host, f"grep -qx '{name}' {LOCK}/job.phase")[0] != 0:
            assert patching.poll() is None, patching.communicate()
            assert time.monotonic() < deadline, f"'{name}' never started under the lock"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def server(vps_factory_module, tmp_path_factory, debs):
    host = vps_factory_module(flavour="provisioned")
    ready_for_the_app(host)
    with example_app_served(tmp_path_factory.mktemp("git")) as (repo, first, env):
        # Two releases: the second serves from slot b, slot a is stopped (kept for rollback).
        sha = example_repo.commit_change(repo, "second release", {"RELEASE": "2\n"})
        srv = Server(host, env, sha, debs)
        for args in (("deploy.setup",), ("deploy", "--sha", first), ("deploy", "--sha", sha)):
            srv.ok(*args)
        assert "server 127.0.0.1:8002;" in srv.sh("cat /etc/nginx/coachntt/api-upstream.conf")
        assert srv.slots() == {"api_a": "exited", "api_b": "running"}, srv.slots()
        # Test equipment: the local repository is the host's only apt source.
        srv.sh("mkdir -p /root/apt-sources-aside && mv /etc/apt/sources.list.d/* /root/apt-sources-aside/ 2>/dev/null; "
               "mv /etc/apt/sources.list /root/apt-sources-aside/ 2>/dev/null; "
               f"echo 'deb [trusted=yes] file:{REPO_ON_HOST} ./' > /etc/apt/sources.list.d/coachntt-test.list")
        srv.publish(("plain", "1.0"), ("probe", "1.0"))
        srv.sh("DEBIAN_FRONTEND=noninteractive apt-get -q -y update >/dev/null && "
               "DEBIAN_FRONTEND=noninteractive apt-get -q -y install coachntt-patch-plain coachntt-patch-probe >/dev/null")
        srv.sh(f"echo 'setting = mine' > {PLAIN_CONF}")  # the operator's own change
        srv.publish(("plain", "1.0"), ("plain", "1.1"), ("probe", "1.0"))
        yield srv


def fingerprint(server) -> str:
    """Packages, the host's own package index and cache, config, release log and lock."""
    return server.sh("dpkg-query -W -f='${Package} ${Version}\\n' | sha256sum; "
                     "find /var/lib/apt/lists /var/cache/apt /etc -xdev -type f -newer /etc/hostname "
                     "-exec sha256sum {} + 2>/dev/null | sort; "
                     f"sha256sum {LOG}; ls -A /var/lib/coachntt-ops; cat /proc/sys/kernel/random/boot_id")


# --------------------------------------------------------------------------- the tests


def test_outside_the_window_it_is_refused_and_nothing_changes(server):
    before = fingerprint(server)
    result = server.fab("maintenance.patch", window=False)
    assert result.returncode == 2, result.stdout + result.stderr
    line = one_line(result, "maintenance.patch runs only in the maintenance window", "next window: ", "--force")
    assert f"next window: {DAYS[(datetime.now(UTC) + timedelta(hours=2)).weekday()]} " in line
    assert result.stdout == "", "refused before connecting: not even facts were read"
    assert fingerprint(server) == before


def test_dry_lists_the_pending_upgrade_and_leaves_even_the_package_index_alone(server):
    before = fingerprint(server)
    result = server.ok("maintenance.patch", "--dry", window=False)
    assert "upgrades    1 pending" in result.stdout and "- coachntt-patch-plain 1.0 -> 1.1" in result.stdout, result.stdout
    assert "window      outside " in result.stdout and "reboot      not asked" in result.stdout
    assert f"app         {server.sha[:12]} in slot b (127.0.0.1:8002) (HTTP 200)" in result.stdout, "the live slot's /health"
    assert "would take the deploy lock, upgrade 1 package(s)" in result.stdout
    assert fingerprint(server) == before, "a scratch index: the host's own lists, cache and packages are untouched"


def test_a_patch_holds_the_deploy_lock_keeps_config_files_and_is_logged(server):
    server.sh(f"rm -f {GO}")
    patching = server.start_patch()
    try:
        server.wait_for_phase(patching, "upgrade packages")
        refused = server.fab("deploy", "--sha", server.sha)
        assert refused.returncode == 4, refused.stdout + refused.stderr
        one_line(refused, "deploy lock held by", "phase 'upgrade packages' still running")
    finally:
        server.sh(f"touch {GO}")
    out, err = patching.communicate(timeout=600)
    assert patching.returncode == 0, out + err
    assert "- coachntt-patch-plain 1.0 -> 1.1" in out and "patched: 1 package(s) upgraded" in out, out
    assert "changed       health gate" in out and "reboot" not in out.split("patched:")[0].split("upgrade packages")[1]
    assert server.version("coachntt-patch-plain") == "1.1"
    assert server.sh(f"cat {PLAIN_CONF}") == "setting = mine\n", "the operator's config file is kept"
    assert server.sh(f"cat {PLAIN_CONF}.dpkg-dist") == "setting = 2\n", "the package's version is beside it"
    entry = json.loads(server.log()[-1])
    assert (entry["kind"], entry["sha"], entry["result"]) == ("patch", server.sha, "ok"), entry
    assert entry["message"] == "maintenance.patch: 1 package(s) upgraded"
    assert not server.lock_held()


def test_a_package_asking_for_a_reboot_reboots_the_host_and_the_app_is_gated_after(server):
    server.publish(("plain", "1.0"), ("plain", "1.1"), ("probe", "1.0"), ("probe", "1.1"))
    boot = server.boot_id()
    seen = {"down": 0, "lock_free": 0, "lock_held": 0}
    stop = threading.Event()

    def watch():  # from the harness, through the console: the machine itself, not SSH
        while not stop.is_set():
            try:
                code, _ = console(server.host, f"test -d {LOCK}")
            except sandbox.SandboxError:  # no guest running: the reboot in progress
                seen["down"] += 1
            else:
                if code == 0:
                    seen["lock_held"] += 1
                elif seen["lock_held"]:
                    seen["lock_free"] += 1  # counted only once the patch had the lock
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = server.ok("maintenance.patch", env={"COACHNTT_MAINTENANCE__REBOOT_TIMEOUT": "300"})
    finally:
        stop.set()
        watcher.join()
    assert "- coachntt-patch-probe 1.0 -> 1.1" in result.stdout, result.stdout
    assert "changed       reboot" in result.stdout and "asked by coachntt-patch-probe" in result.stdout
    assert "back after " in result.stdout and "changed       health gate" in result.stdout
    # The new boot id is the proof; the watcher seeing the guest down is only reported: a
    # quick nspawn restart can fall between two of its polls on a busy machine.
    assert server.boot_id() != boot, f"a new boot: the host really restarted ({seen})"
    assert seen["lock_held"] > 0 and seen["lock_free"] <= 3, f"the lock was held through the reboot: {seen}"
    assert console(server.host, "test -e /var/run/reboot-required")[0] != 0, "the reboot cleared the request"
    (gated,) = [line for line in result.stdout.splitlines() if "health gate" in line]
    assert gated.startswith("  changed") and f"{server.sha[:12]} in slot b (127.0.0.1:8002)" in gated, gated
    assert server.slots() == {"api_a": "exited", "api_b": "running"}, "the live slot came back, the retired one did not"
    assert f'"version":"{server.sha}"' in server.health().replace(" ", "")
    entry = json.loads(server.log()[-1])
    assert entry["kind"] == "patch" and entry["result"] == "ok" and "; rebooted (" in entry["message"], entry
    assert not server.lock_held()


def test_a_second_run_is_up_to_date_and_takes_no_lock(server):
    before = server.log()
    result = server.ok("maintenance.patch")
    assert "upgrades    0 pending" in result.stdout and "reboot      not asked" in result.stdout, result.stdout
    assert "up to date: nothing to upgrade, no reboot asked" in result.stdout
    assert server.log() == before and not server.lock_held()


def test_a_running_backup_ends_before_the_patch_touches_anything(server):
    server.publish(("plain", "1.1"), ("plain", "1.2"), ("probe", "1.1"))
    # A backup as the timers run one: the deploy user's flock on the backup lock, held for a while.
    server.sh(f"systemd-run --quiet --unit=coachntt-test-backup --uid=coachntt flock {BACKUP_LOCK} sleep 300")
    patching = server.start_patch()
    try:
        server.wait_for_phase(patching, "upgrade packages")
        time.sleep(3)
        assert server.sh(f"cat {LOCK}/job.out").startswith(f"waiting for the backup that runs now ({BACKUP_LOCK})")
        assert server.version("coachntt-patch-plain") == "1.1", "apt waits for the backup"
    finally:
        server.sh("systemctl stop coachntt-test-backup")
    out, err = patching.communicate(timeout=600)
    assert patching.returncode == 0, out + err
    assert "- coachntt-patch-plain 1.1 -> 1.2" in out and server.version("coachntt-patch-plain") == "1.2"


def test_a_host_that_does_not_come_back_is_exit_3_with_the_lock_held_until_recover(server):
    # Asked for a reboot with nothing to upgrade; sshd will not start after it.
    server.sh("touch /var/run/reboot-required && systemctl disable --quiet ssh.service")
    boot = server.boot_id()
    started = time.monotonic()
    result = server.fab("maintenance.patch", env={"COACHNTT_MAINTENANCE__REBOOT_TIMEOUT": "60"}, timeout=600)
    assert result.returncode == 3, result.stdout + result.stderr
    line = one_line(result, "did not come back within", "the deploy lock stays held", "deploy.recover")
    assert time.monotonic() - started < 60 + 120, f"bounded by maintenance.reboot_timeout: {line}"
    deadline = time.monotonic() + 60
    while True:  # the harness's console reaches the machine once nspawn has it up again
        try:
            if server.boot_id() != boot:
                break
        except (AssertionError, sandbox.SandboxError):
            pass
        assert time.monotonic() < deadline, "the machine did not boot again"
        time.sleep(1)
    assert server.lock_held(), "nobody deploys onto a host in limbo"
    assert server.sh(f"cat {LOCK}/job.phase").strip() == "reboot"

    server.sh("systemctl enable --now ssh.service")
    recovered = server.ok("deploy.recover")
    assert f"recovered: {server.sha[:12]} is back and healthy" in recovered.stdout, recovered.stdout
    assert not server.lock_held()
    entry = json.loads(server.log()[-1])
    assert (entry["kind"], entry["result"], entry["phase"]) == ("patch", "interrupted", "reboot"), entry
