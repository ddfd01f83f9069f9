"""db: the database of a layout: one primary serving every app host, and read replicas
of it by PostgreSQL's own streaming replication.

Runbook (`fab db.primary` with roles.db and roles.app set). The single-VPS layout needs
neither: its app reaches PostgreSQL on the compose network.
    on the primary (roles.db):
    1. published         the database container listens on the primary's private address,
                         port 5432: DB_PUBLISH and DB_PUBLISH_PORT in app.dir/.env (the
                         compose file publishes ${DB_PUBLISH:-127.0.0.1}:${DB_PUBLISH_PORT:-}:5432,
                         loopback on a port Docker picks without them), PostgreSQL started
                         or restarted once for it. Never a public address: Docker's ports
                         bypass ufw
    on each app host (roles.app, the primary's host aside):
    2. database URL      DATABASE_URL in the env file is the primary's own, its host made
                         the primary's address (compared by digest: it holds the password,
                         which reaches the host as a file only its login reads). From then on
                         that host's releases start no PostgreSQL of their own, back the
                         database up on roles.db, and migrate it there (core/app.py reads
                         where DATABASE_URL points); monitor.check's database row asks the
                         primary, and leaves PgBouncer and the backups to the db host's rows

Runbook (`fab db.replica` with roles.db and roles.replica set; `fab -H REPLICA db.replica`
sets up that replica only). Each host's facts are read in one round trip, and only what
is missing is done; a second run reports every step ok.

    on the primary (roles.db):
    1. published         as db.primary's step 1
    2. password          REPLICATION_PASSWORD in the app's env file, generated there once,
                         never printed
    3. replication       the role db.replication_user with that password, a physical slot
                         and a pg_hba.conf line per replica (its address only), WAL kept for
                         a slot bounded by db.wal_keep_max (a dead replica never fills the
                         primary's disk), configuration reloaded
    on each replica:
    4. standby copy      pg_basebackup -R from the primary into an empty data volume
                         (db.volume). A volume holding a database of its own is refused
                         (exit 1) and never touched; a failed copy leaves it empty again.
    5. published         PostgreSQL started from the same compose file as a hot standby,
                         published on the replica's address for the app's reads
    6. streaming         the WAL receiver streams within db.standby_timeout, else exit 1
                         with the standby's last log line
    on each app host (roles.app; the primary's host when roles.app is empty):
    7. read-only URL     DATABASE_URL_READONLY in the env file: DATABASE_URL with the
                         replicas as hosts and target_session_attrs=read-only (libpq
                         picks a replica that answers); the api reads it at its next start

The password goes from the primary's env file to a replica as a file only the login user
can read, removed once used; pg_basebackup -R keeps it in the standby's own configuration.
`monitor.check` reports each replica's state and lag (on the primary and on the replica).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from invoke import Collection

from .core import redact, templates
from .core.app import App
from .core.errors import ConfigError, OpsError, UsageError
from .core.layout import Member, check, parse_login
from .core.remote import q
from .core.steps import Change, Facts, Plan, Reporter, Step, apply_steps, plan_steps
from .core.target import Target, connect_to
from .core.task import ops_task

SCRIPT = f"sh -c {shlex.quote(templates.script('db-replication.sh'))} db-replication"
PORT = 5432


class Replication:
    """What db.replica works with: the app's files and database, the layout's addresses."""

    def __init__(self, settings, members: list[Member]):
        self.app = App.from_settings(settings)
        self.env_path = self.app.env_path
        self.user = settings.require("db.replication_user")
        self.volume = settings.require("db.volume")
        self.keep = settings.require("db.wal_keep_max")
        self.timeout = int(settings.require("db.standby_timeout"))
        by_role = {role: [m for m in members if role in m.roles] for role in ("app", "db", "replica")}
        if not by_role["db"] or not by_role["replica"]:
            raise UsageError("db.replica needs roles.db (the primary) and roles.replica (its standbys)",
                             "set COACHNTT_ROLES__DB=user@host and COACHNTT_ROLES__REPLICA=user@host,...")
        self.primary = by_role["db"][0]
        self.replicas = by_role["replica"]
        self.app_hosts = by_role["app"] or [self.primary]
        for member in (self.primary, *self.replicas):
            address(member)  # every address checked before the first connection

    def slot(self, replica: Member) -> str:
        return "coachntt_" + address(replica).replace(".", "_")

    def facts_command(self) -> str:
        app = self.app
        return f"{SCRIPT} facts {q(app.db_container)} {q(app.db_user)} {q(app.db_name)} {q(self.env_path)} {q(self.user)}"


def address(member: Member) -> str:
    """The IPv4 address a role's host is given by: pg_hba.conf trusts exactly that one."""
    try:
        return str(ipaddress.IPv4Address(member.login.host))
    except ValueError:
        raise ConfigError(f"{member.login.login}: db.replica needs the host's private IPv4 address in roles.*, "
                          f"got '{member.login.host}'", "name the db and replica hosts by their private addresses") from None


def parse_facts(text: str) -> dict[str, list[str]]:
    """The `facts` lines as {key: [values]} ("slot a", "slot b" -> {"slot": ["a", "b"]}). Pure."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key:
            found.setdefault(key, []).append(value.strip())
    return found


# --------------------------------------------------------------------------- steps


def published_step(app: App, ip: str, what: str) -> Step:
    """The database container publishes IP:5432 (db.primary's step 1, db.replica's 1 and 5)."""
    wanted = f"{ip}:{PORT}"
    recreate = app.compose("up -d --wait --no-deps postgres")
    verify = (f"docker port {q(app.db_container)} {PORT}/tcp | grep -qxF {q(wanted)} || "
              f"{{ echo 'the compose file does not publish its postgres service on DB_PUBLISH "
              f"(ports: [\"${{DB_PUBLISH:-127.0.0.1}}:${{DB_PUBLISH_PORT:-}}:{PORT}\"])' >&2; exit 1; }}")

    def plan(facts: Facts) -> Plan:
        if facts["port"].ok and wanted in facts["port"].stdout.split():
            return Plan.ok(f"listening on {wanted}")
        return Plan.change(Change(f"{what}, published on {wanted} (DB_PUBLISH in {app.dir}/.env)",
                                  f"{SCRIPT} publish {q(app.dir)} {q(ip)}\n{recreate}\n{verify}"))

    return Step("published", probes={"port": f"docker port {q(app.db_container)} {PORT}/tcp"}, plan=plan, sudo=False)


def password_step(rep: Replication) -> Step:
    env = rep.env_path

    def plan(facts: Facts) -> Plan:
        if facts["password"].stdout.strip() == "yes":
            return Plan.ok(f"REPLICATION_PASSWORD in {env}")
        return Plan.change(Change(f"generate REPLICATION_PASSWORD in {env}", f"{SCRIPT} password {q(env)}"))

    probe = f"grep -q '^REPLICATION_PASSWORD=.' {q(env)} && echo yes || echo no"
    return Step("password", probes={"password": probe}, plan=plan, sudo=False)


def replication_step(rep: Replication) -> Step:
    app = rep.app
    pairs = {rep.slot(r): address(r) for r in rep.replicas}
    grant = (f"{SCRIPT} grant {q(app.db_container)} {q(app.db_user)} {q(app.db_name)} {q(rep.env_path)} "
             f"{q(rep.user)} {q(rep.keep)} " + " ".join(q(f"{slot}={ip}") for slot, ip in pairs.items()))

    def plan(facts: Facts) -> Plan:
        if not facts["db"].ok:
            raise OpsError(f"the database container {app.db_container} does not answer on the primary",
                           "start it (deploy, or docker compose up -d postgres) and rerun db.replica")
        found = parse_facts(facts["db"].stdout)
        missing = []
        if found.get("role") != ["yes"]:
            missing.append(f"role {rep.user}")
        missing += [f"slot {slot}" for slot in pairs if slot not in found.get("slot", [])]
        trusted = {tuple(line.split()) for line in found.get("hba", [])}
        missing += [f"pg_hba.conf line for {ip}" for ip in pairs.values() if (rep.user, f"{ip}/32") not in trusted
                    and (rep.user, ip) not in trusted]
        if found.get("keep") != [rep.keep]:
            missing.append(f"max_slot_wal_keep_size {rep.keep}")
        if not missing:
            return Plan.ok(f"role {rep.user}, {len(pairs)} slot(s) and their pg_hba.conf lines")
        return Plan.change(Change("replication: " + ", ".join(missing), grant))

    # The password step may create it in this run: the grant reads it then, on the host.
    return Step("replication", probes={"db": rep.facts_command()}, plan=plan, sudo=False)


def copy_step(rep: Replication, replica: Member, secret_path: str) -> Step:
    app, primary = rep.app, address(rep.primary)
    image = app.compose("config --images postgres")

    def plan(facts: Facts) -> Plan:
        held = facts["volume"].stdout.strip()
        if held == "standby":
            return Plan.ok(f"{rep.volume} holds a standby")
        if held != "empty":
            raise OpsError(f"the volume {rep.volume} on {replica.login.login} holds a database of its own "
                           "(not a standby): nothing was changed",
                           f"if it is a leftover, back it up, remove it (docker volume rm {rep.volume}) and rerun db.replica")
        if not facts["image"].ok or not facts["image"].stdout.strip():
            raise OpsError(f"no postgres service in the compose file on {replica.login.login}",
                           "set the replica host up like an app host (deploy.setup), then rerun db.replica")
        name = facts["image"].stdout.split()[0]
        return Plan.change(Change(f"copy the primary's database from {primary} (pg_basebackup, slot {rep.slot(replica)})",
                                  f"{SCRIPT} copy {q(rep.volume)} {q(name)} {q(primary)} {q(rep.user)} "
                                  f"{q(rep.slot(replica))} {q(secret_path)}"))

    return Step("standby copy", probes={"volume": f"{SCRIPT} volume {q(rep.volume)}", "image": image}, plan=plan)


def streaming_step(rep: Replication) -> Step:
    app = rep.app
    wait = f"{SCRIPT} streaming {q(app.db_container)} {q(app.db_user)} {q(app.db_name)} {rep.timeout}"

    def plan(facts: Facts) -> Plan:
        found = parse_facts(facts["db"].stdout) if facts["db"].ok else {}
        if found.get("receiver") == ["streaming"]:
            return Plan.ok("the WAL receiver streams from the primary")
        return Plan.change(Change(f"wait up to {rep.timeout}s for the standby to stream", wait))

    return Step("streaming", probes={"db": rep.facts_command()}, plan=plan, sudo=False)


def readonly_url_step(rep: Replication) -> Step:
    env = rep.env_path
    hosts = " ".join(q(f"{address(r)}:{PORT}") for r in rep.replicas)

    def plan(facts: Facts) -> Plan:
        if facts["url"].stdout.strip() == "current":
            return Plan.ok(f"DATABASE_URL_READONLY in {env} names the replicas")
        if not facts["url"].ok:
            raise OpsError(f"no DATABASE_URL in {env} to derive the read-only URL from",
                           "create the app's env file (deploy.setup) and rerun db.replica")
        return Plan.change(Change(f"DATABASE_URL_READONLY in {env} (read by the api at its next start)",
                                  f"{SCRIPT} readonly-url {q(env)} set {hosts}"))

    return Step("read-only URL", probes={"url": f"{SCRIPT} readonly-url {q(env)} check {hosts}"}, plan=plan, sudo=False)


def database_url_step(app: App, primary_ip: str, wanted_digest: str, secret_path: str) -> Step:
    """DATABASE_URL in an app host's env file is the primary's, at its private address
    (db.primary's step 2). Compared by digest: the URL holds the password."""
    env = app.env_path

    def plan(facts: Facts) -> Plan:
        if facts["url"].stdout.strip() == wanted_digest:
            return Plan.ok(f"DATABASE_URL in {env} names the primary ({primary_ip}:{PORT})")
        return Plan.change(Change(f"DATABASE_URL in {env} -> the primary, {primary_ip}:{PORT} (read by the api at its "
                                  "next start: the next release)", f"{SCRIPT} database-url {q(env)} {q(secret_path)}"))

    probe = f"sed -n 's/^DATABASE_URL=//p' {q(env)} | tail -n 1 | sha256sum | cut -d ' ' -f 1"
    return Step("database URL", probes={"url": probe}, plan=plan, sudo=False)


def primary_url(primary: Target, app: App, ip: str) -> str:
    """The primary's own DATABASE_URL with its host made the primary's private address
    (what the app hosts connect to); registered as a secret before anything prints."""
    found = primary.run(f"sed -n 's/^DATABASE_URL=//p' {q(app.env_path)} | tail -n 1", check=False).stdout.strip()
    redact.register(found)
    url, replaced = _URL_HOST.subn(rf"\g<1>{ip}:{PORT}", found, count=1)
    if not replaced:
        raise OpsError(f"no DATABASE_URL of the form postgresql://USER:PASSWORD@HOST/DB in {app.env_path} on {primary.label}",
                       "create the app's env file on the db host (deploy.setup) and rerun db.primary")
    redact.register(url)
    return url


_URL_HOST = re.compile(r"^([a-z0-9+]+://[^@/]*@)[^/?]*")


# --------------------------------------------------------------------------- tasks


@ops_task(help={})
def primary(ops):
    """The database on roles.db serves the app hosts: published on its private address, DATABASE_URL on each app host."""
    members = check(ops.settings.get("roles") or {})
    app = App.from_settings(ops.settings)
    found = [m for m in members if "db" in m.roles]
    if not found:
        raise UsageError("db.primary needs roles.db (the host PostgreSQL runs on for every app host)",
                         "set COACHNTT_ROLES__DB=user@ADDRESS, and the app hosts in COACHNTT_ROLES__APP")
    db_host, ip = found[0], address(found[0])
    app_hosts = [m for m in members if "app" in m.roles and "db" not in m.roles]
    target = connect_to(ops.context, ops.settings, db_host.login.login)
    hosts = [Host(target, [published_step(app, ip, "PostgreSQL restarted once")])]
    if app_hosts:
        wanted = primary_url(target, app, ip)
        digest = hashlib.sha256((wanted + "\n").encode()).hexdigest()
        for member in app_hosts:
            there, path = connect_to(ops.context, ops.settings, member.login.login), private_path()
            hosts.append(Host(there, [database_url_step(app, ip, digest, path)],
                              before_apply=lambda planned, t=there, p=path: hand_over_if(planned, "database URL", t, wanted, p)))
    apply_hosts(ops, hosts)


@ops_task(help={})
def replica(ops):
    """Streaming replication from roles.db to each roles.replica host (-H: those replicas only)."""
    rep = Replication(ops.settings, check(ops.settings.get("roles") or {}))
    replicas = chosen_replicas(ops, rep)
    primary = connect_to(ops.context, ops.settings, rep.primary.login.login)
    hosts: list[Host] = [Host(primary, [published_step(rep.app, address(rep.primary), "PostgreSQL restarted once"),
                                        password_step(rep), replication_step(rep)])]
    for member in replicas:
        target, secret_path = connect_to(ops.context, ops.settings, member.login.login), private_path()
        hosts.append(Host(target, [copy_step(rep, member, secret_path),
                                   published_step(rep.app, address(member), "PostgreSQL started as a hot standby"),
                                   streaming_step(rep)],
                          before_apply=lambda planned, t=target, p=secret_path: hand_over_password(planned, primary, t, rep, p)))
    hosts += [Host(connect_to(ops.context, ops.settings, m.login.login), [readonly_url_step(rep)]) for m in rep.app_hosts]

    apply_hosts(ops, hosts)


def apply_hosts(ops, hosts: list[Host]) -> None:
    """Every host's facts and plans before the first change (a replica that must be refused,
    a database of its own, stops the run with the primary untouched too), then each host's."""
    planned = [(host, plan_steps(host.target, host.steps)) for host in hosts]
    for host, plans in planned:
        reporter = Reporter(host.target.label, json=ops.json, show_diff=ops.diff)
        trips = host.target.round_trips
        try:
            if host.before_apply is not None and not ops.dry:
                host.before_apply(plans)
            apply_steps(host.target, plans, reporter, dry=ops.dry)
        finally:
            reporter.summary(host.target.round_trips - trips)


@dataclass
class Host:
    target: Target
    steps: list[Step]
    before_apply: Callable[[list[tuple[Step, Plan]]], None] | None = None


def private_path() -> str:
    return f"/tmp/coachntt-ops.{secrets.token_hex(8)}.secret"


def chosen_replicas(ops, rep: Replication) -> list[Member]:
    """The -H hosts (each must be a replica of the layout), else every replica."""
    given = getattr(ops.context, "host", None)
    if not given:
        return rep.replicas
    login = parse_login(given)
    port = getattr(ops.context, "port", 22)
    for member in rep.replicas:
        if login is not None and member.login.machine == (login.host.lower(), port):
            return [member]
    raise UsageError(f"{given} is not in roles.replica", "list it there, or run db.replica without -H for every replica")


def hand_over_password(planned, primary: Target, replica: Target, rep: Replication, path: str) -> None:
    """Only when the copy runs: the primary's password to a file on the replica only its login reads."""
    if not changes(planned, "standby copy"):
        return
    result = primary.run(f"sed -n 's/^REPLICATION_PASSWORD=//p' {q(rep.env_path)} | tail -n 1", check=False)
    password = result.stdout.strip()
    redact.register(password)
    if not password:
        raise OpsError(f"no REPLICATION_PASSWORD in {rep.env_path} on {primary.label}", "rerun db.replica")
    replica.put_private(password, path)


def hand_over_if(planned, step_name: str, target: Target, secret: str, path: str) -> None:
    """`secret` to a file on `target` only its login reads, when `step_name` will use it."""
    if changes(planned, step_name):
        target.put_private(secret, path)


def changes(planned, step_name: str) -> bool:
    return any(step.name == step_name and plan.changes for step, plan in planned)


ns = Collection("db")
ns.add_task(primary)
ns.add_task(replica)
