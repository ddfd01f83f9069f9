"""The `sandbox` namespace: local test VPS hosts for trying tasks for real.

    inv sandbox.up --name web --flavour fresh      # host: root@10.201.0.11 / key: ...
    fab -H root@10.201.0.11 -i <key> secure ...     # then use it like any VPS
    inv sandbox.console --name web --cmd 'ufw status'
    inv sandbox.down --all
"""

from __future__ import annotations

import functools
import json as jsonlib
import os
import time

from invoke import Collection, task
from invoke.exceptions import Exit

from . import hosts, image, rehearsal
from .paths import SandboxError


def sandbox_task(func):
    """Root check first; a SandboxError becomes one line and exit 1, never a traceback."""

    @functools.wraps(func)
    def wrapper(c, *args, **kwargs):
        if os.geteuid() != 0:
            raise Exit("sandbox tasks need root (systemd-nspawn, mounts, bridge); run them as root", code=2)
        try:
            return func(c, *args, **kwargs)
        except SandboxError as exc:
            raise Exit(f"sandbox: {exc}", code=1) from None

    return wrapper


@task(help={
    "name": "host name (a-z, 0-9, '-', max 12 chars); default vps<N>",
    "flavour": "fresh (new VPS) | ubuntu-like (Ubuntu 24.04 provider image) | provisioned (deps installed)",
    "suite": "Debian suite of the image: trixie (default) or bookworm",
    "json": "print one JSON line (name, ip, user, key, flavour) instead of text",
})
@sandbox_task
def up(c, name=None, flavour="fresh", suite=None, json=False):
    """Create and boot a test VPS; prints how to reach it."""
    started = time.monotonic()
    host = hosts.up(name, flavour=flavour, suite=suite)
    if json:
        print(jsonlib.dumps({"name": host.name, "ip": host.ip, "user": host.user, "key": str(host.key),
                             "flavour": host.flavour, "known_hosts": str(host.known_hosts)}))
        return
    print(f"name: {host.name} ({host.flavour}, up in {time.monotonic() - started:.1f}s)")
    print(f"host: {host.user}@{host.ip}")
    print(f"key: {host.key}")
    print(f"known_hosts: {host.known_hosts}")


@task(name="down", help={"name": "host to destroy", "all": "destroy every host, the bridge and helpers"})
@sandbox_task
def down_(c, name=None, all=False):
    """Destroy a host (or --all of them); leaves no process, mount, veth or cgroup behind."""
    if all:
        if hosts.down_all():
            print("sandbox: all hosts down, bridge and helpers stopped")
        else:
            print("sandbox: all hosts down; bridge and proxy kept for an image build in progress")
    elif name:
        if not hosts.read_state(name) and not hosts.host_dir(name).exists():
            raise Exit(f"sandbox: no host named {name}; see sandbox.list", code=1)
        hosts.down(name)
        print(f"sandbox: {name} down")
    else:
        raise Exit("sandbox: give --name NAME or --all", code=2)


@task(name="list")
@sandbox_task
def list_(c):
    """List sandbox hosts: name, address, flavour, state."""
    found = hosts.list_hosts()
    if not found:
        print("no sandbox hosts")
    for host in found:
        state = "running" if hosts.machine_running(host.name) else "stopped"
        print(f"{host.name:<12} {host.user}@{host.ip:<14} {host.flavour:<12} {state}")


@task(help={"name": "host", "cmd": "shell command to run as root inside the host (no ssh)"})
@sandbox_task
def console(c, name, cmd):
    """Run a command in a host without ssh (the provider's web console); exits with its code."""
    code, output = hosts.console(name, cmd)
    print(output, end="")
    if code:
        raise Exit(code=code)


@task(name="image", help={"force": "rebuild even when cached", "suite": "trixie (default) or bookworm",
            "flavour": "only this flavour (default: all three)"})
@sandbox_task
def image_(c, force=False, suite=None, flavour=None):
    """Build (or unpack from cache) the host images."""
    started = time.monotonic()
    flavours = (flavour,) if flavour else image.FLAVOURS
    for name in flavours:
        image.packages_for(name, image.check_suite(suite))  # validate before any work
    trees = image.ensure_images(suite, force=force, flavours=flavours)
    for name, tree in trees.items():
        print(f"{name}: {tree}")
    print(f"images ready in {time.monotonic() - started:.1f}s")


@task(name="release", help={
    "flavour": "the host to rehearse on (default ubuntu-like: the provider's image)",
    "keep": "leave the host running afterwards",
})
@sandbox_task
def release_(c, flavour="ubuntu-like", keep=False):
    """Rehearse a full release on a fresh local VPS: secure, deps, nginx, ssl, monitoring, staging, releases under load, rollbacks."""
    rehearsal.rehearse(flavour=flavour, keep=keep)


sandbox = Collection("sandbox", up, down_, list_, console, image_, release_)
