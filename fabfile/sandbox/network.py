"""The sandbox's private network: bridge, apt proxy + DNS daemon, and Pebble (ACME).

    cntt-br0 10.201.0.1/24 ── vb-<host> ── host0 10.201.0.11.. (one netns per host)
        :3142 apt proxy (Debian archive only)   :8053 DNS   :14000 Pebble ACME

Hosts get no default route: the only things they can reach are each other and the
services above, so nothing in a test can leak traffic to the outside.

DNS for Pebble: Pebble validates http-01 for real, connecting to <domain>:80. Its
-dnsserver points at our responder (services.py), which answers sandbox host names,
the domains mapped with map_domain(), and — when exactly one host is up — any
unmapped *.coachntt.ai name with that host's IP.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .paths import (
    APT_PROXY_PORT,
    BRIDGE,
    DNS_PORT,
    GATEWAY_IP,
    PEBBLE_MGMT_PORT,
    PEBBLE_PORT,
    SandboxError,
    acme_dir,
    cache_dir,
    gateway_cidr,
    run_dir,
)
from .util import file_lock, is_alive_with, kill_and_wait, read_pid, require_tools, run, wait_for

SERVICES_SCRIPT = Path(__file__).with_name("services.py")
SERVICES_MARKER = "sandbox/services.py"
PEBBLE_MARKER = "pebble"


# --------------------------------------------------------------------------- bridge


def bridge_exists() -> bool:
    return Path(f"/sys/class/net/{BRIDGE}").exists()


# A bridge without an address of its own takes its lowest port's, so a host joining or
# leaving could change the gateway's MAC under the others: their ARP entries then point
# nowhere and every answer stalls for seconds. A fixed, locally administered one never moves.
BRIDGE_MAC = "02:c0:47:00:00:01"


def ensure_bridge() -> None:
    if bridge_exists():
        return
    run(["ip", "link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge"])
    run(["ip", "addr", "add", gateway_cidr(), "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])


def remove_bridge() -> None:
    if bridge_exists():
        run(["ip", "link", "del", BRIDGE], check=False)


# --------------------------------------------------------------------------- daemons


def start_daemon(name: str, cmd: list[str], env: dict | None = None) -> int:
    """Start a long-lived helper in its own session, log to run/<name>.log, pid in run/<name>.pid."""
    log = (run_dir() / f"{name}.log").open("ab")
    process = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,  # survives the `inv sandbox.up` process that started it
        env={**os.environ, **(env or {})},
        cwd=run_dir(),
    )
    (run_dir() / f"{name}.pid").write_text(str(process.pid))
    return process.pid


def daemon_pid(name: str, marker: str) -> int | None:
    pid = read_pid(run_dir() / f"{name}.pid")
    return pid if is_alive_with(pid, marker) else None


def stop_daemon(name: str, marker: str) -> None:
    pid = daemon_pid(name, marker)
    if pid:
        kill_and_wait(pid, marker)
    (run_dir() / f"{name}.pid").unlink(missing_ok=True)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def ensure_services() -> None:
    if daemon_pid("services", SERVICES_MARKER):
        return
    start_daemon(
        "services",
        [sys.executable, str(SERVICES_SCRIPT), "--cache-dir", str(cache_dir()), "--listen", GATEWAY_IP,
         "--proxy-port", str(APT_PROXY_PORT), "--dns-port", str(DNS_PORT)],
    )
    wait_for(lambda: port_open(GATEWAY_IP, APT_PROXY_PORT), 10, what="the apt proxy to listen")


def ensure_network() -> None:
    """Bridge, apt proxy + DNS daemon and the ACME CA: everything a host needs before boot."""
    require_tools("ip")
    with file_lock("network"):
        ensure_bridge()
        ensure_services()
        ensure_acme_certs()


def teardown_network() -> None:
    """Stop Pebble and the services daemon and delete the bridge (call when no host is left)."""
    with file_lock("network"):
        stop_daemon("pebble", PEBBLE_MARKER)
        stop_daemon("services", SERVICES_MARKER)
        remove_bridge()


def apt_proxy_url() -> str:
    return f"http://{GATEWAY_IP}:{APT_PROXY_PORT}"


# --------------------------------------------------------------------------- DNS names


def dns_mapping_file() -> Path:
    return run_dir() / "dns.json"


def map_domain(domain: str, ip: str) -> None:
    """Make Pebble (and the hosts) resolve domain to ip, e.g. api.coachntt.ai -> a host."""
    with file_lock("dns"):
        mapping = read_dns_mapping()
        mapping[domain.lower()] = ip
        dns_mapping_file().write_text(json.dumps(mapping, indent=1))


def unmap_domains_of(ip: str) -> None:
    with file_lock("dns"):
        mapping = {name: addr for name, addr in read_dns_mapping().items() if addr != ip}
        dns_mapping_file().write_text(json.dumps(mapping, indent=1))


def read_dns_mapping() -> dict[str, str]:
    try:
        return json.loads(dns_mapping_file().read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- ACME (Pebble)


@dataclass(frozen=True)
class Pebble:
    directory_url: str  # certbot --server <this>
    ca_cert: Path  # trust anchor of Pebble's HTTPS endpoint (already in every host's CA bundle)
    management_url: str

    def issuer_root_pem(self) -> str:
        """The root that signs issued certificates (new each time Pebble starts)."""
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        with urllib.request.urlopen(f"{self.management_url}/roots/0", context=context, timeout=5) as response:
            return response.read().decode()


def acme_ca_cert() -> Path:
    return acme_dir() / "ca.pem"


def ensure_acme_certs() -> None:
    """A private CA and a server cert for 10.201.0.1, made once and kept in the cache dir."""
    directory = acme_dir()
    if (directory / "server.pem").exists() and acme_ca_cert().exists():
        return
    require_tools("openssl")
    key_opts = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(["openssl", "req", "-x509", *key_opts, "-days", "3650", "-subj", "/CN=coachntt sandbox ACME CA",
         "-keyout", str(directory / "ca.key"), "-out", str(directory / "ca.pem")])
    run(["openssl", "req", *key_opts, "-subj", f"/CN={GATEWAY_IP}",
         "-keyout", str(directory / "server.key"), "-out", str(directory / "server.csr")])
    extensions = directory / "server.ext"
    extensions.write_text(f"subjectAltName=IP:{GATEWAY_IP},DNS:localhost\nextendedKeyUsage=serverAuth\n")
    run(["openssl", "x509", "-req", "-in", str(directory / "server.csr"), "-CA", str(directory / "ca.pem"),
         "-CAkey", str(directory / "ca.key"), "-CAcreateserial", "-days", "3650",
         "-extfile", str(extensions), "-out", str(directory / "server.pem")])


def write_pebble_config() -> Path:
    directory = acme_dir()
    config = {
        "pebble": {
            "listenAddress": f"{GATEWAY_IP}:{PEBBLE_PORT}",
            "managementListenAddress": f"{GATEWAY_IP}:{PEBBLE_MGMT_PORT}",
            "certificate": str(directory / "server.pem"),
            "privateKey": str(directory / "server.key"),
            "httpPort": 80,  # real http-01 validation against the host's nginx/certbot
            "tlsPort": 443,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
    }
    path = directory / "pebble-config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def ensure_pebble() -> Pebble:
    """Start Pebble lazily (only certificate tests need it) and return how to use it."""
    ensure_network()
    require_tools("pebble")
    with file_lock("pebble"):
        if not daemon_pid("pebble", PEBBLE_MARKER):
            config = write_pebble_config()
            start_daemon(
                "pebble",
                ["pebble", "-config", str(config), "-dnsserver", f"{GATEWAY_IP}:{DNS_PORT}"],
                env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"},
            )
            try:
                wait_for(lambda: port_open(GATEWAY_IP, PEBBLE_PORT), 15, what="Pebble to listen")
            except SandboxError:
                raise SandboxError(f"pebble did not start; see {run_dir() / 'pebble.log'}") from None
    return Pebble(
        directory_url=f"https://{GATEWAY_IP}:{PEBBLE_PORT}/dir",
        ca_cert=acme_ca_cert(),
        management_url=f"https://{GATEWAY_IP}:{PEBBLE_MGMT_PORT}",
    )
