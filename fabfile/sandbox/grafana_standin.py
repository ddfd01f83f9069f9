"""SANDBOX ONLY: a stand-in for Grafana, because Grafana's image cannot be had here.

No registry is reachable from this machine and Debian ships no Grafana, so the sandbox's
compose override runs this instead of grafana/grafana. It proves what monitor.stack owns
around Grafana, not Grafana itself:

  - it reads Grafana's own settings (GF_SERVER_HTTP_ADDR, GF_SERVER_HTTP_PORT,
    GF_SECURITY_ADMIN_USER, GF_SECURITY_ADMIN_PASSWORD__FILE), so it listens where
    Grafana would and checks the very password file the task generated;
  - like Grafana, /api/health answers without a login, /api/* answers 401 without the
    admin's basic-auth credentials, and other pages redirect to /login;
  - /api/search lists the dashboards found where the provisioning file points, so the
    provisioned files are proven to be mounted.

It runs in the `coachntt-sandbox/grafana-standin` image (fabfile/sandbox/monitoring_images.py);
production pins the real Grafana image.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PROVISIONING = Path(os.environ.get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning"))


def admin_password() -> str:
    """Grafana reads <KEY>__FILE and trims it; read on each request, like a fresh start would."""
    return Path(os.environ["GF_SECURITY_ADMIN_PASSWORD__FILE"]).read_text().strip()


def authorized(header: str | None) -> bool:
    if not header or not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    wanted_user = os.environ.get("GF_SECURITY_ADMIN_USER", "admin")
    return hmac.compare_digest(user.encode(), wanted_user.encode()) and hmac.compare_digest(
        password.encode(), admin_password().encode())


def provisioned_dashboards() -> list[dict]:
    """Title and uid of every dashboard JSON under the paths the dashboard providers name."""
    found = []
    for provider in sorted((PROVISIONING / "dashboards").glob("*.y*ml")):
        for folder in re.findall(r"^\s*path:\s*(\S+)\s*$", provider.read_text(), re.M):
            for path in sorted(Path(folder).glob("*.json")):
                dashboard = json.loads(path.read_text())
                found.append({"uid": dashboard.get("uid"), "title": dashboard.get("title"), "type": "dash-db"})
    return found


class Handler(BaseHTTPRequestHandler):
    server_version = "grafana-standin"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/api/health":
            return self.reply(200, {"database": "ok", "version": "sandbox stand-in, not Grafana"})
        if self.path.startswith("/login"):
            return self.reply(200, "<html><body>Grafana stand-in (sandbox only): log in</body></html>")
        if not authorized(self.headers.get("Authorization")):
            if self.path.startswith("/api/"):
                return self.reply(401, {"message": "Unauthorized"})
            self.send_response(302)
            self.send_header("Location", "/login")
            self.end_headers()
            return None
        if self.path.startswith("/api/search"):
            return self.reply(200, provisioned_dashboards())
        return self.reply(200, "<html><body>Grafana stand-in (sandbox only): signed in as admin</body></html>")

    def reply(self, status: int, body) -> None:
        data = (json.dumps(body) if not isinstance(body, str) else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not isinstance(body, str) else "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        sys.stdout.write(f"{self.address_string()} {format % args}\n")
        sys.stdout.flush()


def serve(address: str, port: int) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((address, port), Handler)


def main() -> None:
    admin_password()  # fail at start, like Grafana, when the password file is missing
    server = serve(os.environ.get("GF_SERVER_HTTP_ADDR") or "0.0.0.0", int(os.environ.get("GF_SERVER_HTTP_PORT") or 3000))
    print(f"grafana stand-in (sandbox only) on {server.server_address[0]}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
