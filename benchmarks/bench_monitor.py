#!/usr/bin/env python3
"""monitor.check against the same health checks done the usual ways, through a latency relay.

    python3 benchmarks/bench_monitor.py --install-tools     # first time: pyinfra, ansible-core (as bench_facts)
    python3 benchmarks/bench_monitor.py [--rtt 50] [--repeat 5] [--json] [--save FILE]    # as root

Boots one `provisioned` sandbox host of its own, deploys examples/app on it behind
nginx with a backup (as tests/integration/test_monitor.py does), puts bench_facts'
latency relay in front of its sshd and times, round robin, connect to close:

    coachntt-ops monitor.check      RemoteTarget + core/checks.read: scripts/monitor-check.sh, one command
    fab monitor.check (CLI)         the real command line, Python start-up included
    Fabric run() per check          one Connection.run() per check, as a typical fabfile
    pyinfra facts per check         a deploy file reading one `Command` fact per check
    Ansible playbook                one `shell` task per check, pipelining on

Every contender runs the same checks with the same shell (monitor_contenders.py:
check_commands() mirrors the probes of scripts/monitor-check.sh), and each run's
answers are judged by core/checks.evaluate: a contender whose verdicts differ from
ours fails the run. --slope adds a pass at twice the RTT (round trips really waited for).
The host is torn down at the end, also on failure or Ctrl-C. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

from bench_facts import DEFAULT_TOOLS_DIR, install_tools, log, machine
from monitor_contenders import (
    REFERENCE,
    AnsibleChecks,
    CoachnttCheck,
    CoachnttCli,
    FabricPerCheck,
    PyinfraFacts,
    check_commands,
    check_config,
)

import endpoint as ep
from contenders import Contender, ContenderFailed, Outcome, Unavailable, last_lines
from fabfile import sandbox
from fabfile.sandbox import example_repo, images, rehearsal

PROJECT_DIR = ep.PROJECT_DIR
BIN = Path(sys.executable).parent
USER = "coachntt"
TARGET_SECONDS, TARGET_RATIO = 0.75, 3.0
SSH_WAIT = 120


class BenchError(Exception):
    """The host could not be made ready: one line, the run stops (host torn down)."""


# --------------------------------------------------------------------------- the host


def fab(host: sandbox.Host, env: dict, *args: str, user: str = USER, ok=(0,)) -> str:
    command = [str(BIN / "fab"), "-H", f"{user}@{host.ip}", "-i", str(host.key), *args]
    result = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=1800, env={**os.environ, **env})
    if result.returncode not in ok:
        raise BenchError(f"`fab {' '.join(args)}` exited {result.returncode}: {last_lines(result.stderr, 2)}")
    return result.stdout


@contextlib.contextmanager
def bench_host(reuse: str | None) -> Iterator[sandbox.Host]:
    """`reuse` if named (left running), else a host of our own, torn down after: this one only."""
    if reuse:
        host = sandbox.get_host(reuse)
        ep.require_sandbox_address(host.ip)
        yield host
        return
    name = f"mon{os.getpid() % 100000}"
    try:
        # A shared machine can be slow to boot a guest: wait for its sshd longer than the default.
        host = sandbox.up(name, flavour="provisioned", wait=SSH_WAIT)
        ep.require_sandbox_address(host.ip)
        yield host
    finally:
        sandbox.down(name)  # never down_all: other people's hosts may run


def deploy_app(host: sandbox.Host, served: Path) -> None:
    """examples/app as the integration tests deploy it, then nginx and one good backup."""
    images.load_images(host, log=log)
    rehearsal.put_overrides(host)
    sha = example_repo.make_example_repo(served / "app")
    with example_repo.GitDaemon(served) as git:
        env = {"COACHNTT_APP__REPO": git.url("app"), "COACHNTT_APP__COMPOSE_OVERRIDES": rehearsal.APP_OVERRIDE,
               "COACHNTT_APP__HEALTH_DEADLINE": "60"}
        fab(host, env, "secure", user="root")
        # nginx first: a release switches nginx between the api's slots and refuses without it.
        for args in (("nginx",), ("deploy.setup",), ("deploy", "--sha", sha), ("backup.now",)):
            fab(host, env, *args)
    deadline = time.monotonic() + 120
    while True:  # every container past its first health check
        code, out = sandbox.console(host.name, "docker ps --format '{{.Status}}'")
        if code == 0 and out.strip() and all("(healthy)" in line for line in out.splitlines()):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"the app did not settle: {out.strip()}")
        time.sleep(1)


# --------------------------------------------------------------------------- measuring


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rtt", type=float, default=50.0, help="round-trip time the relay adds, ms (default 50)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per contender; the median is reported")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--save", metavar="FILE", type=Path, help="also write the JSON object to FILE")
    parser.add_argument("--host", metavar="NAME", help="reuse this running sandbox host with the app deployed (left running)")
    parser.add_argument("--wait-for-load", metavar="LOAD", type=float,
                        help="before timing, wait (at most 60 min) until this machine's 1-minute load is below LOAD")
    parser.add_argument("--slope", action="store_true",
                        help="a second pass at 2x RTT: (seconds at 2x - seconds) / RTT = round trips each run waited for")
    parser.add_argument("--only", metavar="TEXT", action="append", default=[],
                        help="run only contenders whose name contains TEXT (repeatable); ours always runs")
    parser.add_argument("--tools-dir", type=Path, default=DEFAULT_TOOLS_DIR, help="venvs of pyinfra and ansible-core")
    parser.add_argument("--install-tools", action="store_true", help="pip install pyinfra and ansible-core into --tools-dir first")
    args = parser.parse_args(argv)
    if not 1 <= args.repeat <= 50:
        parser.error("--repeat must be between 1 and 50")
    if not 0 < args.rtt <= 1000:
        parser.error("--rtt must be between 0 and 1000 ms")
    return args


def timed(contender: Contender, endpoint: ep.Endpoint, probes: Mapping[str, str]) -> tuple[float, Outcome]:
    started = time.perf_counter()
    outcome = contender.run(endpoint, probes)
    return time.perf_counter() - started, outcome


def measure(contenders: list[Contender], endpoint: ep.Endpoint, probes: dict[str, str], repeat: int,
            failed: dict[str, str], count: bool = True) -> tuple[dict[str, list[float]], dict[str, int | None]]:
    seconds: dict[str, list[float]] = {}
    trips: dict[str, int | None] = {}
    reference = contenders[0]

    def guarded(contender, action, what):
        try:
            return action()
        except (ContenderFailed, Unavailable, OSError, subprocess.SubprocessError) as exc:
            failed[contender.name] = f"{what} failed: {exc}"
        except Exception as exc:  # a library error: report it, do not hide it
            failed[contender.name] = f"{what} failed: {type(exc).__name__}: {exc}"
        log(f"  {contender.name}: {failed[contender.name]}")
        return None

    alive = lambda: [c for c in contenders if c.name not in failed]  # noqa: E731
    for contender in alive():
        guarded(contender, lambda c=contender: c.run(endpoint, probes), "warm-up")
    for round_number in range(1, repeat + 1):
        for contender in alive():
            outcome = guarded(contender, lambda c=contender: timed(c, endpoint, probes), "run")
            if outcome is None:
                continue
            elapsed, result = outcome
            seconds.setdefault(contender.name, []).append(elapsed)
            trips[contender.name] = result.round_trips
            ours, theirs = getattr(reference, "last", {}), getattr(contender, "last", None)
            if theirs is not None and contender is not reference and theirs != ours:
                failed[contender.name] = f"its verdicts differ from monitor.check's: {theirs} vs {ours}"
                log(f"  {contender.name}: {failed[contender.name]}")
            log(f"  [{endpoint.rtt_ms:g} ms, {round_number}/{repeat}] {contender.name:<52} {elapsed:6.2f}s")
    for contender in alive() if count else []:
        if trips.get(contender.name) is None:
            trips[contender.name] = guarded(contender, lambda c=contender: c.count_round_trips(endpoint, probes), "counting run")
    return seconds, trips


def load_average() -> float:
    """This machine's 1-minute load: every contender's seconds depend on it (2 shared cores)."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_for_load(limit: float | None, most: float = 3600) -> None:
    """Let the host's own deploy and other work on this machine calm down first (bounded)."""
    if limit is None:
        return
    deadline = time.monotonic() + most
    while (load := load_average()) >= limit and time.monotonic() < deadline:
        log(f"  waiting for this machine's 1-minute load ({load}) to fall below {limit}")
        time.sleep(30)


def report(args, contenders, seconds, trips, relay, failed, not_run, verdict_names, doubled=None) -> dict:
    rows = []
    for contender in contenders:
        runs = seconds.get(contender.name)
        if contender.name in failed or not runs:
            continue
        rows.append({"contender": contender.name, "version": contender.version(), "seconds": round(statistics.median(runs), 3),
                     "seconds_runs": [round(s, 3) for s in runs], "round_trips": trips.get(contender.name),
                     "round_trips_how": contender.how_counted})
        if doubled and doubled.get(contender.name):
            at_double = statistics.median(doubled[contender.name])
            rows[-1]["seconds_at_double_rtt"] = round(at_double, 3)
            rows[-1]["rtts_paid"] = round((at_double - rows[-1]["seconds"]) / (args.rtt / 1000), 1)
    ours = next((r["seconds"] for r in rows if r["contender"] == REFERENCE), None)
    for row in rows:
        row["ratio"] = round(row["seconds"] / ours, 2) if ours else None
    others = [r for r in rows if r["contender"] != REFERENCE and not r["contender"].startswith("fab monitor.check")]
    next_best = min(others, key=lambda r: r["seconds"]) if others else None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "load_1min_during": args.loads},
        "rtt_ms": args.rtt,
        "relay_measured": relay,
        "checks": verdict_names,
        "repeat": args.repeat,
        "results": rows,
        "target": {"seconds_max": TARGET_SECONDS, "ratio_min": TARGET_RATIO, "ours": ours,
                   "next_best": next_best["contender"] if next_best else None,
                   "next_best_ratio": next_best["ratio"] if next_best else None,
                   "met": bool(ours is not None and ours <= TARGET_SECONDS and next_best and next_best["ratio"] >= TARGET_RATIO)},
        "not_run": [{"contender": name, "reason": reason} for name, reason in {**not_run, **failed}.items()],
    }


def print_table(result: dict) -> None:
    relay = result["relay_measured"]
    print(f"monitor.check's {len(result['checks'])} checks on one host over SSH, relay RTT {result['rtt_ms']:g} ms "
          f"(measured: ssh ping {relay['ping_ms']} ms); median of {result['repeat']}, connection setup included; "
          f"{result['machine']['cores']} cores (1-minute load {'/'.join(str(x) for x in result['machine']['load_1min_during'])} "
          f"before/after the timed runs), {result['date']}")
    print()
    double = f"at {2 * result['rtt_ms']:g}ms"
    header = f"{'contender':<52} {'seconds':>8} {'round trips':>12} {'ratio':>7} {double:>9} {'RTTs paid':>10}"
    print(header)
    print("-" * len(header))
    for row in result["results"]:
        trips = "?" if row["round_trips"] is None else str(row["round_trips"])
        at_double = f"{row['seconds_at_double_rtt']:.2f}" if "seconds_at_double_rtt" in row else "-"
        paid = f"{row['rtts_paid']:.1f}" if "rtts_paid" in row else "-"
        print(f"{row['contender']:<52} {row['seconds']:>8.2f} {trips:>12} {row['ratio'] or 0:>7.1f} {at_double:>9} {paid:>10}")
    print()
    target = result["target"]
    print(f"target: monitor.check <= {target['seconds_max']} s and >= {target['ratio_min']:g}x faster than the next best: "
          f"{target['ours']} s, {target['next_best']} {target['next_best_ratio']}x -> {'MET' if target['met'] else 'NOT MET'}")
    for row in result["results"]:
        version = f" [{row['version']}]" if row["version"] else ""
        print(f"  {row['contender']}: {row['round_trips_how']}{version}")
    for item in result["not_run"]:
        print(f"NOT RUN   {item['contender']}: {item['reason']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("run as root: the sandbox host is a systemd-nspawn machine")
        return 2
    if args.install_tools:
        install_tools(args.tools_dir)
    cfg = check_config()
    probes = check_commands(cfg)
    contenders: list[Contender] = [CoachnttCheck(cfg), CoachnttCli(), FabricPerCheck(cfg),
                                   PyinfraFacts(args.tools_dir, cfg), AnsibleChecks(args.tools_dir, cfg)]
    if args.only:
        contenders = [c for c in contenders if c.name == REFERENCE or any(t.lower() in c.name.lower() for t in args.only)]
    failed: dict[str, str] = {}
    not_run: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="coachntt-bench-monitor.") as tmp:
        workdir = Path(tmp)
        for contender in list(contenders):
            try:
                contender.prepare(workdir, probes)
            except Unavailable as exc:
                not_run[contender.name] = str(exc)
                contenders.remove(contender)
                log(f"  {contender.name}: not run: {exc}")
        doubled = None
        try:
            with bench_host(args.host) as host:
                log(f"host {host.name} ({host.ip})")
                if not args.host:
                    (workdir / "served").mkdir()
                    deploy_app(host, workdir / "served")
                with ep.relayed_endpoint(host, args.rtt, workdir) as relayed:
                    endpoint = replace(relayed, user=USER)
                    relay = ep.measure_rtt(endpoint)
                    log(f"relay 127.0.0.1:{endpoint.port} -> {host.ip}:22 at {args.rtt:g} ms: ssh ping {relay['ping_ms']} ms")
                    wait_for_load(args.wait_for_load)
                    args.loads = [load_average()]
                    seconds, trips = measure(contenders, endpoint, probes, args.repeat, failed)
                    args.loads.append(load_average())
                if args.slope:
                    with ep.relayed_endpoint(host, 2 * args.rtt, workdir) as relayed:
                        doubled, _ = measure(contenders, replace(relayed, user=USER), probes, args.repeat, failed, count=False)
        except (BenchError, sandbox.SandboxError) as exc:
            log(f"error: {exc}")
            return 1
    result = report(args, contenders, seconds, trips, relay, failed, not_run, contenders[0].names, doubled)
    if args.save:
        args.save.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
