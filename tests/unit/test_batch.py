"""Many probes, one round trip: the batch script and its parser.

The real-shell tests run the generated script with /bin/sh on this machine
through LocalTarget (no network, no sudo).
"""

from __future__ import annotations

import invoke
import pytest

from fabfile.core.batch import ProbeResult, batch_script, gather, parse_batch
from fabfile.core.errors import RemoteCommandError
from fabfile.core.target import LocalTarget, Result

M = "@@coachntt-0123456789abcdef"


@pytest.fixture
def local():
    return LocalTarget(invoke.Context())


def sh_gather(local, probes):
    return gather(local, probes, sudo=False)


# --- as data ----------------------------------------------------------------


def test_parse_batch_splits_frames_into_stdout_and_status():
    output = (
        "Welcome to Ubuntu (motd noise before the first frame)\n"
        f"{M} begin sshd\nPort 22\nPermitRootLogin no\n\n{M} end sshd 0\n"
        f"{M} begin missing\n\n{M} end missing 1\n"
        "trailing noise\n"
    )
    assert parse_batch(output, M) == {
        "sshd": ProbeResult("Port 22\nPermitRootLogin no", 0),
        "missing": ProbeResult("", 1),
    }


def test_parse_batch_treats_lines_with_another_marker_as_output():
    other = "@@coachntt-ffffffffffffffff"
    output = f"{M} begin a\n{other} end a 0\n{other} begin b\n\n{M} end a 5\n"
    assert parse_batch(output, M) == {"a": ProbeResult(f"{other} end a 0\n{other} begin b", 5)}


def test_parse_batch_ignores_a_frame_that_never_ends():
    assert parse_batch(f"{M} begin a\npartial\n", M) == {}


def test_probe_result_ok_and_lines():
    assert ProbeResult("a\nb", 0).ok and ProbeResult("a\nb", 0).lines == ["a", "b"]
    assert not ProbeResult("", 2).ok


def test_batch_script_frames_each_probe_in_order_with_stdin_and_stderr_closed():
    script = batch_script({"one": "echo 1", "two": "cat /etc/hostname"}, M)
    assert script.index(f"'{M} begin one'") < script.index(f"'{M} begin two'")
    assert "( echo 1\n) </dev/null 2>/dev/null" in script
    assert "( cat /etc/hostname\n) </dev/null 2>/dev/null" in script


@pytest.mark.parametrize("name", ["two words", "it's", "a;b", "x\ny", ""])
def test_batch_script_refuses_probe_names_that_are_not_plain_words(name):
    with pytest.raises(ValueError, match="probe name must be a plain word"):
        batch_script({name: "true"}, M)


def test_gather_with_no_probes_costs_no_round_trip(fake_host):
    host = fake_host()
    assert gather(host, {}) == {}
    assert host.round_trips == 0


def test_each_gather_uses_a_fresh_random_marker(fake_host, markers_of):
    host = fake_host(facts={"true": ("", 0)})
    gather(host, {"a": "true"})
    gather(host, {"a": "true"})
    first, second = (markers_of(s) for s in host.sent)
    assert len(first) == 1 and len(second) == 1 and first != second


def test_gather_runs_the_probes_with_sudo_by_default(fake_host):
    host = fake_host(facts={"true": ("", 0)}, is_root=False)
    gather(host, {"a": "true"})
    assert host.sent[0].startswith("sudo -n -- sh -c ")


# --- with a real shell ------------------------------------------------------


def test_probes_run_by_sh_in_one_round_trip_report_output_and_status(local):
    found = sh_gather(
        local,
        {
            "hello": "echo hello",
            "quiet": "true",
            "failing": "echo partial; exit 3",
            "multiline": "printf 'a\\n\\nb\\n'",
            "no_newline": "printf abc",
            "comment": "echo kept # a trailing comment must not eat the frame",
        },
    )
    assert found == {
        "hello": ProbeResult("hello", 0),
        "quiet": ProbeResult("", 0),
        "failing": ProbeResult("partial", 3),
        "multiline": ProbeResult("a\n\nb", 0),
        "no_newline": ProbeResult("abc", 0),
        "comment": ProbeResult("kept", 0),
    }
    assert local.round_trips == 1


def test_probe_stderr_is_dropped_and_stdin_is_empty(local):
    found = sh_gather(local, {"noisy": "echo out; echo warning: noise >&2", "reader": "cat; echo done"})
    assert found["noisy"] == ProbeResult("out", 0)
    assert found["reader"] == ProbeResult("done", 0), "a probe reading stdin gets EOF, not the script"


def test_probe_output_cannot_forge_a_frame(local):
    forged = "@@coachntt-0000000000000000"
    found = sh_gather(
        local,
        {
            "forger": f"echo '{forged} end victim 0'; echo '{forged} begin victim'; echo 'victim end 0'",
            "victim": "echo real; exit 4",
        },
    )
    assert found["forger"].lines == [f"{forged} end victim 0", f"{forged} begin victim", "victim end 0"]
    assert found["victim"] == ProbeResult("real", 4)


def test_a_probe_that_exits_does_not_end_the_batch(local):
    found = sh_gather(local, {"quitter": "exit 7", "after": "echo still here"})
    assert found == {"quitter": ProbeResult("", 7), "after": ProbeResult("still here", 0)}


def test_gather_raises_a_clear_error_when_the_script_itself_dies(local):
    with pytest.raises(RemoteCommandError) as info:
        sh_gather(local, {"first": "echo ok", "killer": "kill -9 $$", "never": "echo unreachable"})
    assert info.value.what.startswith(f"reading facts on {local.label} failed (exit ")
    assert "printf" not in info.value.one_line() and "@@coachntt" not in info.value.one_line()


def test_gather_reports_the_shell_error_when_a_probe_breaks_the_script(local):
    with pytest.raises(RemoteCommandError) as info:
        sh_gather(local, {"ok": "echo fine", "broken": "echo ("})
    assert "syntax error" in info.value.hint.lower()


def test_gather_when_sudo_is_refused_says_how_to_fix_it(fake_host):
    class NoSudo(fake_host):
        def _execute(self, command, timeout):
            return Result(command, "", "sudo: a password is required\n", 1)

    host = NoSudo(is_root=False, label="alice@10.201.0.9")
    with pytest.raises(RemoteCommandError) as info:
        gather(host, {"a": "true"})
    assert info.value.what == "reading facts on alice@10.201.0.9 failed (exit 1)"
    assert info.value.hint == (
        "alice needs passwordless sudo on 10.201.0.9: add a sudoers drop-in from the provider's console "
        "(e.g. `echo 'alice ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/90-alice`), "
        "or run `secure` as root while root login is still on"
    )
