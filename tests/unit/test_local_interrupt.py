"""`inv` on the server (LocalTarget) is cut off like `fab` is: Ctrl-C, SIGTERM or SIGHUP
end the wait at once (invoke alone would only write ^C to the command's stdin and wait
on), the command's processes in our session stop, a process in a session of its own (a
phase under the deploy lock) goes on; and a reporter whose terminal is gone stays quiet."""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import pytest

from fabfile.core.steps import Reporter
from fabfile.core.target import LocalTarget


def alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def interrupt_soon(seconds: float = 0.5) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    return timer


def test_an_interrupt_ends_the_wait_at_once_and_stops_the_command(project_context, tmp_path):
    target = LocalTarget(project_context)
    pid_file = tmp_path / "pid"
    interrupt_soon()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        target.run(f"sh -c 'echo $$ > {pid_file}; exec sleep 30'")
    assert time.monotonic() - started < 10, "not the 30 seconds the command would take"
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), "the command in our session is stopped"


def test_a_process_in_a_session_of_its_own_goes_on(project_context, tmp_path):
    target = LocalTarget(project_context)
    pid_file = tmp_path / "pid"
    interrupt_soon()
    with pytest.raises(KeyboardInterrupt):
        # deploy-lock.sh starts each phase like this: setsid, its output in files.
        target.run(f"setsid sleep 30 >/dev/null 2>&1 </dev/null & echo $! > {pid_file}; sleep 30")
    pid = int(pid_file.read_text())
    try:
        time.sleep(0.3)
        assert alive(pid), "a phase under the deploy lock is out of the client's reach"
    finally:
        os.kill(pid, signal.SIGKILL)


def test_a_command_that_ends_by_itself_is_untouched(project_context):
    assert LocalTarget(project_context).run("echo hello").stdout == "hello\n"


class GoneTerminal(io.StringIO):
    def write(self, text):
        raise OSError(5, "Input/output error")


def test_a_reporter_whose_terminal_is_gone_stays_quiet_instead_of_failing_the_run():
    reporter = Reporter("coachntt@vps", stream=GoneTerminal())
    reporter.info("  this line is lost")
    reporter.step("health gate", "interrupted", 1.0)
    assert reporter.unheard and reporter.counts["interrupted"] == 1
