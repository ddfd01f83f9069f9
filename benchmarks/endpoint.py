"""Where every contender connects: a sandbox host behind a latency relay.

    with sandbox_host(None) as host:                       # boots `bench<pid>` (provisioned)
        with relayed_endpoint(host, rtt_ms=50, workdir) as ep:
            ssh -p ep.port root@127.0.0.1 ...              # every round trip costs ~50 ms

The relay runs in its own process, so its threads never compete for the GIL with
the in-process contenders (coachntt-ops, Fabric). Host keys stay checked: the
host's pinned keys are written to a temporary known_hosts under the relay's
address, "[127.0.0.1]:<port>".
"""

from __future__ import annotations

import contextlib
import ipaddress
import multiprocessing
import os
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

import paramiko  # noqa: E402

from fabfile import sandbox  # noqa: E402

RELAY_ADDRESS = "127.0.0.1"
SANDBOX_NETWORK = ipaddress.ip_network("10.201.0.0/24")
RELAY_START_SECONDS = 10


@dataclass(frozen=True)
class Endpoint:
    """One relayed SSH address and what it takes to log in there with host keys checked."""

    address: str
    port: int
    user: str
    key: Path
    known_hosts: Path
    rtt_ms: float

    @property
    def known_hosts_name(self) -> str:
        return f"[{self.address}]:{self.port}"


# --------------------------------------------------------------------------- host


@contextlib.contextmanager
def sandbox_host(reuse: str | None, flavour: str = "provisioned") -> Iterator[sandbox.Host]:
    """The host to benchmark: `reuse` if named (left running), else a new one torn down after."""
    if reuse:
        host = sandbox.get_host(reuse)
        require_sandbox_address(host.ip)
        yield host
        return
    name = f"bench{os.getpid() % 100000}"
    try:
        host = sandbox.up(name, flavour=flavour)
        require_sandbox_address(host.ip)
        yield host
    finally:
        sandbox.down(name)  # this host only: never down_all, other people's hosts may run


def require_sandbox_address(ip: str) -> None:
    if ipaddress.ip_address(ip) not in SANDBOX_NETWORK:
        raise SystemExit(f"refusing to benchmark {ip}: not in the sandbox network {SANDBOX_NETWORK}")


# --------------------------------------------------------------------------- relay


def _serve_relay(target_ip: str, rtt_ms: float, port_out, stop) -> None:
    """Child process: hold a LatencyRelay open until told to stop."""
    with sandbox.LatencyRelay(target_ip, 22, rtt_ms=rtt_ms) as port:
        port_out.send(port)
        stop.wait()


@contextlib.contextmanager
def relay_process(target_ip: str, rtt_ms: float) -> Iterator[int]:
    """A LatencyRelay in a child process; yields its port on 127.0.0.1."""
    context = multiprocessing.get_context("fork")
    port_in, port_out = context.Pipe(duplex=False)
    stop = context.Event()
    process = context.Process(target=_serve_relay, args=(target_ip, rtt_ms, port_out, stop), daemon=True)
    process.start()
    try:
        if not port_in.poll(RELAY_START_SECONDS):
            raise RuntimeError(f"latency relay to {target_ip} did not start")
        yield port_in.recv()
    finally:
        stop.set()
        process.join(timeout=5)
        if process.is_alive():
            process.kill()  # our own child, by its pid
            process.join(timeout=5)


def write_relay_known_hosts(host: sandbox.Host, port: int, path: Path) -> None:
    """The host's pinned keys, re-labelled for the relay's address and port."""
    pinned = [line.split() for line in host.known_hosts.read_text().splitlines()]
    keys = [fields[1:3] for fields in pinned if len(fields) >= 3 and host.ip in fields[0].split(",")]
    if not keys:
        raise SystemExit(f"no pinned host key for {host.ip} in {host.known_hosts}")
    path.write_text("".join(f"[{RELAY_ADDRESS}]:{port} {kind} {blob}\n" for kind, blob in keys))


@contextlib.contextmanager
def relayed_endpoint(host: sandbox.Host, rtt_ms: float, workdir: Path) -> Iterator[Endpoint]:
    with relay_process(host.ip, rtt_ms) as port:
        known_hosts = workdir / f"known_hosts.{port}"
        write_relay_known_hosts(host, port, known_hosts)
        yield Endpoint(RELAY_ADDRESS, port, host.user, Path(host.key), known_hosts, rtt_ms)


# --------------------------------------------------------------------------- RTT check


def measure_rtt(endpoint: Endpoint, samples: int = 5) -> dict[str, float]:
    """What the relay really adds, in ms.

    banner_ms: TCP connect + the server's first byte (its SSH banner): one way, ~rtt/2.
    ping_ms:   median SSH request -> reply on an open connection (keepalive@openssh
               global request, which sshd answers at once): a full round trip.
    """
    started = time.perf_counter()
    with socket.create_connection((endpoint.address, endpoint.port), timeout=10) as sock:
        sock.recv(1)
    banner_ms = (time.perf_counter() - started) * 1000

    client = paramiko.SSHClient()
    client.load_host_keys(str(endpoint.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(endpoint.address, port=endpoint.port, username=endpoint.user,
                   key_filename=str(endpoint.key), look_for_keys=False, allow_agent=False, timeout=10)
    try:
        transport = client.get_transport()
        pings = []
        for _ in range(samples):
            started = time.perf_counter()
            transport.global_request("keepalive@openssh.com", wait=True)
            pings.append((time.perf_counter() - started) * 1000)
    finally:
        client.close()
    return {"banner_ms": round(banner_ms, 1), "ping_ms": round(statistics.median(pings), 1)}
