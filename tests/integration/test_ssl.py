"""ssl.* on a real sandbox host: examples/app deployed behind nginx, a certificate from
the sandbox's Pebble (real http-01 validation against the host's port 80).

One host, in order: bad input refused before issuing (nginx keeps serving plain HTTP),
the certificate issued and checked from this machine (names, issuer, redirects, HSTS,
protocol versions, ciphers, a websocket echo over wss://), status, a renewal dry run,
re-runs that change nothing, a changed domain list reissued, and failures after issuing
that leave HTTPS serving the same certificate.

Names are sandbox-only (*.cntt.test): mapped to the host with map_domain for Pebble's DNS,
and reached from here by the host's IP only (SNI and Host headers carry the names).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import ssl
import subprocess
import time
import warnings

import pytest

from fabfile import sandbox
from opsrun import console, example_app_served, fab, ready_for_the_app

# Pebble validates through the sandbox DNS, where these names point at one host at a time:
# under `-n 2` the modules that map them share a worker.
pytestmark = pytest.mark.xdist_group("sandbox-dns")

API, METRICS, STAGING = "api.cntt.test", "metrics.cntt.test", "staging.api.cntt.test"
DOMAINS = (API, METRICS, STAGING)
UNMAPPED = "nowhere.cntt.test"  # Pebble's DNS has no answer for it
NOBODY = "10.201.0.251"  # a sandbox address no host has: any connection attempt would fail
LIVE = "/etc/letsencrypt/live/coachntt"
SITE_FILE = "/etc/nginx/conf.d/coachntt.conf"
HSTS = "max-age=31536000; includeSubDomains"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def one_line(result: subprocess.CompletedProcess, *words: str) -> str:
    """A failed run ends with exactly one line on stderr and never a traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def read_response(sock) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    if not data:
        return 0, {}, b""  # closed without an answer (nginx's 444)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def request(name: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()


class Site:
    """The host, the settings that reach it, and Pebble's root to verify what it serves."""

    def __init__(self, host, env: dict, pebble: sandbox.Pebble):
        self.host, self.env, self.pebble = host, env, pebble

    def fab(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return fab(self.host, *args, user="coachntt", env={**self.env, **(env or {})})

    def sh(self, command: str) -> str:
        code, out = console(self.host, command)
        assert code == 0, out
        return out

    def tls_context(self) -> ssl.SSLContext:
        """Trusts only the root Pebble signs with; checks the host name like any client."""
        return ssl.create_default_context(cadata=self.pebble.issuer_root_pem())

    def http_get(self, name: str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
        with socket.create_connection((self.host.ip, 80), timeout=10) as sock:
            sock.sendall(request(name, path))
            return read_response(sock)

    def https_get(self, name: str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
        with socket.create_connection((self.host.ip, 443), timeout=10) as raw, \
                self.tls_context().wrap_socket(raw, server_hostname=name) as sock:
            sock.sendall(request(name, path))
            return read_response(sock)

    def served(self, name: str) -> dict[str, str]:
        """What openssl sees on :443 for `name` (SNI): issuer, names, fingerprint."""
        hello = subprocess.run(["openssl", "s_client", "-connect", f"{self.host.ip}:443", "-servername", name],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
        details = subprocess.run(["openssl", "x509", "-noout", "-issuer", "-fingerprint", "-sha256", "-ext", "subjectAltName"],
                                 input=hello.stdout, capture_output=True, text=True, timeout=10)
        assert details.returncode == 0, hello.stdout + hello.stderr
        text = details.stdout
        return {
            "issuer": re.search(r"^issuer=(.*)$", text, re.MULTILINE)[1],
            "names": sorted(re.findall(r"DNS:([^,\s]+)", text)),
            "fingerprint": re.search(r"Fingerprint=(\S+)", text)[1],
        }

    def serving_as_before(self, fingerprint: str | None) -> None:
        """nginx still answers: plain HTTP before a certificate, the same certificate after."""
        if fingerprint is None:
            status, _, body = self.http_get(API, "/health")
            assert status == 200, body
            assert self.sh(f"test -e {LIVE} && echo yes || echo no").strip() == "no"
        else:
            assert self.served(API)["fingerprint"] == fingerprint
            assert self.https_get(API, "/health")[0] == 200


@pytest.fixture(scope="module")
def site(vps_factory_module, tmp_path_factory):
    try:
        pebble = sandbox.ensure_pebble()
    except sandbox.SandboxError as exc:
        pytest.fail(f"Pebble (the sandbox's ACME server) did not start: {exc}")
    host = vps_factory_module(flavour="provisioned")
    for name in DOMAINS:
        sandbox.map_domain(name, host.ip)  # undone by sandbox.down with the host
    ready_for_the_app(host)
    with example_app_served(tmp_path_factory.mktemp("git")) as (_, sha, app_env):
        env = {**app_env, "COACHNTT_DOMAINS__API": API, "COACHNTT_DOMAINS__METRICS": METRICS,
               "COACHNTT_DOMAINS__STAGING": STAGING, "COACHNTT_SSL__EMAIL": "ops@cntt.test",
               "COACHNTT_SSL__ACME_SERVER": pebble.directory_url}
        served = Site(host, env, pebble)
        for args in (("deploy.setup",), ("deploy", "--sha", sha), ("nginx",)):
            result = served.fab(*args)
            assert result.returncode == 0, result.stdout + result.stderr
        yield served


# --- bad input before a certificate exists: nginx keeps serving plain HTTP ----------------


def test_missing_email_and_a_non_number_threshold_are_refused_before_connecting(site):
    """Aimed at an address where nothing answers: a connection attempt would end in exit 3."""
    nobody = type(site.host)(name="nobody", ip=NOBODY, key=site.host.key)
    missing_email = fab(nobody, "ssl.issue", user="coachntt", env={**site.env, "COACHNTT_SSL__EMAIL": ""})
    assert missing_email.returncode == 2
    assert one_line(missing_email) == ("error: missing config value 'ssl.email'; "
                                       "set it in invoke.yaml or as COACHNTT_SSL__EMAIL=... in .env.production")
    threshold = fab(nobody, "ssl.status", user="coachntt", env={**site.env, "COACHNTT_SSL__MIN_DAYS_LEFT": "two weeks"})
    assert threshold.returncode == 2
    assert one_line(threshold) == "error: COACHNTT_SSL__MIN_DAYS_LEFT must be a number, got 'two weeks'; fix the value"
    site.serving_as_before(None)


def test_issue_refuses_while_another_program_holds_port_443(site):
    site.sh("systemd-run --unit fake443 python3 -m http.server 443")
    try:
        deadline = time.monotonic() + 10
        while not site.sh("ss -Hltn 'sport = :443'").strip():
            assert time.monotonic() < deadline, "the stand-in never listened on 443"
            time.sleep(0.2)
        pid = site.sh("systemctl show -p MainPID --value fake443").strip()
        before = site.sh(f"sha256sum {SITE_FILE}")
        refused = site.fab("ssl.issue")
        assert refused.returncode == 1
        assert one_line(refused) == f"error: port 443 is held by python3 (pid {pid}); stop it or move it, then rerun"
        assert site.sh(f"sha256sum {SITE_FILE}") == before
        site.serving_as_before(None)
    finally:
        console(site.host, "systemctl stop fake443")


def test_issue_refuses_an_acme_server_it_cannot_reach(site):
    unreachable = "https://10.201.0.1:14999/dir"
    refused = site.fab("ssl.issue", env={"COACHNTT_SSL__ACME_SERVER": unreachable})
    assert refused.returncode == 1
    line = one_line(refused, f"cannot reach the ACME server {unreachable} from coachntt@{site.host.ip}: curl: (7)")
    assert line.endswith("check ssl.acme_server and that the host reaches it over HTTPS; nothing was changed"), line
    site.serving_as_before(None)


def test_issue_refuses_a_domain_the_acme_server_cannot_validate(site):
    before = site.sh(f"sha256sum {SITE_FILE}")
    refused = site.fab("ssl.issue", env={"COACHNTT_DOMAINS__METRICS": UNMAPPED})
    assert refused.returncode == 1
    line = one_line(refused, f"error: the ACME server could not validate {UNMAPPED} (")
    assert "point each name's DNS (A/AAAA) at this host with port 80 open" in line, line
    assert site.sh(f"sha256sum {SITE_FILE}") == before
    site.serving_as_before(None)


# --- the certificate -----------------------------------------------------------------------


def test_issue_gets_one_pebble_certificate_naming_every_domain(site):
    issued = site.fab("ssl.issue")
    assert issued.returncode == 0, issued.stdout + issued.stderr
    assert "changed       certificate" in issued.stdout and "ok            HTTPS serves it" in issued.stdout, issued.stdout
    for name in DOMAINS:
        seen = site.served(name)
        assert seen["names"] == sorted(DOMAINS), seen
        assert "Pebble Intermediate CA" in seen["issuer"], seen
        # The chain verifies up to Pebble's root, for this very name.
        assert site.https_get(name, "/")[0] in (200, 404, 502)
    assert site.sh("sed -n 's/^authenticator = //p; s/^installer = //p' /etc/letsencrypt/renewal/coachntt.conf").split() == \
        ["webroot"], "renewals never touch nginx's files"


def test_plain_http_redirects_to_https_except_acme_challenges(site):
    status, headers, _ = site.http_get(API, "/api/notes?page=2")
    assert status == 301
    assert headers["location"] == f"https://{API}/api/notes?page=2"
    assert "strict-transport-security" not in headers
    token = "coachntt-probe-" + os.urandom(6).hex()
    site.sh(f"mkdir -p /var/www/html/.well-known/acme-challenge && echo {token} > /var/www/html/.well-known/acme-challenge/{token}")
    try:
        for name in (API, METRICS, "any-other-name.cntt.test"):
            status, _, body = site.http_get(name, f"/.well-known/acme-challenge/{token}")
            assert (status, body.strip()) == (200, token.encode()), name
    finally:
        site.sh(f"rm -f /var/www/html/.well-known/acme-challenge/{token}")


def test_hsts_is_sent_over_https_only(site):
    status, headers, body = site.https_get(API, "/health")
    assert status == 200, body
    assert headers["strict-transport-security"] == HSTS
    assert headers["x-frame-options"] == "SAMEORIGIN"
    assert "strict-transport-security" not in site.http_get(API, "/health")[1]


def handshake(site, name: str, version: ssl.TLSVersion, ciphers: str = "") -> tuple[str, str]:
    """(protocol, cipher) nginx agreed to, or raises ssl.SSLError with nginx's alert."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is offered on purpose
        # Security level 0: this client really offers old protocols and ciphers; refusing them is nginx's job.
        context.set_ciphers(f"{ciphers or 'DEFAULT'}:@SECLEVEL=0")
        context.minimum_version = context.maximum_version = version
    with socket.create_connection((site.host.ip, 443), timeout=10) as raw, context.wrap_socket(raw, server_hostname=name) as tls:
        return tls.version(), tls.cipher()[0]


def test_tls_1_2_and_1_3_with_aead_ciphers_only(site):
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):  # nginx's alert: the client did offer 1.1
        handshake(site, API, ssl.TLSVersion.TLSv1_1)
    assert handshake(site, API, ssl.TLSVersion.TLSv1_2)[0] == "TLSv1.2"
    assert handshake(site, API, ssl.TLSVersion.TLSv1_3)[0] == "TLSv1.3"
    # CBC suites are in OpenSSL's defaults: only our cipher list refuses them.
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        handshake(site, API, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA")
    assert handshake(site, API, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256") == ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256")


def test_other_names_get_no_certificate_on_443(site):
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        handshake(site, "any-other-name.cntt.test", ssl.TLSVersion.TLSv1_3)


def read_frame(sock) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the websocket closed mid-frame"
            data += chunk
        return data

    first, second = exactly(2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(exactly(2), "big")
    elif length == 127:
        length = int.from_bytes(exactly(8), "big")
    assert not second & 0x80, "a server never masks its frames"
    return first & 0x0F, exactly(length)


def send_frame(sock, opcode: int, payload: bytes) -> None:
    mask = os.urandom(4)
    assert len(payload) < 126
    sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def test_the_apps_websocket_echoes_over_wss(site):
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((site.host.ip, 443), timeout=10) as raw, \
            site.tls_context().wrap_socket(raw, server_hostname=API) as sock:
        sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {API}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head.decode().split("\r\n")[1:])}
        assert headers.get("sec-websocket-accept") == accept, head
        opcode, hello = read_frame(sock)
        assert opcode == 1 and json.loads(hello)["type"] == "hello", hello
        message = "over TLS " + os.urandom(4).hex()
        send_frame(sock, 1, message.encode())
        assert read_frame(sock) == (1, message.encode())
        send_frame(sock, 8, b"\x03\xe8")  # close, 1000


# --- status, renewal, idempotence ------------------------------------------------------------


def test_status_shows_days_left_per_domain_and_fails_below_the_threshold(site):
    shown = site.fab("ssl.status")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    days = {}
    for name in DOMAINS:
        (line,) = [line for line in shown.stdout.splitlines() if line.split()[:1] == [name]]
        assert "Pebble Intermediate CA" in line, line
        days[name] = int(re.search(r"(\d+) days left", line)[1])
    assert len(set(days.values())) == 1 and days[API] > 365, days
    assert "renewal: scheduled (certbot.timer enabled and active" in shown.stdout, shown.stdout
    assert "deploy hook reloads nginx after nginx -t" in shown.stdout
    left = days[API]
    assert site.fab("ssl.status", env={"COACHNTT_SSL__MIN_DAYS_LEFT": str(left)}).returncode == 0
    below = site.fab("ssl.status", env={"COACHNTT_SSL__MIN_DAYS_LEFT": str(left + 1)})
    assert below.returncode == 1
    one_line(below, f"expires in {left} days (ssl.min_days_left is {left + 1})", "run `ssl.renew`")


def test_renew_dry_run_passes_and_the_hook_never_reloads_a_broken_config(site):
    rehearsed = site.fab("ssl.renew", "--dry-run")
    assert rehearsed.returncode == 0, rehearsed.stdout + rehearsed.stderr
    assert "ok            renewal (dry run)" in rehearsed.stdout, rehearsed.stdout
    assert site.sh("systemctl is-enabled certbot.timer; systemctl is-active certbot.timer").split() == ["enabled", "active"]

    fingerprint = site.served(API)["fingerprint"]
    site.sh("echo 'this is not nginx;' > /etc/nginx/conf.d/zz-broken.conf")
    try:
        code, out = console(site.host, "/etc/letsencrypt/renewal-hooks/deploy/coachntt-reload-nginx")
        assert code == 1, out
        assert "nginx -t failed, nginx NOT reloaded" in out, out
        assert site.sh("systemctl is-active nginx").strip() == "active"
        site.serving_as_before(fingerprint)
    finally:
        site.sh("rm -f /etc/nginx/conf.d/zz-broken.conf")


def test_nginx_and_issue_again_change_nothing(site):
    before = site.sh(f"sha256sum {SITE_FILE} {LIVE}/fullchain.pem")
    again = site.fab("nginx")
    assert again.returncode == 0 and " 0 changed" in again.stdout, again.stdout + again.stderr
    issued = site.fab("ssl.issue")
    assert issued.returncode == 0 and " 0 changed" in issued.stdout, issued.stdout + issued.stderr
    assert site.sh(f"sha256sum {SITE_FILE} {LIVE}/fullchain.pem") == before
    assert site.sh("ls /etc/letsencrypt").split().count("options-ssl-nginx.conf") == 0, "certbot's nginx plugin never ran"


def test_a_changed_domain_list_reissues_the_certificate(site):
    without_staging = {"COACHNTT_STAGING__ENABLED": "false"}
    reissued = site.fab("ssl.issue", env=without_staging)
    assert reissued.returncode == 0, reissued.stdout + reissued.stderr
    assert f"reissue for {API}, {METRICS} (drops {STAGING})" in reissued.stdout, reissued.stdout
    assert site.served(API)["names"] == sorted([API, METRICS])
    assert f"server_name {STAGING};" not in site.sh(f"cat {SITE_FILE}")
    assert " 0 changed" in site.fab("nginx", env=without_staging).stdout

    back = site.fab("ssl.issue")
    assert back.returncode == 0, back.stdout + back.stderr
    assert f"(adds {STAGING})" in back.stdout, back.stdout
    assert site.served(STAGING)["names"] == sorted(DOMAINS)


# --- failures once HTTPS serves: the same certificate keeps serving ---------------------------


def test_failures_after_issuing_leave_https_serving_the_same_certificate(site):
    fingerprint = site.served(API)["fingerprint"]
    before = site.sh(f"sha256sum {SITE_FILE} {LIVE}/fullchain.pem")

    unknown = site.fab("ssl.issue", env={"COACHNTT_DOMAINS__METRICS": UNMAPPED})
    assert unknown.returncode == 1
    one_line(unknown, f"the ACME server could not validate {UNMAPPED}", "the certificate and nginx are as before")
    site.serving_as_before(fingerprint)

    # Another ACME server means a new certificate, which cannot be had from here.
    unreachable = site.fab("ssl.issue", env={"COACHNTT_SSL__ACME_SERVER": "https://10.201.0.1:14999/dir"})
    assert unreachable.returncode == 1
    one_line(unreachable, "cannot reach the ACME server https://10.201.0.1:14999/dir")
    site.serving_as_before(fingerprint)

    assert site.sh(f"sha256sum {SITE_FILE} {LIVE}/fullchain.pem") == before
