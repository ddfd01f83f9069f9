#!/usr/bin/env python3
"""Wall time and SSH round trips of `release` through a latency relay: whole releases and
no-op releases (the sha already live), each phase's share; and `inv sandbox.release`.

    .venv/bin/python benchmarks/bench_release.py [--rtt 50] [--repeat 5] [--releases 2] [--json] [--save FILE]
    .venv/bin/python benchmarks/bench_release.py --rehearsal-only       # only `inv sandbox.release`, timed per stage

Boots one `provisioned` sandbox host named bench<pid>, deploys examples/app on it the way
tests/integration/test_release.py does (images, the sandbox compose override, `secure`,
`nginx`, `deploy.setup`, a first `release`), then times, round robin, `release --sha LIVE`
(the no-op: it only verifies) and `release --sha NEW` (a new commit each time) as
`fab -H coachntt@127.0.0.1:<relay> release --json`, the relay adding --rtt ms per round
trip. Round trips per phase come from benchmarks/fab_phases.py (the same fab program,
printing RemoteTarget's count as each phase ends). The host is removed at the end
(`sandbox.down(name)`), also on failure, Ctrl-C or SIGTERM, unless --keep.
--rehearsal adds a run of `inv sandbox.release` (its own host, ~6-9 minutes), each stage timed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from bench_facts import log, machine
from bench_monitor import load_average
from fab_phases import MARK

import endpoint as ep
from fabfile import sandbox
from fabfile.sandbox import example_repo, images, rehearsal

PROJECT_DIR = ep.PROJECT_DIR
BIN = Path(sys.executable).parent
USER = "coachntt"
PHASES = ("preflight", "backup", "staging", "deploy", "verify", "watch", "drain")
TARGET_NOOP_SECONDS, TARGET_REHEARSAL_SECONDS = 3.0, 90.0
SSH_WAIT = 120
RUN_TIMEOUT = 1800


class BenchError(Exception):
    """The host could not be made ready or a release failed: one line, the host torn down."""


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # unwinds through every finally: relay stopped, host removed


# --------------------------------------------------------------------------- the host


@contextlib.contextmanager
def bench_host(reuse: str | None, keep: bool) -> Iterator[sandbox.Host]:
    """`reuse` if named (left running), else a host of our own, removed after unless `keep`."""
    if reuse:
        host = sandbox.get_host(reuse)
        ep.require_sandbox_address(host.ip)
        yield host
        return
    name = f"bench{os.getpid() % 100000}"
    try:
        host = sandbox.up(name, flavour="provisioned", wait=SSH_WAIT)
        ep.require_sandbox_address(host.ip)
        yield host
    finally:
        if keep:
            log(f"kept {name}: `--host {name}` reuses it, `inv sandbox.down --name {name}` removes it")
        else:
            sandbox.down(name)  # this host only: never down_all, other people's hosts may run


def fab(host: sandbox.Host, env: dict, *args: str, user: str = USER, address: str = "") -> subprocess.CompletedProcess:
    """The real CLI (with the phase lines of fab_phases.py); a non-zero exit stops the benchmark."""
    where = address or host.ip
    command = [sys.executable, str(Path(__file__).with_name("fab_phases.py")), "-H", f"{user}@{where}", "-i", str(host.key), *args]
    result = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                            env={**os.environ, **env}, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if not line.startswith(MARK)]
        raise BenchError(f"`fab {' '.join(args)}` exited {result.returncode}: {' | '.join(lines[-2:])}")
    return result


def prepare(host: sandbox.Host, env: dict, reused: bool, git_url: str) -> None:
    """examples/app deployed and released once, as test_release.py's host (untimed)."""
    if reused:
        # The stand-in for GitHub is this run's git daemon: point the checkout's origin at it.
        code, out = sandbox.console(host.name, f"sudo -u {USER} git -C /opt/coachntt remote set-url origin {git_url}")
        if code != 0:
            raise BenchError(f"--host {host.name}: no checkout to release into ({out.strip()})")
        return
    log("  loading the app's images, secure, nginx, deploy.setup (untimed)")
    images.load_images(host, log=log)
    rehearsal.put_overrides(host)
    fab(host, env, "secure", user="root")
    for args in (("nginx",), ("deploy.setup",)):
        fab(host, env, *args)


def live_sha(host: sandbox.Host) -> str:
    code, out = sandbox.console(host.name, f"sudo -u {USER} git -C /opt/coachntt rev-parse HEAD")
    if code != 0:
        raise BenchError(f"no checkout on {host.name}: {out.strip()}")
    return out.strip()


# --------------------------------------------------------------------------- one timed release


def parse_release(stdout: str, stderr: str, launched: float = 0.0, ended: float = 0.0) -> dict:
    """Phases (status, seconds, round trips) and totals of one `release --json`."""
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    steps = {r["step"]: r for r in records if "step" in r}
    summary = next((r for r in records if "summary" in r), {})
    release = next((r["release"] for r in records if "release" in r), {})
    marks = [json.loads(line[len(MARK):]) for line in stderr.splitlines() if line.startswith(MARK)]
    phase_marks = [m for m in marks if not m["phase"].startswith("@")]
    trips, before = {}, 0
    for mark in phase_marks:
        trips[mark["phase"]] = mark["round_trips"] - before
        before = mark["round_trips"]
    phases = {name: {"status": steps[name]["status"], "seconds": steps[name]["seconds"], "round_trips": trips.get(name, 0)}
              for name in PHASES if name in steps}
    total_trips = summary.get("round_trips")
    if total_trips is not None:
        phases["log + unlock"] = {"status": "-", "seconds": None, "round_trips": total_trips - before}
    # Where the wall time goes outside the phases: the clocks are this machine's, stamped by fab_phases.py.
    at = {m["phase"]: m["at"] for m in marks}
    outside = {}
    if "@imported" in at and phase_marks and "preflight" in steps:
        first = phase_marks[0]
        outside = {"python start + imports": at["@imported"] - launched,
                   "login + lock": first["at"] - steps[first["phase"]]["seconds"] - at["@imported"],
                   "log + unlock + exit": (at.get("@exit") or ended) - phase_marks[-1]["at"],
                   "process exit": ended - (at.get("@exit") or ended)}
    return {"phases": phases, "outside": outside, "round_trips": total_trips, "task_seconds": summary.get("seconds"),
            "result": release.get("result"), "sha": release.get("sha_after", "")}


def timed_release(host: sandbox.Host, env: dict, endpoint: ep.Endpoint, sha: str) -> dict:
    launched, started = time.time(), time.perf_counter()
    result = fab(host, {**env, "COACHNTT_KNOWN_HOSTS": str(endpoint.known_hosts)}, "release", "--sha", sha, "--json",
                 address=f"{endpoint.address}:{endpoint.port}")
    seconds, ended = time.perf_counter() - started, time.time()
    parsed = parse_release(result.stdout, result.stderr, launched, ended)
    parsed["seconds"] = seconds
    return parsed


def summarize(runs: list[dict]) -> dict:
    """Medians over runs; each phase's share of the median run's wall time."""
    seconds = statistics.median(r["seconds"] for r in runs)
    phases = {}
    for name in runs[0]["phases"]:
        secs = [r["phases"][name]["seconds"] for r in runs if name in r["phases"] and r["phases"][name]["seconds"] is not None]
        trips = [r["phases"][name]["round_trips"] for r in runs if name in r["phases"]]
        median_secs = statistics.median(secs) if secs else None
        phases[name] = {"status": runs[0]["phases"][name]["status"],
                        "seconds": round(median_secs, 2) if median_secs is not None else None,
                        "share": round(median_secs / seconds, 3) if median_secs is not None else None,
                        "round_trips": statistics.median(trips) if trips else None}
    outside = {name: round(statistics.median(r["outside"][name] for r in runs if name in r["outside"]), 2)
               for name in runs[0]["outside"]}
    return {"seconds": round(seconds, 3), "seconds_runs": [round(r["seconds"], 2) for r in runs], "outside": outside,
            "round_trips": statistics.median(r["round_trips"] for r in runs if r["round_trips"] is not None),
            "phases": phases, "runs": len(runs)}


# --------------------------------------------------------------------------- the rehearsal


def rehearsal_stages(lines: list[tuple[float, str]]) -> dict:
    """Stages of `inv sandbox.release` from its timestamped output: boot, images, each `fab` line."""
    stages: list[tuple[str, float]] = [("boot the host", 0.0)]
    end = lines[-1][0] if lines else 0.0
    releases = 0
    for at, line in lines:
        if line.startswith("sandbox host ") and len(stages) == 1:
            stages.append(("images, compose overrides, the app's repository", at))
        elif line.startswith("$ fab "):
            words = line.split()  # $ fab -H USER@IP TASK ARGS...
            task = words[4] if len(words) > 4 else "?"
            if task == "release":
                releases += 1
                task = f"release {'ABCDEFGH'[min(releases, 8) - 1]}"
            stages.append((task, at))
        elif line.startswith("rehearsal passed in"):
            end = at
    result = {}
    for index, (name, at) in enumerate(stages):
        until = stages[index + 1][1] if index + 1 < len(stages) else end
        key, number = name, 1
        while key in result:
            number += 1
            key = f"{name} #{number}"
        result[key] = round(until - at, 1)
    return {"stages": result, "seconds": round(end, 1),
            "passed": any(line.startswith("rehearsal passed") for _, line in lines)}


def run_rehearsal() -> dict:
    """`inv sandbox.release` as the README runs it, each output line timestamped here."""
    log("running `inv sandbox.release` (its own host; several minutes)")
    before = load_average()
    lines: list[tuple[float, str]] = []
    started = time.perf_counter()
    process = subprocess.Popen([str(BIN / "inv"), "sandbox.release"], cwd=PROJECT_DIR, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    try:
        for line in process.stdout:
            lines.append((time.perf_counter() - started, line.rstrip("\n")))
        process.wait(timeout=RUN_TIMEOUT)
    except BaseException:
        process.send_signal(signal.SIGINT)  # our own child: it removes its host on the way out
        process.wait(timeout=120)
        raise
    found = rehearsal_stages(lines)
    # Each release's phase table and each task's summary line: what a stage's time was spent on.
    found["phase_lines"] = [f"{at:7.1f}s {line.strip()}" for at, line in lines
                            if (line.split()[:1] and line.split()[0] in (*PHASES, "rollback")) or " round trips)" in line]
    found.update(exit=process.returncode, load_1min_before_after=[before, load_average()],
                 target_seconds=TARGET_REHEARSAL_SECONDS, met=bool(found["passed"] and found["seconds"] < TARGET_REHEARSAL_SECONDS))
    if process.returncode != 0:
        found["last_lines"] = [line for _, line in lines[-5:]]
    return found


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rtt", type=float, default=50.0, help="round-trip time the relay adds, ms (default 50)")
    parser.add_argument("--repeat", type=int, default=5, help="timed no-op releases; the median is reported (default 5)")
    parser.add_argument("--releases", type=int, default=2, help="timed whole releases, a new commit each (default 2)")
    parser.add_argument("--watch-seconds", type=int,
                        help="release.watch_seconds for the whole releases (default: the setting, 120 s in production)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--save", metavar="FILE", type=Path, help="also write the JSON object to FILE")
    parser.add_argument("--host", metavar="NAME", help="reuse this running sandbox host with the app released (left running)")
    parser.add_argument("--keep", action="store_true", help="leave the benchmark's host running (for --host next time)")
    parser.add_argument("--rehearsal", action="store_true", help="also run `inv sandbox.release` and time its stages")
    parser.add_argument("--rehearsal-only", action="store_true", help="only run and time `inv sandbox.release`")
    args = parser.parse_args(argv)
    if not 1 <= args.repeat <= 50:
        parser.error("--repeat must be between 1 and 50")
    if not 0 <= args.releases <= 10:
        parser.error("--releases must be between 0 and 10")
    if not 0 < args.rtt <= 1000:
        parser.error("--rtt must be between 0 and 1000 ms")
    if args.watch_seconds is not None and not 1 <= args.watch_seconds <= 14400:
        parser.error("--watch-seconds must be between 1 and 14400")
    return args


def measure_releases(args, host: sandbox.Host, workdir: Path, result: dict) -> None:
    served = workdir / "served"
    served.mkdir()
    sha = example_repo.make_example_repo(served / "app")
    with example_repo.GitDaemon(served) as git:
        env = {"COACHNTT_APP__REPO": git.url("app"), "COACHNTT_APP__COMPOSE_OVERRIDES": rehearsal.APP_OVERRIDE,
               "COACHNTT_APP__HEALTH_DEADLINE": "60"}
        if args.watch_seconds is not None:
            env["COACHNTT_RELEASE__WATCH_SECONDS"] = str(args.watch_seconds)
        prepare(host, env, bool(args.host), git.url("app"))
        if not args.host:
            log("  the first release and a backup (untimed; a no-op release's verify wants a good backup)")
            fab(host, env, "release", "--sha", sha, "--message", "first release")
            fab(host, env, "backup.now")
        with ep.relayed_endpoint(host, args.rtt, workdir) as relayed:
            endpoint = replace(relayed, user=USER)
            result["relay_measured"] = ep.measure_rtt(endpoint)
            log(f"relay 127.0.0.1:{endpoint.port} -> {host.ip}:22 at {args.rtt:g} ms: ssh ping {result['relay_measured']['ping_ms']} ms")
            timed_release(host, env, endpoint, live_sha(host))  # warm-up, untimed
            noops, wholes = [], []
            result["load_1min_during"] = [load_average()]
            for round_number in range(1, max(args.repeat, args.releases) + 1):
                if round_number <= args.repeat:
                    run = timed_release(host, env, endpoint, live_sha(host))
                    if run["result"] != "verified":
                        raise BenchError(f"the no-op release ended {run['result']!r}, not 'verified'")
                    noops.append(run)
                    log(f"  [no-op {round_number}/{args.repeat}] {run['seconds']:6.2f}s  {run['round_trips']} round trips")
                if round_number <= args.releases:
                    new = example_repo.commit_change(served / "app", f"bench release {round_number}",
                                                     {"RELEASE": f"{round_number} {time.time()}\n"})
                    run = timed_release(host, env, endpoint, new)
                    if run["result"] != "ok":
                        raise BenchError(f"release {new[:12]} ended {run['result']!r}")
                    wholes.append(run)
                    log(f"  [release {round_number}/{args.releases}] {run['seconds']:6.1f}s  {run['round_trips']} round trips")
            result["load_1min_during"].append(load_average())
    result["noop"] = summarize(noops)
    if wholes:
        result["release"] = summarize(wholes)
    result["target_noop"] = {"seconds_max": TARGET_NOOP_SECONDS, "ours": result["noop"]["seconds"],
                             "met": result["noop"]["seconds"] < TARGET_NOOP_SECONDS}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("run as root: the sandbox host is a systemd-nspawn machine")
        return 2
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    result: dict = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "rtt_ms": args.rtt,
                    "load_1min_before": load_average()}
    try:
        if not args.rehearsal_only:
            with tempfile.TemporaryDirectory(prefix="coachntt-bench-release.") as tmp, bench_host(args.host, args.keep) as host:
                log(f"host {host.name} ({host.ip})")
                measure_releases(args, host, Path(tmp), result)
        if args.rehearsal or args.rehearsal_only:
            result["rehearsal"] = run_rehearsal()
    except (BenchError, sandbox.SandboxError) as exc:
        log(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted: the benchmark's host is removed")
        return 130
    result["machine"] = {**machine(), "load_1min_before_after": [result.pop("load_1min_before"), load_average()]}
    if args.save:
        args.save.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_tables(result)
    return 0 if not result.get("rehearsal") or result["rehearsal"]["exit"] == 0 else 1


def print_tables(result: dict) -> None:
    loads = result["machine"]["load_1min_before_after"]
    print(f"release through a {result['rtt_ms']:g} ms relay; {result['machine']['cores']} cores, 1-minute load "
          f"{loads[0]} before, {loads[1]} after; {result['date']}")
    for key, title in (("noop", "no-op release (the live sha: verify only)"), ("release", "whole release (a new commit)")):
        if key not in result:
            continue
        run = result[key]
        print(f"\n{title}: {run['seconds']:.2f} s wall (median of {run['runs']}: {' '.join(str(s) for s in run['seconds_runs'])}), "
              f"{run['round_trips']:g} round trips; "
              f"measured ssh ping {result['relay_measured']['ping_ms']} ms")
        print(f"  {'phase':<14} {'result':<9} {'seconds':>8} {'share':>7} {'round trips':>12}")
        for name, phase in run["phases"].items():
            secs = "-" if phase["seconds"] is None else f"{phase['seconds']:.2f}"
            share = "-" if phase["share"] is None else f"{100 * phase['share']:.0f}%"
            print(f"  {name:<14} {phase['status']:<9} {secs:>8} {share:>7} {phase['round_trips']:>12g}")
        for name, secs in run["outside"].items():
            print(f"  {name:<24} {secs:>8.2f} {100 * secs / run['seconds']:>6.0f}%   (outside the phases)")
    if "target_noop" in result:
        target = result["target_noop"]
        print(f"\ntarget: no-op release < {target['seconds_max']:g} s at {result['rtt_ms']:g} ms: {target['ours']:.2f} s -> "
              f"{'MET' if target['met'] else 'NOT MET'}")
    if "rehearsal" in result:
        found = result["rehearsal"]
        print(f"\n`inv sandbox.release`: {found['seconds']:.0f} s, exit {found['exit']} (1-minute load "
              f"{found['load_1min_before_after'][0]} before, {found['load_1min_before_after'][1]} after)")
        for name, seconds in found["stages"].items():
            print(f"  {name:<52} {seconds:7.1f}s  {100 * seconds / max(found['seconds'], 0.1):4.0f}%")
        print(f"target: the rehearsal under {found['target_seconds']:g} s warm: {'MET' if found['met'] else 'NOT MET'}")
        for line in found.get("last_lines", []):
            print(f"  | {line}")


if __name__ == "__main__":
    sys.exit(main())
