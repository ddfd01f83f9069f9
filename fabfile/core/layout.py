"""Which hosts play which role: the layout of a service spread over several hosts.

    roles:
      app: [coachntt@10.0.0.11, coachntt@10.0.0.12]   # the stateless api
      lb: coachntt@10.0.0.10                          # nginx, TLS, upstreams to the app hosts
      db: coachntt@10.0.0.20                          # PostgreSQL primary
      replica: [coachntt@10.0.0.21]                   # optional

Every role empty is the single-VPS layout, the default: all roles on the one host a
task is given (fab -H, COACHNTT_HOST, or the machine itself) and nothing changes for it.
A host may hold several roles (lb and app on one machine), never the same host twice in
one role. Checked with the settings, before any connection (core/settings.validate).
Pure: no connection, no settings import (settings imports this module).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, UsageError

ROLES = ("app", "lb", "db", "replica")
# Roles holding one host; the others hold a list.
SINGLE_ROLES = ("lb", "db")
# user@host[:port], as `fab -H` and COACHNTT_HOST take it (settings' rule for `host` too).
SSH_LOGIN = re.compile(r"(?:([a-z_][a-z0-9_-]{0,31})@)?([A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}))(?::(\d{1,5}))?")


@dataclass(frozen=True)
class HostLogin:
    """One host as given: `login` is what Fabric connects to (user@host[:port])."""

    login: str
    user: str
    host: str
    port: int

    @property
    def machine(self) -> tuple[str, int]:
        """The same machine whatever the user it is reached as."""
        return self.host.lower(), self.port


def parse_login(text: str) -> HostLogin | None:
    found = SSH_LOGIN.fullmatch(text.strip()) if isinstance(text, str) else None
    if found is None:
        return None
    user, host, port = found.groups()
    port_number = int(port) if port else 22
    if not 0 < port_number < 65536:
        return None
    return HostLogin(text.strip(), user or "", host, port_number)


@dataclass(frozen=True)
class Member:
    """A host of the layout with every role it holds, in ROLES order."""

    login: HostLogin
    roles: tuple[str, ...]


def role_hosts(roles: Mapping[str, Any]) -> dict[str, list[str]]:
    """The `roles` setting as {role: [login, ...]}; a single-host role as a list of one."""
    found: dict[str, list[str]] = {}
    for role, value in (roles or {}).items():
        if value in (None, "", []):
            continue
        found[role] = [value] if isinstance(value, str) else [str(v) for v in value]
    return found


def check(roles: Mapping[str, Any]) -> list[Member]:
    """The layout's members, or a ConfigError (exit 2) naming what is wrong with it."""
    if not isinstance(roles, Mapping):
        raise ConfigError(f"roles must name hosts per role (roles.app, roles.lb, roles.db, roles.replica), got '{roles}'",
                          "set COACHNTT_ROLES__APP=user@host,... and the others, not COACHNTT_ROLES")
    given = role_hosts(roles)
    for role in roles:
        if role not in ROLES:
            raise ConfigError(f"unknown role '{role}' in roles.{role}; roles are {', '.join(ROLES)}",
                              f"remove it or use one of {', '.join(ROLES)}")
    for role in SINGLE_ROLES:
        if len(given.get(role, [])) > 1:
            raise ConfigError(f"roles.{role} holds one host, got {len(given[role])}", "name a single user@host[:port]")
    if given.get("lb") and not given.get("app"):
        raise ConfigError("roles.lb is set but roles.app is empty: the load balancer has no app hosts to send requests to",
                          "list the api's hosts in roles.app (COACHNTT_ROLES__APP=user@host,user@host)")
    if given.get("replica") and not given.get("db"):
        raise ConfigError("roles.replica is set but roles.db is empty: a replica needs a primary",
                          "name the PostgreSQL primary in roles.db (COACHNTT_ROLES__DB=user@host)")
    members: dict[tuple[str, int], Member] = {}
    for role in ROLES:
        seen: set[tuple[str, int]] = set()
        for text in given.get(role, []):
            login = parse_login(text)
            if login is None:
                raise ConfigError(f"roles.{role} must hold user@host[:port], got '{text}'", f"fix roles.{role}")
            if login.machine in seen:
                raise ConfigError(f"{login.host}:{login.port} is listed twice in roles.{role}", "list each host once")
            seen.add(login.machine)
            known = members.get(login.machine)
            if known is not None and known.login.user != login.user:
                raise ConfigError(f"{login.host}:{login.port} is reached as {known.login.login} and as {login.login}",
                                  "log in to one host as one user in every role")
            members[login.machine] = Member(known.login if known else login, (*(known.roles if known else ()), role))
    for member in members.values():
        if {"db", "replica"} <= set(member.roles):
            raise ConfigError(f"{member.login.login} is both roles.db and roles.replica", "a replica runs on another host")
    return list(members.values())


def hosts_given(texts: Iterable[str], members: list[Member]) -> list[Member]:
    """The hosts of `fab -H a,b,c`, each with its roles from the layout (none when it is not in it).
    A host given twice (the same machine, whatever the user) is a UsageError: it would run twice."""
    by_machine = {m.login.machine: m for m in members}
    chosen: list[Member] = []
    seen: dict[tuple[str, int], str] = {}
    for text in texts:
        login = parse_login(text)
        if login is None:
            raise UsageError(f"-H must list user@host[:port], got '{text}'", "e.g. fab -H coachntt@10.0.0.11,coachntt@10.0.0.12")
        if login.machine in seen:
            before = "" if seen[login.machine] == text else f" (as {seen[login.machine]} before)"
            raise UsageError(f"{text} is given twice with -H{before}",
                             "list each host once: the task would run on it twice at the same time")
        seen[login.machine] = text
        known = by_machine.get(login.machine)
        chosen.append(Member(login, known.roles if known else ()))
    return chosen
