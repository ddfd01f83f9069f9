"""tool.install and backup.schedule on a real sandbox host with examples/app deployed.

One host, in order: schedule refused until the tool is installed; tool.install over a
copy put in /opt/coachntt-ops by hand (kept), a second run all ok; `inv` on the host as
the deploy user resolving the operator's settings (a non-default backup.dir) from the
server's settings file; a new version installed beside the old one, and going back to
the old one only a switch; schedule twice = one set of timers; the database timer's
service making a backup that verifies, in the journal; runs serialised by the shared
flock; a run that fails leaving the unit failed and no backup; --remove.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from fabfile.core import bundle
from opsrun import BIN, PROJECT_DIR, console, example_app_served, fab, json_lines, one_line, ready_for_the_app, ssh, through_nginx

BACKUP_DIR = "/srv/coachntt-backups"  # not the default: only the server's settings file can tell inv there
SERVICE = "coachntt-backup-db.service"
LOCK = "/var/lib/coachntt-ops/backup.lock"
SECRET = "sched-test-secret-0123456789"


class Host:
    def __init__(self, host, env: dict):
        self.host, self.env = host, env

    def fab(self, *args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
        if cwd is None:
            return fab(self.host, *args, user="coachntt", env={**self.env, **(env or {})})
        command = [str(BIN / "fab"), "-H", f"coachntt@{self.host.ip}", "-i", str(self.host.key), *args]
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900,
                              env={**os.environ, **self.env, **(env or {})})

    def ok(self, *args: str, **kw) -> subprocess.CompletedProcess:
        result = self.fab(*args, **kw)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        return result

    def sh(self, command: str) -> str:
        code, out = console(self.host, command)
        assert code == 0, out
        return out

    def backups(self, suffix: str = ".dump") -> set[str]:
        return {name for name in self.sh(f"ls -A {BACKUP_DIR}").split() if name.endswith(suffix)}

    def wait_healthy(self, seconds: int = 60) -> None:
        deadline = time.monotonic() + seconds
        while console(self.host, through_nginx("/health", curl="curl -f -o /dev/null"))[0] != 0:
            assert time.monotonic() < deadline, "the app did not come back to /health 200"
            time.sleep(1)


@pytest.fixture(scope="module")
def server(vps_factory_module, tmp_path_factory):
    host = vps_factory_module(flavour="provisioned")
    ready_for_the_app(host)
    with example_app_served(tmp_path_factory.mktemp("git")) as (_, sha, env):
        srv = Host(host, {**env, "COACHNTT_BACKUP__DIR": BACKUP_DIR, "COACHNTT_BACKUP__KEEP_DAILY": "9"})
        for args in (("deploy.setup",), ("deploy", "--sha", sha)):
            srv.ok(*args)
        yield srv


def test_schedule_is_refused_until_the_tool_is_installed(server):
    result = server.fab("backup.schedule")
    assert result.returncode == 2, result.stdout + result.stderr
    one_line(result, "the tool is not installed", "run `tool.install`")
    assert console(server.host, "ls /etc/systemd/system/coachntt-backup-*")[0] != 0, "nothing written"


def test_tool_install_keeps_a_copy_put_there_by_hand_and_a_second_run_is_all_ok(server):
    server.sh("mkdir -p /opt/coachntt-ops && echo 'by hand' > /opt/coachntt-ops/NOTE")
    planned = server.ok("tool.install", "--dry")
    assert "would change" in planned.stdout and "keep the copy in /opt/coachntt-ops" in planned.stdout
    assert server.sh("test -d /opt/coachntt-ops && ! test -L /opt/coachntt-ops && ls -A /opt/coachntt-ops").split() == ["NOTE"], \
        "--dry changes nothing"

    secrets = {"JWT_SECRET": SECRET, "COACHNTT_HOST": f"coachntt@{server.host.ip}"}
    installed = server.ok("tool.install", env=secrets)
    assert "changed       tool release" in installed.stdout, installed.stdout
    link = server.sh("readlink /opt/coachntt-ops").strip()
    assert link.startswith("/opt/coachntt-ops-releases/0.1.0-"), link
    kept = server.sh("grep -l 'by hand' /opt/coachntt-ops-releases/by-hand-*/NOTE").strip()
    assert kept, "the copy that was there is kept as a release"

    settings = server.sh("stat -c '%a %U:%G' /etc/coachntt-ops/settings.env; cat /etc/coachntt-ops/settings.env")
    assert settings.startswith("640 root:coachntt\n"), settings
    assert f"COACHNTT_BACKUP__DIR='{BACKUP_DIR}'" in settings and "COACHNTT_BACKUP__KEEP_DAILY='9'" in settings
    assert "COACHNTT_APP__REPO='git://" in settings
    assert "COACHNTT_HOST" not in settings and SECRET not in settings and "JWT" not in settings

    again = server.ok("tool.install", "--json", env=secrets)
    records = json_lines(again.stdout)
    assert [r["status"] for r in records if "step" in r] == ["ok"] * 4, again.stdout
    assert records[-1]["round_trips"] == 1 and records[-1]["summary"]["changed"] == 0
    assert server.sh("readlink /opt/coachntt-ops").strip() == link


def test_inv_runs_on_the_server_as_the_deploy_user_with_the_operators_settings(server):
    server.ok("backup.now")
    on_server = ssh(server.host, "cd /opt/coachntt-ops && inv backup.list", user="coachntt", timeout=120)
    assert on_server.returncode == 0, on_server.stdout + on_server.stderr
    listed_here = server.ok("backup.list").stdout
    names = [line.split()[0] for line in on_server.stdout.splitlines() if line.strip().startswith("db_")]
    assert names and names == [line.split()[0] for line in listed_here.splitlines() if line.strip().startswith("db_")]
    assert set(names) <= server.backups(), f"inv there reads {BACKUP_DIR}, set only in the settings file"
    status = server.ok("tool.status")
    assert "the same" in status.stdout and "matches yours" in status.stdout, status.stdout


def test_a_new_version_goes_in_beside_the_old_one_and_going_back_is_only_a_switch(server, tmp_path):
    copy = tmp_path / "ops"
    for name in bundle.project_files(PROJECT_DIR):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        if (PROJECT_DIR / name).is_symlink():
            (copy / name).symlink_to(os.readlink(PROJECT_DIR / name))
        else:
            shutil.copy2(PROJECT_DIR / name, copy / name)
    (copy / "README.md").write_text((copy / "README.md").read_text() + "\nA newer version.\n")
    old = server.sh("readlink /opt/coachntt-ops").strip()

    newer = server.ok("tool.install", cwd=copy)
    assert "changed       tool release" in newer.stdout, newer.stdout
    new = server.sh("readlink /opt/coachntt-ops").strip()
    assert new != old and server.sh(f"tail -n 1 {new}/README.md").strip() == "A newer version."
    assert server.sh("ls /opt/coachntt-ops-releases").split() == sorted([old.rsplit("/", 1)[1], new.rsplit("/", 1)[1]]), \
        "the release before is kept, the by-hand copy before it is gone"

    back = server.ok("tool.install", "--dry")
    assert "(unpacked already)" in back.stdout, back.stdout
    server.ok("tool.install")
    assert server.sh("readlink /opt/coachntt-ops").strip() == old
    assert sorted(server.sh("ls /opt/coachntt-ops-releases").split()) == sorted([old.rsplit("/", 1)[1], new.rsplit("/", 1)[1]])


def timers(server) -> list[str]:
    return server.sh("systemctl list-timers --all --no-legend --no-pager 'coachntt-backup-*'").splitlines()


def test_schedule_twice_gives_one_set_of_timers(server):
    first = server.ok("backup.schedule")
    assert "changed       backup timers" in first.stdout and "warning" not in first.stdout, first.stdout
    again = server.ok("backup.schedule", "--json")
    records = json_lines(again.stdout)
    assert [r["status"] for r in records if "step" in r] == ["ok"] and records[-1]["round_trips"] == 1, again.stdout
    listed = timers(server)
    assert len(listed) == 2, listed
    for unit in ("coachntt-backup-db.timer", "coachntt-backup-data.timer"):
        assert sum(unit in line for line in listed) == 1, listed
    assert server.sh("systemctl is-enabled coachntt-backup-db.timer coachntt-backup-data.timer").split() == ["enabled"] * 2


def test_the_timers_service_makes_a_backup_that_verifies_and_says_so_in_the_journal(server):
    before = server.backups()
    server.sh(f"systemctl start {SERVICE}")  # a oneshot: returns when the run has ended
    (made,) = server.backups() - before
    assert made.endswith("_daily.dump"), made
    assert server.sh(f"stat -c %U {BACKUP_DIR}/{made}").strip() == "coachntt"
    verified = server.ok("backup.verify", made)
    assert "as in its manifest" in verified.stdout
    journal = server.sh(f"journalctl -u {SERVICE} --no-pager -o cat")
    assert f"backup: {BACKUP_DIR}/{made}" in journal, journal
    assert server.sh(f"systemctl show -p Result --value {SERVICE}").strip() == "success"


def test_the_data_timers_service_archives_the_data_directory(server):
    server.sh("install -d -m 750 -o 1000 -g 1000 /opt/coachntt/data/uploads && "
              "printf 'scheduled' > /opt/coachntt/data/uploads/a.txt && chown 1000:1000 /opt/coachntt/data/uploads/a.txt")
    before = server.backups(".tar.gz")
    server.sh("systemctl start coachntt-backup-data.service")
    (made,) = server.backups(".tar.gz") - before
    assert made.startswith("data_") and made.endswith("_weekly.tar.gz"), made
    verified = server.ok("backup.verify", "latest-data")
    assert made in verified.stdout and ", 9 bytes" in verified.stdout, verified.stdout


def test_runs_never_overlap_a_second_waits_for_the_lock(server):
    before = server.backups()
    server.sh(f"systemd-run --quiet --unit=coachntt-test-hold --uid=coachntt flock {LOCK} sleep 300")
    try:
        server.sh(f"systemctl start --no-block {SERVICE}")
        deadline = time.monotonic() + 30
        while server.sh(f"systemctl show -p MainPID --value {SERVICE}").strip() in ("", "0"):
            assert time.monotonic() < deadline, "the service never started"
            time.sleep(0.5)
        time.sleep(3)
        pid = server.sh(f"systemctl show -p MainPID --value {SERVICE}").strip()
        assert server.sh(f"systemctl is-active {SERVICE} || true").strip() == "activating"
        assert server.sh(f"cat /proc/{pid}/comm").strip() == "flock"
        assert console(server.host, f"pgrep -P {pid}")[0] != 0, "nothing runs under flock while the lock is held"
        assert server.backups() == before
    finally:
        console(server.host, "systemctl stop coachntt-test-hold")
    deadline = time.monotonic() + 180
    while server.sh(f"systemctl is-active {SERVICE} || true").strip() == "activating":
        assert time.monotonic() < deadline, "the waiting run never ran"
        time.sleep(1)
    assert server.sh(f"systemctl show -p Result --value {SERVICE}").strip() == "success"
    assert len(server.backups() - before) == 1, "it ran once the lock was free"


def test_a_run_that_fails_leaves_the_unit_failed_and_no_backup(server):
    before = set(server.sh(f"ls -A {BACKUP_DIR}").split())
    server.sh("docker stop ccp_postgres >/dev/null")
    try:
        code, out = console(server.host, f"systemctl start {SERVICE}")
        assert code != 0, out
        assert server.sh(f"systemctl is-failed {SERVICE} || true").strip() == "failed"
        journal = server.sh(f"journalctl -u {SERVICE} --no-pager -o cat -n 20")
        assert "error: the database container ccp_postgres is not running" in journal, journal
        assert set(server.sh(f"ls -A {BACKUP_DIR}").split()) == before, "no partial file, no sidecar, nothing new"
    finally:
        server.sh("docker start ccp_postgres >/dev/null")
        console(server.host, f"systemctl reset-failed {SERVICE}")
    server.wait_healthy()


def test_remove_takes_the_timers_away(server):
    removed = server.ok("backup.schedule", "--remove")
    assert "changed       backup timers" in removed.stdout
    assert timers(server) == []
    assert console(server.host, "ls /etc/systemd/system/coachntt-backup-*")[0] != 0
    again = server.ok("backup.schedule", "--remove")
    assert "no backup timers" in again.stdout
