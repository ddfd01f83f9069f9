"""One-line errors instead of tracebacks.

Every failure a user can cause or meet (bad input, unreachable host, wrong key,
unknown host key, missing config, a remote command that failed) is raised as an
OpsError carrying *what* went wrong and *what to do*. The task decorator in
core/task.py turns it into a single line on stderr and a non-zero exit code.
"""

from __future__ import annotations

# Exit codes, stable so CI and cron can act on them.
EXIT_FAILED = 1  # the work itself failed (remote command, health gate)
EXIT_USAGE = 2  # bad input or missing config: nothing was touched
EXIT_CONNECT = 3  # could not reach or log in to the host
EXIT_LOCKED = 4  # someone else holds the deploy lock
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM: the message says what runs and what to do


class OpsError(Exception):
    """A failure we can explain in one line."""

    exit_code = EXIT_FAILED
    # True when work may still run on the server: the deploy lock stays held.
    keeps_lock = False

    def __init__(self, what: str, hint: str = ""):
        super().__init__(what)
        self.what = what
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.what}; {self.hint}" if self.hint else self.what


class UsageError(OpsError):
    exit_code = EXIT_USAGE


class ConfigError(OpsError):
    exit_code = EXIT_USAGE


class ConnectError(OpsError):
    exit_code = EXIT_CONNECT


class HostKeyError(ConnectError):
    pass


class AuthError(ConnectError):
    pass


class LockHeldError(OpsError):
    exit_code = EXIT_LOCKED


class ConnectionLost(ConnectError):
    """The connection died while a phase ran under the deploy lock."""

    keeps_lock = True


class Interrupted(OpsError):
    """Stopped by Ctrl-C or a signal, after putting things in order."""

    exit_code = EXIT_INTERRUPTED


class LeftRunning(Interrupted):
    """Stopped at once: a phase may still run on the server under the lock."""

    keeps_lock = True


class Stop(KeyboardInterrupt):
    """SIGTERM / SIGHUP (a cancelled CI job, a closed terminal), raised like Ctrl-C."""

    def __init__(self, signal_name: str = "SIGINT"):
        super().__init__(signal_name)
        self.signal_name = signal_name


class RemoteCommandError(OpsError):
    """A command on the host exited non-zero."""

    def __init__(self, what: str, hint: str = "", *, exit_status: int = 1, output: str = ""):
        super().__init__(what, hint)
        self.exit_status = exit_status
        self.output = output


def from_connection_failure(exc: BaseException, where: str) -> OpsError | None:
    """Map the exceptions socket/paramiko raise while connecting to an OpsError.

    Returns None for exceptions we do not recognise, so real bugs still show
    their traceback.
    """
    import socket

    import paramiko

    if isinstance(exc, OpsError):
        return exc
    if isinstance(exc, socket.gaierror):
        return ConnectError(
            f"cannot resolve host in {where}", "check the host name given with -H"
        )
    if isinstance(exc, ConnectionRefusedError):
        return ConnectError(
            f"cannot reach {where}: connection refused",
            "check the address and port, and that sshd is running there",
        )
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return ConnectError(
            f"cannot reach {where}: timed out",
            "check the address, the firewall and that the host is up",
        )
    if isinstance(exc, paramiko.BadHostKeyException):
        return HostKeyError(
            f"host key for {where} has CHANGED (possible man-in-the-middle)",
            "if the server was rebuilt, remove the old key with "
            "`ssh-keygen -R HOST -f KNOWN_HOSTS` and connect again",
        )
    if isinstance(exc, paramiko.AuthenticationException):
        return AuthError(
            f"authentication failed for {where}",
            "pass the right private key with -i KEY (or load it into ssh-agent)",
        )
    if isinstance(exc, paramiko.SSHException):
        return ConnectError(f"SSH failed for {where}: {exc}", "check the host and try again")
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        return ConnectError(
            f"cannot reach {where}: {reason}",
            "check the address and port, and that the host is up",
        )
    return None
