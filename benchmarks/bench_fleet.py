#!/usr/bin/env python3
"""monitor.check and a no-op `secure` over 1, 5 and 10 hosts at once, each behind a latency
relay, with the same reads done by the usual tools over the same hosts in the same run.

    .venv/bin/python benchmarks/bench_fleet.py [--rtt 50] [--repeat 3] [--hosts 1,5,10]
                                              [--only TEXT] [--tools-dir DIR] [--save FILE]   # as root

Boots 10 `provisioned` sandbox hosts of its own (`fleet<pid>-N`), runs `secure` on all of
them once (untimed: later runs change nothing), puts a LatencyRelay (endpoint.py, its own
process per host) in front of each sshd and times the real command line, Python start-up
included, median of --repeat runs after one untimed warm-up, the host counts round robin:

    fab -H coachntt@127.0.0.1:P1,...,Pn monitor.check     (exit 0 or 1: no app runs there,
                                                           the checks fail the same way on every host)
    fab -H coachntt@127.0.0.1:P1,...,Pn secure            (every step ok: nothing to change)

for n = 1, 5 and 10. Target (issue 13): 10 hosts within 1.5x the time of one. A host
that is unreachable or a `secure` that is not a no-op fails the run.

Baselines (contenders.py, the same timing): the reads a no-op `secure` makes (its steps'
probes, each through `sudo -n`), done on the n hosts at once, each host in its own thread:
OpenSSH with a ControlMaster and one ssh per read, OpenSSH with every read in one ssh,
Fabric's run() per read, and pyinfra and Ansible when `bench_facts.py --install-tools` has
installed them (else reported as not run). All of them share this machine's cores with the
ten hosts, so the hosts' own CPU time (their cgroups' cpu.stat) is measured per run too:
what ten hosts' work costs the machine, whichever tool sends it.

Host keys stay checked: each host's pinned keys are written under its relay's address. The
hosts are torn down at the end, also on failure or Ctrl-C (by name: never anyone else's).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_facts import DEFAULT_TOOLS_DIR, log, machine

import endpoint as ep
from contenders import Ansible, Contender, ContenderFailed, FabricPerProbe, OpenSSHControlMaster, OpenSSHOneScript, Pyinfra, Unavailable
from fabfile import os_baseline, sandbox, secure
from fabfile.core import remote
from fabfile.core.settings import load
from fabfile.sandbox.hosts import CGROUP_PREFIX, CGROUP_ROOTS

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
    parser.add_argument("--only", action="append", default=[],
                        help="time only the baselines whose name contains TEXT (repeatable); coachntt-ops always runs")
    parser.add_argument("--tools-dir", type=Path, default=DEFAULT_TOOLS_DIR,
                        help=f"where bench_facts.py --install-tools put pyinfra and ansible-core (default {DEFAULT_TOOLS_DIR})")
    return parser.parse_args()


# --------------------------------------------------------------------------- the baselines' reads


def secure_reads() -> dict[str, str]:
    """What a no-op `secure` reads (its steps' probes, as invoke.yaml configures them), each
    through sudo as `secure` runs them: the baselines' workload."""
    import yaml

    settings = load(yaml.safe_load((PROJECT_DIR / "invoke.yaml").read_text())["coachntt"], environ={})
    user = settings.require("deploy_user")
    steps = [secure.sshd_config_step(), remote.packages_step("packages", secure.HARDENING_PACKAGES),
             secure.deploy_user_step(user, list(settings.get("deploy_groups"))),
             secure.authorized_keys_step(user, ["ssh-ed25519 AAAA baseline"]), secure.sudoers_step(user),
             secure.sshd_step(), secure.moduli_step(), secure.firewall_step(list(settings.require("firewall.allow")), 22),
             *secure.fail2ban_steps(settings), *secure.unattended_upgrades_steps(), *os_baseline.baseline_steps([])]
    return {f"{n}_{name}": f"sudo -n sh -c {shlex.quote(command)}"
            for n, step in enumerate(steps) for name, command in step.probes.items()}


def baselines(tools_dir: Path, only: list[str]) -> list[tuple[str, Callable[[], Contender]]]:
    """Each baseline as a way to make one contender per host (a thread each)."""
    makers = [(OpenSSHControlMaster.name, OpenSSHControlMaster), (OpenSSHOneScript.name, OpenSSHOneScript),
              (FabricPerProbe.name, FabricPerProbe), (Pyinfra.name, lambda: Pyinfra(tools_dir)),
              ("Ansible playbook, pipelining on", lambda: Ansible(tools_dir, pipelining=True))]
    return [(name, make) for name, make in makers if not only or any(t.lower() in name.lower() for t in only)]


def on_hosts(contenders: list[Contender], endpoints: list[ep.Endpoint], reads: dict[str, str]) -> float:
    """Every contender on its own host at once; the wall time of the whole."""
    started = time.monotonic()
    with ThreadPoolExecutor(len(contenders)) as pool:
        list(pool.map(lambda pair: pair[0].run(pair[1], reads), zip(contenders, endpoints, strict=True)))
    return time.monotonic() - started


def client_cpu() -> float:
    """CPU seconds this process and its finished children (fab, ssh) have used so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def host_cpu(names: list[str]) -> float:
    """CPU seconds the hosts' cgroups have used so far."""
    total = 0
    for name in names:
        for root in CGROUP_ROOTS:
            stat = root / f"{CGROUP_PREFIX}{name}" / "cpu.stat"
            if stat.exists():
                total += int(next(line.split()[1] for line in stat.read_text().splitlines() if line.startswith("usage_usec")))
                break
    return total / 1e6


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
    timings: dict[str, dict[int, float]] = {}
    cpu: dict[str, dict[int, float]] = {}  # the hosts' CPU seconds per run (median)
    client: dict[str, dict[int, float]] = {}  # this machine's client side: fab, ssh, in-process Fabric
    not_run: dict[str, str] = {}
    with hosts(most) as made, tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        for host in made:
            ep.require_sandbox_address(host.ip)
        names, key = [h.name for h in made], made[0].key
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
            endpoints = [ep.Endpoint(ep.RELAY_ADDRESS, port, "coachntt", Path(key), Path(tmp) / f"k{port}", args.rtt)
                         for port in ports]

            def measured(name: str, run_once) -> None:
                """`run_once(count)` -> seconds, for every count: round robin (drift on a shared
                machine hits all alike), one untimed warm-up, the median of --repeat."""
                runs: dict[int, list[tuple[float, float, float]]] = {count: [] for count in counts}
                for attempt in range(args.repeat + 1):
                    for count in counts:
                        before, spent = host_cpu(names), client_cpu()
                        took = run_once(count, not attempt)
                        if attempt:
                            runs[count].append((took, host_cpu(names) - before, client_cpu() - spent))
                timings[name] = {c: round(statistics.median(r[0] for r in runs[c]), 3) for c in counts}
                cpu[name] = {c: round(statistics.median(r[1] for r in runs[c]), 3) for c in counts}
                client[name] = {c: round(statistics.median(r[2] for r in runs[c]), 3) for c in counts}
                for count in counts:
                    log(f"{name} over {count:>2} hosts at {args.rtt:g} ms: {timings[name][count]:.2f}s, hosts' CPU "
                        f"{cpu[name][count]:.2f}s, client CPU {client[name][count]:.2f}s "
                        f"(runs {', '.join(f'{r[0]:.2f}' for r in runs[count])})")

            for task in ("monitor.check", "secure"):
                def task_once(count: int, warm_up: bool, task=task) -> float:
                    result, took = fab(logins[:count], key, env, task, "--json")
                    judged(result, task, count, warm_up=warm_up)
                    return took

                measured(task, task_once)

            reads = secure_reads()
            for name, make in baselines(args.tools_dir, args.only):
                label = f"baseline: {name}"

                def baseline_once(count: int, warm_up: bool, make=make) -> float:
                    contenders = [make() for _ in range(count)]
                    for n, contender in enumerate(contenders):
                        workdir = Path(tmp) / f"{type(contender).__name__}-{n}"
                        workdir.mkdir(exist_ok=True)
                        contender.prepare(workdir, reads)
                    return on_hosts(contenders, endpoints[:count], reads)

                try:
                    measured(label, baseline_once)
                except (Unavailable, ContenderFailed) as exc:
                    not_run[label] = str(exc)
                    log(f"{label}: not run ({exc})")
    ratios = {name: round(t[most] / t[min(counts)], 2) for name, t in timings.items()}
    print(f"\n{'':44} " + " ".join(f"{c:>3} host{'s' if c > 1 else ' '}" for c in counts) + f"  {most} / {min(counts)}  "
          f"CPU at {most}: hosts  client")
    for name, t in timings.items():
        print(f"{name:44} " + " ".join(f"{t[c]:>8.2f}s" for c in counts) + f"  {ratios[name]:>6.2f}x  "
              f"{cpu[name][most]:>13.2f}s {client[name][most]:>6.2f}s")
    for name, why in not_run.items():
        print(f"{name:44} not run: {why}")
    for task in ("monitor.check", "secure"):
        verdict = "within" if ratios[task] <= TARGET_RATIO else "OVER"
        print(f"{task}: {most} hosts take {ratios[task]}x the time of {min(counts)} ({verdict} the {TARGET_RATIO}x target)")
    result = {"date": datetime.date.today().isoformat(), "rtt_ms": args.rtt, "repeat": args.repeat,
              "machine": machine(), "seconds": timings, "host_cpu_seconds": cpu, "client_cpu_seconds": client, "ratio": ratios,
              "target_ratio": TARGET_RATIO, "not_run": not_run, "baseline_reads": len(reads)}
    if args.save:
        Path(args.save).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(ratios[task] <= TARGET_RATIO for task in ("monitor.check", "secure")) else 1


if __name__ == "__main__":
    sys.exit(main())
