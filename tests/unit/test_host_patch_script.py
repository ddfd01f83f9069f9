"""scripts/host-patch.sh's contract, run here against stand-ins for apt-get, dpkg and
dpkg-query: what it asks apt for, and the lines core/patching.py reads back.

The script runs with a PATH of the stand-ins plus a few plain tools and nothing
else, so it can never reach this machine's real apt, dpkg or systemd.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from stand_ins import script_path

from fabfile.core import patching
from fabfile.core.templates import SCRIPTS_DIR

SCRIPT = SCRIPTS_DIR / "host-patch.sh"
PLAIN_TOOLS = ("sh", "awk", "sort", "sed", "grep", "tail", "mktemp", "chmod", "cp", "mkdir", "rm", "tr", "cat", "date",
               "install", "stat", "dirname", "flock")

STAND_INS = {
    "apt-get": r"""#!/bin/sh
printf 'DEBIAN_FRONTEND=%s %s\n' "$DEBIAN_FRONTEND" "$*" >> "$REC/calls"
while [ $# -gt 0 ]; do
    case "$1" in
        -c) cp "$2" "$REC/apt.conf"; shift ;;
        -s) simulate=yes ;;
        update) if [ -n "${FAIL_UPDATE:-}" ]; then echo "Err:1 http://deb.example/debian trixie InRelease"; \
                echo "E: Failed to fetch http://deb.example/debian/dists/trixie/InRelease"; exit 100; fi; exit 0 ;;
        upgrade) if [ -n "${simulate:-}" ]; then cat "$REC/simulate"; else
                 echo "Setting up base-files (13.2) ..."; echo "1 upgraded, 1 newly installed, 0 to remove and 2 not upgraded."
                 [ -z "${ASK_REBOOT:-}" ] || { : > "$FLAG"; printf 'linux-base\nlinux-base\n' > "$FLAG.pkgs"; }; fi; exit 0 ;;
    esac
    shift
done
""",
    "dpkg": "#!/bin/sh\nprintf 'dpkg %s\\n' \"$*\" >> \"$REC/calls\"\n",
    # First call: the versions before; every later one: after.
    "dpkg-query": "#!/bin/sh\nif [ -e \"$REC/queried\" ]; then cat \"$REC/after\"; else : > \"$REC/queried\"; cat \"$REC/before\"; fi\n",
}

SIMULATE = """\
Reading package lists...
Calculating upgrade...
The following NEW packages will be installed:
  linux-image-6.12.48-amd64
The following packages will be upgraded:
  base-files linux-image-amd64
2 upgraded, 1 newly installed, 0 to remove and 3 not upgraded.
Inst base-files [13.1] (13.2 Debian:13.2/stable [amd64])
Inst linux-image-6.12.48-amd64 (6.12.48-1 Debian-Security:13/stable-security [amd64])
Inst linux-image-amd64 [6.12.41-1] (6.12.48-1 Debian-Security:13/stable-security [amd64])
Conf base-files (13.2 Debian:13.2/stable [amd64])
"""


@pytest.fixture
def host(tmp_path):
    """A PATH of stand-ins and plain tools; $REC collects what they were asked."""
    bin_dir, rec = tmp_path / "bin", tmp_path / "rec"
    rec.mkdir()
    script_path(bin_dir, PLAIN_TOOLS, STAND_INS)
    (rec / "before").write_text("ii |base-files|13.1\nii |linux-image-amd64|6.12.41-1\nrc |gone-long-ago|1.0\n"
                                "ii |old-lib|2.0\nhi |held|1.0\n")
    (rec / "after").write_text("ii |base-files|13.2\nii |linux-image-amd64|6.12.48-1\nii |linux-image-6.12.48-amd64|6.12.48-1\n"
                               "rc |gone-long-ago|1.0\nhi |held|1.0\n")
    (rec / "simulate").write_text(SIMULATE)

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True, timeout=30,
                              env={"PATH": str(bin_dir), "REC": str(rec), "FLAG": str(tmp_path / "reboot-required"), **env})

    run.rec, run.tmp, run.lock = rec, tmp_path, str(tmp_path / "state" / "backup.lock")
    (tmp_path / "state").mkdir()
    return run


def test_pending_judges_against_a_scratch_index_without_the_hosts_hooks(host):
    result = host("pending")
    assert result.returncode == 0, result.stderr
    report = patching.parse(result.stdout, record="inst")
    assert [p.describe() for p in report.packages] == [
        "base-files 13.1 -> 13.2", "linux-image-6.12.48-amd64 6.12.48-1 (new)", "linux-image-amd64 6.12.41-1 -> 6.12.48-1"]
    assert report.kept_back == 3
    calls = (host.rec / "calls").read_text().splitlines()
    assert [c.split()[-2:] for c in calls] == [["update", "--error-on=any"], ["upgrade", "--with-new-pkgs"]]
    assert all(" -c /tmp/coachntt-apt." in c for c in calls), "the host's own index is never the one refreshed"
    assert " -s " in calls[1], "only simulated"
    conf = (host.rec / "apt.conf").read_text()
    assert 'Dir::State::Lists "/tmp/coachntt-apt.' in conf and 'Dir::Cache::pkgcache "";' in conf
    for hook in ("Pre-Invoke", "Post-Invoke", "Post-Invoke-Success", "Post-Invoke-Stats"):
        assert f"#clear APT::Update::{hook};" in conf
    assert not list(Path("/tmp").glob(conf.split('"')[1].split("/")[2])), "the scratch directory is gone"


def test_pending_says_why_when_the_index_cannot_be_fetched(host):
    result = host("pending", FAIL_UPDATE="1")
    assert result.returncode == 1
    assert result.stdout.strip() == "error: apt-get update failed: E: Failed to fetch http://deb.example/debian/dists/trixie/InRelease"


def test_upgrade_never_asks_keeps_config_files_and_reports_versions_before_and_after(host):
    log = host.tmp / "patch.log"
    result = host("upgrade", str(log), str(host.tmp / "reboot-required"), host.lock)
    assert result.returncode == 0, result.stderr
    calls = (host.rec / "calls").read_text().splitlines()
    assert calls[0] == "DEBIAN_FRONTEND=noninteractive -q -y -o DPkg::Lock::Timeout=300 update --error-on=any"
    assert calls[1] == "dpkg --configure -a --force-confdef --force-confold", "a dpkg run cut off before is finished first"
    assert calls[2] == ("DEBIAN_FRONTEND=noninteractive -q -y -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef "
                        "-o Dpkg::Options::=--force-confold upgrade --with-new-pkgs")
    report = patching.parse(result.stdout, record="changed")
    assert {p.describe() for p in report.packages} == {
        "base-files 13.1 -> 13.2", "linux-image-amd64 6.12.41-1 -> 6.12.48-1", "linux-image-6.12.48-amd64 6.12.48-1 (new)",
        "old-lib 2.0 (removed)"}, "config-files-only packages are not installed ones"
    assert report.kept_back == 2 and report.reboot_for is None
    assert "Setting up base-files (13.2) ..." in log.read_text() and oct(log.stat().st_mode)[-3:] == "600"
    assert "Setting up" not in result.stdout, "apt's chatter stays in the log"


def test_upgrade_names_the_packages_that_ask_for_a_reboot(host):
    flag = host.tmp / "reboot-required"
    result = host("upgrade", str(host.tmp / "patch.log"), str(flag), host.lock, ASK_REBOOT="1")
    assert patching.parse(result.stdout, record="changed").reboot_for == ("linux-base",)


def test_a_failed_upgrade_is_its_last_lines_and_where_the_log_is(host, tmp_path):
    (tmp_path / "bin" / "dpkg").write_text("#!/bin/sh\necho 'dpkg: error processing package foo (--configure)'\nexit 1\n")
    log = host.tmp / "patch.log"
    result = host("upgrade", str(log), str(host.tmp / "reboot-required"), host.lock)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines()[-2:] == ["dpkg: error processing package foo (--configure)",
                                               f"dpkg --configure -a failed (apt's output: {log})"]


def test_anything_else_is_a_usage_line():
    result = subprocess.run(["sh", str(SCRIPT), "dist-upgrade"], capture_output=True, text=True, timeout=10,
                            env={"PATH": os.defpath})
    assert result.returncode == 2
    assert result.stderr.startswith("usage: host-patch.sh pending | upgrade LOG FLAG BACKUP_LOCK | reboot BACKUP_LOCK")


def test_a_running_backup_finishes_before_apt_starts_and_none_starts_meanwhile(host):
    """The backup timers' runs hold this flock (backup.schedule); the upgrade waits for it, then keeps it."""
    backup = subprocess.Popen(["flock", host.lock, "sleep", "2"])
    try:
        time.sleep(0.3)
        started = time.monotonic()
        result = host("upgrade", str(host.tmp / "patch.log"), str(host.tmp / "reboot-required"), host.lock)
        waited = time.monotonic() - started
    finally:
        backup.wait(timeout=10)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"waiting for the backup that runs now ({host.lock})\n")
    assert waited > 1, "apt started only once the backup let go"
    assert oct(Path(host.lock).stat().st_mode)[-3:] == "644"


def test_the_backup_lock_is_made_for_the_state_directorys_owner_when_no_timer_made_it_yet(host):
    assert not Path(host.lock).exists()
    assert host("upgrade", str(host.tmp / "patch.log"), str(host.tmp / "reboot-required"), host.lock).returncode == 0
    made, directory = Path(host.lock).stat(), Path(host.lock).parent.stat()
    assert (made.st_uid, made.st_gid) == (directory.st_uid, directory.st_gid)
