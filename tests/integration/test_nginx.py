"""nginx on a real sandbox host: headers, rate limit, websocket upgrade, safe reload."""

from __future__ import annotations

import base64
import os
import shlex
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from opsrun import console, fab

STUB = Path(__file__).parent / "stubs" / "ws_echo_backend.py"
API = "api.coachntt.ai"


def http_get(ip: str, host_header: str, path: str = "/") -> tuple[int, dict[str, str]]:
    with socket.create_connection((ip, 80), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if not data:
        return 0, {}  # nginx closed without an answer (return 444)
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    status_line, *header_lines = head.split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers


@pytest.fixture(scope="module", params=["provisioned", "ubuntu-like"])
def proxy_host(request, vps_factory_module):
    """A host serving our sites in front of a stub API; the ubuntu-like one gets `deps` first."""
    host = vps_factory_module(flavour=request.param)
    if request.param == "ubuntu-like":
        installed = fab(host, "deps")
        assert installed.returncode == 0, installed.stdout + installed.stderr
    payload = base64.b64encode(STUB.read_bytes()).decode()
    code, out = console(host, f"echo {payload} | base64 -d > /usr/local/bin/ws_echo_backend.py && "
                              "systemd-run --unit=stub-api python3 /usr/local/bin/ws_echo_backend.py")
    assert code == 0, out
    result = fab(host, "nginx")
    assert result.returncode == 0, result.stdout + result.stderr
    return host


def test_nginx_proxies_the_api_with_security_headers(proxy_host):
    status, headers = http_get(proxy_host.ip, API)
    assert status == 200
    assert headers["x-frame-options"] == "SAMEORIGIN"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-xss-protection"] == "1; mode=block"
    assert "strict-transport-security" not in headers, "HSTS belongs on TLS servers only"
    assert headers["server"] == "nginx", "server_tokens off hides the version"


def test_nginx_answers_nothing_for_unknown_names(proxy_host):
    status, _ = http_get(proxy_host.ip, "unknown.example")
    assert status == 0


def test_nginx_rate_limit_returns_429_beyond_the_burst(proxy_host):
    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(lambda _: http_get(proxy_host.ip, API)[0], range(80)))
    assert statuses.count(429) > 0, statuses
    assert 20 <= statuses.count(200) < 80, statuses
    # Leave the bucket refilled for the next test: 10 r/s refills a burst of 20 in ~2 s.
    deadline = time.monotonic() + 10
    while http_get(proxy_host.ip, API)[0] == 429 and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2.5)


def test_nginx_upgrades_websockets_on_ws(proxy_host):
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((proxy_host.ip, 80), timeout=5) as sock:
        sock.sendall(
            (f"GET /ws HTTP/1.1\r\nHost: {API}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        mask = os.urandom(4)
        message = b"hello ws"
        sock.sendall(bytes([0x81, 0x80 | len(message)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(message)))
        frame = sock.recv(2 + len(message))
    assert frame[2:] == message


def test_nginx_keeps_the_old_config_serving_when_the_new_one_fails(proxy_host):
    code, before = console(proxy_host, "cat /etc/nginx/conf.d/coachntt.conf")
    assert code == 0
    # (The api goes through the slot upstream the deploy owns; staging's address is in the site file.)
    broken = fab(proxy_host, "nginx", env={"COACHNTT_UPSTREAMS__STAGING": "no-such-upstream.invalid:8001"})
    assert broken.returncode != 0
    assert "Traceback" not in broken.stderr and "nginx" in broken.stderr, broken.stderr
    assert console(proxy_host, "cat /etc/nginx/conf.d/coachntt.conf")[1] == before
    assert http_get(proxy_host.ip, API)[0] == 200


def test_nginx_second_run_changes_nothing(proxy_host):
    result = fab(proxy_host, "nginx")
    assert result.returncode == 0
    assert " 0 changed" in result.stdout, result.stdout


def test_nginx_writes_the_slot_include_once_and_never_moves_the_api(proxy_host):
    """The include naming the live api slot belongs to deploy and rollback once it exists:
    rerunning `nginx` (e.g. after ssl.issue) must not send the api back to slot a."""
    include = "/etc/nginx/coachntt/api-upstream.conf"
    code, first = console(proxy_host, f"cat {include}")
    assert code == 0 and "server 127.0.0.1:8000;" in first, first
    code, out = console(proxy_host, f"sed -i 's/127.0.0.1:8000/127.0.0.1:8002/' {include} && nginx -t -q && systemctl reload nginx")
    assert code == 0, out
    try:
        result = fab(proxy_host, "nginx")
        assert result.returncode == 0 and " 0 changed" in result.stdout, result.stdout + result.stderr
        assert "server 127.0.0.1:8002;" in console(proxy_host, f"cat {include}")[1]
    finally:
        code, out = console(proxy_host, f"printf '%s' {shlex.quote(first)} > {include} && systemctl reload nginx")
        assert code == 0, out
    time.sleep(1)
    assert http_get(proxy_host.ip, API)[0] == 200
