"""Following a command line by line (Target.follow): lines as they arrive, an early
stop that really ends the command, timeouts, and the channel side as data."""

from __future__ import annotations

import threading
import time

import invoke
import pytest

from fabfile.core import follow
from fabfile.core.errors import RemoteCommandError
from fabfile.core.target import LocalTarget, Result


@pytest.fixture
def local():
    return LocalTarget(invoke.Context())


def collector(stop_at: str | None = None):
    seen: list[tuple[float, str]] = []

    def on_line(line: str) -> bool:
        seen.append((time.monotonic(), line))
        return line == stop_at

    return seen, on_line


def test_lines_arrive_while_the_command_still_runs(local):
    seen, on_line = collector()
    result = local.follow("echo one; sleep 0.6; echo two; echo err >&2; exit 3", on_line)
    assert [line for _, line in seen] == ["one", "two"]
    assert seen[1][0] - seen[0][0] > 0.4, "the first line came before the command ended"
    assert (result.stdout, result.stderr, result.exit_status) == ("one\ntwo\n", "err\n", 3)
    assert local.round_trips == 1


def test_stopping_early_ends_the_command_and_its_children(local, tmp_path):
    marker = tmp_path / "still-running"
    seen, on_line = collector(stop_at="2")
    started = time.monotonic()
    result = local.follow(f"for i in 1 2 3 4; do echo $i; sleep 0.5; done; touch {marker}", on_line)
    assert time.monotonic() - started < 1.5
    assert [line for _, line in seen] == ["1", "2"]
    assert result.exit_status == follow.NO_STATUS and result.stdout == "1\n2\n"
    time.sleep(2)
    assert not marker.exists(), "the cut-off command did not go on"


def test_a_last_line_without_newline_is_handed_over(local):
    seen, on_line = collector()
    local.follow("printf 'a\\nb'", on_line)
    assert [line for _, line in seen] == ["a", "b"]


def test_a_command_past_its_timeout_is_cut_off_with_one_line(local):
    started = time.monotonic()
    with pytest.raises(RemoteCommandError, match="timed out after 1s"):
        local.follow("echo a; sleep 30", lambda line: False, timeout=1)
    assert time.monotonic() - started < 5


def test_targets_that_cannot_stream_hand_over_the_lines_at_the_end(fake_host):
    host = fake_host(replies={"watch": (0, "a\nb\nc\n", "")})
    seen, on_line = collector(stop_at="b")
    result = host.follow("watch", on_line, sudo=True)
    assert [line for _, line in seen] == ["a", "b"]
    assert result == Result("watch", "a\nb\nc\n", "", 0)
    assert host.sent == ["watch"] and host.round_trips == 1


def test_follow_wraps_like_run(fake_host):
    host = fake_host(is_root=False, login_user="coachntt")
    host.follow("tail it", lambda line: False, sudo=True)
    assert host.sent == ["sudo -n -- sh -c 'tail it'"]


# -- over SSH, with a channel as data -------------------------------------------------


class FakeChannel:
    """paramiko's Channel as far as follow_channel uses it: recv() hands out chunks."""

    def __init__(self, chunks, status=0, stderr=b"", stall=False):
        self.chunks = list(chunks)
        self.status, self.stderr, self.stall = status, stderr, stall
        self.closed = False
        self.command = ""
        self.timeout = None

    def exec_command(self, command):
        self.command = command

    def settimeout(self, seconds):
        self.timeout = seconds

    def recv(self, size):
        if self.chunks:
            return self.chunks.pop(0)
        if self.stall:
            raise TimeoutError()
        return b""

    def recv_stderr_ready(self):
        return bool(self.stderr)

    def recv_stderr(self, size):
        data, self.stderr = self.stderr, b""
        return data

    def recv_exit_status(self):
        return self.status

    def close(self):
        self.closed = True


class FakeTransport:
    def __init__(self, channel):
        self.channel = channel

    def open_session(self, timeout=None):
        return self.channel


def test_channel_lines_are_put_together_across_chunks():
    channel = FakeChannel([b"sam", b"ple 5 1\nsample", b" 10 2\n"], status=0, stderr=b"warn\n")
    seen, on_line = collector()
    out, err, status = follow.follow_channel(FakeTransport(channel), "cmd", on_line, 30)
    assert [line for _, line in seen] == ["sample 5 1", "sample 10 2"]
    assert (out, err, status) == ("sample 5 1\nsample 10 2\n", "warn\n", 0)
    assert channel.command == "cmd" and channel.closed


def test_channel_is_closed_when_the_reader_has_seen_enough():
    channel = FakeChannel([b"a\nb\nc\n", b"d\n"], status=0)
    seen, on_line = collector(stop_at="b")
    out, _, status = follow.follow_channel(FakeTransport(channel), "cmd", on_line, 30)
    assert [line for _, line in seen] == ["a", "b"]
    assert status == follow.NO_STATUS and channel.closed
    assert channel.chunks == [b"d\n"], "nothing more was read"


def test_a_silent_channel_past_the_deadline_times_out_and_is_closed():
    channel = FakeChannel([b"a\n"], stall=True)
    with pytest.raises(follow.TimedOut):
        follow.follow_channel(FakeTransport(channel), "cmd", lambda line: False, 30)
    assert channel.closed


def test_ctrl_c_while_following_closes_the_channel():
    channel = FakeChannel([b"a\n", b"b\n"])

    def on_line(line):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        follow.follow_channel(FakeTransport(channel), "cmd", on_line, 30)
    assert channel.closed


def test_local_follow_is_interruptible_and_leaves_nothing_running(local, tmp_path):
    marker = tmp_path / "went-on"
    seen: list[str] = []

    def on_line(line):
        seen.append(line)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return False

    with pytest.raises(KeyboardInterrupt):
        local.follow(f"echo 1; echo 2; sleep 1; touch {marker}", on_line)
    time.sleep(1.5)
    assert not marker.exists()
    assert threading.active_count() < 5, "no timer thread left behind"
