#!/usr/bin/env python3
"""What one api slot carries: requests per second at a p99 latency bound, and where it saturates.

    python3 benchmarks/bench_capacity.py [--seconds 8] [--levels 1,2,4,8,16,32] [--p99-ms 100] [--json] [--save FILE]

Boots one `provisioned` sandbox host of its own and deploys examples/app on it behind
nginx (as bench_monitor.py does). Then, for each concurrency level, a closed-loop load
runs INSIDE the host against the live api slot on 127.0.0.1 (keep-alive connections, one
per worker): nginx's 10 r/s per-client limit would otherwise measure the limit, not the
app. Two paths of the app are loaded in turn: /health (no database) and
/api/notes/{id} (one indexed row through PgBouncer and PostgreSQL). Each level is bounded
by --seconds and by a request count, and aims at loopback inside a sandbox host only.

For each level: requests per second, p50/p99 latency, errors, and the CPU the api
container used (its cgroup's usage_usec) as cores busy and as requests per CPU-second:
the sandbox cannot apply compose's `cpus` limits (configs/sandbox/compose.sandbox.yml),
so what a production slot limited to 0.5 CPU carries is requests per CPU-second × 0.5.
The load generator shares this machine's CPUs with the host: the figures are a floor.
The host is torn down at the end, also on failure or Ctrl-C. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

from bench_facts import log, machine
from bench_monitor import BenchError, bench_host, deploy_app

from fabfile import sandbox

PATHS = ("/health", "/api/notes/{id}")  # {id}: a note the run creates first
MAX_REQUESTS_PER_LEVEL = 200_000
SLOT_PORTS = {"api_a": 8000, "api_b": 8002}

# Runs inside the host with its python3: N keep-alive workers for S seconds against one URL.
GENERATOR = r"""
import http.client, json, sys, threading, time
port, path, workers, seconds, cap = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
latencies, errors, lock = [], {}, threading.Lock()
stop = time.monotonic() + seconds
def work():
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    mine, bad = [], {}
    while time.monotonic() < stop and len(latencies) + len(mine) < cap:
        started = time.perf_counter()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                bad[str(response.status)] = bad.get(str(response.status), 0) + 1
        except Exception as exc:
            bad[type(exc).__name__] = bad.get(type(exc).__name__, 0) + 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            continue
        mine.append(time.perf_counter() - started)
    with lock:
        latencies.extend(mine)
        for kind, count in bad.items():
            errors[kind] = errors.get(kind, 0) + count
began = time.monotonic()
threads = [threading.Thread(target=work) for _ in range(workers)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"seconds": time.monotonic() - began, "latencies": sorted(latencies), "errors": errors}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="load time per level and path (default 8)")
    parser.add_argument("--levels", default="1,2,4,8,16,32", help="concurrent connections, comma separated")
    parser.add_argument("--p99-ms", type=float, default=100.0, help="the latency bound capacity is judged at (default 100)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--save", metavar="FILE", type=Path, help="also write the JSON object to FILE")
    parser.add_argument("--host", metavar="NAME", help="reuse this running sandbox host with the app deployed (left running)")
    args = parser.parse_args(argv)
    try:
        args.levels = [int(level) for level in args.levels.split(",")]
    except ValueError:
        parser.error("--levels must be whole numbers separated by commas, e.g. 1,2,4,8")
    if not all(1 <= level <= 128 for level in args.levels):
        parser.error("--levels must each be between 1 and 128")
    if not 1 <= args.seconds <= 60:
        parser.error("--seconds must be between 1 and 60")
    return args


def sh(host: sandbox.Host, command: str) -> str:
    code, out = sandbox.console(host.name, command)
    if code != 0:
        raise BenchError(f"`{command[:60]}` exited {code}: {out.strip()[-200:]}")
    return out


def live_slot(host: sandbox.Host) -> tuple[str, int]:
    """The running api container and its port (the slot nginx sends the api to)."""
    for line in sh(host, "docker ps --format '{{.Names}} {{.Label \"com.docker.compose.service\"}}'").splitlines():
        name, _, service = line.partition(" ")
        if service in SLOT_PORTS:
            return name, SLOT_PORTS[service]
    raise BenchError("no api slot is running")


def cpu_usec(host: sandbox.Host, container: str) -> int:
    """The container's cgroup CPU time so far (cgroup v2 cpu.stat usage_usec)."""
    cid = sh(host, f"docker inspect -f '{{{{.Id}}}}' {container}").strip()
    text = sh(host, f"cat /sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat 2>/dev/null || "
                    f"cat $(find /sys/fs/cgroup -path '*{cid}*' -name cpu.stat | head -n 1)")
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("usage_usec"))


def percentile(values: list[float], share: float) -> float:
    return values[min(len(values) - 1, int(share * len(values)))] if values else float("nan")


def measure(host: sandbox.Host, args: argparse.Namespace) -> list[dict]:
    container, port = live_slot(host)
    nano_cpus = int(sh(host, f"docker inspect -f '{{{{.HostConfig.NanoCpus}}}}' {container}").strip() or 0)
    log(f"  api slot {container} on 127.0.0.1:{port}, CPU limit: {nano_cpus / 1e9 if nano_cpus else 'none'}")
    sh(host, f"cat > /tmp/coachntt-load.py <<'EOF'\n{GENERATOR}\nEOF")
    note = json.loads(sh(host, f"curl -sf -X POST -H 'Content-Type: application/json' -d '{{\"body\": \"capacity\"}}' "
                               f"http://127.0.0.1:{port}/api/notes").strip().splitlines()[-1])
    rows = []
    for path in PATHS:
        url = path.format(id=note["id"])
        for level in args.levels:
            before = cpu_usec(host, container)
            out = sh(host, f"python3 /tmp/coachntt-load.py {port} {url} {level} {args.seconds} {MAX_REQUESTS_PER_LEVEL}")
            used = (cpu_usec(host, container) - before) / 1e6
            run = json.loads(out.strip().splitlines()[-1])
            done, seconds = len(run["latencies"]), run["seconds"]
            row = {"path": path, "connections": level, "requests": done,
                   "errors": sum(run["errors"].values()), "error_kinds": run["errors"],
                   "rps": round(done / seconds, 1), "p50_ms": round(percentile(run["latencies"], 0.50) * 1000, 2),
                   "p99_ms": round(percentile(run["latencies"], 0.99) * 1000, 2),
                   "api_cores": round(used / seconds, 2), "requests_per_cpu_second": round(done / used, 1) if used else None}
            rows.append(row)
            log(f"  {path:<14} {level:>3} conn  {row['rps']:>8.1f} rps  p50 {row['p50_ms']:>7.2f} ms  "
                f"p99 {row['p99_ms']:>7.2f} ms  api {row['api_cores']:.2f} cores  errors {row['errors']} {row['error_kinds'] or ''}")
    return rows


def verdicts(rows: list[dict], p99_ms: float) -> dict[str, dict]:
    """Per path: the best rps with p99 within the bound, and the level where rps stops rising (< +10 %)."""
    found = {}
    for path in PATHS:
        mine = [r for r in rows if r["path"] == path]
        within = [r for r in mine if r["p99_ms"] <= p99_ms and r["errors"] == 0]
        best = max(within, key=lambda r: r["rps"]) if within else None
        saturated = next((b for a, b in zip(mine, mine[1:], strict=False) if b["rps"] < a["rps"] * 1.1), None)
        per_cpu = [r["requests_per_cpu_second"] for r in mine if r["requests_per_cpu_second"]]
        found[path] = {"best_within_bound": best, "saturates_at": saturated,
                       "requests_per_cpu_second": max(per_cpu) if per_cpu else None}
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_capacity: run as root (sandbox hosts)", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.UTC)
    try:
        with bench_host(args.host) as host:
            if not args.host:
                with tempfile.TemporaryDirectory(prefix="coachntt-capacity-") as served:
                    deploy_app(host, Path(served))
            rows = measure(host, args)
    except BenchError as exc:
        print(f"bench_capacity: {exc}", file=sys.stderr)
        return 1
    result = {"benchmark": "capacity", "date": started.isoformat(timespec="seconds"), "machine": machine(),
              "seconds_per_level": args.seconds, "p99_bound_ms": args.p99_ms, "rows": rows,
              "verdicts": verdicts(rows, args.p99_ms)}
    if args.save:
        args.save.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
        return 0
    for path, verdict in result["verdicts"].items():
        best, saturated = verdict["best_within_bound"], verdict["saturates_at"]
        print(f"{path}: {best['rps'] if best else 'none'} rps with p99 <= {args.p99_ms:g} ms"
              + (f" (at {best['connections']} connections, p99 {best['p99_ms']} ms)" if best else "")
              + (f"; saturates at {saturated['connections']} connections ({saturated['rps']} rps)" if saturated else "")
              + f"; {verdict['requests_per_cpu_second']} requests per api CPU-second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
