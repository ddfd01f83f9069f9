"""Websocket smoke check with the standard library only (runs on any host with python3).

    python3 scripts/ws_probe.py ws://127.0.0.1:8000/ws
    python3 scripts/ws_probe.py wss://api.coachntt.ai/ws --cafile /path/ca.pem

Connects, expects the app's hello message, sends a text frame and expects it echoed.
Prints one JSON line {"ok": ..., "hello": ..., "echo": ...}; exit 0 only when both worked.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import sys
from urllib.parse import urlsplit

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Conn:
    """A socket plus the bytes already read past the upgrade response (often the first frame)."""

    def __init__(self, sock, pending: bytes = b""):
        self.sock, self.pending = sock, pending

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def read_exact(conn: Conn, count: int) -> bytes:
    data, conn.pending = conn.pending[:count], conn.pending[count:]
    while len(data) < count:
        chunk = conn.sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-frame")
        data += chunk
    return data


def read_frame(conn: Conn) -> tuple[int, bytes]:
    first, second = read_exact(conn, 2)
    length = second & 0x7F
    if length == 126:
        length = struct.unpack("!H", read_exact(conn, 2))[0]
    elif length == 127:
        length = struct.unpack("!Q", read_exact(conn, 8))[0]
    mask = read_exact(conn, 4) if second & 0x80 else None
    payload = read_exact(conn, length)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return first & 0x0F, payload


def send_frame(conn: Conn, opcode: int, payload: bytes) -> None:
    """Client frames are always masked (RFC 6455 5.3)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    conn.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def read_message(conn: Conn) -> bytes:
    """The next text/binary payload, answering pings on the way."""
    while True:
        opcode, payload = read_frame(conn)
        if opcode in (0x1, 0x2):
            return payload
        if opcode == 0x9:
            send_frame(conn, 0xA, payload)
        elif opcode == 0x8:
            raise ConnectionError("server closed the websocket")


def connect(url: str, timeout: float, cafile: str | None, host_header: str | None):
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"expected a ws:// or wss:// URL, got {url!r}")
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    sock = socket.create_connection((parts.hostname, port), timeout=timeout)
    if parts.scheme == "wss":
        context = ssl.create_default_context(cafile=cafile)
        sock = context.wrap_socket(sock, server_hostname=host_header or parts.hostname)
    key = base64.b64encode(os.urandom(16)).decode()
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host_header or parts.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"no upgrade response (got {response[:80]!r})")
        response += chunk
    raw_head, _, rest = response.partition(b"\r\n\r\n")
    head = raw_head.decode("latin-1")
    status = head.split("\r\n", 1)[0]
    if " 101 " not in f"{status} ":
        raise ConnectionError(f"upgrade refused: {status}")
    expected = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    headers = {line.split(":", 1)[0].strip().lower(): line.split(":", 1)[1].strip() for line in head.split("\r\n")[1:] if ":" in line}
    if headers.get("sec-websocket-accept") != expected:
        raise ConnectionError("bad Sec-WebSocket-Accept in the upgrade response")
    return Conn(sock, rest)


def probe(url: str, timeout: float = 5.0, cafile: str | None = None, host_header: str | None = None) -> dict:
    result = {"ok": False, "url": url}
    try:
        conn = connect(url, timeout, cafile, host_header)
        try:
            result["hello"] = json.loads(read_message(conn))
            token = f"ping-{os.urandom(4).hex()}"
            send_frame(conn, 0x1, token.encode())
            result["echo"] = read_message(conn).decode()
            send_frame(conn, 0x8, struct.pack("!H", 1000))
        finally:
            conn.close()
        result["ok"] = result["echo"] == token and result["hello"].get("type") == "hello"
    except (OSError, ValueError, ConnectionError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--cafile", help="CA bundle for wss:// (default: the system's)")
    parser.add_argument("--host-header", help="Host / SNI name when the URL uses an address")
    args = parser.parse_args(argv)
    result = probe(args.url, args.timeout, args.cafile, args.host_header)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
