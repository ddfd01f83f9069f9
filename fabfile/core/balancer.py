"""The load balancer of a several-host layout: roles.lb in front of roles.app, as data.

    lb host     nginx's api upstream names every app host's private address on
                `lb.backend_port` (configs/nginx/lb-upstream.conf.j2) instead of a local
                api slot: TLS, the rate limit and the security headers stay here. A host
                that refuses, times out or answers 502/503/504 is passed over for
                `lb.fail_timeout` seconds and the request retried on the next host
                (open-source nginx's passive health check).
    app hosts   nginx also listens on `lb.backend_port` for the load balancer alone (its
                address allowed, every other one denied, and ufw opened for it only) and
                sends those requests to the api slot that serves, like its public site;
                the client's address comes from the lb's X-Forwarded-For.

Every role empty, or no lb in the layout: nothing here applies (the single-VPS layout).
Pure: no connection.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from . import templates
from .errors import ConfigError
from .layout import Member

LB, APP = "lb", "app"


@dataclass(frozen=True)
class Balancing:
    """What the host a task runs on does in an lb layout."""

    role: str  # LB or APP
    lb: str  # the load balancer's private address (app hosts allow exactly it)
    apps: tuple[str, ...]  # the app hosts' addresses (the lb's upstream)
    port: int  # where app hosts listen for the lb


def balancing(members: list[Member], host: str | None, port: int, backend_port: int) -> Balancing | None:
    """The role of `host:port` in the layout's load balancing, or None (no lb, or not one of its hosts)."""
    lbs = [m for m in members if LB in m.roles]
    if not lbs or not host:
        return None
    here = next((m for m in members if m.login.machine == (host.lower(), port)), None)
    if here is None or not ({LB, APP} & set(here.roles)):
        return None
    lb = private_address(lbs[0], "roles.lb")
    apps = tuple(private_address(m, "roles.app") for m in members if APP in m.roles)
    return Balancing(LB if LB in here.roles else APP, lb, apps, backend_port)


def private_address(member: Member, role: str) -> str:
    """The IPv4 address a host is named by: nginx allows it and ufw opens for it, exactly."""
    try:
        return str(ipaddress.IPv4Address(member.login.host))
    except ValueError:
        raise ConfigError(f"{member.login.login} in {role}: the load balancer's layout needs private IPv4 addresses",
                          "name the lb and app hosts by their private addresses in roles.*") from None


def render_upstream(b: Balancing, upstream: str, *, fail_timeout: int, down: frozenset[str] = frozenset()) -> str:
    """The lb's api upstream include: every app host, on the port it listens on for the lb;
    those in `down` marked so (taken out: no new requests)."""
    return templates.render("nginx/lb-upstream.conf.j2", upstream=upstream, servers=b.apps, port=b.port,
                            fail_timeout=fail_timeout, tries=len(b.apps), down=down)


_DOWN = re.compile(r"^\s*server ([0-9.]+):\d+ [^;]*\bdown;", re.MULTILINE)


def taken_out(include: str) -> frozenset[str]:
    """The app hosts the lb's include marks `down` (read back, so `nginx` keeps them)."""
    return frozenset(_DOWN.findall(include))


def firewall_rule(b: Balancing) -> str:
    """The ufw rule (as `ufw status` shows it, and as `ufw allow` takes it) letting the lb in."""
    return f"proto tcp from {b.lb} to any port {b.port}"
