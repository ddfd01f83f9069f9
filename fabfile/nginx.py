"""nginx: the reverse proxy in front of the API, Grafana and staging.

Runbook (`fab -H coachntt@HOST nginx`):
    0. ports 80/443    held by nginx or by nobody; another program there (`ss -ltnp`) is
                       named and nothing is changed (exit 1): nginx could not bind them
    1. default site    removed, so only our servers answer
    2. api upstream    /etc/nginx/coachntt/api-upstream.conf, the include naming the
                       api slot nginx sends requests to: written once (slot a) when
                       missing, never overwritten (deploy and rollback own it, see
                       core/slots.py); the maintenance page beside it
    3. old workers     worker_shutdown_timeout (main context, modules-enabled/): a
                       bound on old workers after a reload, longer than a cutover's drain
    4. site config     conf.d/coachntt.conf from configs/nginx/coachntt.conf.j2:
                       api / metrics / staging (when staging.enabled) servers, /ws
                       upgrade, rate limit, security headers, the api's 503 page
                       while a breaking migration runs; a site the `coachntt`
                       certificate names (ssl.issue) is served over TLS with HSTS and
                       its HTTP redirects; `nginx -t` before reload, the previous
                       file restored if the test fails
    5. nginx running
`nginx.status` shows whether nginx runs, its config test, who holds :80/:443, and what each
domain answers; it fails when something other than nginx answers there.
"""

from __future__ import annotations

import re
import shlex

from invoke import Collection

from .core import balancer, certificates, layout, remote, slots, templates
from .core.batch import ProbeResult, gather
from .core.errors import OpsError
from .core.fleet import CHANGES
from .core.steps import Change, Facts, Plan, Step
from .core.task import ops_task

SITE_FILE = slots.SITE_FILE
# Main context: nginx.conf includes this directory at its top level (Debian, Ubuntu).
SHUTDOWN_FILE = "/etc/nginx/modules-enabled/90-coachntt-shutdown.conf"
DEFAULT_SITE = "/etc/nginx/sites-enabled/default"
SITE_NAMES = ("api", "metrics", "staging")
WEB_PORTS = ("80", "443")
LISTENERS = "ss -ltnpH '( sport = :80 or sport = :443 )'"
_USER = re.compile(r'\("([^"]+)",pid=(\d+)')
# nginx 1.25.1 moved HTTP/2 from `listen ... http2` (deprecated since) to `http2 on;`;
# Ubuntu 24.04 ships 1.24, Debian 13 1.26.
HTTP2_DIRECTIVE_SINCE = (1, 25, 1)
_NGINX_VERSION = re.compile(r"nginx/(\d+)\.(\d+)\.(\d+)")


def site_settings(settings) -> list[dict]:
    """The sites from settings (their values were validated with the settings); staging only when enabled.
    The api goes to the upstream the slot include defines (core/slots.py), not to one address."""
    names = [name for name in SITE_NAMES if name != "staging" or settings.get("staging.enabled", True)]
    return [
        {"name": name, "domain": settings.require(f"domains.{name}"),
         "upstream": slots.UPSTREAM if name == "api" else settings.require(f"upstreams.{name}")}
        for name in names
    ]


def http2_directive(nginx_v: ProbeResult) -> bool:
    """True when this nginx wants `http2 on;` (>= 1.25.1), False for `listen 443 ssl http2`. Pure.

    An nginx that does not say its version gets the current form; `nginx -t` judges it.
    """
    found = _NGINX_VERSION.search(nginx_v.stdout)
    return not found or tuple(int(part) for part in found.groups()) >= HTTP2_DIRECTIVE_SINCE


def render_site(settings, facts: Facts, balancing: balancer.Balancing | None = None) -> str:
    """The site file for these facts: TLS for each site the `coachntt` certificate names;
    on an app host behind the load balancer, the server the lb alone reaches. Pure."""
    certificate = certificates.parse_certificate(facts["certificate"])
    private = {"port": balancing.port, "lb": balancing.lb} if balancing and balancing.role == balancer.APP else None
    return templates.render(
        "nginx/coachntt.conf.j2",
        sites=[{**site, "tls": bool(certificate and certificate.covers(site["domain"]))} for site in site_settings(settings)],
        rate=str(settings.require("rate_limit.rate")),
        burst=int(settings.require("rate_limit.burst")),
        certificate=certificates.LIVE_DIR,
        webroot=certificates.WEBROOT,
        http2_directive=http2_directive(facts["nginx_version"]),
        api_upstream=slots.UPSTREAM,
        upstream_file=slots.UPSTREAM_FILE,
        maintenance_dir=slots.UPSTREAM_DIR,
        maintenance_page=slots.MAINTENANCE_PAGE,
        retry_after=int(settings.require("cutover.retry_after")),
        private=private,
    )


def balancing_here(ops) -> balancer.Balancing | None:
    """This host's part in the layout's load balancing (lb, app behind it), or None."""
    members = layout.check(ops.settings.get("roles") or {})
    return balancer.balancing(members, getattr(ops.context, "host", None), getattr(ops.context, "port", 22),
                              int(ops.settings.require("lb.backend_port")))


def upstream_step(settings, balancing: balancer.Balancing | None = None) -> Step:
    """The api slot include: created (naming slot a, the first release's slot) only when
    missing. Once there, deploy and rollback own it: rewriting it here would move traffic.
    On the load balancer it names the app hosts instead, and `nginx` keeps it in step with roles.app."""
    if balancing is not None and balancing.role == balancer.LB:
        return lb_upstream_step(settings, balancing)
    first = slots.Slot("a", int(settings.require("cutover.port_a")))

    def plan(facts: Facts) -> Plan:
        if facts["include"].ok:
            return Plan.ok(f"{slots.UPSTREAM_FILE} present (deploy and rollback own it)")
        write = remote.write_file_command(slots.UPSTREAM_FILE, slots.render_upstream(first), "0644", "root:root")
        return Plan.change(Change(f"create {slots.UPSTREAM_FILE} (api -> {first}, before the first release)", write))

    return Step("api upstream", probes={"include": f"test -f {slots.UPSTREAM_FILE}"}, plan=plan)


def lb_upstream_step(settings, balancing: balancer.Balancing, *, out: frozenset[str] | None = None,
                     name: str = "api upstream") -> Step:
    """The lb's include naming the app hosts. Hosts taken out stay out (read from the file)
    unless `out` says which are out now (lb.out, lb.in)."""
    fail_timeout = int(settings.require("lb.fail_timeout"))

    def plan(facts: Facts) -> Plan:
        down = out if out is not None else balancer.taken_out(facts["content"].stdout if facts["content"].ok else "")
        content = balancer.render_upstream(balancing, slots.UPSTREAM, fail_timeout=fail_timeout,
                                           down=frozenset(down) & set(balancing.apps))
        return remote.file_step(name, slots.UPSTREAM_FILE, content, validate="nginx -t -q",
                                then=remote.RELOAD_NGINX).plan(facts)

    return Step(name, probes=remote.file_probes(slots.UPSTREAM_FILE), plan=plan)


def maintenance_page_step() -> Step:
    page = templates.render(f"nginx/{slots.MAINTENANCE_PAGE}")
    return remote.file_step("maintenance page", f"{slots.UPSTREAM_DIR}/{slots.MAINTENANCE_PAGE}", page)


def shutdown_step(settings) -> Step:
    """worker_shutdown_timeout: how long old workers may outlive a reload."""
    seconds = slots.nginx_shutdown_seconds(int(settings.require("cutover.drain_seconds")))
    content = templates.render("nginx/coachntt-shutdown.conf.j2", seconds=seconds)
    return remote.file_step("old workers bounded", SHUTDOWN_FILE, content, validate="nginx -t -q", then=remote.RELOAD_NGINX)


def site_step(settings, balancing: balancer.Balancing | None = None) -> Step:
    # A missing domain, upstream or rate setting is refused now, before any connection.
    site_settings(settings), settings.require("rate_limit.rate"), settings.require("rate_limit.burst")
    settings.require("cutover.retry_after")

    def plan(facts: Facts) -> Plan:
        # A site gets TLS once the certificate names it (ssl.issue puts it there).
        rendered = render_site(settings, facts, balancing)
        return remote.file_step("site config", SITE_FILE, rendered, validate="nginx -t -q", then=remote.RELOAD_NGINX).plan(facts)

    return Step(
        "site config",
        probes={**remote.file_probes(SITE_FILE), "certificate": certificates.CERTIFICATE_PROBE, "nginx_version": "nginx -v 2>&1"},
        plan=plan,
    )


def lb_firewall_step(balancing: balancer.Balancing) -> Step:
    """An app host behind the load balancer: ufw lets the lb (only) reach its port."""
    shown = re.compile(rf"^{balancing.port}/tcp\s+ALLOW(?: IN)?\s+{re.escape(balancing.lb)}\b", re.MULTILINE)

    def plan(facts: Facts) -> Plan:
        if "Status: active" not in facts["ufw"].stdout:
            return Plan.ok("ufw is not active: nothing to open")
        if shown.search(facts["ufw"].stdout):
            return Plan.ok(f"ufw lets {balancing.lb} reach port {balancing.port}")
        rule = balancer.firewall_rule(balancing)
        return Plan.change(Change(f"ufw allow {rule}", f"ufw allow {rule} comment 'coachntt load balancer'"))

    return Step("load balancer let in", probes={"ufw": "ufw status"}, plan=plan)


def default_site_step() -> Step:
    def plan(facts: Facts) -> Plan:
        if not facts["default"].ok:
            return Plan.ok("default site not enabled")
        return Plan.change(Change(f"remove {DEFAULT_SITE}", f"rm -f {DEFAULT_SITE} && nginx -t -q && {remote.RELOAD_NGINX}"))

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


@ops_task(default=True, fleet=CHANGES)
def install(ops):
    """Render and install the sites, test, reload (old config restored on failure)."""
    # The distribution's default site goes first: it claims default_server on :80 too.
    # Every step's facts are read and planned before any applies: a foreign listener stops it all.
    # The include the site file names exists before the site is tested.
    # In a layout with a load balancer: its upstream on the lb host, its way in on app hosts.
    balancing = balancing_here(ops)
    steps = [web_ports_step(), default_site_step(), upstream_step(ops.settings, balancing), maintenance_page_step(),
             shutdown_step(ops.settings), site_step(ops.settings, balancing), remote.service_step("nginx running", "nginx")]
    if balancing is not None and balancing.role == balancer.APP:
        steps.insert(-1, lb_firewall_step(balancing))
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
