"""Shared by every test: the project on sys.path and a network safety guard.

The guard refuses, before any packet is sent, every TCP/UDP connection from the
test process to an address outside loopback and the sandbox network
(10.201.0.0/24). A test that would reach the production VPS (or anything else
on the internet) fails loudly instead.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[1]
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

ALLOWED_NETWORKS = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "10.201.0.0/24")]


class NetworkGuardError(RuntimeError):
    """Raised instead of connecting; deliberately not an OSError, so no code maps it away."""


def check_address(family: int, address) -> None:
    """Raise NetworkGuardError unless `address` is local or in the sandbox network."""
    if family not in (socket.AF_INET, socket.AF_INET6):
        return  # AF_UNIX and friends never leave the machine
    host = address[0]
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        if host == "localhost":
            return
        raise NetworkGuardError(f"test tried to connect to host name {host!r}; use an address") from None
    ip = getattr(ip, "ipv4_mapped", None) or ip
    if not any(ip in net for net in ALLOWED_NETWORKS):
        raise NetworkGuardError(f"test tried to connect to {host} (port {address[1]}): outside loopback and 10.201.0.0/24")


@pytest.fixture(autouse=True, scope="session")
def network_guard():
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self, address):
        check_address(self.family, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check_address(self.family, address)
        return real_connect_ex(self, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket.socket, "connect_ex", connect_ex)
        yield


# With pytest-xdist (`-n 2`, the README's test command) each module runs whole, in order, on
# one worker: a module's tests share module-scoped hosts and build on each other. A module
# that marks itself with an xdist_group shares a worker with the other modules of that group.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))

