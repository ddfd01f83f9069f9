"""The sandbox's helper daemon: a caching apt proxy and a tiny DNS responder.

Runs as its own process (started by network.ensure_network, pid file in the cache
dir's run/), standard library only, so it can be started by path:

    python3 services.py --cache-dir DIR --listen 10.201.0.1

* apt proxy on :3142 — forwards ONLY to the Debian archive (deb.debian.org, paths
  /debian/ and /debian-security/); everything else gets 403. Immutable files (.deb,
  by-hash indexes) are cached forever, other index files for INDEX_TTL seconds, so
  the first `apt-get update` in a host is slow once and fast afterwards.
* DNS on :8053 (for Pebble's -dnsserver) and, when free, :53 (for the hosts' own
  resolver): answers A records for sandbox host names and for domains mapped in
  run/dns.json; if a *.coachntt.ai name is unmapped and exactly one host is up, it
  answers with that host's IP. Everything else is NXDOMAIN, so lookups fail fast.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import socketserver
import struct
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

UPSTREAM_HOST = "deb.debian.org"
ALLOWED_PATH_PREFIXES = ("/debian/", "/debian-security/")
INDEX_TTL = 30 * 60
UPSTREAM_TIMEOUT = 60
CHUNK = 256 * 1024
FALLBACK_DOMAIN_SUFFIX = ".coachntt.ai"


# --------------------------------------------------------------------------- apt proxy


def is_immutable(path: str) -> bool:
    return path.endswith((".deb", ".udeb", ".dsc")) or "/by-hash/" in path


class AptProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: apt pipelines many requests per connection
    server_version = "coachntt-sandbox-apt-proxy"
    cache_root: Path = Path(".")
    log_file = None
    log_lock = threading.Lock()

    def do_CONNECT(self):  # noqa: N802 - http.server naming
        self.refuse("CONNECT (https) is not proxied")

    def do_POST(self):  # noqa: N802
        self.refuse("only GET/HEAD are proxied")

    def do_HEAD(self):  # noqa: N802
        self.serve(send_body=False)

    def do_GET(self):  # noqa: N802
        self.serve(send_body=True)

    # -- the request

    def target_path(self) -> str | None:
        """The archive path asked for, or None when the destination is not allowed."""
        url = urlsplit(self.path)
        if url.scheme or url.netloc:  # forward-proxy form: http://host/path
            if url.scheme != "http" or url.hostname != UPSTREAM_HOST or url.port not in (None, 80):
                return None
            path = url.path
        else:  # reverse form: http://10.201.0.1:3142/debian/...
            path = url.path
        if ".." in path.split("/") or not path.startswith(ALLOWED_PATH_PREFIXES):
            return None
        return path

    def serve(self, send_body: bool):
        path = self.target_path()
        if path is None:
            self.refuse(f"destination not allowed: {self.path}")
            return
        cached = self.cache_root / UPSTREAM_HOST / path.lstrip("/")
        if self.is_fresh(cached, path):
            self.log_line("HIT", path)
            self.send_file(cached, send_body)
            return
        self.fetch_and_serve(path, cached, send_body)

    def is_fresh(self, cached: Path, path: str) -> bool:
        if not cached.is_file():
            return False
        return is_immutable(path) or time.time() - cached.stat().st_mtime < INDEX_TTL

    def fetch_and_serve(self, path: str, cached: Path, send_body: bool):
        try:
            upstream = http.client.HTTPConnection(UPSTREAM_HOST, 80, timeout=UPSTREAM_TIMEOUT)
            upstream.request("GET", path, headers={"User-Agent": "coachntt-sandbox-apt-proxy"})
            response = upstream.getresponse()
        except OSError as exc:
            self.log_line("UPSTREAM-ERROR", f"{path} {exc}")
            self.send_simple(502, f"upstream error: {exc}\n")
            return
        try:
            if response.status != 200:
                body = response.read()
                self.log_line(f"PASS-{response.status}", path)
                self.send_simple(response.status, body, content_type=response.getheader("Content-Type"))
                return
            # Download completely first, then serve with a Content-Length: simple and
            # keeps keep-alive working whatever encoding the archive used.
            cached.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=cached.parent, prefix=".part-")
            with os.fdopen(fd, "wb") as tmp:
                while chunk := response.read(CHUNK):
                    tmp.write(chunk)
            os.replace(tmp_name, cached)
        except OSError as exc:
            self.log_line("UPSTREAM-ERROR", f"{path} {exc}")
            self.send_simple(502, f"upstream error: {exc}\n")
            return
        finally:
            upstream.close()
        self.log_line("MISS", path)
        self.send_file(cached, send_body)

    # -- responses

    def send_file(self, path: Path, send_body: bool):
        size = path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Last-Modified", self.date_time_string(path.stat().st_mtime))
        self.end_headers()
        if send_body:
            with path.open("rb") as source:
                while chunk := source.read(CHUNK):
                    self.wfile.write(chunk)

    def send_simple(self, status: int, body, content_type: str | None = None):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", content_type or "text/plain")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def refuse(self, reason: str):
        self.log_line("DENY", self.path)
        self.send_simple(403, f"coachntt sandbox proxy: {reason}\n")
        self.close_connection = True

    def log_line(self, what: str, detail: str):
        line = f"{time.strftime('%H:%M:%S')} {self.client_address[0]} {what} {detail}\n"
        with self.log_lock:
            if self.log_file:
                self.log_file.write(line)
                self.log_file.flush()

    def log_message(self, format, *args):  # silence http.server's stderr log
        pass


# --------------------------------------------------------------------------- DNS


class NameTable:
    """Name -> IPv4 from run/dns.json and the hosts' state files, re-read on each query."""

    def __init__(self, cache_dir: Path):
        self.mapping_file = cache_dir / "run" / "dns.json"
        self.hosts_dir = cache_dir / "hosts"

    def host_ips(self) -> dict[str, str]:
        ips = {}
        for state_file in self.hosts_dir.glob("*/state.json"):
            try:
                state = json.loads(state_file.read_text())
                ips[state["name"]] = state["ip"]
            except (OSError, ValueError, KeyError):
                continue
        return ips

    def lookup(self, name: str) -> str | None:
        name = name.rstrip(".").lower()
        try:
            mapped = json.loads(self.mapping_file.read_text())
        except (OSError, ValueError):
            mapped = {}
        if name in mapped:
            return mapped[name]
        hosts = self.host_ips()
        short = name.removesuffix(".sandbox")
        if short in hosts:
            return hosts[short]
        if name.endswith(FALLBACK_DOMAIN_SUFFIX) and len(hosts) == 1:
            return next(iter(hosts.values()))
        return None


def parse_question(packet: bytes) -> tuple[int, str, int, int]:
    """(id, qname, qtype, offset after question) of a standard query."""
    query_id = struct.unpack("!H", packet[:2])[0]
    labels, offset = [], 12
    while packet[offset]:
        length = packet[offset]
        labels.append(packet[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    offset += 1
    qtype = struct.unpack("!H", packet[offset : offset + 2])[0]
    return query_id, ".".join(labels), qtype, offset + 4


def build_answer(packet: bytes, ip: str | None) -> bytes:
    query_id, _name, qtype, end = parse_question(packet)
    question = packet[12:end]
    rd = packet[2] & 0x01
    answers = b""
    if ip and qtype == 1:  # A
        answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 30, 4) + socket.inet_aton(ip)
    rcode = 0 if ip else 3  # NOERROR (maybe no data, e.g. AAAA) / NXDOMAIN
    flags = 0x8400 | (rd << 8) | 0x0080 | rcode  # response, authoritative, RA
    header = struct.pack("!HHHHHH", query_id, flags, 1, 1 if answers else 0, 0, 0)
    return header + question + answers


class DnsHandler(socketserver.BaseRequestHandler):
    names: NameTable

    def handle(self):
        packet, sock = self.request
        try:
            _id, name, _qtype, _end = parse_question(packet)
            sock.sendto(build_answer(packet, self.names.lookup(name)), self.client_address)
        except (IndexError, struct.error, OSError):
            pass  # malformed query: ignore, like any resolver


class ThreadingUDPServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True
    allow_reuse_address = True


# --------------------------------------------------------------------------- main


def serve_forever_in_thread(server) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", required=True, type=Path)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--proxy-port", type=int, default=3142)
    parser.add_argument("--dns-port", type=int, default=8053)
    args = parser.parse_args(argv)

    AptProxyHandler.cache_root = args.cache_dir / "apt-cache"
    AptProxyHandler.log_file = (args.cache_dir / "run" / "apt-proxy.log").open("a")
    ThreadingHTTPServer.daemon_threads = True
    proxy = ThreadingHTTPServer((args.listen, args.proxy_port), AptProxyHandler)

    DnsHandler.names = NameTable(args.cache_dir)
    servers = [proxy, ThreadingUDPServer((args.listen, args.dns_port), DnsHandler)]
    try:  # the hosts' resolv.conf points here; optional, pebble only needs --dns-port
        servers.append(ThreadingUDPServer((args.listen, 53), DnsHandler))
    except OSError as exc:
        print(f"dns :53 not available ({exc}); hosts' lookups will fail fast instead", file=sys.stderr)

    threads = [serve_forever_in_thread(server) for server in servers]
    print(f"listening on {args.listen}: apt proxy :{args.proxy_port}, dns :{args.dns_port}", flush=True)
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
