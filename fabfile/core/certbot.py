"""certbot as data: the command lines ssl.* runs, and certbot's words read back.

Pure functions, tested as data; the commands run on the server (fabfile/ssl.py).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from dataclasses import dataclass

from .certificates import CERT_NAME, DEPLOY_HOOK, WEBROOT

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
# certbot's own renewal window: ssl.issue renews inside it like the timer would.
RENEW_BEFORE_DAYS = 30


def certonly_command(domains: Iterable[str], email: str, server: str, *, force: bool = False) -> str:
    """certbot obtains (or replaces) the lineage and never touches nginx's files. Pure."""
    args = ["certbot", "certonly", "--non-interactive", "--agree-tos", "--no-eff-email", "--email", email,
            "--server", server, "--cert-name", CERT_NAME, "--webroot", "--webroot-path", WEBROOT]
    for domain in domains:
        args += ["--domain", domain]
    # A changed list under the same --cert-name replaces the names without asking.
    args.append("--renew-with-new-domains")
    if force:
        args.append("--force-renewal")
    return " ".join(shlex.quote(arg) for arg in args)


def same_server(a: str, b: str) -> bool:
    return a.strip().rstrip("/") == b.strip().rstrip("/")


def acme_problem(probe) -> str:
    """'' when the ACME directory answered 200, else what went wrong (curl's words). Pure."""
    text = probe.stdout.strip()
    if probe.ok and text.endswith("200"):
        return ""
    said = [line.strip() for line in text.splitlines() if line.strip().startswith("curl:")]
    if said:
        return said[0]
    code = text[-3:] if text[-3:].isdigit() else "?"
    return f"it answered HTTP {code}, not an ACME directory" if code not in ("?", "000") else "no answer"


def renew_command(*, dry_run: bool, server: str = "") -> str:
    """certbot renew for our lineage, then our deploy hook on a dry run (certbot skips it there). Pure.

    --no-random-sleep-on-renew: without a terminal certbot would first sleep up to 8 minutes.
    A dry run goes to Let's Encrypt's staging directory unless --server names another:
    the lineage's own server is named, except Let's Encrypt's production one (its staging
    directory is the rehearsal certbot means). Running the hook ourselves (not
    --run-deploy-hooks, certbot >= 2.7 only) proves that `nginx -t` passes and nginx
    reloads, and runs no other package's hooks.
    """
    args = ["certbot", "renew", "--non-interactive", "--no-random-sleep-on-renew", "--cert-name", CERT_NAME]
    if dry_run:
        args.append("--dry-run")
        if server and not same_server(server, LETS_ENCRYPT):
            args += ["--server", server]
    command = " ".join(shlex.quote(arg) for arg in args)
    return f"{command}\n{DEPLOY_HOOK}" if dry_run else command


def renew_outcome(output: str, *, dry_run: bool) -> tuple[str, str]:
    """(status, reason) of a certbot renew that succeeded. Pure."""
    if "not yet due for renewal" in output or "No renewals were attempted" in output:
        return "ok", f"not due yet; certbot renews {RENEW_BEFORE_DAYS} days before expiry"
    if dry_run:
        return "ok", "a full renewal against the ACME server succeeded (nothing saved); deploy hook: nginx -t passed, reloaded"
    return "changed", "renewed; the deploy hook reloaded nginx"


# -- certbot's failures, in one line -------------------------------------------------

_NOISE = ("Saving debug log", "Ask for help", "See the logfile", "Some challenges have failed",
          "Hint:", "- - -", "If you like Certbot", "Donating to", "Requesting a certificate", "Renewing an existing")
_UNREACHABLE = ("Connection refused", "Failed to establish a new connection", "Max retries exceeded",
                "Name or service not known", "Temporary failure in name resolution", "timed out",
                "No route to host", "Network is unreachable", "CERTIFICATE_VERIFY_FAILED", "certificate verify failed")


_RATE_LIMITED = ("rateLimited", "too many certificates", "too many failed authorizations", "too many new orders")


@dataclass(frozen=True)
class CertbotFailure:
    kind: str  # "validation", "unreachable", "rate limit", "other"
    what: str


def certbot_failure(output: str) -> CertbotFailure:
    """Why certbot failed, from its output. Pure: tested on certbot's real words.

    certbot ends every failure with a pointer to its log; the reason is above it:
    a `Domain:/Type:/Detail:` block per name the CA could not validate, or an
    error line about the ACME server.
    """
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    problems = []
    for index, line in enumerate(lines):
        if line.startswith("Domain:"):
            domain = line.split(":", 1)[1].strip()
            detail = next((later.split(":", 1)[1].strip() for later in lines[index + 1:index + 3]
                           if later.startswith("Detail:")), "")
            problems.append(f"{domain} ({shorten(detail)})" if detail else domain)
    if problems:
        return CertbotFailure("validation", "the ACME server could not validate " + "; ".join(problems))
    if any(marker in output for marker in _RATE_LIMITED):
        line = next(line for line in lines if any(marker in line for marker in _RATE_LIMITED))
        return CertbotFailure("rate limit", shorten(line))
    meaningful = [line for line in lines if not line.startswith(_NOISE)]
    if any(marker in output for marker in _UNREACHABLE):
        line = next((line for line in meaningful if any(marker in line for marker in _UNREACHABLE)), "")
        return CertbotFailure("unreachable", shorten(line))
    reason = next((line for line in meaningful if not line.endswith(":")), "") or (lines[-1] if lines else "no output")
    return CertbotFailure("other", shorten(reason))


def shorten(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
