"""Small process, lock and command helpers shared by the sandbox modules."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path

from .paths import SandboxError, run_dir


def run(cmd: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a local command; on failure raise a one-line SandboxError with its stderr."""
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise SandboxError(f"{' '.join(cmd[:3])} failed: {detail[-1] if detail else result.returncode}")
    return result


@contextlib.contextmanager
def _flock(name: str, mode: int):
    with open(run_dir() / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, mode)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_lock(name: str):
    """An exclusive lock shared by every process using the same cache dir."""
    return _flock(name, fcntl.LOCK_EX)


def shared_lock(name: str):
    """Held (shared) by every user of a resource; see try_exclusive_lock."""
    return _flock(name, fcntl.LOCK_SH)


@contextlib.contextmanager
def try_exclusive_lock(name: str):
    """Yield True when nobody holds the shared lock of that name (and keep them out), else False."""
    with open(run_dir() / f"{name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cmdline(pid: int) -> str:
    # Right after exec the kernel can briefly report an empty cmdline: retry a moment.
    for _ in range(50):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return ""
        if raw:
            return raw.replace(b"\0", b" ").decode(errors="replace")
        time.sleep(0.01)
    return ""


def is_alive_with(pid: int | None, marker: str) -> bool:
    """True when pid is running AND its command line contains marker: never kill a reused pid."""
    return bool(pid) and marker in cmdline(pid)


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def kill_and_wait(pid: int, marker: str, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
    """Send sig to our own process pid (checked by marker) and wait until it is gone."""
    if not is_alive_with(pid, marker):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    wait_gone(pid, timeout)


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap if it is our child
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return True
        time.sleep(0.05)
    return False


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(part) for part in text.split()]


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll predicate until it returns a truthy value (returned) or raise after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise SandboxError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def require_root() -> None:
    if os.geteuid() != 0:
        raise SandboxError("the sandbox needs root (systemd-nspawn, mounts, bridge); run it as root")


def require_tools(*tools: str) -> None:
    import shutil

    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        raise SandboxError(
            f"missing {', '.join(missing)}; install: apt-get install systemd-container mmdebstrap zstd pebble openssh-client"
        )
