"""Where the sandbox keeps things, and the fixed addresses of its private network.

Everything lives under one cache directory on a real (ext4) filesystem, so images,
the apt cache and per-host overlays survive between runs and Docker inside a host
gets an ext4 /var/lib/docker (overlay-on-overlay does not work).
"""

from __future__ import annotations

import os
from pathlib import Path

BRIDGE = "cntt-br0"
SUBNET_PREFIX = "10.201.0."
GATEWAY_IP = "10.201.0.1"
NETMASK_BITS = 24
FIRST_HOST_OCTET = 11
LAST_HOST_OCTET = 250

APT_PROXY_PORT = 3142
DNS_PORT = 8053  # pebble's -dnsserver; the same responder also tries :53 for the hosts
PEBBLE_PORT = 14000
PEBBLE_MGMT_PORT = 15000

# The only destinations the whole sandbox (harness, tests, proxy clients) may talk to.
ALLOWED_NETWORKS = ("127.0.0.0/8", "10.201.0.0/24")

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS_DIR = REPO_ROOT / "configs" / "sandbox"
SCRIPTS_DIR = REPO_ROOT / "scripts" / "sandbox"

# cgroup hierarchies of this machine (PID 1 is not systemd; see TESTVPS.md)
CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
CGROUP_PREFIX = "coachntt-sandbox-"


class SandboxError(Exception):
    """A failure the sandbox can explain in one line."""


def cache_dir() -> Path:
    configured = os.environ.get("COACHNTT_SANDBOX_CACHE")
    path = Path(configured) if configured else Path.home() / ".cache" / "coachntt-testvps"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sub(*parts: str) -> Path:
    """A directory under the cache dir, created on first use."""
    path = cache_dir().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def images_dir() -> Path:
    return sub("images")


def base_trees_dir() -> Path:
    return sub("base")


def hosts_dir() -> Path:
    return sub("hosts")


def run_dir() -> Path:
    """pid files, logs and lock files of the sandbox's own services."""
    return sub("run")


def apt_cache_dir() -> Path:
    return sub("apt-cache")


def keys_dir() -> Path:
    return sub("keys")


def acme_dir() -> Path:
    return sub("acme")


def known_hosts_path() -> Path:
    configured = os.environ.get("COACHNTT_KNOWN_HOSTS")
    path = Path(configured) if configured else Path.home() / ".config" / "coachntt-ops" / "known_hosts"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def gateway_cidr() -> str:
    return f"{GATEWAY_IP}/{NETMASK_BITS}"
