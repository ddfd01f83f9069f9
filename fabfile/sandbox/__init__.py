"""Local test VPS hosts (systemd-nspawn on a private bridge), see shared TESTVPS notes.

The Python API the integration tests and benchmarks use; `tasks.sandbox` is the
invoke namespace. Production tasks and core never import this package.
"""

from .hosts import Host, console, down, down_all, get_host, list_hosts, machine_running, sandbox_key, up
from .image import FLAVOURS, ensure_image, ensure_images
from .network import Pebble, apt_proxy_url, ensure_network, ensure_pebble, map_domain
from .paths import ALLOWED_NETWORKS, GATEWAY_IP, SandboxError, cache_dir, known_hosts_path
from .relay import LatencyRelay

__all__ = [
    "ALLOWED_NETWORKS", "FLAVOURS", "GATEWAY_IP", "Host", "LatencyRelay", "Pebble", "SandboxError",
    "apt_proxy_url", "cache_dir", "console", "down", "down_all", "ensure_image", "ensure_images",
    "ensure_network", "ensure_pebble", "get_host", "known_hosts_path", "list_hosts", "machine_running",
    "map_domain", "sandbox_key", "up",
]
