"""Integration tests run against real test VPS hosts (systemd-nspawn, see TESTVPS.md).

Safety first: tests/conftest.py guards every test against connections outside
127.0.0.0/8 and the sandbox network 10.201.0.0/24. Hosts made by the fixtures are
torn down at the end of each test (or module), also when it fails.

A missing prerequisite (not root, no systemd-nspawn, ...) FAILS the fixture with the
reason: a green run must mean the hosts really ran.
"""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from fabfile import sandbox
from fabfile.sandbox.hosts import teardown_network_if_unused

REQUIRED_TOOLS = ("systemd-nspawn", "mmdebstrap", "zstd", "ssh", "ssh-keygen", "nsenter", "ip", "openssl")


# --------------------------------------------------------------------------- prerequisites


@pytest.fixture(scope="session")
def sandbox_ready():
    """Fail (never skip) when this machine cannot run sandbox hosts; build/unpack images once."""
    if os.geteuid() != 0:
        pytest.fail("sandbox hosts need root (systemd-nspawn, mounts, bridge)")
    missing = [tool for tool in REQUIRED_TOOLS if not shutil.which(tool)]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install systemd-container mmdebstrap zstd "
                    "openssh-client util-linux iproute2 openssl pebble")
    try:
        sandbox.ensure_images()
    except sandbox.SandboxError as exc:
        pytest.fail(f"sandbox images unavailable: {exc}")
    yield
    teardown_network_if_unused()  # only when nobody's host or image build still needs it


# --------------------------------------------------------------------------- hosts


class HostPool:
    """Makes hosts and remembers them, so one call destroys them all (also after a failure)."""

    def __init__(self):
        self.made: list[sandbox.Host] = []
        self.lock = threading.Lock()

    def make(self, flavour: str = "fresh", name: str | None = None) -> sandbox.Host:
        try:
            host = sandbox.up(name, flavour=flavour)
        except sandbox.SandboxError as exc:
            pytest.fail(f"sandbox host did not come up: {exc}")
        with self.lock:
            self.made.append(host)
        return host

    def destroy_all(self) -> None:
        errors = []
        for host in self.made:
            try:
                # This boot only: a test may have taken the host down already, and its name
                # may belong to another worker's host by now.
                sandbox.down(host.name, instance=host.instance)
            except sandbox.SandboxError as exc:
                errors.append(f"{host.name}: {exc}")
        if errors:
            pytest.fail(f"sandbox teardown failed: {'; '.join(errors)}")


@pytest.fixture
def vps_factory(sandbox_ready):
    """make(flavour='fresh', name=None) -> Host; every host made is destroyed after the test."""
    pool = HostPool()
    yield pool.make
    pool.destroy_all()


@pytest.fixture(scope="module")
def vps_factory_module(sandbox_ready):
    """Like vps_factory, but hosts live for the whole test module (slow set-ups shared)."""
    pool = HostPool()
    yield pool.make
    pool.destroy_all()


@pytest.fixture
def vps(vps_factory):
    """One fresh host (like a new VPS: root login by key only)."""
    return vps_factory("fresh")
