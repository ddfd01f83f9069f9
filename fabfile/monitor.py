"""monitor: is the service healthy now, and did a release hold.

Runbook:
    monitor.check [--json]       the plan's health thresholds in ONE round trip
                                 (scripts/monitor-check.sh runs every probe in parallel):
                                 the live api slot's /health 200, PostgreSQL accepting connections,
                                 PgBouncer answering, every compose service running and
                                 healthy, disk free, memory used, CPU sustained,
                                 certificate days left, age of the newest good backup;
                                 with roles.replica, streaming replication where the
                                 database runs (primary: every replica streaming, lag
                                 within thresholds.replication_lag_seconds_max; standby:
                                 its own stream and lag; no row on a host without it).
                                 A table for people (colour only on a terminal), one
                                 JSON object per check with --json; exit 1 when any
                                 check fails, each failure with its remedy. Thresholds
                                 come from settings (thresholds.*, monitor.*), checked
                                 before connecting. From cron, CI, a laptop (fab -H) or
                                 the server itself (`inv monitor.check`).
    monitor.watch --minutes N    after a deploy: nginx's 5xx share and /health for N
                                 minutes in one round trip, a line per interval as it
                                 happens; exit 1 as soon as the error rate or a /health
                                 outage longer than its grace says the release did not
                                 hold (core/watch.py; `release` calls watch() itself)
    monitor.stack                Prometheus, Grafana and the exporters (fabfile/monitoring_stack.py)
"""

from __future__ import annotations

import json
import os
import sys
import time

from invoke import Collection

from .core import checks, redact
from .core import watch as watching
from .core.errors import OpsError, UsageError
from .core.fleet import READS
from .core.task import ops_task
from .monitoring_stack import stack_task

MAX_MINUTES = 240


def say(line: str) -> None:
    print(redact.redact(line), flush=True)


def colour_wanted() -> bool:
    """Colour for a person at a terminal; never for cron, CI or a pipe (nor with NO_COLOR)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def trips(count: int) -> str:
    return f"{count} round trip{'' if count == 1 else 's'}"


@ops_task(name="check", fleet=READS)
def check(ops):
    """Every health threshold of the plan in one round trip; exit 1 if any check fails."""
    cfg = checks.CheckConfig.from_settings(ops.settings)
    started = time.monotonic()
    found = checks.read(ops.target, cfg, replication=cfg.replication)
    seconds = time.monotonic() - started
    counts = checks.counts(found)
    if ops.json:
        for line in checks.json_lines(found, ops.where):
            say(line)
        say(json.dumps({"host": ops.where, "summary": counts, "seconds": round(seconds, 3), "round_trips": ops.round_trips}))
    else:
        for line in checks.table(found, colour=colour_wanted()):
            say(line)
        say(f"{ops.where}: {counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail "
            f"in {seconds:.1f}s ({trips(ops.round_trips)})")
    failed = [c.name for c in found if c.status == checks.FAIL]
    if failed:
        raise OpsError(f"{len(failed)} of {len(found)} checks fail on {ops.where}: {', '.join(failed)}",
                       "each one's remedy is " + ("in its JSON object" if ops.json else "shown above"))


def validate_minutes(minutes) -> float:
    try:
        value = float(minutes)
    except (TypeError, ValueError):
        value = -1.0
    if not 0 < value <= MAX_MINUTES:
        raise UsageError(f"--minutes must be a number above 0 and at most {MAX_MINUTES}, got '{minutes}'",
                         "e.g. --minutes 5 (or 0.5)")
    return value


@ops_task(name="watch", help={"minutes": "how long to watch, in minutes (default 5; 0.5 is 30 s)"})
def watch(ops, minutes="5"):
    """After a deploy: nginx's 5xx share and /health for N minutes; exit 1 when the release does not hold."""
    minutes = validate_minutes(minutes)
    cfg = watching.WatchConfig.from_settings(ops.settings)
    rule = (f"5xx above {cfg.error_rate_percent_max}% of at least {cfg.error_rate_min_requests} requests, "
            f"or /health failing for {cfg.health_grace_seconds}s")
    if ops.dry:
        ops.reporter.info(f"  would watch {cfg.access_log} and {cfg.health.describe()} on {ops.where} for {minutes:g} min "
                          f"(every {cfg.interval}s); it fails on {rule}")
        return
    if not ops.json:
        say(f"  watching {ops.where} for {minutes:g} min, every {cfg.interval}s: fails on {rule}")

    def show(sample: watching.Sample, judge: watching.Judge) -> None:
        if ops.json:
            say(json.dumps({"host": ops.where, "elapsed": sample.elapsed, "requests": sample.requests,
                            "errors": sample.errors, "health": sample.health}))
            return
        rate = f"{judge.errors * 100 / judge.requests:5.1f}%" if judge.requests else "    -"
        say(f"  {sample.elapsed // 60}:{sample.elapsed % 60:02d}  {sample.requests:>5} requests  {sample.errors:>4} 5xx  "
            f"(so far {judge.errors}/{judge.requests} {rate})  /health {sample.health}")

    verdict = watching.watch(ops.target, cfg, minutes, on_sample=show)
    if ops.json:
        say(json.dumps({"host": ops.where, "watch": "pass" if verdict.passed else "fail", "reason": verdict.reason,
                        "elapsed": verdict.elapsed, "requests": verdict.requests, "errors": verdict.errors,
                        "error_rate": round(verdict.error_rate, 2), "unhealthy_samples": verdict.unhealthy_samples,
                        "round_trips": ops.round_trips}))
    if not verdict.passed:
        api = cfg.health.slot(verdict.slot).service
        raise OpsError(f"the release did not hold on {ops.where} (after {verdict.elapsed}s): {verdict.reason}",
                       f"read the api's logs (`docker compose logs --tail 100 {api}`) and nginx's error log; "
                       "`rollback` puts the previous release back")
    if not ops.json:
        say(f"{ops.where}: watch passed after {verdict.elapsed}s: {verdict.reason} ({trips(ops.round_trips)})")


ns = Collection("monitor")
ns.add_task(check, name="check")
ns.add_task(watch, name="watch")
ns.add_task(stack_task, name="stack")
