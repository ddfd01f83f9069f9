"""nginx: the reverse proxy in front of the API, Grafana and staging.

Runbook (`fab -H coachntt@HOST nginx`):
    0. ports 80/443    held by nginx or by nobody; another program there (`ss -ltnp`) is
                       named and nothing is changed (exit 1): nginx could not bind them
    1. default site    removed, so only our servers answer
    2. site config     conf.d/coachntt.conf from configs/nginx/coachntt.conf.j2:
                       api / metrics / staging servers, /ws upgrade, rate limit,
                       security headers; `nginx -t` before reload, the previous
                       file restored if the test fails
    3. nginx running
`nginx.status` shows whether nginx runs, its config test, who holds :80/:443, and what each
domain answers; it fails when something other than nginx answers there.
"""

from __future__ import annotations

import re
import shlex

from invoke import Collection

from .core import remote, templates
from .core.batch import gather
from .core.errors import OpsError
from .core.steps import Change, Facts, Plan, Step
from .core.task import ops_task

SITE_FILE = "/etc/nginx/conf.d/coachntt.conf"
DEFAULT_SITE = "/etc/nginx/sites-enabled/default"
SITE_NAMES = ("api", "metrics", "staging")
# Braced: `a && nginx -t && reload || restart` would restart on a failed test.
TEST_AND_RELOAD = "{ systemctl reload nginx || systemctl restart nginx; }"
WEB_PORTS = ("80", "443")
LISTENERS = "ss -ltnpH '( sport = :80 or sport = :443 )'"
_USER = re.compile(r'\("([^"]+)",pid=(\d+)')


def site_settings(settings) -> list[dict]:
    """The sites from settings (their values were validated with the settings)."""
    return [
        {"name": name, "domain": settings.require(f"domains.{name}"), "upstream": settings.require(f"upstreams.{name}")}
        for name in SITE_NAMES
    ]


def site_step(settings) -> Step:
    sites = site_settings(settings)
    rate, burst = str(settings.require("rate_limit.rate")), int(settings.require("rate_limit.burst"))

    def plan(facts: Facts) -> Plan:
        # A site gets TLS once its certificate exists (ssl.issue puts it there).
        with_tls = set(facts["certificates"].lines)
        rendered = templates.render(
            "nginx/coachntt.conf.j2",
            sites=[{**site, "tls": site["domain"] in with_tls} for site in sites],
            rate=rate,
            burst=burst,
        )
        return remote.file_step("site config", SITE_FILE, rendered, validate="nginx -t -q", then=TEST_AND_RELOAD).plan(facts)

    return Step(
        "site config",
        probes={**remote.file_probes(SITE_FILE), "certificates": "ls /etc/letsencrypt/live"},
        plan=plan,
    )


def default_site_step() -> Step:
    def plan(facts: Facts) -> Plan:
        if not facts["default"].ok:
            return Plan.ok("default site not enabled")
        return Plan.change(Change(f"remove {DEFAULT_SITE}", f"rm -f {DEFAULT_SITE} && nginx -t -q && {TEST_AND_RELOAD}"))

    return Step("default site removed", probes={"default": f"test -e {DEFAULT_SITE}"}, plan=plan)


def listeners(ss_lines: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Port -> [(program, pid)] from `ss -ltnpH` lines. Pure.

    A listener ss cannot name (no process info) counts as ("unknown", "?").
    """
    found: dict[str, list[tuple[str, str]]] = {}
    for line in ss_lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        port = fields[3].rsplit(":", 1)[-1]
        holders = _USER.findall(line) or [("unknown", "?")]
        for holder in holders:
            if holder not in found.setdefault(port, []):
                found[port].append(holder)
    return found


def foreign_holder(ss_lines: list[str]) -> tuple[str, str, str] | None:
    """(port, program, pid) of the first web-port listener that is not nginx, else None. Pure."""
    held = listeners(ss_lines)
    for port in WEB_PORTS:
        for program, pid in held.get(port, []):
            if program != "nginx":
                return port, program, pid
    return None


def web_ports_step() -> Step:
    """Preflight: nginx can only bind 80/443 if nobody else holds them; refuse before any change."""

    def plan(facts: Facts) -> Plan:
        other = foreign_holder(facts["listeners"].lines)
        if other:
            port, program, pid = other
            raise OpsError(f"port {port} is held by {program} (pid {pid})", "stop it or move it, then rerun")
        return Plan.ok("80/443 free or held by nginx")

    return Step("ports 80/443 for nginx", probes={"listeners": LISTENERS}, plan=plan)


@ops_task(default=True)
def install(ops):
    """Render and install the sites, test, reload (old config restored on failure)."""
    # The distribution's default site goes first: it claims default_server on :80 too.
    # Every step's facts are read and planned before any applies: a foreign listener stops it all.
    steps = [web_ports_step(), default_site_step(), site_step(ops.settings), remote.service_step("nginx running", "nginx")]
    ops.run_steps(steps)


@ops_task
def status(ops):
    """Is nginx running, does its config test pass, what does each domain answer."""
    sites = site_settings(ops.settings)
    probes = {"active": "systemctl is-active nginx", "config_test": "nginx -t 2>&1", "listeners": LISTENERS}
    for site in sites:
        probes[site["name"]] = (
            f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 -H {shlex.quote('Host: ' + site['domain'])} http://127.0.0.1/"
        )
    facts = gather(ops.target, probes)
    # The answers below come from whoever holds port 80: only nginx's are ours.
    other = foreign_holder(facts["listeners"].lines)
    held = listeners(facts["listeners"].lines)
    ops.reporter.info(f"  nginx         {facts['active'].stdout or 'not installed'}")
    ops.reporter.info(f"  config test   {'ok' if facts['config_test'].ok else 'FAILED: ' + facts['config_test'].stdout}")
    for port in WEB_PORTS:
        holders = ", ".join(f"{program} (pid {pid})" for program, pid in held.get(port, [])) or "nobody"
        ops.reporter.info(f"  port {port:<8} {holders}")
    for site in sites:
        source = f"from {other[1]}, NOT nginx" if other else f"-> {site['upstream']}"
        ops.reporter.info(f"  {site['domain']:<28} HTTP {facts[site['name']].stdout or '---'} ({source})")
    if other:
        port, program, pid = other
        raise OpsError(f"port {port} on {ops.where} is answered by {program} (pid {pid}), not nginx",
                       "stop it or move it, then run `nginx`")
    if not (facts["active"].ok and facts["config_test"].ok):
        raise OpsError(f"nginx is not healthy on {ops.where}", "run `nginx` to install and reload it")


ns = Collection("nginx")
ns.add_task(install, default=True)
ns.add_task(status)
