"""Who runs a command: the host a task works on, local or over SSH.

A task gets one Target and never asks which kind it is:

    fab -H coachntt@host release   -> RemoteTarget over one hardened SSH connection
    inv release  (COACHNTT_HOST=)  -> RemoteTarget to the configured host
    inv backup.now  (on the server)-> LocalTarget through invoke's Context

Remote connections check host keys (~/.ssh/known_hosts plus the project's own
file; unknown keys are refused unless COACHNTT_ACCEPT_NEW_HOST_KEY=1 accepts
them once), set TCP_NODELAY, and count round trips so benchmarks can report them.
"""

from __future__ import annotations

import atexit
import getpass
import io
import logging
import os
import secrets
import shlex
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from fabric import Connection
from fabric.runners import Remote
from invoke.exceptions import CommandTimedOut
from invoke.runners import Local

from . import follow, redact
from .errors import AuthError, ConfigError, HostKeyError, RemoteCommandError, from_connection_failure
from .settings import Settings

# Longer commands go to `sh -s` on stdin: one argument may not exceed ~128 KiB.
MAX_INLINE_COMMAND = 64 * 1024
# No command waits forever: one without its own timeout gets this one.
DEFAULT_TIMEOUT = 1800
# A half-open connection (a cut link, a dead NAT entry) is noticed within about
# KEEPALIVE + USER_TIMEOUT seconds instead of hanging while it holds the lock.
KEEPALIVE_SECONDS = 10
USER_TIMEOUT_SECONDS = 30
# Once `secure` has turned root login off, only the provider's console can add sudo.
SUDO_PASSWORD_HINT = (
    "{user} needs passwordless sudo on {host}: add a sudoers drop-in from the provider's console "
    "(e.g. `echo '{user} ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/90-{user}`), "
    "or run `secure` as root while root login is still on"
)


@dataclass(frozen=True)
class Result:
    command: str
    stdout: str
    stderr: str
    exit_status: int

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


TOOL_UMASK = "umask 022"


class Target:
    """Runs shell on one host. Subclasses supply `_execute` and the file copies."""

    label = "local"
    is_root = False
    login_user = ""

    def __init__(self) -> None:
        self.round_trips = 0

    def run(
        self, command: str, *, sudo: bool = False, user: str = "", check: bool = True, timeout: int | None = None
    ) -> Result:
        """Run `command` with sh: as root when `sudo`, as `user` when given (sudo -n: never a prompt)."""
        wrapped = self._wrap(command, sudo=sudo, user=user)
        self.round_trips += 1
        timeout = timeout or DEFAULT_TIMEOUT
        try:
            result = self._execute(wrapped, timeout)
        except CommandTimedOut:
            raise self._timed_out(command, timeout) from None
        result = Result(command, result.stdout, result.stderr, result.exit_status)
        if check and not result.ok:
            raise command_failed(result, self.label)
        return result

    def follow(
        self, command: str, on_line: Callable[[str], bool], *, sudo: bool = False, user: str = "", timeout: int | None = None
    ) -> Result:
        """Run `command` like run(check=False), handing each line of its output to `on_line`
        as it arrives (one round trip). `on_line` returning True stops following: the
        command is cut off (its channel closed, or its process group ended) and the
        result holds what came until then, with exit status -1."""
        wrapped = self._wrap(command, sudo=sudo, user=user)
        self.round_trips += 1
        timeout = timeout or DEFAULT_TIMEOUT
        try:
            stdout, stderr, status = self._follow(wrapped, on_line, timeout)
        except follow.TimedOut:
            raise self._timed_out(command, timeout) from None
        return Result(command, stdout, stderr, status)

    def _timed_out(self, command: str, timeout: int) -> RemoteCommandError:
        return RemoteCommandError(redact.redact(f"{_first_line(command)} timed out after {timeout}s on {self.label}"),
                                  "the host may be overloaded or the command stuck; check it and rerun", exit_status=124)

    def _wrap(self, command: str, *, sudo: bool, user: str) -> str:
        # What the tool creates gets the modes it sets, whatever umask the host gives logins
        # (the OS baseline's 027 through pam_umask, sudo's sessions too): a directory it
        # makes as root must stay readable by the deploy user and the services.
        to_run = f"{TOOL_UMASK}; {command}"
        if len(command) > MAX_INLINE_COMMAND:
            # One argument may not exceed ~128 KiB: ship the script as a file first.
            path = self._upload_script(command)
            to_run = f"sh {path}; status=$?; rm -f {path}; exit $status"
        if user and user != self.login_user:
            return f"sudo -n -u {shlex.quote(user)} -- sh -c {shlex.quote(to_run)}"
        if sudo and not self.is_root:
            return f"sudo -n -- sh -c {shlex.quote(to_run)}"
        return to_run

    def _execute(self, command: str, timeout: int | None) -> Result:
        raise NotImplementedError

    def _follow(self, command: str, on_line: Callable[[str], bool], timeout: int) -> tuple[str, str, int]:
        """Targets that cannot stream (test doubles) hand over the lines once the command ended."""
        result = self._execute(command, timeout)
        follow.hand_over(result.stdout, on_line)
        return result.stdout, result.stderr, result.exit_status

    def _upload_script(self, script: str) -> str:
        """Put `script` in a private temporary file on the host; return its path."""
        raise NotImplementedError

    def put_file(self, local: str | Path, remote: str) -> None:
        raise NotImplementedError

    def put_private(self, text: str, remote: str) -> None:
        """`text` (a secret) into the file `remote` only the login user can read; the
        command that uses it removes it. Never on a command line, never printed."""
        raise NotImplementedError

    def get_file(self, remote: str, local: str | Path) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _first_line(command: str) -> str:
    first = command.strip().splitlines()[0] if command.strip() else "(empty)"
    return f"`{first[:77] + '...' if len(first) > 80 else first}`"


def command_failed(result: Result, where: str, what: str = "", *, summary: str = "") -> RemoteCommandError:
    """One line for a failed command: what ran (or `what` it was for), where, how it ended.

    `summary` replaces the whole first part, for commands too internal to name.
    """
    what = what or _first_line(result.command)
    summary = summary or f"{what} failed on {where} (exit {result.exit_status})"
    return RemoteCommandError(
        redact.redact(summary),
        redact.redact(failure_hint(result, where)),
        exit_status=result.exit_status,
        output=redact.redact(result.stdout + result.stderr),
    )


def failure_hint(result: Result, where: str) -> str:
    """What to do: passwordless sudo when sudo asked for a password, else the last line it printed."""
    stderr = result.stderr.strip()
    if "a password is required" in stderr or "a terminal is required" in stderr:
        user, _, host = where.rpartition("@")  # labels are user@host[:port]
        return SUDO_PASSWORD_HINT.format(user=user or "the login user", host=host)
    last = (stderr or result.stdout.strip()).splitlines()
    return last[-1] if last else "no output; rerun with the same command by hand to see more"


class CutOffLocal(Local):
    """invoke's local runner, but Ctrl-C, SIGTERM or SIGHUP (CI's SSH session gone with its
    terminal) end our waiting at once, as CutOffRemote does over SSH. invoke would only
    write ^C to the command's stdin, which nothing under the deploy lock reads, and wait on.
    The command's processes in this session are stopped, so their output ends; a phase
    under the deploy lock runs in a session of its own (deploy-lock.sh) and goes on."""

    def send_interrupt(self, interrupt: KeyboardInterrupt) -> None:
        for pid in in_this_session(self.process.pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        raise interrupt


def in_this_session(root: int) -> list[int]:
    """`root` and its descendants that are in our session (never a phase that setsid took out)."""
    session, children = os.getsid(0), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append((int(entry), int(fields[3])))
    found, todo = [root], [root]
    while todo:
        for pid, sid in children.get(todo.pop(), []):
            if sid == session:
                found.append(pid)
                todo.append(pid)
    return found


class LocalTarget(Target):
    """The machine `inv` runs on (the server itself, for on-server tasks)."""

    def __init__(self, context: Any):
        super().__init__()
        self.context = context
        context.config.runners.local = CutOffLocal
        self.login_user = getpass.getuser()
        self.label = f"{self.login_user}@localhost"
        self.is_root = os.geteuid() == 0

    def _execute(self, command: str, timeout: int | None) -> Result:
        r = self.context.run(command, hide=True, warn=True, in_stream=False, timeout=timeout, shell="/bin/sh")
        return Result(command, r.stdout, r.stderr, r.exited)

    def _follow(self, command: str, on_line: Callable[[str], bool], timeout: int) -> tuple[str, str, int]:
        return follow.follow_process(command, on_line, timeout)

    def _upload_script(self, script: str) -> str:
        fd, path = tempfile.mkstemp(prefix="coachntt-ops.", suffix=".sh")
        with os.fdopen(fd, "w") as fh:
            fh.write(script)
        return path

    def put_file(self, local: str | Path, remote: str) -> None:
        self.run(f"cp {shlex.quote(str(local))} {shlex.quote(remote)}")

    def put_private(self, text: str, remote: str) -> None:
        fd = os.open(remote, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)

    def get_file(self, remote: str, local: str | Path) -> None:
        self.run(f"cp {shlex.quote(remote)} {shlex.quote(str(local))}")


# paramiko logs a dying transport ("Socket exception: ...") to stderr by itself;
# we say it once, in our own one-line error.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class CutOffRemote(Remote):
    """Fabric's runner, but Ctrl-C (or SIGTERM) without a pty stops our reading at
    once: the channel is closed, so the run can go on (put things in order, leave)
    instead of waiting for the remote command to end. That command goes on."""

    def send_interrupt(self, interrupt: KeyboardInterrupt) -> None:
        self.channel.close()
        raise interrupt


class RemoteTarget(Target):
    """A host over exactly one SSH connection, opened with our safety settings."""

    def __init__(self, connection: Connection, settings: Settings, environ: Mapping[str, str] | None = None):
        super().__init__()
        self.connection = connection
        self.label = f"{connection.user}@{connection.host}" + (f":{connection.port}" if connection.port != 22 else "")
        self.login_user = connection.user
        self.is_root = connection.user == "root"
        self.kept_for_run = False
        self.settings = settings
        connection.config.runners.remote = CutOffRemote
        environ = os.environ if environ is None else environ
        try:
            open_hardened(connection, settings, accept_new=environ.get("COACHNTT_ACCEPT_NEW_HOST_KEY") == "1")
        except Exception as exc:
            mapped = from_connection_failure(exc, self.label)
            if mapped is None:
                raise
            if isinstance(mapped, AuthError) and self.is_root:
                deploy = f"{settings.get('deploy_user', 'coachntt')}@{self.label.split('@', 1)[1]}"
                mapped = AuthError(mapped.what, "if `secure` ran on this host, root login is now off: continue with "
                                   f"fab -H {deploy}; else pass the right private key with -i KEY")
            raise mapped from None

    def reconnect(self) -> None:
        """Close this connection and open it again (a host that rebooted), with the same
        host key checks: a key not already known is refused. The Connection object
        stays, so everything holding this target (a held lock, later tasks of the run)
        goes on over the new one. A failure is a ConnectError (exit 3)."""
        self.connection.close()
        stale = self.connection.connect_kwargs.pop("sock", None)
        if stale is not None:
            stale.close()
        try:
            open_hardened(self.connection, self.settings)
        except Exception as exc:
            mapped = from_connection_failure(exc, self.label)
            if mapped is None:
                raise
            raise mapped from None

    def _execute(self, command: str, timeout: int | None) -> Result:
        r = self.connection.run(command, hide=True, warn=True, in_stream=False, timeout=timeout)
        if r.exited == -1 and not self.connection.is_connected:
            # paramiko's "no exit status": the transport died under the command.
            raise ConnectionResetError(f"the SSH connection to {self.label} closed")
        return Result(command, r.stdout, r.stderr, r.exited)

    def _follow(self, command: str, on_line: Callable[[str], bool], timeout: int) -> tuple[str, str, int]:
        stdout, stderr, status = follow.follow_channel(self.connection.transport, command, on_line, timeout)
        if status == follow.NO_STATUS and not self.connection.is_connected:
            raise ConnectionResetError(f"the SSH connection to {self.label} closed")
        return stdout, stderr, status

    def _upload_script(self, script: str) -> str:
        path = f"/tmp/coachntt-ops.{secrets.token_hex(8)}.sh"
        self.round_trips += 1
        # SFTP creates it 0600 under the login user: nobody else can read it.
        self.connection.put(io.StringIO(script), path)
        return path

    def put_file(self, local: str | Path, remote: str) -> None:
        self.round_trips += 1
        self.connection.put(str(local), remote)

    def put_private(self, text: str, remote: str) -> None:
        self.round_trips += 1
        # Made private before the secret is written: SFTP creates files with the server's umask.
        with self.connection.sftp().open(remote, "wx") as fh:
            fh.chmod(0o600)
            fh.write(text)

    def get_file(self, remote: str, local: str | Path) -> None:
        self.round_trips += 1
        self.connection.get(remote, str(local))

    def close(self) -> None:
        if not self.kept_for_run:  # kept ones close at exit: later tasks of this run use them
            self.connection.close()


def require_key_files(connection: Connection) -> None:
    """A missing -i KEY would otherwise surface as "cannot reach" or "authentication failed"."""
    names = connection.connect_kwargs.get("key_filename") or []
    for name in [names] if isinstance(names, str) else names:
        path = Path(os.path.expanduser(str(name)))
        if not path.exists():
            raise ConfigError(f"key file {name} does not exist", "pass the private key with -i")
        if not path.is_file():
            raise ConfigError(f"key file {name} is not a file", "pass the private key with -i")


def known_hosts_file(settings: Settings) -> Path:
    return Path(os.path.expanduser(os.environ.get("COACHNTT_KNOWN_HOSTS") or settings.get("ssh.known_hosts")))


class RefuseUnknownHostKey(paramiko.MissingHostKeyPolicy):
    """Fabric's default silently trusts any new server; we refuse and say how to opt in."""

    def missing_host_key(self, client, hostname, key):
        raise HostKeyError(
            f"unknown host key for {hostname} ({key.get_name()} {fingerprint(key)})",
            "verify the fingerprint with your provider's console, then rerun once "
            "with COACHNTT_ACCEPT_NEW_HOST_KEY=1 to record it",
        )


class AcceptOnceAndRecord(paramiko.MissingHostKeyPolicy):
    """The explicit opt-in: record the new key in the project's known_hosts."""

    def __init__(self, path: Path):
        self.path = path

    def missing_host_key(self, client, hostname, key):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        print(f"recorded new host key for {hostname}: {key.get_name()} {fingerprint(key)} in {self.path}")


def fingerprint(key: paramiko.PKey) -> str:
    import base64
    import hashlib

    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def open_hardened(connection: Connection, settings: Settings, *, accept_new: bool = False) -> None:
    """Open `connection` with strict host keys, a timeout and TCP_NODELAY."""
    known = known_hosts_file(settings)
    client = connection.client
    client.load_system_host_keys()
    if known.is_file():
        client.load_host_keys(str(known))
    client.set_missing_host_key_policy(AcceptOnceAndRecord(known) if accept_new else RefuseUnknownHostKey())
    timeout = int(settings.get("ssh.connect_timeout", 10))
    # Our own socket so TCP_NODELAY is on before the first byte: SSH is a
    # chatty request/response protocol and Nagle's delay costs every round trip.
    sock = socket.create_connection((connection.host, connection.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    keep_alive(sock)
    connection.connect_kwargs["sock"] = sock
    connection.connect_timeout = timeout
    connection.open()
    connection.transport.set_keepalive(KEEPALIVE_SECONDS)


def keep_alive(sock: socket.socket) -> None:
    """Probe an idle connection and give up on unacknowledged data (Linux options
    where the platform has them), so a dead link ends in an error, not a hang."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_SECONDS), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3),
                        ("TCP_USER_TIMEOUT", USER_TIMEOUT_SECONDS * 1000)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def target_for(c: Any, settings: Settings) -> Target:
    """The Target for this run: the -H host, else the configured host, else local."""
    if isinstance(c, Connection):
        require_key_files(c)
        return _one_per_run(c, settings)
    host = settings.get("host")  # validated with the settings: user@host[:port]
    if host:
        connection = Connection(host, config=c.config)
        require_key_files(connection)
        return _one_per_run(connection, settings)
    return LocalTarget(c)


def connect_to(c: Any, settings: Settings, login: str) -> Target:
    """Another host of the layout (user@host[:port], from roles.*), with the run's SSH
    options and key: a task that works on several hosts at once (db.replica)."""
    connection = Connection(login, config=c.config.clone())
    require_key_files(connection)
    return _one_per_run(connection, settings)


# -- one connection per host for the whole run --------------------------------
# Fabric hands every task its own Connection. `fab -H root@HOST secure deps nginx`
# must not log in again for `deps`: `secure` has just turned root login off. So a
# run keeps the first connection to each (user, host, port) for all its tasks and
# closes them when the process exits; Ops.finish's close() leaves them open.

_OPEN: dict[tuple[str, str, int], RemoteTarget] = {}
# Several hosts connect at once (core/fleet.py): each to its own key, the registry shared.
_OPEN_LOCK = threading.Lock()


def _one_per_run(connection: Connection, settings: Settings) -> RemoteTarget:
    key = (connection.user, connection.host, connection.port)
    with _OPEN_LOCK:
        cached = _OPEN.get(key)
    if cached is not None and cached.connection.is_connected:
        return cached
    target = RemoteTarget(connection, settings)  # outside the lock: hosts connect in parallel
    target.kept_for_run = True
    with _OPEN_LOCK:
        if not _OPEN:
            atexit.register(close_run_connections)
        _OPEN[key] = target
    return target


def close_run_connections() -> None:
    """Close every connection kept for this run (at process exit)."""
    while _OPEN:
        _, target = _OPEN.popitem()
        target.connection.close()


def login_public_keys(target: Target) -> list[str]:
    """Public halves of the keys this run logged in with (-i KEY or connect_kwargs)."""
    if not isinstance(target, RemoteTarget):
        return []
    filenames = target.connection.connect_kwargs.get("key_filename") or []
    if isinstance(filenames, str):
        filenames = [filenames]
    keys = []
    for name in filenames:
        path = Path(os.path.expanduser(name))
        pub = path.with_name(path.name + ".pub")
        if pub.is_file():
            keys.append(" ".join(pub.read_text().split()[:2]))
        elif path.is_file():
            key = paramiko.PKey.from_path(path)
            keys.append(f"{key.get_name()} {key.get_base64()}")
    return keys


def second_login(target: Target, settings: Settings, user: str) -> Target:
    """A NEW connection to the same host as `user`, with the keys of this run.

    Used to prove a login works before we turn off the one we are using.
    """
    if not isinstance(target, RemoteTarget):
        raise ConfigError("a second login can only be proven over SSH", "run this task with fab -H")
    c = target.connection
    other = Connection(c.host, user=user, port=c.port, config=c.config,
                       connect_kwargs={k: v for k, v in c.connect_kwargs.items() if k != "sock"})
    return RemoteTarget(other, settings)
