"""The ways to run monitor.check's checks that bench_monitor.py compares.

Every contender runs the same checks: ours sends scripts/monitor-check.sh once; the
others run `check_commands()`, the same shell as that script's probes, one command
per check. Each run's answers are judged by core/checks.evaluate (`verdicts`), so a
contender that answers differently is caught, not timed.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import yaml

import endpoint as ep
from contenders import (
    Ansible,
    Contender,
    ContenderFailed,
    Outcome,
    Pyinfra,
    fabric_connection,
    known_hosts_env,
    last_lines,
    run_tool,
)
from fabfile.core import checks, templates
from fabfile.core.batch import ProbeResult
from fabfile.core.settings import Settings
from fabfile.core.target import RemoteTarget

PROJECT_DIR = ep.PROJECT_DIR
BIN = Path(sys.executable).parent
REFERENCE = "coachntt-ops monitor.check"
# The CPU sample is judged against a machine shared with other work: its verdict is left out
# of the comparison (every contender still reads it).
NOT_COMPARED = {"cpu"}


# --------------------------------------------------------------------------- the checks


def check_config() -> checks.CheckConfig:
    defaults = yaml.safe_load((PROJECT_DIR / "invoke.yaml").read_text())["coachntt"]
    return checks.CheckConfig.from_settings(Settings("production", defaults))


def database_script() -> str:
    """monitor-check.sh's database probe, word for word, as a script of its own (args: db, user, name)."""
    text = templates.script(checks.SCRIPT)
    start = text.index("database() {")
    body = text[start:text.index("\n}\n", start) + 3]
    return f"set -u\ndb=$1 db_user=$2 db_name=$3\n{body}database\n"


def check_commands(cfg: checks.CheckConfig) -> dict[str, str]:
    """Each check as its own command: the shell of monitor-check.sh's probes, one by one."""
    q = shlex.quote
    host, _, port = cfg.pgbouncer.rpartition(":")
    filters = json.dumps({"label": [f"com.docker.compose.project.working_dir={cfg.app_dir}"]}, separators=(",", ":"))
    disks = " ".join(q(p) for p in cfg.disk_paths)
    # The live slot's /health, found as monitor-check.sh finds it (scripts/live-slot.sh).
    live_health = (templates.script("live-slot.sh") + 'live_slot "$@"\n'
                   + 'exec curl -s -m 3 -o /dev/null -w "%{http_code} %{time_total} $live_name\\n" "$live_url"\n')
    return {
        "health": f"sh -c {q(live_health)} health " + " ".join(q(a) for a in cfg.health.args()),
        "database": f"bash -c {q(database_script())} database {q(cfg.db_container)} {q(cfg.db_user)} {q(cfg.db_name)}",
        "pgbouncer": ("timeout 3 bash -c 'exec 3<> \"/dev/tcp/$0/$1\" && printf \"\\0\\0\\0\\010\\004\\322\\026\\057\" >&3 "
                      f"&& head -c 1 <&3' {q(host)} {q(port)}"),
        "services": ("curl -sf -m 5 --unix-socket /var/run/docker.sock -G http://docker/containers/json "
                     f"--data-urlencode all=1 --data-urlencode {q('filters=' + filters)}"),
        "disk": (f"df -Pk -- {disks} | awk -v paths={q(' '.join(cfg.disk_paths))} "
                 "'BEGIN {split(paths, p, \" \")} NR > 1 {print p[NR - 1], $6, $3, $4}'"),
        "memory": "grep -E '^(MemTotal|MemAvailable):' /proc/meminfo",
        "cpu": (f"head -n 1 /proc/stat; sleep {cfg.cpu_sample_ms / 1000:g}; head -n 1 /proc/stat; cat /proc/loadavg; "
                "echo \"cpus $(getconf _NPROCESSORS_ONLN)\""),
        "certificate": ("sudo -n sh -c '[ -e \"$1\" ] || exit 3; exec openssl x509 -enddate -noout -in \"$1\"' certificate "
                        f"{q(cfg.cert_file)}"),
        "backups": (f"cd {q(cfg.backup_dir)} 2>/dev/null || exit 4; for f in db_*.dump; do [ -f \"$f\" ] || continue; "
                    "printf '%s\\t%s\\t%s\\t%s\\t%s\\t%s\\n' \"$f\" \"$(stat -c %s \"$f\")\" \"$(stat -c %Y \"$f\")\" "
                    "\"$([ -f \"$f.sha256\" ] && echo yes || echo no)\" \"$([ -f \"$f.json\" ] && echo yes || echo no)\" "
                    "\"$(head -n 1 \"$f.verified\" 2>/dev/null | tr '\\t' ' ')\"; done"),
    }


def verdicts(answers: Mapping[str, ProbeResult], cfg: checks.CheckConfig, now: int) -> dict[str, str]:
    facts = {"now": ProbeResult(str(now), 0), **answers}
    return {c.name: c.status for c in checks.evaluate(facts, cfg) if c.name not in NOT_COMPARED}


# --------------------------------------------------------------------------- contenders


class CoachnttCheck(Contender):
    """What `monitor.check` does (core/checks.read), in this process, connection included."""

    name = REFERENCE
    how_counted = "counted: RemoteTarget.round_trips"

    def __init__(self, cfg: checks.CheckConfig):
        self.cfg = cfg
        self.last: dict[str, str] = {}
        self.names: list[str] = []

    def run(self, endpoint: ep.Endpoint, probes: Mapping[str, str]) -> Outcome:
        settings = Settings("production", {"ssh": {"connect_timeout": 10, "known_hosts": str(endpoint.known_hosts)}})
        with known_hosts_env(endpoint.known_hosts):
            target = RemoteTarget(fabric_connection(endpoint), settings)
            try:
                found = checks.read(target, self.cfg)
            finally:
                target.close()
        self.names = [c.name for c in found]
        self.last = {c.name: c.status for c in found if c.name not in NOT_COMPARED}
        return Outcome(len(found), target.round_trips)

    def version(self) -> str:
        import fabric
        return f"fabric {fabric.__version__}"


class CoachnttCli(Contender):
    """`fab -H coachntt@127.0.0.1:<relay> monitor.check --json`: what an operator or cron runs."""

    name = "fab monitor.check (CLI, Python start-up included)"
    how_counted = "counted: its own JSON summary (round_trips)"

    def run(self, endpoint: ep.Endpoint, probes: Mapping[str, str]) -> Outcome:
        command = [str(BIN / "fab"), "-H", f"{endpoint.user}@{endpoint.address}:{endpoint.port}", "-i", str(endpoint.key),
                   "monitor.check", "--json"]
        result = run_tool(command, {**os.environ, "COACHNTT_KNOWN_HOSTS": str(endpoint.known_hosts)}, PROJECT_DIR)
        records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode not in (0, 1) or not records or "summary" not in records[-1]:
            raise ContenderFailed(f"fab monitor.check exited {result.returncode}: {last_lines(result.stderr)}")
        return Outcome(len(records) - 1, records[-1]["round_trips"])


class FabricPerCheck(Contender):
    """fabric.Connection(...).run(check, hide=True, warn=True) once per check, default settings."""

    name = "Fabric run() per check"
    how_counted = "counted: one run() per check"

    def __init__(self, cfg: checks.CheckConfig):
        self.cfg = cfg
        self.last: dict[str, str] = {}

    def run(self, endpoint: ep.Endpoint, probes: Mapping[str, str]) -> Outcome:
        connection = fabric_connection(endpoint)
        connection.client.load_host_keys(str(endpoint.known_hosts))
        answers = {}
        try:
            for name, command in probes.items():
                result = connection.run(command, hide=True, warn=True, in_stream=False)
                answers[name] = ProbeResult(result.stdout.rstrip("\n"), result.exited)
        finally:
            connection.close()
        self.last = verdicts(answers, self.cfg, int(time.time()))
        return Outcome(len(answers), len(answers))


# Command output and status, framed so a deploy file or a playbook can hand them back.
RC_MARK = "@@rc="


def with_status(command: str) -> str:
    return f"( {command}\n) 2>/dev/null; rc=$?; echo; echo {RC_MARK}$rc"


def split_status(text: str) -> ProbeResult:
    body, _, status = text.rpartition(RC_MARK)
    return ProbeResult(body.rstrip("\n"), int(status.strip() or 1))


class PyinfraFacts(Pyinfra):
    """A deploy file that reads one `Command` fact per check (facts only, no operations)."""

    name = "pyinfra facts per check"

    def __init__(self, tools_dir: Path, cfg: checks.CheckConfig):
        super().__init__(tools_dir)
        self.cfg = cfg
        self.last: dict[str, str] = {}

    def prepare(self, workdir: Path, probes: Mapping[str, str]) -> None:
        super().prepare(workdir, probes)
        answers = self.workdir / "answers.json"
        lines = ["import json", "from pyinfra import host", "from pyinfra.facts.server import Command", "", "answers = {}"]
        for name, command in probes.items():
            lines.append(f"answers[{name!r}] = host.get_fact(Command, {with_status(command)!r})")
        lines.append(f"open({str(answers)!r}, 'w').write(json.dumps(answers))")
        (self.workdir / "deploy.py").write_text("\n".join(lines) + "\n")
        self.answers = answers

    def run(self, endpoint: ep.Endpoint, probes: Mapping[str, str]) -> Outcome:
        self.answers.unlink(missing_ok=True)
        self.invoke(endpoint)
        got = json.loads(self.answers.read_text()) if self.answers.exists() else {}
        if set(got) != set(probes) or not all(isinstance(v, str) for v in got.values()):
            raise ContenderFailed(f"pyinfra answered {len(got)} of {len(probes)} checks")
        self.last = verdicts({name: split_status(text) for name, text in got.items()}, self.cfg, int(time.time()))
        return Outcome(len(got), None)


class AnsibleChecks(Ansible):
    """One `shell` task per check, gather_facts off, pipelining on; answers read from `-v` output."""

    def __init__(self, tools_dir: Path, cfg: checks.CheckConfig):
        super().__init__(tools_dir, pipelining=True)
        self.cfg = cfg
        self.last: dict[str, str] = {}

    def environment(self, endpoint: ep.Endpoint, control_dir: Path) -> dict[str, str]:
        # Each task's result on one JSON line (ansible-core's own callback; its `json` one is not in core).
        return {**super().environment(endpoint, control_dir),
                "ANSIBLE_CALLBACK_RESULT_FORMAT": "json", "ANSIBLE_CALLBACK_FORMAT_PRETTY": "False"}

    def run(self, endpoint: ep.Endpoint, probes: Mapping[str, str]) -> Outcome:
        result = self.invoke(endpoint, probes, "-v")
        answers, task = {}, ""
        for line in result.stdout.splitlines():
            if line.startswith("TASK ["):
                task = line[len("TASK ["):line.index("]")]
            elif line.startswith(("ok: [", "changed: [", "failed: [", "fatal: [")) and " => {" in line:
                outcome = json.loads(line.split(" => ", 1)[1])
                answers[task] = ProbeResult(outcome.get("stdout", "").rstrip("\n"), int(outcome.get("rc", 1)))
        if set(answers) != set(probes):
            raise ContenderFailed(f"ansible answered {len(answers)} of {len(probes)} checks")
        self.last = verdicts(answers, self.cfg, int(time.time()))
        return Outcome(len(answers), None)
