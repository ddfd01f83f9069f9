"""How every task meets a host: clear one-line answers for bad keys, unknown or
changed host keys and unreachable hosts, against a real sandbox sshd."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest

from opsrun import BIN, PROJECT_DIR, fab


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture
def host(vps_factory):
    return vps_factory(flavour="fresh")


def test_a_known_host_with_the_right_key_answers(host):
    result = fab(host, "deps.check")
    assert result.returncode == 1, "a fresh host lacks the dependencies, but the connection works"
    assert "nginx" in result.stdout and "missing" in result.stdout


def test_a_wrong_key_is_an_authentication_error(host, tmp_path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    result = fab(dataclasses.replace(host, key=stranger), "deps.check")
    assert result.returncode == 3
    assert "authentication failed for root@" in one_line_error(result)


def test_an_unknown_host_key_is_refused_until_accepted_once(host, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    env = {"COACHNTT_KNOWN_HOSTS": str(empty)}
    refused = fab(host, "deps.check", env=env)
    assert refused.returncode == 3
    line = one_line_error(refused)
    assert "unknown host key" in line and "SHA256:" in line and "COACHNTT_ACCEPT_NEW_HOST_KEY=1" in line
    assert empty.read_text() == ""

    accepted = fab(host, "deps.check", env={**env, "COACHNTT_ACCEPT_NEW_HOST_KEY": "1"})
    assert "recorded new host key" in accepted.stdout and host.ip in empty.read_text()
    again = fab(host, "deps.check", env=env)
    assert again.returncode == 1 and "unknown host key" not in again.stderr, "the recorded key is trusted from now on"


def test_a_changed_host_key_is_refused_as_a_possible_attack(host, tmp_path):
    forged = tmp_path / "known_hosts"
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    forged.write_text(f"{host.ip} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n")
    result = fab(host, "deps.check", env={"COACHNTT_KNOWN_HOSTS": str(forged)})
    assert result.returncode == 3
    assert "CHANGED" in one_line_error(result)


def test_an_unreachable_host_is_one_line_and_exit_3():
    result = subprocess.run([str(BIN / "fab"), "-H", "nobody@127.0.0.1:1", "deps.check"],
                            cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert "cannot reach nobody@127.0.0.1:1: connection refused" in one_line_error(result)
