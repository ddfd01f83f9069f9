#!/usr/bin/env python3
"""`secure`'s first run and no-op run through a latency relay, against an Ansible playbook
of the same items, with OpenSSH and Fabric reading the same facts as the floor.

    .venv/bin/python benchmarks/bench_secure.py --install-tools     # first time: ansible-core in /tmp
    .venv/bin/python benchmarks/bench_secure.py [--rtt 50] [--repeat 5] [--first 1] [--json] [--save FILE]

First runs: each round boots two fresh sandbox hosts (bench<pid>-<letter>), times
`fab -H root@... secure` on one and `ansible-playbook` on the other, each through its own
relay. No-op runs: the same hosts, now hardened, as the deploy user, --repeat times round
robin with the floors (secure's fact probes one ssh per probe over a ControlMaster, one
Fabric run() per probe, all of them in one `ssh sudo sh -s`). Every host is removed at the
end (`sandbox.down(name)`), also on failure, Ctrl-C or SIGTERM. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import yaml
from bench_facts import DEFAULT_TOOLS_DIR, install_tools, log, machine
from bench_monitor import load_average
from secure_playbook import sshd_drop_in, write_playbook

import endpoint as ep
from contenders import (
    Ansible,
    Contender,
    ContenderFailed,
    FabricPerProbe,
    OpenSSHControlMaster,
    Outcome,
    Unavailable,
    destination,
    last_lines,
    run_ssh,
    run_tool,
    ssh_options,
    tool_path,
)
from fabfile import os_baseline, sandbox
from fabfile import secure as secure_task
from fabfile.core import remote
from fabfile.core.batch import batch_script, parse_batch
from fabfile.core.settings import Settings

PROJECT_DIR = ep.PROJECT_DIR
BIN = Path(sys.executable).parent
USER = "coachntt"
TARGET_NOOP_SECONDS = 2.0
REFERENCE = "coachntt-ops secure"
SSH_WAIT = 120


class BenchError(Exception):
    """The benchmark cannot go on: one line, every host torn down."""


def settings() -> Settings:
    return Settings("production", yaml.safe_load((PROJECT_DIR / "invoke.yaml").read_text())["coachntt"])


# --------------------------------------------------------------------------- hosts


class Hosts:
    """Fresh sandbox hosts of this run, named bench<pid>-<letter>; all removed by close()."""

    def __init__(self) -> None:
        self.prefix = f"bench{os.getpid() % 100000}-"
        self.names: list[str] = []

    def up(self) -> sandbox.Host:
        name = f"{self.prefix}{'abcdefghijklmnopqrstuvwxyz'[len(self.names)]}"
        self.names.append(name)
        host = sandbox.up(name, flavour="fresh", wait=SSH_WAIT)
        ep.require_sandbox_address(host.ip)
        return host

    def down(self, name: str) -> None:
        if name in self.names:
            self.names.remove(name)
            sandbox.down(name)  # this host only: never down_all, other people's hosts may run

    def close(self) -> None:
        for name in list(self.names):
            with contextlib.suppress(Exception):
                self.down(name)


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # unwinds through every finally: relays stopped, hosts removed


def public_key(key: Path) -> str:
    return subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, check=True).stdout.strip()


def host_algorithms(host: sandbox.Host) -> tuple[dict[str, list[str]], list[str]]:
    """What the host's OpenSSH offers, read through the console (untimed): the playbook's drop-in."""
    found = {}
    for kind in ("kex", "cipher", "mac", "key-sig"):
        code, out = sandbox.console(host.name, f"ssh -Q {kind}")
        if code != 0:
            raise BenchError(f"ssh -Q {kind} on {host.name} failed: {out.strip()}")
        found[kind] = out.split()
    code, out = sandbox.console(host.name, "ls /etc/ssh/ssh_host_*_key")
    return found, out.split()


# --------------------------------------------------------------------------- contenders


class SecureCli(Contender):
    """`fab -H USER@127.0.0.1:<relay> -i KEY secure --json`: what the operator types."""

    name = REFERENCE
    how_counted = "counted: its --json summary (RemoteTarget.round_trips; the two proving logins are separate connections)"

    def __init__(self) -> None:
        self.last: dict = {}

    def run(self, endpoint: ep.Endpoint, probes: Mapping[str, str]) -> Outcome:
        command = [str(BIN / "fab"), "-H", f"{endpoint.user}@{endpoint.address}:{endpoint.port}", "-i", str(endpoint.key),
                   "secure", "--json"]
        result = run_tool(command, {**os.environ, "COACHNTT_KNOWN_HOSTS": str(endpoint.known_hosts)}, PROJECT_DIR)
        records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or not records or "summary" not in records[-1]:
            raise ContenderFailed(f"fab secure exited {result.returncode}: {last_lines(result.stderr)}")
        self.last = records[-1]
        return Outcome(len(records) - 1, records[-1]["round_trips"])

    def changed(self) -> int:
        return int(self.last["summary"].get("changed", 0))

    def version(self) -> str:
        import fabric
        return f"fabric {fabric.__version__}"


class AnsibleSecure(Ansible):
    """The playbook of secure_playbook.py, pipelining on, Ansible's default ControlMaster."""

    how_counted = "counted: 'SSH: EXEC' lines (ssh/sftp runs) of a -vvv run"

    def __init__(self, tools_dir: Path):
        super().__init__(tools_dir, pipelining=True)
        self.name = "Ansible playbook (ansible.builtin, pipelining)"
        self.changed_count = 0

    def prepare(self, workdir: Path, probes: Mapping[str, str]) -> None:
        self.program = self.program or self.find()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)

    def find(self) -> Path:
        program = tool_path(self.tools_dir, "ansible", "ansible-playbook")
        if not program:
            raise Unavailable("ansible-core not installed (run with --install-tools)")
        return program

    def invoke(self, endpoint: ep.Endpoint, probes: Mapping[str, str], *extra: str) -> subprocess.CompletedProcess:
        result, recap = self.play(endpoint, *extra, tail=8)
        if recap.group(4) != "0":
            raise ContenderFailed(f"ansible-playbook exited {result.returncode}: {last_lines(result.stdout + result.stderr, 8)}")
        self.changed_count = int(recap.group(2))
        return result

    def run(self, endpoint: ep.Endpoint, probes: Mapping[str, str], verbose: bool = False) -> Outcome:
        result = self.invoke(endpoint, probes, *(["-vvv"] if verbose else []))
        trips = len(re.findall(r"SSH: EXEC (?:ssh|sftp|scp)", result.stdout)) if verbose else None
        return Outcome(0, trips)

    def changed(self) -> int:
        return self.changed_count


class SudoOneScript(Contender):
    """A fresh `ssh host sudo -n sh -s` fed every probe in one script (coachntt-ops' batch_script)."""

    name = "OpenSSH, all probes in one ssh"
    how_counted = "counted: one ssh"

    def __init__(self, raw: Mapping[str, str]):
        self.raw = {f"p{index}": command for index, command in enumerate(raw.values())}  # batch names are plain words

    def run(self, endpoint: ep.Endpoint, probes: Mapping[str, str]) -> Outcome:
        marker = "@@bench-" + secrets.token_hex(8)
        raw = self.raw
        result = run_ssh(["ssh", *ssh_options(endpoint), destination(endpoint), "sudo -n sh -s"], stdin=batch_script(raw, marker))
        answered = len(parse_batch(result.stdout, marker))
        if answered != len(raw):
            raise ContenderFailed(f"{answered} of {len(raw)} probes answered")
        return Outcome(answered, 1)


def secure_probes(login_port: int) -> dict[str, str]:
    """Every fact `secure` reads on a no-op run (its three batches), as it reads them (as root)."""
    s = settings()
    user = s.require("deploy_user")
    steps = [
        secure_task.sshd_config_step(),
        remote.packages_step("hardening packages", secure_task.HARDENING_PACKAGES),
        secure_task.deploy_user_step(user, list(s.get("deploy_groups"))),
        secure_task.authorized_keys_step(user, []),
        secure_task.sudoers_step(user),
        secure_task.sshd_step(),
        secure_task.moduli_step(),
        secure_task.firewall_step(list(s.require("firewall.allow")), login_port),
        *secure_task.fail2ban_steps(s),
        *secure_task.unattended_upgrades_steps(),
        *os_baseline.baseline_steps(s.get("baseline.skip") or []),
    ]
    return {f"{index}.{step.name}.{probe}": command
            for index, step in enumerate(steps) for probe, command in step.probes.items()}


# --------------------------------------------------------------------------- measuring


def timed(action) -> tuple[float, Outcome]:
    started = time.perf_counter()
    outcome = action()
    return time.perf_counter() - started, outcome


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rtt", type=float, default=50.0, help="round-trip time the relay adds, ms (default 50)")
    parser.add_argument("--repeat", type=int, default=5, help="timed no-op runs per contender; the median is reported")
    parser.add_argument("--first", type=int, default=1,
                        help="first runs per tool, each on a fresh host (two hosts booted per round; default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--save", metavar="FILE", type=Path, help="also write the JSON object to FILE")
    parser.add_argument("--host", metavar="NAME",
                        help="reuse this running sandbox host, already secured: no-op runs of secure and the floors only "
                             "(no first run, no Ansible); left running")
    parser.add_argument("--only", metavar="TEXT", action="append", default=[],
                        help="run only contenders whose name contains TEXT (repeatable); secure always runs")
    parser.add_argument("--tools-dir", type=Path, default=DEFAULT_TOOLS_DIR, help=f"venvs of the tools (default {DEFAULT_TOOLS_DIR})")
    parser.add_argument("--install-tools", action="store_true", help="pip install ansible-core (and pyinfra) into --tools-dir first")
    args = parser.parse_args(argv)
    if not 1 <= args.repeat <= 50:
        parser.error("--repeat must be between 1 and 50")
    if not 1 <= args.first <= 5:
        parser.error("--first must be between 1 and 5")
    if not 0 < args.rtt <= 1000:
        parser.error("--rtt must be between 0 and 1000 ms")
    return args


def wanted(name: str, only: list[str]) -> bool:
    return name == REFERENCE or not only or any(text.lower() in name.lower() for text in only)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("run as root: the sandbox hosts are systemd-nspawn machines")
        return 2
    if args.install_tools:
        install_tools(args.tools_dir)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "rtt_ms": args.rtt,
              "repeat": args.repeat, "first_runs": 0 if args.host else args.first, "first": {}, "noop": {}, "relay_measured": [],
              "not_run": {}, "failed": {}}
    loads = [load_average()]
    hosts = Hosts()
    with tempfile.TemporaryDirectory(prefix="coachntt-bench-secure.") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        stack.callback(hosts.close)
        ours = SecureCli()
        ansible = AnsibleSecure(args.tools_dir) if wanted("Ansible", args.only) and not args.host else None
        if ansible:
            try:
                ansible.prepare(workdir / "ansible", {})
            except Unavailable as exc:
                result["not_run"][ansible.name] = str(exc)
                ansible = None
        if args.host:
            result["not_run"]["first runs, Ansible"] = "--host reuses a secured host: first runs need fresh ones"
        try:
            noop_targets = run_first_runs(args, hosts, stack, workdir, ours, ansible, result) if not args.host else \
                [(ours, relayed(stack, sandbox.get_host(args.host), args.rtt, workdir, result, USER))]
            run_noop(args, noop_targets, ansible, result)
        except (BenchError, sandbox.SandboxError, ContenderFailed) as exc:
            log(f"error: {exc}")
            return 1
        except KeyboardInterrupt:
            log("interrupted: removing the benchmark's hosts")
            return 130
    loads.append(load_average())
    result["machine"] = {**machine(), "load_1min_before_after": loads}
    if args.save:
        args.save.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 1 if result["failed"] else 0


def relayed(stack: contextlib.ExitStack, host: sandbox.Host, rtt: float, workdir: Path, result: dict,
            user: str = "") -> ep.Endpoint:
    """A relay in front of `host` for the rest of the run (its port is the one secure's firewall opens)."""
    ep.require_sandbox_address(host.ip)
    endpoint = stack.enter_context(ep.relayed_endpoint(host, rtt, workdir))
    endpoint = replace(endpoint, user=user or endpoint.user)
    measured = ep.measure_rtt(endpoint)
    result["relay_measured"].append({"host": host.name, **measured})
    log(f"host {host.name} ({host.ip}) behind 127.0.0.1:{endpoint.port} at {rtt:g} ms: ssh ping {measured['ping_ms']} ms")
    return endpoint


def run_first_runs(args, hosts: Hosts, stack, workdir: Path, ours: SecureCli, ansible: AnsibleSecure | None,
                   result: dict) -> list[tuple[Contender, ep.Endpoint]]:
    """Each round: fresh hosts, one per tool, the tools in alternating order. Returns the last round's
    (contender, endpoint as the deploy user) for the no-op runs; earlier rounds' hosts are removed."""
    seconds: dict[str, list[float]] = {}
    trips: dict[str, int | None] = {}
    inside: list[float] = []
    kept: list[tuple[Contender, ep.Endpoint, str]] = []
    for round_number in range(1, args.first + 1):
        for _, _, name in kept:
            hosts.down(name)
        kept = []
        tools = [ours] + ([ansible] if ansible else [])
        if round_number % 2 == 0:
            tools.reverse()
        booted = {tool.name: hosts.up() for tool in tools}
        endpoints = {name: relayed(stack, host, args.rtt, workdir, result) for name, host in booted.items()}
        for tool in tools:
            endpoint, host = endpoints[tool.name], booted[tool.name]
            if tool is ansible:
                algorithms, keys = host_algorithms(host)
                write_playbook(ansible.workdir, settings(), public_key(Path(host.key)), endpoint.port,
                               sshd_drop_in(algorithms, keys))
                elapsed, outcome = timed(lambda e=endpoint: ansible.run(e, {}, verbose=True))
            else:
                elapsed, outcome = timed(lambda e=endpoint: ours.run(e, {}))
            seconds.setdefault(tool.name, []).append(elapsed)
            trips[tool.name] = outcome.round_trips
            if tool is ours:
                inside.append(ours.last["seconds"])
            log(f"  [first run {round_number}/{args.first}] {tool.name:<50} {elapsed:6.1f}s  "
                f"{outcome.round_trips} round trips, {tool.changed()} changed")
            kept.append((tool, replace(endpoint, user=USER), host.name))
    result["first"] = {name: {"seconds": round(statistics.median(runs), 2), "seconds_runs": [round(s, 2) for s in runs],
                              "round_trips": trips[name]} for name, runs in seconds.items()}
    if inside:
        result["first"][REFERENCE]["task_seconds"] = round(statistics.median(inside), 2)
    return [(tool, endpoint) for tool, endpoint, _ in kept]


def run_noop(args, targets: list[tuple[Contender, ep.Endpoint]], ansible: AnsibleSecure | None, result: dict) -> None:
    """No-op runs on the hardened hosts, round robin, with the floors on secure's host."""
    secure_endpoint = next(endpoint for tool, endpoint in targets if tool.name == REFERENCE)
    probes = secure_probes(secure_endpoint.port)
    as_root = {name: f"sudo -n sh -c {shlex.quote(command)}" for name, command in probes.items()}
    result["probes"] = len(probes)
    floors: list[Contender] = [c for c in (OpenSSHControlMaster(), FabricPerProbe(), SudoOneScript(probes)) if wanted(c.name, args.only)]
    runs: list[tuple[Contender, ep.Endpoint, Mapping[str, str]]] = [(tool, endpoint, {}) for tool, endpoint in targets]
    runs += [(floor, secure_endpoint, as_root) for floor in floors]
    seconds: dict[str, list[float]] = {}
    trips: dict[str, int | None] = {}
    inside: list[float] = []  # secure's own --json seconds: from after its login to the end
    failed = result["failed"]

    def attempt(contender, endpoint, probes, count=False):
        try:
            if count:
                return timed(lambda: contender.run(endpoint, probes, verbose=True))
            return timed(lambda: contender.run(endpoint, probes))
        except (ContenderFailed, Unavailable, OSError, subprocess.SubprocessError) as exc:
            failed[contender.name] = f"no-op run failed: {exc}"
        except Exception as exc:  # a library error: report it, do not hide it
            failed[contender.name] = f"no-op run failed: {type(exc).__name__}: {exc}"
        log(f"  {contender.name}: {failed[contender.name]}")
        return None

    for contender, endpoint, probes in runs:  # warm-up, untimed: also proves the first runs converged
        outcome = attempt(contender, endpoint, probes)
        # A reused host meets this run's relay port for the first time: secure opens it in ufw once.
        if outcome and hasattr(contender, "changed") and contender.changed() and not args.host:
            failed[contender.name] = f"its second run still changed {contender.changed()} item(s): not a no-op"
            log(f"  {contender.name}: {failed[contender.name]}")
    result["load_1min_noop"] = [load_average()]
    for round_number in range(1, args.repeat + 1):
        for contender, endpoint, probes in runs:
            if contender.name in failed:
                continue
            outcome = attempt(contender, endpoint, probes)
            if outcome is None:
                continue
            elapsed, done = outcome
            if hasattr(contender, "changed") and contender.changed():
                failed[contender.name] = f"a no-op run changed {contender.changed()} item(s)"
                continue
            seconds.setdefault(contender.name, []).append(elapsed)
            if isinstance(contender, SecureCli):
                inside.append(contender.last["seconds"])
            if done.round_trips is not None:
                trips[contender.name] = done.round_trips
            log(f"  [no-op {round_number}/{args.repeat}] {contender.name:<50} {elapsed:6.2f}s")
    result["load_1min_noop"].append(load_average())
    if ansible and ansible.name not in failed:
        counted = attempt(ansible, next(e for t, e in targets if t is ansible), {}, count=True)
        if counted:
            trips[ansible.name] = counted[1].round_trips
    for contender, _, _ in runs:
        runs_of = seconds.get(contender.name)
        if not runs_of or contender.name in failed:
            continue
        result["noop"][contender.name] = {"seconds": round(statistics.median(runs_of), 3),
                                          "seconds_runs": [round(s, 3) for s in runs_of],
                                          "round_trips": trips.get(contender.name), "how_counted": contender.how_counted,
                                          "version": contender.version()}
    if REFERENCE in result["noop"] and inside:
        result["noop"][REFERENCE]["task_seconds"] = round(statistics.median(inside), 3)
    ours = result["noop"].get(REFERENCE, {}).get("seconds")
    for row in result["noop"].values():
        row["ratio"] = round(row["seconds"] / ours, 2) if ours else None
    result["target"] = {"noop_seconds_max": TARGET_NOOP_SECONDS, "ours": ours,
                        "met": bool(ours is not None and ours < TARGET_NOOP_SECONDS)}


def print_table(result: dict) -> None:
    pings = ", ".join(f"{r['ping_ms']}" for r in result["relay_measured"])
    loads = result["machine"]["load_1min_before_after"]
    print(f"secure vs the same items done other ways, relay RTT {result['rtt_ms']:g} ms (measured ssh ping: {pings} ms); "
          f"{result['machine']['cores']} cores, 1-minute load {loads[0]} before, {loads[1]} after; {result['date']}")
    if result["first"]:
        print(f"\nfirst run on a fresh host (median of {result['first_runs']}, a new host each):")
        ours = result["first"].get(REFERENCE, {}).get("seconds")
        print(f"  {'contender':<50} {'seconds':>8} {'round trips':>12} {'ratio':>7}")
        for name, row in result["first"].items():
            ratio = f"{row['seconds'] / ours:.1f}" if ours else "-"
            print(f"  {name:<50} {row['seconds']:>8.1f} {row['round_trips'] if row['round_trips'] is not None else '?':>12} "
                  f"{ratio:>7}   runs {' '.join(str(s) for s in row['seconds_runs'])}")
    print(f"\nno-op run on a hardened host, as {USER} (median of {result['repeat']}; "
          f"{result.get('probes', '?')} probes = every fact secure reads):")
    print(f"  {'contender':<50} {'seconds':>8} {'round trips':>12} {'ratio':>7}")
    for name, row in result["noop"].items():
        trips = "?" if row["round_trips"] is None else row["round_trips"]
        print(f"  {name:<50} {row['seconds']:>8.2f} {trips:>12} {row['ratio'] or 0:>7.1f}")
    for phase in ("first", "noop"):
        row = result[phase].get(REFERENCE, {})
        if "task_seconds" in row:
            print(f"  ({'first' if phase == 'first' else 'no-op'} run: secure's own summary says {row['task_seconds']} s "
                  "after its login; the rest is starting Python, loading the tasks and logging in)")
    target = result.get("target", {})
    if target:
        print(f"\ntarget: no-op secure < {target['noop_seconds_max']} s at {result['rtt_ms']:g} ms: {target['ours']} s -> "
              f"{'MET' if target['met'] else 'NOT MET'}")
    for name, row in result["noop"].items():
        print(f"  {name}: {row['how_counted']}" + (f" [{row['version']}]" if row.get("version") else ""))
    for name, reason in {**result["not_run"], **result["failed"]}.items():
        print(f"NOT RUN   {name}: {reason}")


if __name__ == "__main__":
    sys.exit(main())
