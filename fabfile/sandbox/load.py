"""SANDBOX ONLY: a bounded HTTP load through a sandbox host's nginx, counting failed requests.

Used by the release rehearsal (fabfile/sandbox/rehearsal.py) and by
tests/integration/test_release.py, so "0 failed requests during a cutover" means the
same thing in both. It aims only at a sandbox address (10.201.0.x, refused otherwise),
runs from this machine, and stops by itself: a request count and a time limit bound it,
and leaving the `with` block ends it when the command under test ends.

Each request goes on a connection of its own (keep-alive would measure the client's
reuse race at a reload, which clients retry, not the cutover). A failure is any answer
but the allowed statuses (200), or no answer (refused, reset, timeout). With `tls`, it
speaks HTTPS to port 443 with the domain as SNI, verifying against the given context
(after `ssl.issue`, plain HTTP only redirects).
"""

from __future__ import annotations

import collections
import http.client
import ipaddress
import json
import ssl
import threading
import time
from dataclasses import dataclass, field

from .paths import ALLOWED_NETWORKS, SandboxError

API_DOMAIN = "api.coachntt.ai"  # the default settings' api domain (nginx routes by Host)


class _NamedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an IP address, with the domain as SNI and as the name the certificate must carry."""

    def __init__(self, ip: str, name: str, context: ssl.SSLContext, timeout: float):
        super().__init__(ip, 443, timeout=timeout, context=context)
        self.server_name = name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.server_name)


def connect(ip: str, domain: str, tls: ssl.SSLContext | None = None, timeout: float = 10) -> http.client.HTTPConnection:
    """A connection to nginx on the sandbox host: HTTPS with the domain as SNI when `tls` is given, else port 80."""
    return _NamedHTTPS(ip, domain, tls, timeout=timeout) if tls else http.client.HTTPConnection(ip, 80, timeout=timeout)


@dataclass
class Answer:
    at: float  # seconds after the load began, when the request was sent
    status: int  # 0: no answer (connection refused, reset, timeout)
    version: str = ""
    retry_after: str = ""
    error: str = ""


@dataclass
class Load:
    """Bounded HTTP load through nginx: `workers` threads, one connection per request
    (keep-alive would measure the client's reuse race at a reload, which clients retry,
    not the cutover), until the `with` block ends, `limit` requests or `seconds`."""

    ip: str
    path: str = "/health"
    domain: str = API_DOMAIN
    tls: ssl.SSLContext | None = None
    workers: int = 4
    limit: int = 30_000
    seconds: float = 420.0
    pause: float = 0.05
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self):
        if not any(ipaddress.ip_address(self.ip) in ipaddress.ip_network(net) for net in ALLOWED_NETWORKS):
            raise SandboxError(f"the load aims only at sandbox addresses, not {self.ip}")
        self.lock, self.done = threading.Lock(), threading.Event()
        self.sent, self.began, self.ended = 0, 0.0, 0.0
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(self.workers)]

    def __enter__(self) -> Load:
        self.began = time.monotonic()
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(timeout=30)
        self.ended = time.monotonic()

    def _work(self) -> None:
        while not self.done.is_set() and time.monotonic() - self.began < self.seconds:
            with self.lock:
                if self.sent >= self.limit:
                    return
                self.sent += 1
            answer = self._one()
            with self.lock:
                self.answers.append(answer)
            time.sleep(self.pause)

    def _one(self) -> Answer:
        at = time.monotonic() - self.began
        connection = connect(self.ip, self.domain, self.tls)
        try:
            connection.request("GET", self.path, headers={"Host": self.domain, "Connection": "close"})
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            return Answer(at, 0, error=f"{type(exc).__name__}: {exc}")
        finally:
            connection.close()
        try:
            version = json.loads(body).get("version", "") if response.status == 200 else ""
        except ValueError:
            version = ""
        return Answer(at, response.status, version, response.getheader("Retry-After") or "")

    # -- what it saw

    @property
    def hit_bound(self) -> bool:
        return self.sent >= self.limit or (self.ended - self.began) >= self.seconds

    @property
    def ordered(self) -> list[Answer]:
        return sorted(self.answers, key=lambda a: a.at)

    def failed(self, allowed: tuple[int, ...] = (200,)) -> list[Answer]:
        return [a for a in self.answers if a.status not in allowed]

    def versions(self) -> list[str]:
        """The releases that answered, in the order they first did."""
        return list(dict.fromkeys(a.version for a in self.ordered if a.version))

    def around_switch(self, seconds: float = 2.5) -> int:
        """Requests sent within `seconds` of the first answer from the second release."""
        versions = self.versions()
        if len(versions) < 2:
            return 0
        switch = next(a.at for a in self.ordered if a.version == versions[1])
        return sum(1 for a in self.answers if abs(a.at - switch) <= seconds)

    def summary(self) -> str:
        statuses = collections.Counter(a.status for a in self.answers)
        seconds = self.ended - self.began
        by_version = collections.Counter(a.version[:12] for a in self.answers if a.version)
        return (f"{len(self.answers)} requests in {seconds:.1f}s ({len(self.answers) / max(seconds, 0.001):.0f}/s, "
                f"{self.workers} workers, bounds {self.limit} requests / {self.seconds:.0f}s), "
                f"statuses {dict(statuses)}, versions {dict(by_version)}, {self.around_switch()} within 2.5s of the switch, "
                f"failures {[(round(a.at, 2), a.status, a.error) for a in self.failed()][:5]}")
