"""A full release rehearsed on a local VPS, through the real CLI.

What an operator does to the plan's server, in order, against a sandbox host
that looks like the provider's Ubuntu 24.04 image (Docker pre-installed,
ssh.socket, cloud-init's PasswordAuthentication yes):

    secure (as root)  ->  deps  ->  nginx  ->  secure.audit
    deploy.setup      ->  deploy A  ->  deploy B (with a migration)
    deploy C (broken) ->  automatic rollback to B
    rollback --to A   ->  deploy.history

Every step is a `fab -H ... TASK` subprocess, so the rehearsal proves the
commands the README documents. The example app stands in for the CoachNTT API;
its images are loaded from the cache (there is no registry here) and its
repository is served by a git daemon on the bridge (the stand-in for GitHub).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import example_repo, hosts, images
from .paths import REPO_ROOT, SandboxError

OVERRIDE = REPO_ROOT / "configs" / "sandbox" / "compose.sandbox.yml"
OVERRIDE_ON_HOST = "/etc/coachntt-sandbox/compose.sandbox.yml"
BROKEN_HEALTH = {"BROKEN_HEALTH": "this release fails its health check on purpose\n"}
MIGRATION_2 = {"migrations/0002_pinned.sql": "ALTER TABLE notes ADD COLUMN IF NOT EXISTS pinned boolean NOT NULL DEFAULT false;\n"}


def fab(host: hosts.Host, user: str, *args: str, env: dict, expect: int = 0) -> None:
    """Run one task like an operator would; stop the rehearsal on a surprise."""
    command = [str(Path(sys.executable).parent / "fab"), "-H", f"{user}@{host.ip}", "-i", str(host.key), *args]
    print(f"\n$ fab -H {user}@{host.ip} {' '.join(args)}", flush=True)
    result = subprocess.run(command, cwd=REPO_ROOT, env=env)
    if result.returncode != expect:
        raise SandboxError(f"`fab {' '.join(args)}` exited {result.returncode}, expected {expect}")


def put_override(host: hosts.Host) -> None:
    """The sandbox-only compose override (no CPU limits: cgroup v1 guests can't apply them)."""
    payload = base64.b64encode(OVERRIDE.read_bytes()).decode()
    code, out = hosts.console(host.name, f"mkdir -p {Path(OVERRIDE_ON_HOST).parent} && echo {payload} | base64 -d > {OVERRIDE_ON_HOST}")
    if code != 0:
        raise SandboxError(f"could not place the compose override: {out.strip()}")


def rehearse(name: str = "rehearsal", flavour: str = "ubuntu-like", keep: bool = False) -> None:
    started = time.monotonic()
    host = hosts.up(name, flavour=flavour)
    print(f"sandbox host {host.name}: root@{host.ip} ({flavour})")
    try:
        images.load_images(host)
        put_override(host)
        with tempfile.TemporaryDirectory(prefix="coachntt-rehearsal-") as served:
            repo = Path(served) / "app"
            sha_a = example_repo.make_example_repo(repo)
            with example_repo.GitDaemon(Path(served)) as git:
                env = {
                    **os.environ,
                    "COACHNTT_ENV": "sandbox",
                    "COACHNTT_APP__REPO": git.url("app"),
                    "COACHNTT_APP__COMPOSE_OVERRIDES": OVERRIDE_ON_HOST,
                    "COACHNTT_APP__HEALTH_DEADLINE": "20",
                }
                fab(host, "root", "secure", env=env)
                fab(host, "coachntt", "deps", env=env)
                fab(host, "coachntt", "nginx", env=env)
                fab(host, "coachntt", "secure.audit", env=env)
                fab(host, "coachntt", "deploy.setup", env=env)
                fab(host, "coachntt", "deploy", "--sha", sha_a, "--message", "first release", env=env)
                sha_b = example_repo.commit_change(repo, "notes can be pinned", MIGRATION_2)
                fab(host, "coachntt", "deploy", "--sha", sha_b, "--message", "schema 2", env=env)
                sha_c = example_repo.commit_change(repo, "a release that fails its health gate", BROKEN_HEALTH)
                fab(host, "coachntt", "deploy", "--sha", sha_c, "--message", "broken on purpose", env=env, expect=1)
                fab(host, "coachntt", "deploy.status", env=env)
                fab(host, "coachntt", "rollback", "--to", sha_a, env=env)
                fab(host, "coachntt", "deploy.history", env=env)
        print(f"\nrehearsal passed in {time.monotonic() - started:.0f}s: secure, deps, nginx, audit, "
              "setup, two releases, an automatic rollback and a manual one")
    finally:
        if keep:
            print(f"kept {host.name} (root@{host.ip}); `inv sandbox.down --name {host.name}` removes it")
        else:
            hosts.down(host.name)
