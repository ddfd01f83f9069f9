"""The one certificate coachntt-ops keeps, read as data.

A single certbot lineage, `coachntt`, covers every name nginx serves (one ACME order,
one renewal, one expiry to watch). `nginx` renders a site's TLS server only when this
certificate names it; `ssl.issue` obtains it; `ssl.status` reads it. Everything here
is pure except the probe texts, which run on the server in a facts round trip.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime

from .batch import ProbeResult

CERT_NAME = "coachntt"
LIVE_DIR = f"/etc/letsencrypt/live/{CERT_NAME}"
FULLCHAIN = f"{LIVE_DIR}/fullchain.pem"
PRIVKEY = f"{LIVE_DIR}/privkey.pem"
RENEWAL_CONF = f"/etc/letsencrypt/renewal/{CERT_NAME}.conf"
# nginx serves /.well-known/acme-challenge/ from here on :80 for every name (configs/nginx).
WEBROOT = "/var/www/html"
DEPLOY_HOOK = "/etc/letsencrypt/renewal-hooks/deploy/coachntt-reload-nginx"
RENEWAL_TIMER = "certbot.timer"

# The leaf of fullchain.pem, only when its key is there too (nginx needs both).
CERTIFICATE_PROBE = (f"test -r {PRIVKEY} && "
                     f"openssl x509 -in {FULLCHAIN} -noout -issuer -enddate -fingerprint -sha256 -ext subjectAltName")
# The ACME directory the lineage was issued from, as certbot saved it for renewals.
SERVER_PROBE = f"sed -n 's/^server *= *//p' {RENEWAL_CONF}"

_MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}
_NOT_AFTER = re.compile(r"([A-Z][a-z]{2})\s+(\d{1,2})\s+(\d{2}):(\d{2}):(\d{2})\s+(\d{4})\s+GMT")


@dataclass(frozen=True)
class Certificate:
    names: tuple[str, ...]
    issuer: str
    not_after: datetime
    fingerprint: str  # sha256, upper-case hex with colons, as openssl prints it

    def days_left(self, now: datetime) -> int:
        """Whole days until expiry (negative once expired)."""
        return (self.not_after - now).days

    def covers(self, domain: str) -> bool:
        return domain.lower() in self.names


def parse_certificate(probe: ProbeResult) -> Certificate | None:
    """CERTIFICATE_PROBE's output -> Certificate; None when there is none (or it is unreadable)."""
    if not probe.ok:
        return None
    issuer = fingerprint = ""
    not_after = None
    names: list[str] = []
    lines = probe.lines
    for index, line in enumerate(lines):
        key, _, value = line.partition("=")
        if key == "issuer":
            issuer = common_name(value)
        elif key == "notAfter":
            not_after = parse_not_after(value)
        elif key.lower() == "sha256 fingerprint":
            fingerprint = value.strip().upper()
        elif line.strip().startswith("X509v3 Subject Alternative Name"):
            following = lines[index + 1] if index + 1 < len(lines) else ""
            names = [part.strip()[4:].lower() for part in following.split(",") if part.strip().startswith("DNS:")]
    if not_after is None or not fingerprint:
        return None
    return Certificate(tuple(names), issuer, not_after, fingerprint)


def common_name(distinguished: str) -> str:
    """'C=US, O=Let's Encrypt, CN=E5' (or openssl's spaced form) -> 'E5'; the whole name without a CN."""
    found = re.search(r"CN\s*=\s*([^,/]+)", distinguished)
    return (found[1] if found else distinguished).strip()


def parse_not_after(text: str) -> datetime | None:
    """openssl's 'Dec  1 23:06:22 2031 GMT' -> an aware UTC datetime (no locale involved)."""
    found = _NOT_AFTER.search(text)
    if not found or found[1] not in _MONTHS:
        return None
    month, day, hour, minute, second, year = _MONTHS[found[1]], *(int(part) for part in found.groups()[1:])
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def parse_epoch(probe: ProbeResult) -> datetime | None:
    """`date +%s` on the server -> now, by the server's clock (expiry is the server's business)."""
    text = probe.stdout.strip()
    return datetime.fromtimestamp(int(text), UTC) if probe.ok and text.isdigit() else None


def served_fingerprint_probe(domain: str) -> str:
    """The sha256 fingerprint nginx presents on 127.0.0.1:443 for `domain` (SNI)."""
    return (f"echo | timeout 10 openssl s_client -connect 127.0.0.1:443 -servername {shlex.quote(domain)} 2>/dev/null"
            " | openssl x509 -noout -fingerprint -sha256")


def parse_fingerprint(probe: ProbeResult) -> str:
    _, _, value = probe.stdout.strip().partition("=")
    return value.strip().upper() if probe.ok else ""
