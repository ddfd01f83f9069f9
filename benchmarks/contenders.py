"""The ways to read N facts from one host that the benchmark compares.

Each contender opens its own connection(s) through the relay, runs every probe,
closes, and returns an Outcome: how many probes answered and how many command
round trips it made (counted, or None when only a verbose side run can count them).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from fabric import Connection

from endpoint import Endpoint
from fabfile.core.batch import batch_script, parse_batch
from fabfile.core.settings import Settings
from fabfile.core.steps import Step, gather_facts
from fabfile.core.target import RemoteTarget

SSH_ERROR = 255  # OpenSSH's own failure status (a remote command's status is passed through)
RUN_TIMEOUT = 300  # seconds for one contender run: a bound, not an expectation
STOP_TIMEOUT = 10


class Unavailable(Exception):
    """This contender cannot run here; the message says why."""


class ContenderFailed(Exception):
    """It ran but did not answer every probe."""


@dataclass(frozen=True)
class Outcome:
    answered: int
    round_trips: int | None


class Contender:
    name = ""
    how_counted = ""  # how the round-trip number is obtained

    def prepare(self, workdir: Path, probes: Mapping[str, str]) -> None:
        """Check the tool is there and write any files it needs; raise Unavailable if not."""

    def run(self, endpoint: Endpoint, probes: Mapping[str, str]) -> Outcome:
        raise NotImplementedError

    def count_round_trips(self, endpoint: Endpoint, probes: Mapping[str, str]) -> int | None:
        """An untimed run that counts command round trips, for tools that only log them."""
        return None

    def version(self) -> str:
        return ""


def require_all_answered(name: str, answered: int, probes: Mapping[str, str], detail: str = "") -> None:
    if answered != len(probes):
        raise ContenderFailed(f"{name}: {answered} of {len(probes)} probes answered {detail}".strip())


# --------------------------------------------------------------------------- coachntt-ops


def fabric_connection(endpoint: Endpoint) -> Connection:
    """What `fab -H root@127.0.0.1:<port> -i KEY` builds."""
    return Connection(endpoint.address, user=endpoint.user, port=endpoint.port,
                      connect_kwargs={"key_filename": [str(endpoint.key)]})


@contextlib.contextmanager
def known_hosts_env(path: Path) -> Iterator[None]:
    """Point COACHNTT_KNOWN_HOSTS at `path` for this block only (sandbox.up/down read it too)."""
    before = os.environ.get("COACHNTT_KNOWN_HOSTS")
    os.environ["COACHNTT_KNOWN_HOSTS"] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("COACHNTT_KNOWN_HOSTS", None)
        else:
            os.environ["COACHNTT_KNOWN_HOSTS"] = before


class CoachnttGather(Contender):
    """RemoteTarget (one hardened connection, TCP_NODELAY) + gather_facts over one Step per probe."""

    name = "coachntt-ops gather"
    how_counted = "counted: RemoteTarget.round_trips"

    def run(self, endpoint: Endpoint, probes: Mapping[str, str]) -> Outcome:
        settings = Settings("production", {"ssh": {"connect_timeout": 10, "known_hosts": str(endpoint.known_hosts)}})
        steps = [Step(name, probes={"out": command}) for name, command in probes.items()]
        with known_hosts_env(endpoint.known_hosts):
            target = RemoteTarget(fabric_connection(endpoint), settings)
            try:
                facts = gather_facts(target, steps)
            finally:
                target.close()
        answered = sum(len(step_facts) for step_facts in facts)
        require_all_answered(self.name, answered, probes)
        return Outcome(answered, target.round_trips)

    def version(self) -> str:
        import fabric
        return f"fabric {fabric.__version__}"


# --------------------------------------------------------------------------- Fabric, as a typical fabfile


class FabricPerProbe(Contender):
    """fabric.Connection(...).run(probe, hide=True) once per probe, default settings."""

    name = "Fabric run() per probe"
    how_counted = "counted: one run() per probe"

    def run(self, endpoint: Endpoint, probes: Mapping[str, str]) -> Outcome:
        connection = fabric_connection(endpoint)
        # Fabric's default policy would accept any key; loading ours makes a wrong one fail.
        connection.client.load_host_keys(str(endpoint.known_hosts))
        answered = 0
        try:
            for command in probes.values():
                connection.run(command, hide=True, warn=True, in_stream=False)
                answered += 1
        finally:
            connection.close()
        require_all_answered(self.name, answered, probes)
        return Outcome(answered, answered)


# --------------------------------------------------------------------------- OpenSSH


def ssh_options(endpoint: Endpoint) -> list[str]:
    """No ~/.ssh/config, only the sandbox key, host key checked against the relay's entry."""
    return [
        "-F", "/dev/null", "-p", str(endpoint.port), "-i", str(endpoint.key),
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={endpoint.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
    ]


def destination(endpoint: Endpoint) -> str:
    return f"{endpoint.user}@{endpoint.address}"


def run_ssh(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                            stdin=None if stdin is not None else subprocess.DEVNULL)
    if result.returncode == SSH_ERROR:
        raise ContenderFailed(f"ssh failed: {result.stderr.strip()[-300:]}")
    return result


def openssh_version() -> str:
    result = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
    return result.stderr.strip().split(",")[0]


class OpenSSHControlMaster(Contender):
    """One ControlMaster connection, then `ssh -S <socket> host PROBE` per probe."""

    name = "OpenSSH ControlMaster, ssh per probe"
    how_counted = "counted: one ssh per probe (+ the master's login)"

    def run(self, endpoint: Endpoint, probes: Mapping[str, str]) -> Outcome:
        control = Path(endpoint.known_hosts).parent / f"cm-{secrets.token_hex(4)}"
        base = ["ssh", *ssh_options(endpoint), "-S", str(control)]
        start_control_master(base, destination(endpoint))
        answered = 0
        try:
            for command in probes.values():
                run_ssh([*base, "-o", "ControlMaster=no", destination(endpoint), command])
                answered += 1
        finally:
            stop_control_master(base, destination(endpoint))
        require_all_answered(self.name, answered, probes)
        return Outcome(answered, answered)

    def version(self) -> str:
        return openssh_version()


def start_control_master(base: list[str], dest: str) -> None:
    """`ssh -M -N -f`: the master backgrounds itself once logged in, so this returns when it is usable.

    Its output goes to a file, not a pipe: the backgrounded master would keep a pipe open.
    """
    with tempfile.TemporaryFile("w+") as errors:
        status = subprocess.run([*base, "-M", "-N", "-f", dest], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=errors, timeout=RUN_TIMEOUT).returncode
        if status != 0:
            errors.seek(0)
            raise ContenderFailed(f"ssh ControlMaster failed (exit {status}): {errors.read().strip()[-300:]}")


def stop_control_master(base: list[str], dest: str) -> None:
    subprocess.run([*base, "-O", "exit", dest], capture_output=True, timeout=STOP_TIMEOUT,
                   stdin=subprocess.DEVNULL)


class OpenSSHOneScript(Contender):
    """A fresh `ssh host sh -s` with every probe in one script (what a hand-written script does).

    The script is coachntt-ops' own batch_script, so the remote work is identical and the
    difference is the client (OpenSSH vs paramiko+Fabric).
    """

    name = "OpenSSH, all probes in one ssh"
    how_counted = "counted: one ssh"

    def run(self, endpoint: Endpoint, probes: Mapping[str, str]) -> Outcome:
        marker = "@@bench-" + secrets.token_hex(8)
        result = run_ssh(["ssh", *ssh_options(endpoint), destination(endpoint), "sh -s"],
                         stdin=batch_script(probes, marker))
        answered = len(parse_batch(result.stdout, marker))
        require_all_answered(self.name, answered, probes)
        return Outcome(answered, 1)

    def version(self) -> str:
        return openssh_version()


class OpenSSHConnectionPerProbe(Contender):
    """`ssh host PROBE` per probe, each a new connection (a naive shell loop)."""

    name = "OpenSSH, new connection per probe"
    how_counted = "counted: one ssh (and one login) per probe"

    def run(self, endpoint: Endpoint, probes: Mapping[str, str]) -> Outcome:
        answered = 0
        for command in probes.values():
            run_ssh(["ssh", *ssh_options(endpoint), destination(endpoint), command])
            answered += 1
        return Outcome(answered, answered)

    def version(self) -> str:
        return openssh_version()


# --------------------------------------------------------------------------- pyinfra and Ansible


def tool_path(tools_dir: Path, venv: str, program: str) -> Path | None:
    """The program in our own venv under tools_dir, else on PATH."""
    candidate = tools_dir / venv / "bin" / program
    if candidate.is_file():
        return candidate
    found = shutil.which(program)
    return Path(found) if found else None


def run_tool(args: list[str], env: Mapping[str, str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, env=dict(env), cwd=cwd,
                              timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ContenderFailed(f"{Path(args[0]).name} did not finish within {RUN_TIMEOUT}s") from None


def last_lines(text: str, count: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-count:])


class Pyinfra(Contender):
    """A deploy file with one `server.shell` operation per probe (`_ignore_errors=True`)."""

    name = "pyinfra server.shell per probe"
    how_counted = "counted: 'Command exit status' lines of a separate --debug run"

    def __init__(self, tools_dir: Path):
        self.tools_dir = tools_dir
        self.program: Path | None = None
        self.workdir = Path()

    def prepare(self, workdir: Path, probes: Mapping[str, str]) -> None:
        self.program = tool_path(self.tools_dir, "pyinfra", "pyinfra")
        if not self.program:
            raise Unavailable("pyinfra not installed (run with --install-tools)")
        self.workdir = workdir / "pyinfra"
        self.workdir.mkdir(exist_ok=True)
        lines = ["from pyinfra.operations import server", ""]
        for name, command in probes.items():
            lines.append(f"server.shell(name={name!r}, commands=[{command!r}], _ignore_errors=True)")
        (self.workdir / "deploy.py").write_text("\n".join(lines) + "\n")

    def command(self, endpoint: Endpoint, *extra: str) -> list[str]:
        return [
            str(self.program), "-y", *extra,
            "--ssh-user", endpoint.user, "--ssh-port", str(endpoint.port), "--ssh-key", str(endpoint.key),
            "--data", f"ssh_known_hosts_file={endpoint.known_hosts}",
            "--data", "ssh_strict_host_key_checking=yes",
            endpoint.address, "deploy.py",
        ]

    def invoke(self, endpoint: Endpoint, *extra: str) -> subprocess.CompletedProcess:
        result = run_tool(self.command(endpoint, *extra), {**os.environ, "NO_COLOR": "1"}, self.workdir)
        if result.returncode != 0:
            raise ContenderFailed(f"pyinfra exited {result.returncode}: {last_lines(result.stdout + result.stderr)}")
        return result

    def run(self, endpoint: Endpoint, probes: Mapping[str, str]) -> Outcome:
        self.invoke(endpoint)
        return Outcome(len(probes), None)

    def count_round_trips(self, endpoint: Endpoint, probes: Mapping[str, str]) -> int | None:
        result = self.invoke(endpoint, "--debug")
        return (result.stdout + result.stderr).count("Command exit status")

    def version(self) -> str:
        result = subprocess.run([str(self.program), "--version"], capture_output=True, text=True)
        return result.stdout.strip()


class Ansible(Contender):
    """A playbook of N `shell` tasks (gather_facts off), Ansible's default OpenSSH settings."""

    how_counted = "counted: 'SSH: EXEC' lines (ssh/sftp runs) of a separate -vvv run"

    def __init__(self, tools_dir: Path, pipelining: bool):
        self.tools_dir = tools_dir
        self.pipelining = pipelining
        self.name = f"Ansible playbook, pipelining {'on' if pipelining else 'off'}"
        self.program: Path | None = None
        self.workdir = Path()

    def prepare(self, workdir: Path, probes: Mapping[str, str]) -> None:
        self.program = tool_path(self.tools_dir, "ansible", "ansible-playbook")
        if not self.program:
            raise Unavailable("ansible-core not installed (run with --install-tools)")
        self.workdir = workdir / ("ansible-pipelining" if self.pipelining else "ansible")
        self.workdir.mkdir(exist_ok=True)
        # `cmd:` rather than free form (which Ansible splits as k=v), and raw: Ansible templates
        # task arguments, and shell text such as bash's ${#var} must reach the host as written.
        tasks = [{"name": name, "ansible.builtin.shell": {"cmd": "{% raw %}" + command + "{% endraw %}"},
                  "changed_when": False, "failed_when": False}
                 for name, command in probes.items()]
        play = [{"hosts": "all", "gather_facts": False, "tasks": tasks}]
        (self.workdir / "playbook.yml").write_text(json.dumps(play, indent=1) + "\n")  # JSON is YAML

    def environment(self, endpoint: Endpoint, control_dir: Path) -> dict[str, str]:
        ssh_args = ("-F /dev/null -C -o ControlMaster=auto -o ControlPersist=60s -o IdentitiesOnly=yes "
                    f"-o UserKnownHostsFile={endpoint.known_hosts} -o GlobalKnownHostsFile=/dev/null")
        return {
            **os.environ,
            "LC_ALL": "C.UTF-8",
            "ANSIBLE_CONFIG": str(self.workdir / "none.cfg"),  # no ansible.cfg from elsewhere
            "ANSIBLE_HOME": str(self.workdir / "home"),
            "ANSIBLE_LOCAL_TEMP": str(self.workdir / "tmp"),
            "ANSIBLE_HOST_KEY_CHECKING": "True",
            "ANSIBLE_PIPELINING": str(self.pipelining),
            "ANSIBLE_SSH_ARGS": ssh_args,
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control_dir),
            "ANSIBLE_PYTHON_INTERPRETER": "auto_silent",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_TIMEOUT": "10",
        }

    def write_inventory(self, endpoint: Endpoint) -> Path:
        inventory = self.workdir / "inventory.ini"
        inventory.write_text(
            f"bench ansible_host={endpoint.address} ansible_port={endpoint.port} ansible_user={endpoint.user} "
            f"ansible_ssh_private_key_file={endpoint.key}\n"
        )
        return inventory

    def play(self, endpoint: Endpoint, *extra: str, tail: int = 5) -> tuple[subprocess.CompletedProcess, re.Match]:
        """playbook.yml run once; its result and its recap (ok, changed, unreachable, failed)."""
        # A fresh ControlPath dir each run: ControlPersist=60s must not hand the next run a live login.
        control_dir = self.workdir / f"cp-{secrets.token_hex(4)}"
        control_dir.mkdir()
        inventory = self.write_inventory(endpoint)
        try:
            result = run_tool([str(self.program), *extra, "-i", str(inventory), "playbook.yml"],
                              self.environment(endpoint, control_dir), self.workdir)
        finally:
            stop_persisted_masters(control_dir, endpoint)
        recap = re.search(r"ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", result.stdout)
        if result.returncode != 0 or not recap:
            raise ContenderFailed(f"ansible-playbook exited {result.returncode}: {last_lines(result.stdout + result.stderr, tail)}")
        return result, recap

    def invoke(self, endpoint: Endpoint, probes: Mapping[str, str], *extra: str) -> subprocess.CompletedProcess:
        result, recap = self.play(endpoint, *extra)
        require_all_answered(self.name, int(recap.group(1)), probes, f"({recap.group(0)})")
        return result

    def run(self, endpoint: Endpoint, probes: Mapping[str, str]) -> Outcome:
        self.invoke(endpoint, probes)
        return Outcome(len(probes), None)

    def count_round_trips(self, endpoint: Endpoint, probes: Mapping[str, str]) -> int | None:
        result = self.invoke(endpoint, probes, "-vvv")
        return len(re.findall(r"SSH: EXEC (?:ssh|sftp|scp)", result.stdout))

    def version(self) -> str:
        result = subprocess.run([str(self.program), "--version"], capture_output=True, text=True)
        return result.stdout.splitlines()[0].strip() if result.stdout else ""


def stop_persisted_masters(control_dir: Path, endpoint: Endpoint) -> None:
    """Ask each ControlPersist master Ansible left behind to exit, then drop the dir."""
    for socket_path in control_dir.iterdir():
        subprocess.run(["ssh", "-F", "/dev/null", "-S", str(socket_path), "-O", "exit", destination(endpoint)],
                       capture_output=True, timeout=STOP_TIMEOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + STOP_TIMEOUT
    while any(control_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    shutil.rmtree(control_dir, ignore_errors=True)


def all_contenders(tools_dir: Path) -> list[Contender]:
    return [
        CoachnttGather(),
        OpenSSHOneScript(),
        OpenSSHControlMaster(),
        OpenSSHConnectionPerProbe(),
        FabricPerProbe(),
        Pyinfra(tools_dir),
        Ansible(tools_dir, pipelining=True),
        Ansible(tools_dir, pipelining=False),
    ]
