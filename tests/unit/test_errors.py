"""Connection failures become one-line OpsErrors with stable exit codes."""

from __future__ import annotations

import socket

import paramiko
import pytest

from fabfile.core.errors import (
    EXIT_CONNECT,
    AuthError,
    ConnectError,
    HostKeyError,
    OpsError,
    UsageError,
    from_connection_failure,
)

WHERE = "coachntt@203.0.113.10"


def bad_host_key():
    got, expected = paramiko.RSAKey.generate(1024), paramiko.RSAKey.generate(1024)
    return paramiko.BadHostKeyException("203.0.113.10", got, expected)


@pytest.mark.parametrize(
    "exc,kind,what",
    [
        (ConnectionRefusedError(111, "Connection refused"), ConnectError, f"cannot reach {WHERE}: connection refused"),
        (TimeoutError("timed out"), ConnectError, f"cannot reach {WHERE}: timed out"),
        (TimeoutError(), ConnectError, f"cannot reach {WHERE}: timed out"),
        (socket.gaierror(-2, "Name or service not known"), ConnectError, f"cannot resolve host in {WHERE}"),
        (paramiko.AuthenticationException("Authentication failed."), AuthError, f"authentication failed for {WHERE}"),
        (OSError(113, "No route to host"), ConnectError, f"cannot reach {WHERE}: No route to host"),
        (paramiko.SSHException("Error reading SSH protocol banner"), ConnectError,
         f"SSH failed for {WHERE}: Error reading SSH protocol banner"),
    ],
)
def test_connection_failures_map_to_one_line_errors(exc, kind, what):
    error = from_connection_failure(exc, WHERE)
    assert type(error) is kind
    assert error.what == what
    assert error.hint, "every mapped failure says what to do"
    assert "\n" not in error.one_line()
    assert error.exit_code == EXIT_CONNECT


def test_changed_host_key_maps_to_host_key_error_with_the_removal_hint():
    error = from_connection_failure(bad_host_key(), WHERE)
    assert type(error) is HostKeyError
    assert "CHANGED" in error.what
    assert "ssh-keygen -R" in error.hint
    assert error.exit_code == EXIT_CONNECT


def test_wrong_key_hint_says_how_to_pass_a_key():
    assert "-i KEY" in from_connection_failure(paramiko.AuthenticationException(), WHERE).hint


@pytest.mark.parametrize("exc", [ValueError("bug"), KeyError("x"), RuntimeError("boom"), ZeroDivisionError()])
def test_unknown_exceptions_are_not_mapped(exc):
    assert from_connection_failure(exc, WHERE) is None


def test_an_ops_error_passes_through_unchanged():
    error = UsageError("domain must be a host name, got 'api coachntt.ai'")
    assert from_connection_failure(error, WHERE) is error


def test_one_line_joins_what_and_hint():
    assert OpsError("lock held by alice", "wait or run lock.release").one_line() == "lock held by alice; wait or run lock.release"
    assert OpsError("no hint").one_line() == "no hint"
