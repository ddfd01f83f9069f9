"""release over several app hosts behind the load balancer: one host at a time.

Runbook (`fab release --sha SHA` with roles.lb and roles.app set, and no -H; with -H the
release runs on the hosts given, as on a single VPS):
    0. preflight     --sha is required (every host gets the same commit); the layout is
                     checked before any connection; every app host must be in the load
                     balancer and answer it /health 200 (lb.status's facts, one round
                     trip), else exit 1 and nothing changes
    for each app host, in roles.app order: the first alone, then release.roll_parallel
    (default 1) at a time, each batch released at once over its own connections:
    1. out           the host leaves the load balancer (lb.out: graceful reload, the
                     requests it is serving finish; the others take the new ones)
    2. release       `release --sha SHA` on that host, its whole checklist: backup, staging,
                     deploy (the first host runs the migrations, the others find them
                     applied), verify, watch, drain; rolled back on that host if any phase fails.
                     A database shared on roles.db is backed up once, by the first host's
                     release (on the db host, verified there), before its migrations; the
                     hosts after it keep that backup in their log entries
    3. in            back into the load balancer once it answers the lb /health 200
    A host that fails stops the roll and stays out of the load balancer (its own release
    put the old one back there; the others of its batch finish and go back in); hosts not
    reached keep the old release; the hosts done keep the new one (release.roll_failure:
    keep) or go back one at a time the same way, out, `rollback`, in (rollback). A table shows each host's state; exit 1 when it stopped.
    --dry: each host's release plan from its own facts, after the preflight; nothing moves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import load_balancer
from .core import balancer, layout, redact
from .core import fleet as fleets
from .core.batch import gather
from .core.errors import OpsError, UsageError
from .core.task import Ops, ops_at
from .rollback import rollback

RELEASED, FAILED, ROLLED_BACK, NOT_STARTED = "released", "failed", "rolled back", "not started"
KEEP, ROLLBACK = "keep", "rollback"


@dataclass
class HostRoll:
    address: str
    login: str
    state: str = NOT_STARTED
    seconds: float = 0.0
    why: str = ""


def applies(ops) -> bool:
    """A rolling release: roles name an lb and app hosts, and no -H picked hosts."""
    if getattr(ops.context, "host", None):
        return False
    given = layout.role_hosts(ops.settings.get("roles") or {})
    return bool(given.get(balancer.LB) and given.get(balancer.APP))


def roll(ops, sha: str, release_here: Callable[..., str], **release_args) -> None:
    """Release `sha` on every app host in turn, each out of the load balancer meanwhile."""
    if not sha:
        raise UsageError("a rolling release needs --sha: every app host must get the same commit",
                         "rerun with --sha SHA (the tip of app.branch: git rev-parse origin/main)")
    on_failure = ops.settings.require("release.roll_failure")
    members = layout.check(ops.settings.get("roles") or {})
    target, balancing = load_balancer.the_lb(ops)
    by_address = {balancer.private_address(m, "roles.app"): m.login.login for m in members if balancer.APP in m.roles}
    hosts = [HostRoll(address, by_address[address]) for address in balancing.apps]

    # Preflight: the layout serves now, on every app host, or nothing starts.
    now = load_balancer.states(gather(target, load_balancer.probes(ops, balancing)), balancing)
    unwell = [f"{a} ({state}, /health {health})" for a, (state, health) in now.items() if (state, health) != ("in", "200")]
    if unwell:
        raise OpsError(f"not every app host is in the load balancer and answering: {', '.join(unwell)}; nothing was changed",
                       "put them back first (lb.in --host ADDRESS, see lb.status), then rerun the release")
    ops.reporter.info(f"rolling release of {sha[:12]} over {len(hosts)} app hosts, one at a time")
    if ops.dry:
        # Each host's own plan from its facts; nothing is taken out, nothing changes.
        for host in hosts:
            with ops_at(ops.context, host.login, ops.settings, dry=True, json=ops.json) as host_ops:
                release_here(host_ops, sha=sha, **release_args)
        return

    shared_backup = ""

    def release_on(host_ops: Ops) -> None:
        # A database shared on roles.db is backed up (and migrated) by the first host's
        # release; the hosts after it are handed that backup and find the schema current.
        nonlocal shared_backup
        shared_backup = release_here(host_ops, sha=sha, shared_backup=shared_backup, **release_args) or shared_backup

    failed: list[HostRoll] = []
    for batch in batches(hosts, int(ops.settings.require("release.roll_parallel"))):
        failed = release_batch(ops, batch, release_on)
        if failed:
            break
    stopped = failed[0] if failed else None
    if stopped and on_failure == ROLLBACK:
        for host in [h for h in hosts if h.state == RELEASED]:
            try:
                through_host(ops, host, rollback_here)
                host.state = ROLLED_BACK
            except OpsError as exc:
                host.why = f"rollback failed: {exc.one_line()}"
    show(ops, hosts, sha)
    if stopped:
        raise OpsError(redact.redact(f"the rolling release stopped at {stopped.address}: {stopped.why}"),
                       f"{stopped.address} is out of the load balancer, serving the release before; "
                       "fix it, then lb.in --host it and rerun the release")


def rollback_here(ops) -> None:
    """`rollback` (to the release before) on the host `ops` works on."""
    rollback.body.__wrapped__(ops)


def batches(hosts: list[HostRoll], at_once: int) -> list[list[HostRoll]]:
    """The first host alone (it proves the release, and migrates a shared database, before
    more hosts go out), then `at_once` at a time. Pure. The first host is back in before
    the next batch goes out, so one host always serves."""
    return [hosts[:1]] + [hosts[i:i + at_once] for i in range(1, len(hosts), at_once)]


def release_batch(ops, batch: list[HostRoll], work: Callable[[Ops], None]) -> list[HostRoll]:
    """Out of the load balancer, released, back in; the hosts that failed (they stay out).
    One host runs with its output as it comes; several run at once (core/fleet.run, one
    connection each), each host's output shown after it, in roles.app order."""
    started = time.monotonic()
    if len(batch) == 1:
        try:
            through_host(ops, batch[0], work)
            batch[0].state = RELEASED
        except OpsError as exc:
            batch[0].state, batch[0].why = FAILED, exc.one_line()
    else:
        out = []
        for host in batch:  # one reload each: the lb's include is changed by one writer
            try:
                load_balancer.move(ops, host.address, leaving=True)
                out.append(host)
            except OpsError as exc:
                host.state, host.why = FAILED, exc.one_line()
        members = [layout.Member(layout.parse_login(host.login), (balancer.APP,)) for host in out]

        def on_host(member: layout.Member) -> None:
            with ops_at(ops.context, member.login.login, ops.settings, json=ops.json, diff=ops.diff) as host_ops:
                work(host_ops)

        for host, result in zip(out, fleets.run(members, on_host, parallel=len(members)), strict=True):
            for line in result.output:
                print(line, flush=True)
            if result.status != fleets.OK:
                host.state, host.why = FAILED, result.line
                continue
            try:
                load_balancer.move(ops, host.address, leaving=False)
                host.state = RELEASED
            except OpsError as exc:
                host.state, host.why = FAILED, exc.one_line()
    for host in batch:
        host.seconds = time.monotonic() - started
    return [host for host in batch if host.state == FAILED]


def through_host(ops, host: HostRoll, work: Callable[[Ops], None]) -> None:
    """Out of the load balancer, `work` on the host, back in; a failure leaves it out."""
    load_balancer.move(ops, host.address, leaving=True)
    with ops_at(ops.context, host.login, ops.settings, json=ops.json, diff=ops.diff) as host_ops:
        work(host_ops)
    load_balancer.move(ops, host.address, leaving=False)


def show(ops, hosts: list[HostRoll], sha: str) -> None:
    if ops.json:
        for host in hosts:
            print(json.dumps({"host": host.login, "address": host.address, "roll": host.state, "sha": sha,
                              "seconds": round(host.seconds, 1), "error": redact.redact(host.why)}), flush=True)
        return
    ops.reporter.info(f"  {'HOST':<18} {'STATE':<12} {'TIME':>6}  release {sha[:12]}")
    for host in hosts:
        line = f"  {host.address:<18} {host.state:<12} {host.seconds:5.0f}s"
        ops.reporter.info(line + (f"  {host.why}" if host.why else ""))
