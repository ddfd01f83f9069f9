"""A userspace TCP relay that adds latency (the kernel here has no netem).

    with LatencyRelay("10.201.0.11", 22, rtt_ms=50) as port:
        ssh -p <port> root@127.0.0.1 ...     # every round trip now costs ~50 ms more

Each direction is delayed by rtt_ms / 2: bytes read from one side are queued with a
due time and written to the other side when it passes, so data keeps streaming while
in flight (a delay line, not a stop-and-wait), like a real long link. Benchmarks must
record the RTT they ran at.
"""

from __future__ import annotations

import heapq
import ipaddress
import socket
import threading
import time

from .paths import ALLOWED_NETWORKS, SandboxError

CHUNK = 64 * 1024


def check_target_allowed(host: str) -> None:
    address = ipaddress.ip_address(socket.gethostbyname(host))
    if not any(address in ipaddress.ip_network(net) for net in ALLOWED_NETWORKS):
        raise SandboxError(f"relay target {host} is outside the sandbox networks {ALLOWED_NETWORKS}")


class DelayLine:
    """Forward bytes from src to dst, each chunk delivered delay seconds after it arrived."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float):
        self.src, self.dst, self.delay = src, dst, delay
        self.queue: list[tuple[float, int, bytes]] = []
        self.sequence = 0
        self.cond = threading.Condition()
        self.eof = False

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.read_loop, daemon=True),
                   threading.Thread(target=self.write_loop, daemon=True)]
        for thread in threads:
            thread.start()
        return threads

    def read_loop(self) -> None:
        try:
            while data := self.src.recv(CHUNK):
                with self.cond:
                    heapq.heappush(self.queue, (time.monotonic() + self.delay, self.sequence, data))
                    self.sequence += 1
                    self.cond.notify()
        except OSError:
            pass
        with self.cond:
            self.eof = True
            self.cond.notify()

    def write_loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.eof:
                        self.cond.wait()
                    if not self.queue:  # eof and drained
                        break
                    due, _seq, data = self.queue[0]
                    wait = due - time.monotonic()
                    if wait > 0:
                        self.cond.wait(wait)
                        continue
                    heapq.heappop(self.queue)
                self.dst.sendall(data)
            self.dst.shutdown(socket.SHUT_WR)  # pass the half-close on, after the delay
        except OSError:
            pass


class LatencyRelay:
    """Listen on 127.0.0.1:<port>, forward to target_ip:target_port with rtt_ms added."""

    def __init__(self, target_ip: str, target_port: int = 22, rtt_ms: float = 50.0, listen_port: int = 0):
        check_target_allowed(target_ip)
        self.target = (target_ip, target_port)
        self.rtt_ms = rtt_ms
        self.listener = socket.create_server(("127.0.0.1", listen_port))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.stopping = threading.Event()
        self.accept_thread = threading.Thread(target=self.accept_loop, daemon=True)

    def __enter__(self) -> int:
        self.accept_thread.start()
        return self.port

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.stopping.set()
        for sock in [self.listener, *self.sockets]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.accept_thread.join(timeout=2)

    def accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _addr = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sockets += [client, upstream]
            one_way = self.rtt_ms / 2000.0
            DelayLine(client, upstream, one_way).start()
            DelayLine(upstream, client, one_way).start()
