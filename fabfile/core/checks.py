"""monitor.check's judgement: the frames scripts/monitor-check.sh prints, turned
into one result per check against the thresholds in settings. Pure after the
read, so every rule and remedy is tested as data.

    api health      the live api slot's /health answers 200 (the slot nginx sends requests to)
    database        PostgreSQL in its container accepts connections (pg_isready's exchange)
    pgbouncer       PgBouncer answers the PostgreSQL protocol on monitor.pgbouncer
    services        every container of the compose project running (and healthy when it has a check),
                    but the api slot nginx does not send requests to: stopped, kept for rollback
    disk <mount>    free space of each filesystem under monitor.disk_paths
    memory          used share of memory (MemTotal - MemAvailable)
    cpu             busy share over the sample window AND load per CPU over 1 minute: sustained
    certificate     days left on the certificate ssl.issue obtains (core/certificates.FULLCHAIN)
    backup age      the newest good database backup (db_*.dump with its .sha256, not failed)
    replication     only when roles.replica names hosts, and only where the database container
                    runs: on the primary every replica streaming within the lag, on a standby
                    its own stream and lag (the one probe that starts a process in a container)

A check passes, warns (shown, exit 0) or fails (exit 1); every check that does
not pass carries the plan's remedy.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime

from . import backups, certificates, database_location, layout, slots, templates
from .batch import ProbeResult, parse_batch
from .settings import Settings
from .target import Target, command_failed

SCRIPT = "monitor-check.sh"
PASS, WARN, FAIL = "pass", "warn", "fail"
PROBES = ("now", "health", "database", "pgbouncer", "services", "disk", "memory", "certificate", "backups", "cpu")
REPLICATION = "replication"  # a probe run only when asked: command(..., replication=True)
# monitor-check.sh's own statuses
NO_CERTIFICATE, NO_BACKUP_DIR = 3, 4
NO_DB_CONTAINER = 3  # the replication probe's: no database on this host


@dataclass(frozen=True)
class CheckConfig:
    """What the checks read on the server and the thresholds they judge by (from settings)."""

    health: slots.HealthProbe
    db_container: str
    db_user: str
    db_name: str
    pgbouncer: str
    app_dir: str
    cert_file: str
    backup_dir: str
    cpu_sample_ms: int
    disk_paths: tuple[str, ...]
    disk_free_percent_min: int
    memory_used_percent_max: int
    cpu_percent_max: int
    certificate_days_min: int
    certificate_missing: str
    backup_age_hours_max: int
    replicas: tuple[str, ...]  # roles.replica
    replication_lag_seconds_max: int
    env_file: str = ""  # the app's: its DATABASE_URL says where the database runs

    @property
    def replication(self) -> bool:
        """The layout has replicas: only then is PostgreSQL asked about replication."""
        return bool(self.replicas)

    @classmethod
    def from_settings(cls, s: Settings) -> CheckConfig:
        number = lambda key: int(s.require(key))  # noqa: E731 - validated by the settings' rules
        return cls(
            health=slots.HealthProbe.from_settings(s),
            db_container=s.require("backup.db_container"),
            db_user=s.require("backup.db_user"),
            db_name=s.require("backup.db_name"),
            pgbouncer=s.require("monitor.pgbouncer"),
            app_dir=s.require("app.dir"),
            cert_file=certificates.FULLCHAIN,
            backup_dir=s.require("backup.dir"),
            cpu_sample_ms=number("monitor.cpu_sample_ms"),
            disk_paths=tuple(s.require("monitor.disk_paths")),
            disk_free_percent_min=number("thresholds.disk_free_percent_min"),
            memory_used_percent_max=number("thresholds.memory_used_percent_max"),
            cpu_percent_max=number("thresholds.cpu_percent_max"),
            certificate_days_min=number("thresholds.certificate_days_min"),
            certificate_missing=s.require("monitor.certificate_missing"),
            backup_age_hours_max=number("thresholds.backup_age_hours_max"),
            replicas=tuple(layout.role_hosts(s.get("roles") or {}).get("replica", [])),
            replication_lag_seconds_max=number("thresholds.replication_lag_seconds_max"),
            env_file=f"{s.require('app.dir')}/{s.require('app.env_file')}",
        )


def command(cfg: CheckConfig, marker: str, *, replication: bool = False) -> str:
    """The one command monitor.check sends: scripts/monitor-check.sh with every value quoted;
    the replication probe only with `replication`."""
    host, _, port = cfg.pgbouncer.rpartition(":")
    args = [marker, *cfg.health.args(), cfg.db_container, cfg.db_user, cfg.db_name, host, port, cfg.app_dir,
            cfg.cert_file, cfg.backup_dir, str(cfg.cpu_sample_ms), f"replication={'yes' if replication else 'no'}",
            *([f"env={cfg.env_file}"] if cfg.env_file else []), *cfg.disk_paths]
    script = templates.script("database-location.sh") + "\n" + slots.with_live_slot(SCRIPT)
    return f"bash -c {shlex.quote(script)} monitor-check " + " ".join(shlex.quote(a) for a in args)


def probes(replication: bool = False) -> tuple[str, ...]:
    """The frames the script prints (`replication` as command's)."""
    return (*PROBES, REPLICATION) if replication else PROBES


def read(target: Target, cfg: CheckConfig, *, replication: bool = False) -> list[Check]:
    """Every check on `target`: one command (scripts/monitor-check.sh), then the judgement.
    monitor.check asks for replication when the layout has replicas; a release's verify
    does not (a replica's lag says nothing of the release, and must not roll it back)."""
    marker = "@@coachntt-" + secrets.token_hex(8)
    result = target.run(command(cfg, marker, replication=replication), check=False)
    facts = parse_batch(result.stdout, marker)
    if any(name not in facts for name in probes(replication)):
        # The script itself died (no bash, sudo refused it): its text means nothing to the operator.
        raise command_failed(replace(result, stdout=""), target.label,
                             summary=f"the checks could not run on {target.label} (exit {result.exit_status})")
    return evaluate(facts, cfg)


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # pass | warn | fail
    detail: str  # what was seen, against what limit
    remedy: str = ""  # what to do, for anything but pass
    value: float | None = None  # the measured number, for machines
    limit: float | None = None  # the threshold it was held against
    measured: Mapping[str, float] = field(default_factory=dict)  # more numbers, for machines (JSON keys)


def remedies(cfg: CheckConfig, api: str = "api_a") -> dict[str, str]:
    """The deployment plan's "common issues", said where they apply; `api` is the compose
    service of the live api slot."""
    in_app = f"in {cfg.app_dir}"
    return {
        "api health": f"read the api's logs (`docker compose logs --tail 50 {api}` {in_app}) and restart it "
                      f"(`docker compose restart {api}`); if a release broke it, `rollback`",
        "database": f"start it (`docker compose up -d postgres` {in_app}) and read its logs "
                    f"(`docker logs --tail 50 {cfg.db_container}`); restart the database if it hangs",
        "pgbouncer": f"check PgBouncer's logs (`docker compose logs --tail 50 pgbouncer` {in_app}) and its connection "
                     "limits (max_client_conn, default_pool_size); restart the database if needed",
        "services": f"see `docker compose ps` and `docker compose logs SERVICE` {in_app}; `docker compose up -d` "
                    "starts what is down",
        "disk": "prune old backups (`backup.prune`) and unused Docker images (`docker image prune -a`)",
        "memory": f"restart the api container (`docker compose restart {api}` {in_app}) and look for memory leaks "
                  "(`docker stats --no-stream`: which container grows)",
        "cpu": "find what is busy (`top`, `docker stats --no-stream`); restart the api container if it is the api",
        "certificate": "`ssl.renew`, and check certbot's renewal timer (`systemctl list-timers certbot.timer`)",
        "no certificate": "`ssl.issue` once DNS points at this host",
        "backup age": "`backup.now`, then check the backup timer (`backup.schedule`)",
        "no backup dir": "`deploy.setup` creates it (or fix backup.dir)",
        "missing path": "fix monitor.disk_paths: every path must exist on the server",
        "replica log": f"read the replica's PostgreSQL log (`docker logs --tail 50 {cfg.db_container}` on it)",
    }


# -- the checks ---------------------------------------------------------------------


def evaluate(facts: Mapping[str, ProbeResult], cfg: CheckConfig) -> list[Check]:
    """Every check, in the plan's order. Pure."""
    live = live_slot(facts["health"], cfg)
    fix = remedies(cfg, live.service)
    now = _int(facts["now"].stdout.strip())
    # An app host of a layout: PostgreSQL, PgBouncer and the backups are the db host's rows.
    here = not database_location.elsewhere(facts["database"])
    return [
        api_health(facts["health"], cfg, fix),
        database(facts["database"], cfg, fix),
        *replication(facts.get(REPLICATION), cfg, fix),
        *([pgbouncer(facts["pgbouncer"], cfg, fix)] if here else []),
        services(facts["services"], cfg, fix, idle=cfg.health.other(live).service),
        *disks(facts["disk"], cfg, fix),
        memory(facts["memory"], cfg, fix),
        cpu(facts["cpu"], cfg, fix),
        certificate(facts["certificate"], cfg, fix, now),
        *([backup_age(facts["backups"], cfg, fix, now)] if here else []),
    ]


def live_slot(fact: ProbeResult, cfg: CheckConfig) -> slots.Slot:
    """The slot the health probe asked: the one nginx sends requests to (its third word)."""
    words = fact.stdout.split()
    return cfg.health.slot(words[2] if len(words) > 2 else "a")


def api_health(fact: ProbeResult, cfg: CheckConfig, fix: dict[str, str]) -> Check:
    words = fact.stdout.split()
    code, seconds = (words + ["", ""])[:2]
    url = cfg.health.url(live_slot(fact, cfg).name)
    if code == "200":
        return Check("api health", PASS, f"{url} 200 in {_float(seconds):.3f}s")
    seen = "no answer" if code in ("", "000") else f"HTTP {code}"
    return Check("api health", FAIL, f"{url}: {seen}", fix["api health"])


def database(fact: ProbeResult, cfg: CheckConfig, fix: dict[str, str]) -> Check:
    """The probe answers as pg_isready would (scripts/monitor-check.sh): 0 accepting,
    1 rejecting (starting up, shutting down), 2 no response or the container not running."""
    elsewhere = database_location.elsewhere(fact)
    lines = fact.stdout.strip().splitlines()[1 if elsewhere else 0:]
    said, name = (lines[0].strip() if lines else ""), (f"{elsewhere} (roles.db)" if elsewhere else cfg.db_container)
    if fact.ok:
        return Check("database", PASS, f"{name}: accepting connections")
    reason = said or {1: "rejecting connections", 2: "no response", 124: "no answer within 5s"}.get(fact.status, f"exit {fact.status}")
    remedy = (f"`monitor.check` on the db host ({elsewhere}) and the private network between them" if elsewhere
              else fix["database"])
    return Check("database", FAIL, f"{name}: {reason}", remedy)


def replication(fact: ProbeResult | None, cfg: CheckConfig, fix: dict[str, str]) -> list[Check]:
    """No row when not asked, nor on a host without the database container (an app host of
    the layout: the database row already says whether a database that should run does)."""
    if fact is None or fact.status == NO_DB_CONTAINER:
        return []
    if not fact.ok:
        return [Check(REPLICATION, FAIL, f"{cfg.db_container}: {_first_line(fact.stdout) or 'psql failed'}", fix["database"])]
    rows = [line.split(maxsplit=4) for line in fact.lines if line.strip()]
    head = rows[0] if rows else []
    if len(head) == 2 and head[0] == "primary" and head[1].isdigit():
        return [_primary(int(head[1]), [r for r in rows if len(r) == 5 and r[0] == "replica"], cfg, fix)]
    if len(head) == 5 and head[0] == "standby":
        return [_standby(head[1], _float(head[2]), _int(head[3]) or 0, head[4], cfg, fix)]
    return [Check(REPLICATION, FAIL, f"cannot read the replication state of {cfg.db_container}", fix["database"])]


def _primary(streaming: int, replicas: list[list[str]], cfg: CheckConfig, fix: dict[str, str]) -> Check:
    """Rows: replica <client_addr> <state> <replay lag s> <bytes behind>. Every replica of
    roles.replica streaming (more is fine), none lagging past the threshold."""
    lag = max((_float(r[3]) for r in replicas), default=0.0)
    behind = max((_int(r[4]) or 0 for r in replicas), default=0)
    limit, expected = cfg.replication_lag_seconds_max, len(cfg.replicas)
    shown = f"{streaming} of {expected} streaming, lag {lag:g} s / {_bytes(behind)} (max {limit} s)"
    measured = {"streaming": streaming, "replicas": expected, "lag_seconds": lag, "lag_bytes": behind}
    remedy = ""
    if streaming < expected:
        # Named by address where client_addr shows one; otherwise (host names, NAT) every replica.
        seen = {r[1] for r in replicas if r[2] == "streaming"}
        missing = [h for h in cfg.replicas if (login := layout.parse_login(h)) is None or login.host not in seen]
        remedy = f"run `fab -H {','.join(missing or cfg.replicas)} db.replica`, then " + fix["replica log"]
    elif lag > limit:
        slow = sorted({r[1] for r in replicas if _float(r[3]) > limit})
        shown += f"; behind: {', '.join(slow)}"
        remedy = fix["replica log"] + ", its disk I/O and the network between the two"
    return Check(REPLICATION, FAIL if remedy else PASS, f"primary: {shown}", remedy, lag, limit, measured)


def _standby(status: str, lag: float, behind: int, sender: str, cfg: CheckConfig, fix: dict[str, str]) -> Check:
    limit = cfg.replication_lag_seconds_max
    source = "no primary" if sender == "-" else f"from {sender}"
    shown = f"standby {status} {source}, lag {lag:g} s / {_bytes(behind)} (max {limit} s)"
    measured = {"lag_seconds": lag, "lag_bytes": behind}
    remedy = ""
    if status != "streaming":
        remedy = (f"read this replica's PostgreSQL log (`docker logs --tail 50 {cfg.db_container}`) and check the primary "
                  "is up; `db.replica` on this host sets streaming up again")
    elif lag > limit:
        remedy = (f"read this replica's PostgreSQL log (`docker logs --tail 50 {cfg.db_container}`), its disk I/O and "
                  "the network to the primary")
    return Check(REPLICATION, FAIL if remedy else PASS, shown, remedy, lag, limit, measured)


def pgbouncer(fact: ProbeResult, cfg: CheckConfig, fix: dict[str, str]) -> Check:
    if fact.ok and fact.stdout.strip() in ("N", "S"):
        return Check("pgbouncer", PASS, f"answers on {cfg.pgbouncer}")
    return Check("pgbouncer", FAIL, f"no PostgreSQL answer on {cfg.pgbouncer}", fix["pgbouncer"])


_HEALTH = re.compile(r"\((healthy|unhealthy|health: starting)\)")


def services(fact: ProbeResult, cfg: CheckConfig, fix: dict[str, str], *, idle: str = "") -> Check:
    """Every container of the project (one-off `run` containers aside): running, and healthy if it
    has a check. The api slot nginx does not send requests to (`idle`) may be stopped: after a
    cutover the old slot is, kept for an instant rollback."""
    try:
        containers = json.loads(fact.stdout) if fact.ok else None
    except ValueError:
        containers = None
    if not isinstance(containers, list):
        return Check("services", FAIL, "Docker is not answering", "start Docker (`sudo systemctl start docker`); then "
                     + fix["services"])
    seen: list[tuple[str, str, str]] = []  # (service, state, health)
    for container in (c for c in containers if isinstance(c, dict)):
        labels = container.get("Labels")
        if not isinstance(labels, dict) or labels.get("com.docker.compose.oneoff") == "True":
            continue
        found = _HEALTH.search(str(container.get("Status", "")))
        seen.append((str(labels.get("com.docker.compose.service", "?")), str(container.get("State", "?")),
                     found.group(1) if found else ""))
    if not seen:
        return Check("services", FAIL, f"no containers of the compose project in {cfg.app_dir}",
                     f"`deploy`, or `docker compose up -d` in {cfg.app_dir}")
    seen.sort()
    kept = {name for name, state, _ in seen if name == idle and state != "running"}
    seen = [(name, "stopped (idle slot)" if name in kept else state, health) for name, state, health in seen]
    down = [f"{name} {state}" for name, state, _ in seen if state != "running" and name not in kept]
    sick = [f"{name} {health}" for name, state, health in seen if state == "running" and health == "unhealthy"]
    starting = [name for name, state, health in seen if state == "running" and health == "health: starting"]
    if down or sick:
        return Check("services", FAIL, ", ".join(down + sick), fix["services"])
    if starting:
        return Check("services", WARN, f"{', '.join(starting)} still starting (health check not passed yet)",
                     "check again in a minute; " + fix["services"])
    return Check("services", PASS, ", ".join(f"{name} {health or state}" for name, state, health in seen))


def disks(fact: ProbeResult, cfg: CheckConfig, fix: dict[str, str]) -> list[Check]:
    """One check per filesystem (paths on the same mount are one check), in the order given."""
    checks: dict[str, Check] = {}
    for line in fact.lines:
        fields = line.split()
        if len(fields) == 2 and fields[1] == "-":
            checks[f"path {fields[0]}"] = Check(f"disk {fields[0]}", FAIL, f"{fields[0]} does not exist", fix["missing path"])
            continue
        if len(fields) != 4 or not (fields[2].isdigit() and fields[3].isdigit()):
            continue
        path, mount, used, available = fields[0], fields[1], int(fields[2]), int(fields[3])
        if mount in checks:
            continue
        size = used + available
        free = available * 100 / size if size else 0.0
        shown = f"{_percent(free, cfg.disk_free_percent_min)} free ({_size(available)} of {_size(size)}; min {cfg.disk_free_percent_min}%)"
        name = f"disk {mount}" + (f" ({path})" if path != mount else "")
        status = PASS if free >= cfg.disk_free_percent_min else FAIL
        checks[mount] = Check(name, status, shown, fix["disk"] if status == FAIL else "", round(free, 1), cfg.disk_free_percent_min)
    if not checks and cfg.disk_paths:
        return [Check("disk", FAIL, "cannot read free space (df answered nothing)", "check the server's mounts (`df -h`)")]
    return list(checks.values())


def memory(fact: ProbeResult, cfg: CheckConfig, fix: dict[str, str]) -> Check:
    values = {line.split(":")[0]: _int(line.split()[1]) for line in fact.lines if len(line.split()) >= 2}
    total, available = values.get("MemTotal"), values.get("MemAvailable")
    if not total or available is None:
        return Check("memory", FAIL, "cannot read /proc/meminfo", fix["memory"])
    used = (total - available) * 100 / total
    shown = f"{_percent(used, cfg.memory_used_percent_max)} used of {_size(total)} (max {cfg.memory_used_percent_max}%)"
    status = PASS if used <= cfg.memory_used_percent_max else FAIL
    return Check("memory", status, shown, fix["memory"] if status == FAIL else "", round(used, 1), cfg.memory_used_percent_max)


def cpu_busy_percent(first: str, second: str) -> float | None:
    """Busy share between two /proc/stat "cpu" lines (steal counts as busy: the VM could not use it). Pure."""
    a, b = _cpu_fields(first), _cpu_fields(second)
    if a is None or b is None:
        return None
    delta = [y - x for x, y in zip(a, b, strict=False)]
    idle = delta[3] + (delta[4] if len(delta) > 4 else 0)  # idle + iowait
    total = sum(delta[:8])  # guest time is already inside user and nice
    return None if total <= 0 else max(0.0, (total - idle) * 100 / total)


def cpu(fact: ProbeResult, cfg: CheckConfig, fix: dict[str, str]) -> Check:
    """Sustained = busy over the sample AND over the last minute (load average per CPU): a
    spike alone is not sustained (the sample spans the check's own probes, a few tens of
    ms of CPU), nor is a load of tasks waiting on I/O while the CPUs idle."""
    lines = fact.lines
    stat = [line for line in lines if line.startswith("cpu ")]
    loadavg = next((line.split() for line in lines if re.match(r"^\d+\.\d+ ", line)), None)
    cpus = next((_int(line.split()[1]) for line in lines if line.startswith("cpus ") and len(line.split()) == 2), 0)
    window = next((_int(line.split()[1]) for line in lines if line.startswith("window ") and len(line.split()) == 2), None)
    busy = cpu_busy_percent(*stat[:2]) if len(stat) >= 2 else None
    if busy is None or not loadavg or not cpus:
        return Check("cpu", WARN, "no CPU sample (window too short or /proc unreadable)", fix["cpu"])
    load = _float(loadavg[0]) * 100 / cpus
    limit = cfg.cpu_percent_max
    shown = (f"{_percent(busy, limit)} busy over {window or cfg.cpu_sample_ms} ms, load {_percent(load, limit)} of {cpus} CPUs "
             f"over 1 min (max {limit}%)")
    status = FAIL if busy > limit and load > limit else PASS
    return Check("cpu", status, shown, fix["cpu"] if status == FAIL else "", round(min(busy, load), 1), limit)


def certificate_expiry(text: str) -> datetime | None:
    """openssl x509 -enddate's "notAfter=Mar  1 12:00:00 2027 GMT" as a UTC time. Pure."""
    value = text.strip().partition("notAfter=")[2]
    try:
        return datetime.strptime(" ".join(value.split()), "%b %d %H:%M:%S %Y %Z").replace(tzinfo=UTC)
    except ValueError:
        return None


def certificate(fact: ProbeResult, cfg: CheckConfig, fix: dict[str, str], now: int | None) -> Check:
    if fact.status == NO_CERTIFICATE:
        status = FAIL if cfg.certificate_missing == FAIL else WARN
        return Check("certificate", status, f"no certificate yet at {cfg.cert_file}", fix["no certificate"])
    expires = certificate_expiry(fact.stdout) if fact.ok else None
    if expires is None or now is None:
        return Check("certificate", FAIL, f"cannot read {cfg.cert_file}", "run monitor.check with passwordless sudo; "
                     + fix["certificate"])
    days = int((expires.timestamp() - now) // 86400)
    when = expires.strftime("%Y-%m-%d")
    shown = (f"expired {-days} day(s) ago ({when})" if days < 0 else f"{days} days left (until {when}; min {cfg.certificate_days_min})")
    status = PASS if days >= cfg.certificate_days_min else FAIL
    return Check("certificate", status, shown, fix["certificate"] if status == FAIL else "", days, cfg.certificate_days_min)


def backup_age(fact: ProbeResult, cfg: CheckConfig, fix: dict[str, str], now: int | None) -> Check:
    """The newest good dump: db_*.dump with its .sha256, not recorded as failing verification."""
    if fact.status == NO_BACKUP_DIR:
        return Check("backup age", FAIL, f"no backup directory {cfg.backup_dir}", fix["no backup dir"])
    found = [b for b in backups.parse_list(fact.stdout) if b.name.endswith(".dump") and not backups.is_data(b.name)]
    good = [b for b in found if b.has_checksum and not b.verification.startswith("failed ")]
    limit = cfg.backup_age_hours_max
    if not good:
        bad = f" ({len(found)} without a .sha256 or failing verification)" if found else ""
        return Check("backup age", FAIL, f"no good database backup in {cfg.backup_dir}{bad}", fix["backup age"], None, limit)
    newest = max(good, key=lambda b: (b.when, b.name))
    hours = max(0.0, ((now or 0) - newest.when.timestamp()) / 3600)
    shown = f"{newest.name}, {_age(hours)} old (max {limit}h)"
    status = PASS if hours <= limit else FAIL
    return Check("backup age", status, shown, fix["backup age"] if status == FAIL else "", round(hours, 1), limit)


# -- output -------------------------------------------------------------------------

_COLOURS = {PASS: "32", WARN: "33", FAIL: "31"}


def table(checks: list[Check], *, colour: bool = False) -> list[str]:
    """One line per check for people; a remedy line under each that does not pass."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for check in checks:
        label = check.status.upper() if check.status == FAIL else check.status
        if colour:
            label = f"\033[{_COLOURS[check.status]}m{label:<4}\033[0m"
        lines.append(f"  {label:<4}  {check.name:<{width}}  {check.detail}")
        if check.status != PASS and check.remedy:
            lines.append(f"  {'':<4}  {'':<{width}}  -> {check.remedy}")
    return lines


def json_lines(checks: list[Check], host: str) -> list[str]:
    """One JSON object per check (the tool's --json convention: one object per line)."""
    return [json.dumps({"host": host, "check": c.name,
                        **{k: v for k, v in asdict(c).items() if k not in ("name", "measured")}, **c.measured})
            for c in checks]


def counts(checks: list[Check]) -> dict[str, int]:
    return {status: sum(1 for c in checks if c.status == status) for status in (PASS, WARN, FAIL)}


# -- helpers ------------------------------------------------------------------------


def _cpu_fields(line: str) -> list[int] | None:
    fields = line.split()
    if len(fields) < 5 or fields[0] != "cpu" or not all(f.isdigit() for f in fields[1:]):
        return None
    return [int(f) for f in fields[1:]]


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def _percent(value: float, limit: float) -> str:
    """Whole percent, but a tenth near the limit: "80% used (max 80%)" must not fail unexplained."""
    return f"{value:.1f}%" if abs(value - limit) < 1 else f"{value:.0f}%"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:160] if lines else ""


def _size(kib: int) -> str:
    gib = kib / (1024 * 1024)
    return f"{gib:.1f} GiB" if gib >= 1 else f"{kib / 1024:.0f} MiB"


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def _age(hours: float) -> str:
    return f"{hours * 60:.0f}m" if hours < 1 else f"{hours:.1f}h"
