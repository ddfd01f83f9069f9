#!/usr/bin/env python3
"""Round trips and seconds to read N facts from one host, coachntt-ops vs the usual tools.

    python3 benchmarks/bench_facts.py [--rtt 50] [--probes 12] [--repeat 3] [--json]    # as root

Boots one `provisioned` sandbox host (or reuses --host NAME), puts a latency relay in
front of its sshd and connects every contender THROUGH it, so each pays the same RTT.
Each contender is timed end to end (connection setup included), median of --repeat,
at the given RTT and again at twice that RTT: the difference divided by the RTT is how
many round trips each run really waited for ("RTTs paid"), whatever the tool counts.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import endpoint as ep
import workload
from contenders import Contender, ContenderFailed, Unavailable, all_contenders

DEFAULT_TOOLS_DIR = Path(tempfile.gettempdir()) / "coachntt-bench-tools"
TOOL_PACKAGES = {"pyinfra": "pyinfra", "ansible": "ansible-core"}
INSTALL_TIMEOUT = 600
REFERENCE = "coachntt-ops gather"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- arguments and tools


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rtt", type=float, default=50.0, help="round-trip time the relay adds, ms (default 50)")
    parser.add_argument("--probes", type=int, default=12, help="read-only probes per run (default 12)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per contender; the median is reported")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--save", metavar="FILE", type=Path, help="also write the JSON object to FILE")
    parser.add_argument("--host", metavar="NAME", help="reuse this running sandbox host (left running)")
    parser.add_argument("--only", metavar="TEXT", action="append", default=[],
                        help="run only contenders whose name contains TEXT (repeatable); coachntt-ops always runs")
    parser.add_argument("--no-slope", action="store_true", help="skip the pass at 2x RTT (no 'RTTs paid' column)")
    parser.add_argument("--tools-dir", type=Path, default=DEFAULT_TOOLS_DIR,
                        help=f"venvs for pyinfra and ansible-core (default {DEFAULT_TOOLS_DIR})")
    parser.add_argument("--install-tools", action="store_true",
                        help="pip install pyinfra and ansible-core into --tools-dir first (not the project's venv)")
    args = parser.parse_args(argv)
    if not 1 <= args.repeat <= 50:
        parser.error("--repeat must be between 1 and 50")
    if not 0 < args.rtt <= 1000:
        parser.error("--rtt must be between 0 and 1000 ms")
    return args


def install_tools(tools_dir: Path) -> None:
    """One venv per tool under tools_dir, so neither touches the project's dependencies."""
    for venv, package in TOOL_PACKAGES.items():
        target = tools_dir / venv
        if (target / "bin" / "pip").exists():
            log(f"  {package}: venv {target} exists, pip install -U")
        else:
            subprocess.run([sys.executable, "-m", "venv", str(target)], check=True, timeout=INSTALL_TIMEOUT)
        log(f"  pip install {package} into {target} ...")
        result = subprocess.run([str(target / "bin" / "pip"), "install", "-q", "-U", package],
                                capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        if result.returncode != 0:
            log(f"  {package} did not install: {result.stderr.strip().splitlines()[-1:]}")


def selected(contenders: list[Contender], only: list[str]) -> list[Contender]:
    if not only:
        return contenders
    return [c for c in contenders if c.name == REFERENCE or any(text.lower() in c.name.lower() for text in only)]


# --------------------------------------------------------------------------- measuring


@dataclass
class Pass:
    """Every timed run at one relay delay."""

    rtt_ms: float
    relay: dict = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    round_trips: dict[str, int | None] = field(default_factory=dict)


def timed_run(contender: Contender, endpoint: ep.Endpoint, probes: dict[str, str]) -> tuple[float, int | None]:
    started = time.perf_counter()
    outcome = contender.run(endpoint, probes)
    return time.perf_counter() - started, outcome.round_trips


def run_pass(host, rtt_ms: float, contenders: list[Contender], probes: dict[str, str], repeat: int,
             workdir: Path, failed: dict[str, str], count: bool) -> Pass:
    """Warm up, then time every contender `repeat` times, round robin so drift hits all alike."""
    result = Pass(rtt_ms)
    with ep.relayed_endpoint(host, rtt_ms, workdir) as endpoint:
        result.relay = ep.measure_rtt(endpoint)
        log(f"relay 127.0.0.1:{endpoint.port} -> {host.ip}:22 at {rtt_ms:g} ms: "
            f"ssh ping {result.relay['ping_ms']} ms, connect+first byte {result.relay['banner_ms']} ms")
        for contender in alive(contenders, failed):
            guarded(contender, failed, lambda c=contender: c.run(endpoint, probes), "warm-up")
        for round_number in range(1, repeat + 1):
            for contender in alive(contenders, failed):
                outcome = guarded(contender, failed, lambda c=contender: timed_run(c, endpoint, probes), "run")
                if outcome is None:
                    continue
                seconds, round_trips = outcome
                result.seconds.setdefault(contender.name, []).append(seconds)
                result.round_trips[contender.name] = round_trips
                log(f"  [{rtt_ms:g} ms, {round_number}/{repeat}] {contender.name:<40} {seconds:6.2f}s")
        if count:
            for contender in alive(contenders, failed):
                if result.round_trips.get(contender.name) is None:
                    counted = guarded(contender, failed, lambda c=contender: c.count_round_trips(endpoint, probes),
                                      "counting run")
                    result.round_trips[contender.name] = counted
    return result


def alive(contenders: list[Contender], failed: dict[str, str]) -> list[Contender]:
    return [c for c in contenders if c.name not in failed]


def guarded(contender: Contender, failed: dict[str, str], action, what: str):
    """Run action; a contender that fails is dropped from the rest of the benchmark, with the reason."""
    try:
        return action()
    except (ContenderFailed, Unavailable, OSError, subprocess.SubprocessError) as exc:
        failed[contender.name] = f"{what} failed: {exc}"
    except Exception as exc:  # a library error (paramiko, invoke): report it, do not hide it
        failed[contender.name] = f"{what} failed: {type(exc).__name__}: {exc}"
    log(f"  {contender.name}: {failed[contender.name]}")
    return None


# --------------------------------------------------------------------------- report


def machine() -> dict:
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cores": os.cpu_count(), "cpu": model, "kernel": platform.release(), "python": platform.python_version()}


def build_report(args, probes, contenders, delayed: Pass, doubled: Pass | None, failed, not_run) -> dict:
    rows = []
    for contender in contenders:
        runs = delayed.seconds.get(contender.name)
        if contender.name in failed or not runs:
            continue
        row = {
            "contender": contender.name,
            "version": contender.version(),
            "seconds": round(statistics.median(runs), 3),
            "seconds_runs": [round(s, 3) for s in runs],
            "round_trips": delayed.round_trips.get(contender.name),
            "round_trips_how": contender.how_counted,
        }
        if doubled and doubled.seconds.get(contender.name):
            at_double = statistics.median(doubled.seconds[contender.name])
            row["seconds_at_double_rtt"] = round(at_double, 3)
            row["rtts_paid"] = round((at_double - row["seconds"]) / (args.rtt / 1000), 1)
        rows.append(row)
    reference = next((r["seconds"] for r in rows if r["contender"] == REFERENCE), None)
    for row in rows:
        row["ratio"] = round(row["seconds"] / reference, 2) if reference else None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "rtt_ms": args.rtt,
        "relay_measured": {"at_rtt": delayed.relay, "at_double_rtt": doubled.relay if doubled else None},
        "probes": len(probes),
        "probe_names": list(probes),
        "repeat": args.repeat,
        "results": rows,
        "not_run": [{"contender": name, "reason": reason} for name, reason in {**not_run, **failed}.items()],
    }


def print_table(report: dict) -> None:
    relay = report["relay_measured"]["at_rtt"]
    machine_info = report["machine"]
    print(f"{report['probes']} read-only probes from one host over SSH, relay RTT {report['rtt_ms']:g} ms "
          f"(measured: ssh ping {relay['ping_ms']} ms, connect+first byte {relay['banner_ms']} ms)")
    print(f"median of {report['repeat']} runs, connection setup included; {machine_info['cores']} cores, "
          f"{report['date']}")
    print()
    double = f"at {2 * report['rtt_ms']:g}ms"
    header = f"{'contender':<38} {'seconds':>8} {double:>9} {'round trips':>12} {'RTTs paid':>10} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for row in report["results"]:
        round_trips = "?" if row["round_trips"] is None else str(row["round_trips"])
        at_double = f"{row['seconds_at_double_rtt']:.2f}" if "seconds_at_double_rtt" in row else "-"
        paid = f"{row['rtts_paid']:.1f}" if "rtts_paid" in row else "-"
        ratio = f"{row['ratio']:.1f}" if row["ratio"] else "-"
        print(f"{row['contender']:<38} {row['seconds']:>8.2f} {at_double:>9} {round_trips:>12} {paid:>10} {ratio:>7}")
    print()
    print(f"ratio: seconds / seconds of {REFERENCE}")
    print("round trips: commands sent over SSH (after login), how each was counted:")
    for row in report["results"]:
        version = f" [{row['version']}]" if row["version"] else ""
        print(f"  {row['contender']}: {row['round_trips_how']}{version}")
    print("RTTs paid: (seconds at 2x RTT - seconds at RTT) / RTT = round trips the whole run waited for,")
    print("           login included; measured, so it also shows what a tool does but does not count")
    for item in report["not_run"]:
        print(f"NOT RUN   {item['contender']}: {item['reason']}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("run as root: the sandbox host is a systemd-nspawn machine")
        return 2
    probes = workload.probes(args.probes)
    if args.install_tools:
        install_tools(args.tools_dir)
    contenders = selected(all_contenders(args.tools_dir), args.only)
    failed: dict[str, str] = {}
    not_run: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="coachntt-bench.") as tmp:
        workdir = Path(tmp)
        for contender in list(contenders):
            try:
                contender.prepare(workdir, probes)
            except Unavailable as exc:
                not_run[contender.name] = str(exc)
                contenders.remove(contender)
                log(f"  {contender.name}: not run: {exc}")
        with ep.sandbox_host(args.host) as host:
            log(f"host {host.name} ({host.ip}, {host.flavour})")
            delayed = run_pass(host, args.rtt, contenders, probes, args.repeat, workdir, failed, count=True)
            doubled = None
            if not args.no_slope:
                doubled = run_pass(host, 2 * args.rtt, contenders, probes, args.repeat, workdir, failed, count=False)
    report = build_report(args, probes, contenders, delayed, doubled, failed, not_run)
    if args.save:
        args.save.write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_table(report)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
