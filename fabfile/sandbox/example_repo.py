"""The example app as a real git repository, so deploys in tests check out real shas.

    sha = make_example_repo(tmp_path / "app")            # copy examples/app, git init, commit
    bad = commit_change(path, "break health", {"BROKEN_HEALTH": ""})
    good = commit_change(path, "fix", {"BROKEN_HEALTH": None})   # None deletes the file

Commits use a fixed identity through the environment: no git config is written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from .paths import GATEWAY_IP, REPO_ROOT, SandboxError

EXAMPLE_APP = REPO_ROOT / "examples" / "app"
IDENTITY = {
    "GIT_AUTHOR_NAME": "coachntt-ops tests",
    "GIT_AUTHOR_EMAIL": "tests@coachntt.invalid",
    "GIT_COMMITTER_NAME": "coachntt-ops tests",
    "GIT_COMMITTER_EMAIL": "tests@coachntt.invalid",
}


def git(path: Path, *args: str) -> str:
    env = {**os.environ, **IDENTITY, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}
    result = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise SandboxError(f"git {args[0]} in {path} failed: {detail[-1] if detail else result.returncode}")
    return result.stdout.strip()


def make_example_repo(path: Path | str, source: Path = EXAMPLE_APP) -> str:
    """Copy the example app to `path` (must not exist or be empty), commit it; return the sha."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise SandboxError(f"{path} is not empty; make_example_repo needs a fresh directory")
    shutil.copytree(source, path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".env.production"))
    git(path, "init", "-q", "-b", "main")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "example app")
    return git(path, "rev-parse", "HEAD")


def commit_change(path: Path | str, message: str, files: dict[str, str | bytes | None]) -> str:
    """Write (str/bytes) or delete (None) files relative to the repo, commit; return the sha."""
    path = Path(path)
    for name, content in files.items():
        target = path / name
        if not target.resolve().is_relative_to(path.resolve()):
            raise SandboxError(f"{name} is outside the repository {path}")
        if content is None:
            if target.exists():
                git(path, "rm", "-q", "--", name)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
        git(path, "add", "--", name)
    git(path, "commit", "-q", "--allow-empty", "-m", message)
    return git(path, "rev-parse", "HEAD")


def free_port(address: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


class GitDaemon:
    """A read-only git server on the bridge: the sandbox's stand-in for GitHub.

    Started and stopped by its own pid; bounded to the test that uses it.
    """

    def __init__(self, base_path: Path, listen: str = GATEWAY_IP, port: int = 0):
        # Port 0: a free port of its own, so two test runs never answer for each other.
        self.base_path, self.listen, self.port = base_path, listen, port or free_port(listen)
        self.process: subprocess.Popen | None = None

    def url(self, repo: str) -> str:
        return f"git://{self.listen}:{self.port}/{repo}"

    def __enter__(self) -> GitDaemon:
        self.process = subprocess.Popen(
            ["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={self.base_path}",
             f"--listen={self.listen}", f"--port={self.port}", str(self.base_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break  # it could not listen: someone else holds the port
            probe = subprocess.run(["git", "ls-remote", self.url("probe")], capture_output=True, text=True)
            if "Connection refused" not in probe.stderr:
                return self
            time.sleep(0.2)
        self.__exit__()
        raise SandboxError("git daemon did not start on the bridge")

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None
