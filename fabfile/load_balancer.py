"""lb: the load balancer's app hosts, one at a time (roles.lb in front of roles.app).

Runbook (`fab lb.out --host 10.0.0.12`, with roles.lb and roles.app set; every command
runs on the lb host, its facts in one round trip):
    lb.status             each app host: in or out, and what its lb port answers the lb
                          (/health on lb.backend_port, as the lb's own requests go)
    lb.out --host ADDR    ADDR marked `down` in the lb's upstream, `nginx -t`, a graceful
                          reload: no new request reaches it, those it is serving finish (the
                          old workers drain, bounded by worker_shutdown_timeout). Refused
                          (exit 1, nothing changed) when no other app host is in and answers
                          200: nothing would serve.
    lb.in --host ADDR     the lb asks ADDR for /health first: anything but 200 is exit 1 and
                          ADDR stays out; then it is back in.
`nginx` keeps a host that is out, out (core/balancer.py reads the marks back).
"""

from __future__ import annotations

import json
import shlex

from invoke import Collection

from .core import balancer, layout, remote, slots
from .core.batch import gather
from .core.errors import OpsError, UsageError
from .core.steps import Reporter, apply_steps
from .core.target import Target, connect_to
from .core.task import ops_task
from .nginx import lb_upstream_step

IN, OUT = "in", "out"


def the_lb(ops) -> tuple[Target, balancer.Balancing]:
    """A connection to the lb host and the layout's balancing; refused before connecting without one."""
    members = layout.check(ops.settings.get("roles") or {})
    lb = next((m for m in members if balancer.LB in m.roles), None)
    if lb is None:
        raise UsageError("lb.* needs the layout's load balancer: roles.lb and roles.app",
                         "set COACHNTT_ROLES__LB=user@host and COACHNTT_ROLES__APP=user@host,...")
    port = int(ops.settings.require("lb.backend_port"))
    balancing = balancer.balancing(members, lb.login.host, lb.login.port, port)
    return connect_to(ops.context, ops.settings, lb.login.login), balancing


def chosen(balancing: balancer.Balancing, host: str) -> str:
    if host not in balancing.apps:
        raise UsageError(f"--host must be one of roles.app ({', '.join(balancing.apps)}), got '{host}'",
                         "name the app host by its address in roles.app")
    return host


def probes(ops, balancing: balancer.Balancing) -> dict[str, str]:
    """The include as it is, and each app host's /health asked from the lb."""
    domain = shlex.quote("Host: " + ops.settings.require("domains.api"))
    asked = {f"health{index}": f"curl -s -o /dev/null -w '%{{http_code}}' -m 3 -H {domain} "
                               f"http://{address}:{balancing.port}/health" for index, address in enumerate(balancing.apps)}
    return {**remote.file_probes(slots.UPSTREAM_FILE), **asked}


def states(facts, balancing: balancer.Balancing) -> dict[str, tuple[str, str]]:
    """address -> (in|out, the HTTP status its /health gave the lb, 000 for none). Pure."""
    if not facts["content"].ok:
        raise OpsError("the lb host has no api upstream for the app hosts yet", "run `fab nginx` with roles.lb and roles.app set")
    down = balancer.taken_out(facts["content"].stdout)
    return {a: (OUT if a in down else IN, facts[f"health{i}"].stdout.strip() or "000") for i, a in enumerate(balancing.apps)}


def move(ops, host: str, *, leaving: bool) -> None:
    target, balancing = the_lb(ops)
    address = chosen(balancing, host)
    facts = gather(target, probes(ops, balancing))
    now = states(facts, balancing)
    reporter = Reporter(target.label, json=ops.json, show_diff=ops.diff)
    out = {a for a, (state, _) in now.items() if state == OUT}
    if leaving:
        serving = [a for a, (state, health) in now.items() if a != address and state == IN and health == "200"]
        if address not in out and not serving:
            raise OpsError(f"{address} is the last app host in the load balancer that answers; nothing else would serve",
                           "put another app host in first (lb.in --host ADDRESS)")
        out.add(address)
    else:
        health = now[address][1]
        if health != "200":
            raise OpsError(f"{address} answers the load balancer {health} on /health, not 200; it stays out",
                           "check its api and nginx (monitor.check on it), then rerun lb.in")
        out.discard(address)
    step = lb_upstream_step(ops.settings, balancing, out=frozenset(out), name=f"{address} {OUT if leaving else IN}")
    # Planned from the facts read above: one round trip to look, one to change.
    apply_steps(target, [(step, step.plan(facts))], reporter, dry=ops.dry)
    reporter.summary(target.round_trips)


@ops_task(name="out", help={"host": "the app host's address, as in roles.app"})
def take_out(ops, host=""):
    """Take an app host out of the load balancer: no new requests, the running ones finish."""
    move(ops, host, leaving=True)


@ops_task(name="in", help={"host": "the app host's address, as in roles.app"})
def put_in(ops, host=""):
    """Put an app host back into the load balancer once it answers /health 200."""
    move(ops, host, leaving=False)


@ops_task
def status(ops):
    """Each app host: in or out of the load balancer, and its /health as the lb sees it."""
    target, balancing = the_lb(ops)
    now = states(gather(target, probes(ops, balancing)), balancing)
    for address, (state, health) in now.items():
        if ops.json:
            print(json.dumps({"host": address, "lb": state, "health": health}))
        else:
            print(f"  {address:<18} {state:<4} /health {health}")
    if not any(state == IN and health == "200" for state, health in now.values()):
        raise OpsError("no app host is in the load balancer and answering", "lb.in --host ADDRESS once one answers")


ns = Collection("lb")
ns.add_task(take_out)
ns.add_task(put_in)
ns.add_task(status)
