"""The deploy lock and the phases run under it, on this machine's own shell.

scripts/deploy-lock.sh runs for real against a
temporary state directory; nothing here needs a server.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time

import invoke
import pytest

from fabfile.core import lock, state
from fabfile.core.cutoff import settle
from fabfile.core.errors import EXIT_LOCKED, ConnectionLost, LockHeldError, OpsError
from fabfile.core.target import LocalTarget

A, B = "a" * 40, "b" * 40


@pytest.fixture
def sh():
    local = LocalTarget(invoke.Context())
    local.is_root = True  # nothing here needs privileges
    return local


@pytest.fixture
def state_dir(tmp_path):
    return str(tmp_path)


def log_of(state_dir) -> list[state.Release]:
    path = f"{state_dir}/releases.jsonl"
    try:
        return state.parse_log(open(path).read())
    except FileNotFoundError:
        return []


def test_a_second_holder_is_refused_naming_the_first(sh, state_dir, tmp_path):
    with lock.deploy_lock(sh, state_dir, A, "first release"):
        with pytest.raises(LockHeldError) as info:
            with lock.deploy_lock(sh, state_dir, B, "second release"):
                pytest.fail("the second holder must not get in")
        assert info.value.exit_code == EXIT_LOCKED
        assert info.value.what.startswith(f"deploy lock held by {state.operator()} since ")
        assert f"(sha {A[:12]})" in info.value.what
        assert "deploy.recover" in info.value.hint and "--break-lock" in info.value.hint, "nothing runs: say how to free it"
        assert (tmp_path / "deploy.lock").is_dir(), "a refused second holder must not release the first one's lock"
    assert not (tmp_path / "deploy.lock").exists()


def test_a_failure_the_block_recorded_releases_the_lock(sh, state_dir, tmp_path):
    with pytest.raises(OpsError):
        with lock.deploy_lock(sh, state_dir, A, "doomed"):
            raise OpsError("deploy failed")
    assert not (tmp_path / "deploy.lock").exists()


@pytest.mark.parametrize("cut_off", [KeyboardInterrupt(), ConnectionLost("lost"), EOFError()], ids=["ctrl-c", "lost", "other"])
def test_a_run_cut_off_keeps_the_lock_because_work_may_still_run(sh, state_dir, tmp_path, cut_off):
    with pytest.raises(type(cut_off)):
        with lock.deploy_lock(sh, state_dir, A, "cut off"):
            raise cut_off
    assert (tmp_path / "deploy.lock").is_dir()


def test_only_the_run_that_holds_the_lock_releases_it(sh, state_dir, tmp_path):
    with pytest.raises(LockHeldError) as info:
        with lock.deploy_lock(sh, state_dir, A, "mine"):
            (tmp_path / "deploy.lock" / "info").write_text("holder=other@ci\nsince=now\nsha=x\ntoken=theirs\n")
    assert "taken from this run" in info.value.what and "other@ci" in info.value.what
    assert (tmp_path / "deploy.lock").is_dir(), "the other run's lock stays"


def test_a_release_ends_in_one_command_that_logs_its_entry_and_frees_the_lock(fake_host):
    host = fake_host()
    entry = state.Release(sha=A, kind="release", result="ok", previous=B, message="it's \"quoted\"")
    with lock.deploy_lock(host, "/var/lib/coachntt-ops", A, "") as held:
        held.log(entry)
    acquire, finish = host.sent
    assert "deploy-lock acquire" in acquire
    assert shlex.split(finish)[-5:] == ["deploy-lock", "finish", "/var/lib/coachntt-ops", held.token, entry.to_json()]
    assert held.final == [], "written: a second release of the lock would not write it again"


def test_the_entry_of_a_run_whose_lock_was_taken_is_not_written_and_the_error_says_so(sh, state_dir, tmp_path):
    with pytest.raises(LockHeldError) as info:
        with lock.deploy_lock(sh, state_dir, A, "mine") as held:
            held.log(state.Release(sha=A, kind="deploy", result="ok"))
            (tmp_path / "deploy.lock" / "info").write_text("holder=other@ci\nsince=now\nsha=x\ntoken=theirs\n")
    assert f"{A[:12]}'s ok entry was not written to the release log" in info.value.hint
    assert log_of(state_dir) == []


@pytest.mark.parametrize("abandoned", [True, False], ids=["recorded-by-the-server", "not-yet-logged"])
def test_recover_of_a_release_cut_off_after_its_final_entry_logs_it_once_and_undoes_nothing(sh, state_dir, tmp_path, abandoned):
    final = state.Release(sha=A, kind="release", result="ok", previous=B, who="me", started=state.now(), finished=state.now())
    with pytest.raises(KeyboardInterrupt):
        with lock.deploy_lock(sh, state_dir, A, "") as held:
            held.release = state.Release(sha=A, kind="release", previous=B, who="me", started=final.started)
            held.log(final)
            held.phase = "post_deploy hook"
            assert held.interrupted_entry() == final.to_json(), "a phase after the entry would record it, not an interruption"
            assert held.run("echo hook").stdout == "hook\n"
            if abandoned:  # a second Ctrl-C: the server records the entry the client had
                held.abandon()
            raise KeyboardInterrupt
    assert log_of(state_dir) == ([final] if abandoned else [])
    adopted, info = lock.adopt(sh, state_dir)
    assert info.finished and info.recorded == abandoned
    healthy, said = settle(None, None, adopted, info)  # nothing is put back: no app, no reporter needed
    assert healthy and said == f"{A[:12]} had finished (ok) and is logged: nothing to put back"
    assert log_of(state_dir) == [final], "exactly one entry for the release"
    assert not (tmp_path / "deploy.lock").exists()


def test_a_phase_runs_as_a_job_and_answers_like_a_plain_command(sh, state_dir, tmp_path):
    with lock.deploy_lock(sh, state_dir, A, "") as held:
        held.phase = "migrate"
        result = held.run("echo out; echo err >&2; exit 3", check=False)
        assert (result.exit_status, result.stdout, result.stderr) == (3, "out\n", "err")
        assert result.command == "echo out; echo err >&2; exit 3", "errors name the command, not the wrapper"
        assert (tmp_path / "deploy.lock" / "job.phase").read_text() == "migrate\n"
        with pytest.raises(OpsError) as info:
            held.run("echo 'no space left on device' >&2; exit 1")
        assert info.value.hint == "no space left on device"


def test_a_phase_past_its_timeout_is_ended_on_the_server(sh, state_dir):
    with lock.deploy_lock(sh, state_dir, A, "") as held:
        started = time.monotonic()
        result = held.run("sleep 30", check=False, timeout=1)
        assert result.exit_status == 124 and time.monotonic() - started < 15


def test_a_phase_whose_client_is_gone_finishes_and_records_the_release(sh, state_dir, tmp_path):
    """The waiter dies with the client; the phase runs on and logs the release as interrupted."""
    with pytest.raises(KeyboardInterrupt):
        with lock.deploy_lock(sh, state_dir, A, "") as held:
            held.phase = "migrate"
            held.release = state.Release(sha=A, kind="deploy", previous=B, who="me", started=state.now())
            job = (f"{lock.LOCK_SCRIPT} run {state_dir} migrate 60 '{held.interrupted_entry()}' "
                   f"'sleep 1; echo migrated > {tmp_path}/done'")
            waiter = subprocess.Popen(["sh", "-c", job], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
            time.sleep(0.4)
            assert lock.read(sh, state_dir).job == "running"
            os.killpg(waiter.pid, signal.SIGKILL)  # the client is gone, and the waiter with it
            waiter.wait()
            raise KeyboardInterrupt
    info = lock.read(sh, state_dir)
    assert info is not None and info.job == "running", "the phase goes on, under the lock"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (tmp_path / "done").exists():
        time.sleep(0.1)
    time.sleep(0.5)
    entries = log_of(state_dir)
    assert [(e.sha, e.result, e.phase) for e in entries] == [(A, "interrupted", "migrate")]
    assert "exit 0" in entries[0].message and entries[0].finished[:2] == "20"
    info = lock.read(sh, state_dir)
    assert info.job == "finished" and info.recorded and info.release.sha == A


def test_abandon_records_the_release_once_when_no_phase_runs(sh, state_dir):
    with pytest.raises(KeyboardInterrupt):
        with lock.deploy_lock(sh, state_dir, A, "") as held:
            held.release = state.Release(sha=A, kind="deploy", previous=B)
            held.phase = "health gate"
            held.abandon()
            held.abandon()
            raise KeyboardInterrupt
    entries = log_of(state_dir)
    assert [(e.result, e.phase) for e in entries] == [("interrupted", "health gate")]


def test_break_stale_removes_a_lock_whose_holder_is_gone(sh, state_dir, tmp_path):
    (tmp_path / "deploy.lock").mkdir()
    (tmp_path / "deploy.lock" / "info").write_text("holder=gone@laptop\nsince=2025-01-01T00:00:00Z\nsha=x\ntoken=t\n")
    lock.break_stale(sh, state_dir)
    assert not (tmp_path / "deploy.lock").exists()


def test_break_stale_never_breaks_a_lock_over_a_half_done_release(sh, state_dir, tmp_path):
    (tmp_path / "deploy.lock").mkdir()
    (tmp_path / "deploy.lock" / "info").write_text("holder=gone@laptop\nsince=then\nsha=x\ntoken=t\n")
    (tmp_path / "deploy.lock" / "release.json").write_text(json.dumps({"sha": A, "kind": "deploy"}) + "\n")
    with pytest.raises(LockHeldError) as info:
        lock.break_stale(sh, state_dir)
    assert "deploy.recover" in info.value.hint
    assert (tmp_path / "deploy.lock").is_dir()


def test_break_stale_never_breaks_a_lock_whose_phase_still_runs(sh, state_dir, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with lock.deploy_lock(sh, state_dir, A, "") as held:
            held.phase = "checkout + build"
            subprocess.Popen(["sh", "-c", f"{lock.LOCK_SCRIPT} run {state_dir} 'checkout + build' 60 '' 'sleep 3'"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(0.4)
            raise KeyboardInterrupt
    with pytest.raises(LockHeldError) as info:
        lock.break_stale(sh, state_dir)
    assert "phase 'checkout + build' still running" in info.value.what
    assert (tmp_path / "deploy.lock").is_dir()
    assert lock.read(sh, state_dir).job == "running"


def test_lock_info_reads_the_status_lines():
    info = lock.LockInfo.parse("holder=ci@runner\nsince=2026-12-01T10:00:00Z\nsha=abc\ntoken=t\njob=running\n"
                               "phase=migrate\njob_pid=42\nclient=connected\n"
                               f'release={{"sha": "{A}", "kind": "deploy", "previous": "{B}"}}\n')
    assert (info.holder, info.job, info.phase, info.client_connected) == ("ci@runner", "running", "migrate", True)
    assert info.release.sha == A and info.release.previous == B
    assert info.describe() == "ci@runner since 2026-12-01T10:00:00Z (sha abc, phase 'migrate' still running)"


def test_a_client_that_gives_up_waiting_says_the_phase_may_still_run(sh, state_dir, mocker):
    from fabfile.core.errors import RemoteCommandError

    with pytest.raises(ConnectionLost) as info:
        with lock.deploy_lock(sh, state_dir, A, "") as held:
            held.phase = "migrate"
            mocker.patch.object(held.target, "run", side_effect=RemoteCommandError("`x` timed out after 660s"))
            held.run("sleep 1")
    assert "during migrate" in info.value.what and "deploy.recover" in info.value.hint
