"""scripts/deploy-lock.sh's `finish`, run here against a temporary STATE_DIR: the
release's last log entry appended and the lock freed in one command, only by the
run whose token holds the lock.

The script runs with a PATH of a few plain tools and nothing else.
"""

from __future__ import annotations

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
