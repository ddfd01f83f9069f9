#!/usr/bin/env python3
"""monitor.check and a no-op `secure` over 1, 5 and 10 hosts at once, each behind a latency relay.

    .venv/bin/python benchmarks/bench_fleet.py [--rtt 50] [--repeat 3] [--hosts 1,5,10] [--save FILE]   # as root

Boots 10 `provisioned` sandbox hosts of its own (`fleet<pid>-N`), runs `secure` on all of
them once (untimed: later runs change nothing), puts a LatencyRelay (endpoint.py, its own
process per host) in front of each sshd and times the real command line, Python start-up
included, median of --repeat runs after one untimed warm-up, the host counts round robin:

    fab -H coachntt@127.0.0.1:P1,...,Pn monitor.check     (exit 0 or 1: no app runs there,
                                                           the checks fail the same way on every host)
    fab -H coachntt@127.0.0.1:P1,...,Pn secure            (every step ok: nothing to change)

for n = 1, 5 and 10. Target (issue 13): 10 hosts within 1.5x the time of one. A host
that is unreachable or a `secure` that is not a no-op fails the run. Host keys stay
checked: each host's pinned keys are written under its relay's address into one
known_hosts file given through COACHNTT_KNOWN_HOSTS. The hosts are torn down at the end,
also on failure or Ctrl-C (by name: never anyone else's).
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_facts import log, machine

import endpoint as ep
from fabfile import sandbox

PROJECT_DIR = ep.PROJECT_DIR
BIN = Path(sys.executable).parent
TARGET_RATIO = 1.5
SSH_WAIT = 120  # a booting host on a busy machine
CPU = {"COACHNTT_THRESHOLDS__CPU_PERCENT_MAX": "100"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rtt", type=float, default=50.0, help="round-trip time each relay adds, ms (default 50)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per point (default 3)")
    parser.add_argument("--hosts", default="1,5,10", help="host counts to time (default 1,5,10)")
    parser.add_argument("--save", help="write the result as JSON to this file")
    return parser.parse_args()


def fab(logins: list[str], key: Path, env: dict, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    command = [str(BIN / "fab"), "-H", ",".join(logins), "-i", str(key), *args]
    started = time.monotonic()
    result = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=1800,
                            env={**os.environ, **CPU, **env})
    return result, time.monotonic() - started


def judged(result: subprocess.CompletedProcess, task: str, count: int, *, warm_up: bool = False) -> None:
    """Every host ran the task: none unreachable, `secure` changed nothing (after the warm-up:
    through a relay, `secure` opens the port the run is connected on once, see README)."""
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    results = [r for r in records if "result" in r]
    if len(results) != count and not (count == 1 and result.returncode in (0, 1)):
        raise SystemExit(f"{task} over {count} hosts: {len(results)} results; {result.stderr.strip()[-300:]}")
    if any(r["result"] == "unreachable" for r in results) or result.returncode not in (0, 1):
        raise SystemExit(f"{task} over {count} hosts exited {result.returncode}: {result.stderr.strip()[-300:]}")
    if task == "secure" and not warm_up and any(r.get("status") not in (None, "ok", "skipped") for r in records if "step" in r):
        raise SystemExit("secure was not a no-op: " + ", ".join(r["step"] for r in records if r.get("status") == "changed"))


@contextlib.contextmanager
def hosts(count: int):
    names = [f"fleet{os.getpid() % 10000}-{n}" for n in range(count)]
    try:
        with ThreadPoolExecutor(3) as pool:  # ten boots at once overload a 2-core machine's sshd start-up
            made = list(pool.map(lambda name: sandbox.up(name, flavour="provisioned", wait=SSH_WAIT), names))
        yield made
    finally:
        for name in names:
            sandbox.down(name)  # these hosts only


def main() -> int:
    args = parse_args()
    counts = [int(n) for n in args.hosts.split(",")]
    most = max(counts)
    with hosts(most) as made, tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        for host in made:
            ep.require_sandbox_address(host.ip)
        key = made[0].key
        log(f"{most} hosts up; secure once on all of them (untimed)")
        first, seconds = fab([f"root@{h.ip}" for h in made], key, {"COACHNTT_FLEET__PARALLEL_CHANGES": str(most)}, "secure")
        if first.returncode != 0:
            raise SystemExit(f"the first secure failed: {first.stderr.strip()[-300:]}")
        log(f"secure on {most} hosts: {seconds:.1f}s")
        known = Path(tmp) / "known_hosts"
        with contextlib.ExitStack() as relays:
            ports = [relays.enter_context(ep.relay_process(h.ip, args.rtt)) for h in made]
            lines = []
            for host, port in zip(made, ports, strict=True):
                ep.write_relay_known_hosts(host, port, Path(tmp) / f"k{port}")
                lines.append((Path(tmp) / f"k{port}").read_text())
            known.write_text("".join(lines))
            env = {"COACHNTT_KNOWN_HOSTS": str(known), "COACHNTT_FLEET__PARALLEL_READS": str(most),
                   "COACHNTT_FLEET__PARALLEL_CHANGES": str(most)}
            logins = [f"coachntt@127.0.0.1:{port}" for port in ports]
            timings: dict[str, dict[int, float]] = {}
            for task in ("monitor.check", "secure"):
                runs: dict[int, list[float]] = {count: [] for count in counts}
                # Round robin over the host counts, so drift on a shared machine hits all alike.
                for attempt in range(args.repeat + 1):
                    for count in counts:
                        result, took = fab(logins[:count], key, env, task, "--json")
                        judged(result, task, count, warm_up=not attempt)
                        if attempt:
                            runs[count].append(took)
                timings[task] = {count: round(statistics.median(runs[count]), 3) for count in counts}
                for count in counts:
                    log(f"{task} over {count:>2} hosts at {args.rtt:g} ms: {timings[task][count]:.2f}s "
                        f"(runs {', '.join(f'{r:.2f}' for r in runs[count])})")
    ratios = {task: round(t[max(counts)] / t[min(counts)], 2) for task, t in timings.items()}
    for task, ratio in ratios.items():
        verdict = "within" if ratio <= TARGET_RATIO else "OVER"
        print(f"{task}: {max(counts)} hosts take {ratio}x the time of {min(counts)} ({verdict} the {TARGET_RATIO}x target)")
    result = {"date": datetime.date.today().isoformat(), "rtt_ms": args.rtt, "repeat": args.repeat,
              "machine": machine(), "seconds": timings, "ratio": ratios, "target_ratio": TARGET_RATIO}
    if args.save:
        Path(args.save).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r <= TARGET_RATIO for r in ratios.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
