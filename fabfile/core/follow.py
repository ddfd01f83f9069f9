"""Following a long command line by line, and stopping it early.

`Target.follow` (core/target.py) runs a command that prints one line per
interval (scripts/monitor-watch.sh) and hands each line to a callback as soon
as it arrives; the callback returns True once it has seen enough. Then the
command is cut off:

    over SSH    the session channel is closed: the script dies of SIGPIPE at
                its next line (a sleep it is in finishes on its own)
    locally     the process group we started is sent SIGTERM

invoke's runners read a command to its end, so both ways are written here
against paramiko's channel and subprocess directly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable

# What a command cut off (or whose channel died) reports instead of an exit status.
NO_STATUS = -1
_READ = 32768


class TimedOut(Exception):
    """The command ran past its timeout; it was cut off."""


def hand_over(text: str, on_line: Callable[[str], bool]) -> bool:
    """Give each line of `text` to on_line until it says stop; True when it did."""
    return any(on_line(line) for line in text.splitlines())


class _Lines:
    """Bytes in, whole lines out to on_line; remembers everything it was given."""

    def __init__(self, on_line: Callable[[str], bool]):
        self.on_line = on_line
        self.pending = b""
        self.seen: list[bytes] = []
        self.stopped = False

    def feed(self, data: bytes) -> bool:
        self.seen.append(data)
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            if self.on_line(line.decode(errors="replace")):
                self.stopped = True
                return True
        return False

    def end(self) -> None:
        if self.pending and not self.stopped:
            self.stopped = bool(self.on_line(self.pending.decode(errors="replace")))

    @property
    def text(self) -> str:
        return b"".join(self.seen).decode(errors="replace")


def follow_channel(transport, command: str, on_line: Callable[[str], bool], timeout: int) -> tuple[str, str, int]:
    """Run `command` in a new session channel of `transport`; (stdout, stderr, status)."""
    deadline = time.monotonic() + timeout
    channel = transport.open_session(timeout=min(timeout, 60))
    lines = _Lines(on_line)
    try:
        channel.exec_command(command)
        while True:
            channel.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                data = channel.recv(_READ)
            except TimeoutError:  # socket.timeout
                raise TimedOut() from None
            if not data or lines.feed(data):
                break
        lines.end()
        if lines.stopped:
            return lines.text, "", NO_STATUS
        stderr = b""
        while channel.recv_stderr_ready():
            stderr += channel.recv_stderr(_READ)
        status = channel.recv_exit_status()
        return lines.text, stderr.decode(errors="replace"), status
    finally:
        channel.close()


def follow_process(command: str, on_line: Callable[[str], bool], timeout: int) -> tuple[str, str, int]:
    """Run `command` with /bin/sh in its own process group on this machine; (stdout, stderr, status)."""
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=errors, start_new_session=True)
        timed_out = threading.Event()

        def cut_off() -> None:
            timed_out.set()
            _end_group(process)

        timer = threading.Timer(timeout, cut_off)
        timer.start()
        lines = _Lines(on_line)
        ended = False
        try:
            while data := process.stdout.read1(_READ):
                if lines.feed(data):
                    break
            lines.end()
            ended = not lines.stopped
        finally:
            timer.cancel()
            if not ended:
                _end_group(process)  # stopped early or interrupted: ours to end
            process.stdout.close()
            process.wait()
        if timed_out.is_set():
            raise TimedOut()
        errors.seek(0)
        status = NO_STATUS if lines.stopped else process.returncode
        return lines.text, errors.read().decode(errors="replace"), status


def _end_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group of a command we started (its own session)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
