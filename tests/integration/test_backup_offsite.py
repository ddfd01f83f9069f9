"""backup.offsite and backup.pull on two real sandbox hosts.

Host A serves examples/app (deployed as in test_backup.py); host B is a plain host
acting as the SFTP storage: a user `offsite` whose authorized_keys gets the line
`backup.offsite --init` prints on A. In order: --init before and after the key is
authorized, a push and fetches after the local dump and data archive are deleted
(sha256 and backup.verify pass), a second push that adds nothing, a fetched copy that fails
its checksum leaving nothing, a missing password, the storage host down, pulls
to this machine (good and tampered), bad names. The repository password never
appears in any output, in A's journal or in A's process list.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
import subprocess
import time

import pytest

from opsrun import BIN, PROJECT_DIR, console, example_app_served, fab, one_line, ready_for_the_app

ENV_FILE = "/opt/coachntt/.env.production"
REPO_PATH = "/home/offsite/coachntt"
PASSWORD = "offsite-" + secrets.token_hex(16)


class Hosts:
    """A (the server) and B (the storage), and every output a run printed."""

    def __init__(self, a, b, env: dict):
        self.a, self.b, self.env = a, b, env
        self.outputs: list[str] = []
        self.names: dict[str, str] = {}

    def fab(self, *args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
        result = fab(self.a, *args, user="coachntt", env={**self.env, **(env or {})}, timeout=timeout)
        self.outputs.append(result.stdout + result.stderr)
        return result

    def ok(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        result = self.fab(*args, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def on(self, host, command: str) -> str:
        code, out = console(host, command)
        assert code == 0, out
        return out

    def backup_dir(self) -> str:
        """Every file in /backups on A (hidden ones too) with its sha256: what "nothing changed" compares."""
        return self.on(self.a, "cd /backups && find . -mindepth 1 | sort && find . -type f -exec sha256sum {} + | sort")

    def repo(self) -> str:
        """The repository's files on B (not its transient locks) with their sizes."""
        return self.on(self.b, f"cd {REPO_PATH} && find . -path ./locks -prune -o -type f -printf '%p %s\\n' | sort")


@pytest.fixture(scope="module")
def hosts(vps_factory_module, tmp_path_factory):
    b = vps_factory_module(flavour="fresh")
    # Test equipment: the storage user, and no OpenSSH 10 source penalties for the sandbox
    # network (--init scans B's host keys without logging in, a refused key counts too).
    code, out = console(b, "useradd -m -s /bin/bash offsite && install -d -m 700 -o offsite -g offsite /home/offsite/.ssh && "
                           "install -m 600 -o offsite -g offsite /dev/null /home/offsite/.ssh/authorized_keys && "
                           "echo 'PerSourcePenaltyExemptList 10.201.0.0/24' > /etc/ssh/sshd_config.d/10-test-storage.conf && "
                           "systemctl reload ssh")
    assert code == 0, out
    a = vps_factory_module(flavour="provisioned")
    ready_for_the_app(a)
    with example_app_served(tmp_path_factory.mktemp("git")) as (_, sha, env):
        h = Hosts(a, b, {**env, "COACHNTT_BACKUP__OFFSITE_REPO": f"sftp:offsite@{b.ip}:{REPO_PATH}"})
        h.ok("deploy.setup")
        h.ok("deploy", "--sha", sha)
        h.on(a, f"printf 'RESTIC_PASSWORD=%s\\n' {PASSWORD} >> {ENV_FILE}")
        yield h


def test_init_prints_the_key_pins_the_host_and_creates_the_repository_once_authorized(hosts):
    before = hosts.fab("backup.offsite")
    assert before.returncode == 2, before.stdout + before.stderr
    one_line(before, "restic is not installed", "--init")

    first = hosts.fab("backup.offsite", "--init")
    assert first.returncode == 3, first.stdout + first.stderr  # B does not know the key yet
    one_line(first, f"storage host {hosts.b.ip} refuses the off-site key", "authorized_keys")
    line = next(line.strip() for line in first.stdout.splitlines()
                if line.strip().startswith('restrict,command="internal-sftp" ssh-ed25519 '))
    public = hosts.on(hosts.a, "cat /home/coachntt/.ssh/coachntt_offsite.pub").strip()
    assert line.endswith(public) and f"public key: {public}" in first.stdout
    assert hosts.on(hosts.a, "stat -c '%a %U' /home/coachntt/.ssh/coachntt_offsite").strip() == "600 coachntt"
    assert "pinned now" in first.stdout
    b_key = hosts.on(hosts.b, "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub").split()[1]
    assert b_key in first.stdout, "the fingerprint shown is the storage host's real key"
    assert hosts.on(hosts.a, f"ssh-keygen -F {hosts.b.ip} -f /home/coachntt/.ssh/known_hosts | grep -c ssh-ed25519").strip() == "1"
    assert console(hosts.b, f"test -e {REPO_PATH}")[0] != 0, "no repository before the key is authorized"

    hosts.on(hosts.b, f"echo '{line}' >> /home/offsite/.ssh/authorized_keys")
    second = hosts.ok("backup.offsite", "--init")
    assert "kept" in second.stdout and "already pinned" in second.stdout and "(created)" in second.stdout, second.stdout
    hosts.on(hosts.b, f"test -f {REPO_PATH}/config")
    assert public in hosts.on(hosts.a, "cat /home/coachntt/.ssh/coachntt_offsite.pub"), "the key is kept, not replaced"


def test_push_then_fetch_brings_deleted_backups_back_checked(hosts):
    name = hosts.ok("backup.now").stdout.split("backup: ")[-1].split()[0].rsplit("/", 1)[1]
    hosts.on(hosts.a, "install -d -m 750 -o 1000 -g 1000 /opt/coachntt/data && printf upload > /opt/coachntt/data/a.txt")
    archive = hosts.ok("backup.now", "--data").stdout.split("backup: ")[-1].split()[0].rsplit("/", 1)[1]
    hosts.names["pushed"], hosts.names["archive"] = name, archive
    pushed = hosts.ok("backup.offsite")
    assert re.search(r"snapshot [0-9a-f]{8} in sftp:offsite@\S+: 2 backup\(s\)", pushed.stdout), pushed.stdout
    for backup in (name, archive):
        original = hosts.on(hosts.a, f"sha256sum /backups/{backup}").split()[0]
        sidecars = hosts.on(hosts.a, f"cat /backups/{backup}.sha256 /backups/{backup}.json")
        hosts.on(hosts.a, f"rm /backups/{backup} /backups/{backup}.sha256 /backups/{backup}.json")
        fetched = hosts.ok("backup.offsite", "--fetch", backup)
        assert f"/backups/{backup}: sha256 ok" in fetched.stdout, fetched.stdout
        assert hosts.on(hosts.a, f"sha256sum /backups/{backup}").split()[0] == original
        assert hosts.on(hosts.a, f"cat /backups/{backup}.sha256 /backups/{backup}.json") == sidecars
        assert hosts.on(hosts.a, f"stat -c '%a %U' /backups/{backup}").strip() == "600 coachntt"
        assert not [f for f in hosts.on(hosts.a, "ls -A /backups").split() if f.startswith(".")], "no temporary left"
        hosts.ok("backup.verify", backup)

    again = hosts.fab("backup.offsite", "--fetch", name)
    assert again.returncode == 2, again.stdout + again.stderr
    one_line(again, "already in /backups")


def test_a_second_push_adds_no_new_data(hosts):
    hosts.ok("backup.offsite")  # whatever verify changed (.verified) goes now
    repo = hosts.repo()
    assert "./snapshots/" in repo and "./data/" in repo, repo
    again = hosts.ok("backup.offsite")
    assert "off-site already" in again.stdout, again.stdout
    assert hosts.repo() == repo, "not a byte more in the repository"


def copy_as(hosts, source: str, name: str) -> None:
    """A copy of a good backup under another name, its checksum taken, then one byte flipped."""
    hosts.on(hosts.a, f"cd /backups && cp -p {source} {name} && cp -p {source}.json {name}.json && "
                      f"sha256sum {name} > {name}.sha256 && chown coachntt:coachntt {name}* && "
                      f"printf '\\377' | dd of={name} bs=1 seek=4000 conv=notrunc status=none")


def test_a_fetched_copy_that_fails_its_checksum_leaves_nothing(hosts):
    flipped = "db_20200101_000000_flipped.dump"
    copy_as(hosts, hosts.names["pushed"], flipped)
    hosts.ok("backup.offsite")
    hosts.on(hosts.a, f"rm /backups/{flipped} /backups/{flipped}.sha256 /backups/{flipped}.json")
    before = hosts.backup_dir()
    result = hosts.fab("backup.offsite", "--fetch", flipped)
    assert result.returncode == 1, result.stdout + result.stderr
    one_line(result, f"off-site copy of {flipped}", "fails its sha256 check", "nothing kept")
    assert hosts.backup_dir() == before, "no file, no sidecar, no temporary directory"


def test_a_missing_password_is_one_line_exit_2_and_changes_nothing(hosts):
    hosts.on(hosts.a, f"cp -p {ENV_FILE} /root/env.saved && sed -i '/^RESTIC_PASSWORD=/d' {ENV_FILE}")
    try:
        before, repo = hosts.backup_dir(), hosts.repo()
        for args in (("backup.offsite",), ("backup.offsite", "--init"), ("backup.offsite", "--fetch", hosts.names["pushed"])):
            result = hosts.fab(*args)
            assert result.returncode == 2, result.stdout + result.stderr
            one_line(result, f"no RESTIC_PASSWORD in {ENV_FILE}", "nothing changed")
        assert hosts.backup_dir() == before and hosts.repo() == repo
    finally:
        hosts.on(hosts.a, f"cp -p /root/env.saved {ENV_FILE} && rm /root/env.saved")


def test_an_unreachable_storage_host_is_exit_3_and_changes_nothing(hosts):
    hosts.on(hosts.a, "touch /backups/*.json")  # a push would have something to send
    before = hosts.backup_dir()
    hosts.on(hosts.b, "systemctl stop ssh.socket ssh.service 2>/dev/null; ! systemctl is-active --quiet ssh.service")
    try:
        for args in (("backup.offsite",), ("backup.offsite", "--fetch", "db_20200101_000000_other.dump")):
            result = hosts.fab(*args)
            assert result.returncode == 3, result.stdout + result.stderr
            one_line(result, f"cannot reach the storage host {hosts.b.ip}", "Connection refused", "nothing changed")
        assert hosts.backup_dir() == before
    finally:
        hosts.on(hosts.b, "systemctl start ssh.service")
    hosts.ok("backup.offsite")


def test_pull_brings_a_checked_copy_to_this_machine(hosts, tmp_path):
    env = {"COACHNTT_BACKUP__PULL_DIR": str(tmp_path / "pulled")}
    name = hosts.names["pushed"]
    result = hosts.ok("backup.pull", name, env=env)
    here = tmp_path / "pulled" / hosts.a.ip
    assert sorted(p.name for p in here.iterdir()) == sorted([name, f"{name}.json", f"{name}.sha256", f"{name}.verified"])
    assert hashlib.sha256((here / name).read_bytes()).hexdigest() == hosts.on(hosts.a, f"sha256sum /backups/{name}").split()[0]
    assert stat.S_IMODE(here.stat().st_mode) == 0o700 and stat.S_IMODE((tmp_path / "pulled").stat().st_mode) == 0o700
    assert stat.S_IMODE((here / name).stat().st_mode) == 0o600
    assert "sha256" in result.stdout and str(here / name) in result.stdout

    latest = hosts.ok("backup.pull", "latest", env=env)
    assert f"{here / name}: sha256" in latest.stdout and "(already here)" in latest.stdout, latest.stdout
    archive = hosts.names["archive"]
    hosts.ok("backup.pull", "latest-data", env=env)
    assert hashlib.sha256((here / archive).read_bytes()).hexdigest() == hosts.on(hosts.a, f"sha256sum /backups/{archive}").split()[0]


def test_a_pull_of_a_tampered_backup_fails_and_leaves_nothing(hosts, tmp_path):
    env = {"COACHNTT_BACKUP__PULL_DIR": str(tmp_path / "pulled")}
    tampered = "db_20200101_000000_tampered.dump"
    copy_as(hosts, hosts.names["pushed"], tampered)
    result = hosts.fab("backup.pull", tampered, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    one_line(result, f"copy of {tampered}", "does not match its .sha256", "nothing kept")
    assert list((tmp_path / "pulled" / hosts.a.ip).iterdir()) == [], "no file, no sidecar, no partial"


@pytest.mark.parametrize("args, words", [
    (("backup.pull", "../x"), "no '/' or '..'"),
    (("backup.pull", "a/b"), "no '/' or '..'"),
    (("backup.pull", "db_20200101_000000_nothere.dump"), "no backup db_20200101_000000_nothere.dump"),
    (("backup.offsite", "--fetch", "../x"), "no '/' or '..'"),
    (("backup.offsite", "--fetch", "a/b"), "no '/' or '..'"),
    (("backup.offsite", "--fetch", "db_20200101_000000_nothere.dump"), "no off-site copy of db_20200101_000000_nothere.dump"),
])
def test_bad_names_are_one_line_exit_2(hosts, tmp_path, args, words):
    before = hosts.backup_dir()
    result = hosts.fab(*args, env={"COACHNTT_BACKUP__PULL_DIR": str(tmp_path / "pulled")})
    assert result.returncode == 2, result.stdout + result.stderr
    one_line(result, words)
    assert hosts.backup_dir() == before
    assert not (tmp_path / "pulled").exists() or not any((tmp_path / "pulled").rglob("*.dump*"))


def test_the_password_never_shows(hosts):
    hosts.on(hosts.a, "touch /backups/*.json")  # a push with work to do, watched from outside
    process = subprocess.Popen([str(BIN / "fab"), "-H", f"coachntt@{hosts.a.ip}", "-i", str(hosts.a.key), "backup.offsite"],
                               cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **hosts.env})
    seen = []
    try:
        while process.poll() is None:
            seen.append(hosts.on(hosts.a, "ps -eo args"))
            time.sleep(0.1)
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out + err
    assert any("restic" in snapshot for snapshot in seen), "the process list was read while restic ran"
    hosts.outputs.append(out + err)
    assert len(hosts.outputs) > 20
    for text in [*hosts.outputs, *seen]:
        assert PASSWORD not in text
    journal = hosts.on(hosts.a, f"journalctl --no-pager -o cat | grep -c -F {PASSWORD} || true").strip()
    assert journal == "0", "the password is not in A's journal"
    assert hosts.on(hosts.a, f"grep -c -F {PASSWORD} /var/lib/coachntt-ops/releases.jsonl || true").strip() == "0"
