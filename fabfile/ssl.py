"""ssl: one ACME certificate for every name nginx serves, renewed on its own.

Runbook (`fab -H coachntt@HOST ssl.issue`, after `deps` and `nginx`):
    0. preflight      ssl.email set (checked before connecting); ports 80/443 held by nginx
                      or nobody (the `nginx` task's own check); our site installed and
                      nginx running: it answers the http-01 challenges
    1. certificate    `certbot certonly --webroot` (http-01), one lineage `coachntt` for
                      domains.api, domains.metrics and, with staging.enabled,
                      domains.staging, from ssl.acme_server (Let's Encrypt by default).
                      Kept while it names exactly those domains, comes from that server
                      and has more than 30 days left; otherwise (re)issued, `--cert-name`
                      with the new list replacing the names. The ACME server must answer
                      before certbot runs. A failure changes nothing: one line naming the
                      domain and what the CA said
    2. deploy hook    renewal-hooks/deploy/coachntt-reload-nginx: after each renewal,
                      `nginx -t`, and only then a reload
    3. renewal timer  certbot.timer (the certbot package's, twice a day) enabled, running
    4. site config    the `nginx` task's own step, its facts read again now that the
                      certificate exists: TLS servers, HTTP -> HTTPS redirects (ACME
                      challenges excepted), HSTS on TLS only. A later `nginx` run renders
                      the same file and changes nothing
    5. verify         each domain on 127.0.0.1:443 serves the certificate file (same sha256
                      fingerprint) and plain HTTP answers 301 to https
`ssl.status`          per domain: issuer, expiry, days left, and whether renewal is
                      scheduled, in one round trip; exit 1 below ssl.min_days_left
`ssl.renew [--dry-run]`  certbot renew for the lineage (--dry-run: a full renewal against the
                      ACME server, nothing saved), then the deploy hook

Why `certonly --webroot` and not certbot's nginx plugin: measured on a sandbox host
(certbot 4.0, nginx 1.26, Pebble), `certonly --nginx` rewrote conf.d/coachntt.conf for
about a second of its run (a challenge location inside our server blocks) and reloaded
nginx before putting the file back; it wrote options-ssl-nginx.conf and ssl-dhparams.pem
we do not use, and saved `authenticator = nginx, installer = nginx` for renewals, so
every renewal edits our file again and one cut off midway leaves it for `nginx` to fight
(7.8 s). `certonly --webroot` touched no nginx file and reloaded nothing (3.7 s): the
template already answers /.well-known/acme-challenge/ from /var/www/html on :80 for every
name, redirect servers included. So the template is the one owner of the config; it
renders a site's TLS server once the certificate names it, whichever task renders it.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from invoke import Collection

from . import nginx
from .core import remote, templates
from .core.batch import gather
from .core.certbot import (
    RENEW_BEFORE_DAYS,
    acme_problem,
    certbot_failure,
    certonly_command,
    renew_command,
    renew_outcome,
    same_server,
)
from .core.certificates import (
    CERT_NAME,
    CERTIFICATE_PROBE,
    DEPLOY_HOOK,
    FULLCHAIN,
    RENEWAL_TIMER,
    SERVER_PROBE,
    WEBROOT,
    Certificate,
    parse_certificate,
    parse_epoch,
    parse_fingerprint,
    served_fingerprint_probe,
)
from .core.errors import OpsError, UsageError
from .core.fleet import READS
from .core.steps import Change, Facts, Plan, Step
from .core.task import ops_task

CERTBOT_TIMEOUT = 600
NOW_PROBE = "date +%s"


@dataclass(frozen=True)
class Wanted:
    """What the certificate should be, from settings."""

    domains: tuple[str, ...]
    email: str
    server: str


def wanted_from(settings) -> Wanted:
    """The domains nginx serves, the account e-mail, the ACME directory; refused before any connection."""
    email = settings.require("ssl.email")
    return Wanted(wanted_domains(settings), email, settings.require("ssl.acme_server"))


def wanted_domains(settings) -> tuple[str, ...]:
    """The names nginx serves (staging only when enabled), each once."""
    return tuple(dict.fromkeys(site["domain"].lower() for site in nginx.site_settings(settings)))


# -- issue ------------------------------------------------------------------------------


def certificate_step(wanted: Wanted, where: str) -> Step:
    def plan(facts: Facts) -> Plan:
        current = parse_certificate(facts["certificate"])
        now = parse_epoch(facts["now"]) or datetime.now(UTC)
        issued_by = facts["server"].stdout.strip() if facts["server"].ok else ""
        names = ", ".join(wanted.domains)
        force = False
        if current is None:
            summary = f"obtain a certificate for {names} from {wanted.server}"
        elif set(current.names) != set(wanted.domains):
            added = [d for d in wanted.domains if d not in current.names]
            dropped = [d for d in current.names if d not in wanted.domains]
            change = "; ".join(part for part in (added and f"adds {', '.join(added)}", dropped and f"drops {', '.join(dropped)}") if part)
            summary = f"reissue for {names} ({change})"
        elif not same_server(issued_by, wanted.server):
            summary, force = f"reissue from {wanted.server} (this one came from {issued_by or 'an unknown server'})", True
        elif current.days_left(now) < RENEW_BEFORE_DAYS:
            summary, force = f"renew: {current.days_left(now)} days left", True
        else:
            return Plan.ok(f"{CERT_NAME} names {names}; {current.issuer}, {current.days_left(now)} days left")
        problem = acme_problem(facts["acme"])
        if problem:
            raise OpsError(f"cannot reach the ACME server {wanted.server} from {where}: {problem}",
                           "check ssl.acme_server and that the host reaches it over HTTPS; nothing was changed")
        command = "\n".join([
            f"mkdir -p {WEBROOT}",
            certonly_command(wanted.domains, wanted.email, wanted.server, force=force),
            # nginx may already serve this lineage: a reload picks up the new files.
            f"if nginx -t -q 2>/dev/null; then {remote.RELOAD_NGINX}; fi",
        ])
        return Plan.change(Change(summary, command))

    return Step(
        "certificate",
        probes={
            "certificate": CERTIFICATE_PROBE,
            "server": SERVER_PROBE,
            "now": NOW_PROBE,
            "acme": f"curl -sS --max-time 10 -o /dev/null -w '%{{http_code}}' {shlex.quote(wanted.server)} 2>&1",
        },
        plan=plan,
    )


def nginx_serving_step() -> Step:
    """Preflight: certbot --webroot needs our site (it answers the challenges) and nginx running."""

    def plan(facts: Facts) -> Plan:
        if not facts["site"].ok:
            raise UsageError(f"{nginx.SITE_FILE} is missing: nginx does not answer ACME challenges yet",
                             "run `nginx` first, then `ssl.issue`")
        if facts["active"].stdout.strip() != "active":
            raise UsageError(f"nginx is {facts['active'].stdout.strip() or 'not running'}: nobody answers ACME challenges",
                             "run `nginx` (and `nginx.status`), then `ssl.issue`")
        return Plan.ok("our site is installed and nginx runs")

    return Step("nginx answers challenges", probes={"site": f"test -f {nginx.SITE_FILE}", "active": "systemctl is-active nginx"},
                plan=plan)


def deploy_hook_step() -> Step:
    return remote.file_step("renewal deploy hook", DEPLOY_HOOK, templates.render("letsencrypt/coachntt-reload-nginx"), mode="0755")


def issue_error(output: str, wanted: Wanted, where: str) -> OpsError:
    """certbot's failure as one line with what to do. Pure."""
    failure = certbot_failure(output)
    unchanged = "the certificate and nginx are as before"
    if failure.kind == "validation":
        return OpsError(failure.what, "point each name's DNS (A/AAAA) at this host with port 80 open, or fix domains.* / "
                                      f"staging.enabled; {unchanged}")
    if failure.kind == "unreachable":
        return OpsError(f"cannot reach the ACME server {wanted.server} from {where}: {failure.what}",
                        f"check ssl.acme_server and the host's outbound HTTPS; {unchanged}")
    if failure.kind == "rate limit":
        return OpsError(f"the ACME server refused a new certificate: {failure.what}",
                        f"wait for the rate limit to reset, or rehearse against a staging directory (ssl.acme_server); {unchanged}")
    return OpsError(f"certbot failed on {where}: {failure.what}",
                    f"see /var/log/letsencrypt/letsencrypt.log on the host; {unchanged}")


def run_certbot(ops, step: Step, plan: Plan, to_error) -> None:
    """Apply a certbot plan, reporting certbot's failure in its own words instead of its log pointer."""
    if ops.dry or not plan.changes:
        ops.apply([(step, plan)])
        return
    started = time.monotonic()
    result = ops.target.run(plan.script, sudo=True, check=False, timeout=CERTBOT_TIMEOUT)
    if not result.ok:
        error = to_error(result.stdout + "\n" + result.stderr)
        ops.reporter.step(step.name, "failed", time.monotonic() - started, reason=error.one_line(), changes=plan.changes)
        raise error
    ops.reporter.step(step.name, "changed", time.monotonic() - started, reason=plan.reason, changes=plan.changes)


def verify_step(domains: tuple[str, ...], where: str) -> Step:
    """Read-only: HTTPS serves the certificate file for every domain and HTTP redirects to it."""
    probes = {"certificate": CERTIFICATE_PROBE}
    for domain in domains:
        probes[f"tls:{domain}"] = served_fingerprint_probe(domain)
        probes[f"http:{domain}"] = (f"curl -s -o /dev/null --max-time 5 -w '%{{http_code}} %{{redirect_url}}' "
                                    f"-H {shlex.quote('Host: ' + domain)} http://127.0.0.1/")

    def plan(facts: Facts) -> Plan:
        certificate = parse_certificate(facts["certificate"])
        if certificate is None:
            raise OpsError(f"{FULLCHAIN} is missing or unreadable on {where}", "rerun `ssl.issue`")
        stale = [d for d in domains if parse_fingerprint(facts[f"tls:{d}"]) != certificate.fingerprint]
        if stale:
            raise OpsError(f"HTTPS on {where} does not serve {FULLCHAIN} for {', '.join(stale)}",
                           "check `nginx -t` on the host and run `nginx`; the certificate itself is in place")
        unredirected = [d for d in domains if facts[f"http:{d}"].stdout.strip() != f"301 https://{d}/"]
        if unredirected:
            raise OpsError(f"plain HTTP on {where} does not redirect to HTTPS for {', '.join(unredirected)}",
                           "run `nginx` to render the TLS servers")
        return Plan.ok(f"{len(domains)} domain(s) on :443 serve {certificate.fingerprint[:11]}..., :80 redirects")

    return Step("HTTPS serves it", probes=probes, plan=plan)


@ops_task
def issue(ops):
    """Obtain (or reissue) the certificate for every domain nginx serves; TLS, redirects, HSTS, auto-renewal."""
    wanted = wanted_from(ops.settings)
    site = nginx.site_step(ops.settings)
    planned = ops.plan([nginx.web_ports_step(), nginx_serving_step(), certificate_step(wanted, ops.where),
                        deploy_hook_step(), remote.service_step("renewal timer", RENEWAL_TIMER)])
    preflight, (certificate, certificate_plan), rest = planned[:2], planned[2], planned[3:]
    ops.apply(preflight)
    run_certbot(ops, certificate, certificate_plan, lambda output: issue_error(output, wanted, ops.where))
    ops.apply(rest)
    # Read again: the site's TLS servers depend on the certificate that now exists.
    ops.run_steps([site])
    if ops.dry:
        if certificate_plan.changes:
            ops.reporter.info("  (the site config gets its TLS servers once the certificate exists)")
        return
    ops.run_steps([verify_step(wanted.domains, ops.where)])


# -- status -----------------------------------------------------------------------------


STATUS_PROBES = {
    "certificate": CERTIFICATE_PROBE,
    "server": SERVER_PROBE,
    "now": NOW_PROBE,
    "timer_enabled": f"systemctl is-enabled {RENEWAL_TIMER}",
    "timer_active": f"systemctl is-active {RENEWAL_TIMER}",
    "timer_next": f"systemctl show -p NextElapseUSecRealtime --value {RENEWAL_TIMER}",
    "hook": f"test -x {DEPLOY_HOOK}",
}


@dataclass(frozen=True)
class Report:
    lines: list[str]
    problems: list[tuple[str, str]]  # (what, what to do)


def status_report(domains: tuple[str, ...], minimum: int, facts: Facts) -> Report:
    """Per domain: issuer, expiry, days left; the renewal schedule; what is wrong. Pure."""
    certificate: Certificate | None = parse_certificate(facts["certificate"])
    now = parse_epoch(facts["now"]) or datetime.now(UTC)
    lines, problems = [], []
    uncovered = [d for d in domains if certificate is None or not certificate.covers(d)]
    for domain in domains:
        if domain in uncovered:
            lines.append(f"  {domain:<28} no certificate")
        else:
            lines.append(f"  {domain:<28} {certificate.issuer:<30} expires {certificate.not_after:%Y-%m-%d}  "
                         f"{certificate.days_left(now)} days left")
    if uncovered:
        problems.append((f"no certificate names {', '.join(uncovered)}", "run `ssl.issue`"))
    covered = [d for d in domains if d not in uncovered]
    if covered and certificate.days_left(now) < minimum:
        problems.append((f"the certificate for {', '.join(covered)} expires in {certificate.days_left(now)} days "
                         f"(ssl.min_days_left is {minimum})",
                         "run `ssl.renew`, and see `journalctl -u certbot` on the host for why the timer did not"))
    enabled, active = facts["timer_enabled"].stdout.strip(), facts["timer_active"].stdout.strip()
    scheduled = enabled == "enabled" and active == "active"
    next_run = facts["timer_next"].stdout.strip()
    hook = "deploy hook reloads nginx after nginx -t" if facts["hook"].ok else "NO deploy hook (nginx would keep the old certificate)"
    if scheduled:
        lines.append(f"  renewal: scheduled ({RENEWAL_TIMER} enabled and active{', next ' + next_run if next_run else ''}); {hook}")
    else:
        lines.append(f"  renewal: NOT scheduled ({RENEWAL_TIMER} {enabled or 'missing'}, {active or 'inactive'}); {hook}")
        problems.append((f"renewal is not scheduled ({RENEWAL_TIMER} {enabled or 'missing'}, {active or 'inactive'})",
                         "run `ssl.issue` to enable it"))
    if not facts["hook"].ok:
        problems.append((f"the deploy hook {DEPLOY_HOOK} is missing", "run `ssl.issue` to install it"))
    if certificate is not None and facts["server"].ok:
        lines.append(f"  issued by {facts['server'].stdout.strip()} (certificate {CERT_NAME}, {FULLCHAIN})")
    return Report(lines, problems)


@ops_task(fleet=READS)
def status(ops):
    """Issuer, expiry and days left per domain, and whether renewal is scheduled; exit 1 below ssl.min_days_left."""
    domains = wanted_domains(ops.settings)
    minimum = int(ops.settings.require("ssl.min_days_left"))
    report = status_report(domains, minimum, gather(ops.target, STATUS_PROBES))
    for line in report.lines:
        ops.reporter.info(line)
    if report.problems:
        what = "; ".join(problem for problem, _ in report.problems)
        raise OpsError(f"{what} on {ops.where}", report.problems[0][1])


# -- renew ------------------------------------------------------------------------------


@ops_task(help={"dry_run": "renew against the ACME server without saving anything (then run the deploy hook)"})
def renew(ops, dry_run=False):
    """Renew the certificate if it is due (certbot renew); --dry-run rehearses the whole renewal."""
    wanted_domains(ops.settings)
    if ops.dry:
        ops.reporter.info(f"  would run: {renew_command(dry_run=dry_run).replace(chr(10), ' && ')}")
        return
    facts = gather(ops.target, {"certificate": CERTIFICATE_PROBE, "server": SERVER_PROBE, "hook": f"test -x {DEPLOY_HOOK}"})
    if parse_certificate(facts["certificate"]) is None:
        raise UsageError(f"no certificate {CERT_NAME} on {ops.where}", "run `ssl.issue` first")
    if dry_run and not facts["hook"].ok:
        raise UsageError(f"the deploy hook {DEPLOY_HOOK} is missing on {ops.where}", "run `ssl.issue` to install it")
    name = "renewal (dry run)" if dry_run else "renewal"
    reporter = ops.reporter  # its clock starts now, for the summary line
    started = time.monotonic()
    command = renew_command(dry_run=dry_run, server=facts["server"].stdout.strip() if facts["server"].ok else "")
    result = ops.target.run("set -e\n" + command, sudo=True, check=False, timeout=CERTBOT_TIMEOUT)
    output = result.stdout + "\n" + result.stderr
    if not result.ok:
        error = renew_error(output, ops.where)
        reporter.step(name, "failed", time.monotonic() - started, reason=error.one_line())
        raise error
    outcome, reason = renew_outcome(output, dry_run=dry_run)
    reporter.step(name, outcome, time.monotonic() - started, reason=reason)
    if outcome == "changed":
        ops.run_steps([verify_step(wanted_domains(ops.settings), ops.where)])


def renew_error(output: str, where: str) -> OpsError:
    if "coachntt-reload-nginx" in output and "nginx -t failed" in output:
        line = next(line for line in output.splitlines() if "nginx -t failed" in line)
        return OpsError(line.strip(), "fix nginx's configuration (`nginx -t` on the host); nginx still serves the previous certificate")
    failure = certbot_failure(output)
    if failure.kind == "validation":
        return OpsError(f"renewal failed: {failure.what}",
                        "point each name's DNS at this host with port 80 open; the current certificate stays in use")
    if failure.kind == "unreachable":
        return OpsError(f"renewal failed: cannot reach the ACME server from {where}: {failure.what}",
                        "check the host's outbound HTTPS; the current certificate stays in use")
    return OpsError(f"renewal failed on {where}: {failure.what}",
                    "see /var/log/letsencrypt/letsencrypt.log on the host; the current certificate stays in use")


ns = Collection("ssl")
ns.add_task(issue)
ns.add_task(status)
ns.add_task(renew)
