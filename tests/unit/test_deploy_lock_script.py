"""scripts/deploy-lock.sh's `finish`, run here against a temporary STATE_DIR: the
release's last log entry appended and the lock freed in one command, only by the
run whose token holds the lock.

The script runs with a PATH of a few plain tools and nothing else.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from stand_ins import script_path

from fabfile.core import state
from fabfile.core.templates import SCRIPTS_DIR

SCRIPT = SCRIPTS_DIR / "deploy-lock.sh"
PLAIN_TOOLS = ("sh", "cat", "cut", "date", "grep", "head", "id", "mkdir", "rm", "sed", "stat", "touch", "chown")
A = "a" * 40
ENTRY = state.Release(sha=A, kind="release", result="ok", who="me@laptop", started="2026-12-02T10:00:00Z",
                      finished="2026-12-02T10:00:03Z", message="it's \"quoted\" $HOME `x` @FINISHED@ @STATUS@").to_json()


@pytest.fixture
def lock_sh(tmp_path):
    bin_dir, state_dir = tmp_path / "bin", tmp_path / "state"
    script_path(bin_dir, PLAIN_TOOLS)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(SCRIPT), args[0], str(state_dir), *args[1:]], capture_output=True, text=True,
                              timeout=30, env={"PATH": str(bin_dir)})

    run.lock, run.log = state_dir / "deploy.lock", state_dir / "releases.jsonl"
    assert run("acquire", "t0ken", "me@laptop", A, "release").returncode == 0
    return run


def test_finish_appends_the_entry_once_and_frees_the_lock(lock_sh):
    result = lock_sh("finish", "t0ken", ENTRY)
    assert result.returncode == 0, result.stderr
    assert lock_sh.log.read_text() == ENTRY + "\n", "the line as given, once: nothing filled in or escaped"
    assert not lock_sh.lock.exists()
    assert lock_sh("acquire", "next", "ci", A, "next release").returncode == 0, "the next release gets the lock"


def test_finish_with_another_token_refuses_exit_5_and_writes_nothing(lock_sh):
    result = lock_sh("finish", "not-ours", ENTRY)
    assert result.returncode == 5
    assert "no longer ours" in result.stderr and "holder=me@laptop" in result.stderr
    assert lock_sh.log.read_text() == "", "no entry for a run whose lock was taken"
    assert lock_sh.lock.is_dir(), "the holder's lock stays"
    assert lock_sh("finish", "t0ken", ENTRY).returncode == 0 and lock_sh.log.read_text() == ENTRY + "\n"


def test_finish_with_no_entry_only_frees_the_lock(lock_sh):
    assert lock_sh("finish", "t0ken", "").returncode == 0
    assert lock_sh.log.read_text() == "" and not lock_sh.lock.exists()


def test_finish_writes_each_line_of_a_settled_release(lock_sh):
    verify = state.Release(sha=A, kind="verify", result="ok").to_json()
    assert lock_sh("finish", "t0ken", f"{ENTRY}\n{verify}").returncode == 0
    assert lock_sh.log.read_text().splitlines() == [ENTRY, verify]


def test_release_is_finish_without_an_entry_for_a_run_that_logs_nothing(lock_sh):
    assert lock_sh("release", "not-ours").returncode == 5 and lock_sh.lock.is_dir()
    assert lock_sh("release", "t0ken").returncode == 0, "deps' restart of Docker frees the lock it took this way"
    assert lock_sh.log.read_text() == "" and not lock_sh.lock.exists()


# -- whose process: job.waiter and job.pid name a process by its start time and boot too ------


def identity_of(pid: int) -> tuple[str, str]:
    start = open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1].split()[19]
    return start, open("/proc/sys/kernel/random/boot_id").read().strip()


@pytest.mark.parametrize("written,connected", [
    ("{pid} {start} {boot}", True),              # that very process: its client is there
    ("{pid} {start} 00000000-another-boot", False),  # the same number after a reboot: not it
    ("{pid} 1 {boot}", False),                    # the number reused by a later process: not it
    ("{pid}", True),                              # a lock written before identities: the number alone
    ("", False),
])
def test_the_client_counts_as_connected_only_while_its_very_process_runs(lock_sh, written, connected):
    start, boot = identity_of(os.getpid())
    (lock_sh.lock / "job.waiter").write_text(written.format(pid=os.getpid(), start=start, boot=boot) + "\n")
    status = lock_sh("status")
    assert status.returncode == 0, status.stderr
    assert ("client=connected" in status.stdout.splitlines()) is connected, status.stdout


def test_a_phase_run_under_the_lock_records_who_waits_and_who_works(tmp_path, lock_sh):
    import shutil

    for tool in ("setsid", "timeout", "mv", "sleep"):  # what `run` needs beyond the fixture's tools
        (tmp_path / "bin" / tool).symlink_to(shutil.which(tool))
    result = lock_sh("run", "migrate", "30", "", "echo did it")
    assert (result.returncode, result.stdout.strip()) == (0, "did it"), result.stderr
    pid, start, boot = (lock_sh.lock / "job.pid").read_text().split()
    assert pid.isdigit() and start.isdigit() and boot == identity_of(os.getpid())[1]
    assert len((lock_sh.lock / "job.waiter").read_text().split()) == 3
    assert "job_pid=" + pid in lock_sh("status").stdout.splitlines()
