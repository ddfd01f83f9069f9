"""The GitHub Actions deploy step, run for real against a sandbox host.

The step's shell text is read from .github/workflows/deploy.yml and run the way a
runner runs it (`bash -e`), with its `env:` filled in: the secrets and variables
by test values, GITHUB_SHA and GITHUB_ACTOR as Actions sets them. The host has
examples/app deployed and the tool installed with `tool.install`; CI's own key
was added to the deploy user with `secure --keys`.

The task is the workflow's own (DEPLOY_TASK: release), run as it is: the release
log's entry is a `release` (its watch kept short here by the server's settings).

In order: a push is released (the release log's newest entry is that sha, ok,
by the actor), the key is gone from the runner afterwards; a host key that is
not the pinned one is refused by ssh (255) with nothing changed; a held deploy
lock is exit 4; a cancelled job (SIGINT then SIGTERM to the step, as the runner
sends them) reaches the tool on the server as SIGHUP through `ssh -tt`: the
release is recorded interrupted, the lock held, and `deploy.recover` settles it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import yaml

from fabfile.sandbox import example_repo
from opsrun import PROJECT_DIR, console, example_app_served, fab, ready_for_the_app, through_nginx

WORKFLOW = PROJECT_DIR / ".github" / "workflows" / "deploy.yml"
LOG = "/var/lib/coachntt-ops/releases.jsonl"
LOCK = "/var/lib/coachntt-ops/deploy.lock"
HOLD = "/tmp/coachntt-test-hold-ci"
ACTOR = "test-actor"
# The server's settings file keeps a release's watch short here.
RELEASE_SETTINGS = {"COACHNTT_RELEASE__WATCH_SECONDS": "10", "COACHNTT_MONITOR__WATCH_INTERVAL": "2"}
# Test equipment: the pre_deploy hook waits (bounded) while HOLD exists, so a phase runs when the job is cancelled.
HOOK = f"i=0; while [ -e {HOLD} ] && [ $i -lt 150 ]; do sleep 0.2; i=$((i + 1)); done"


def deploy_step() -> dict:
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    (step,) = [step for step in jobs["deploy"]["steps"] if "run" in step]
    return step


class CI:
    """The deploy step as a runner runs it: its `run:` text under `bash -e`, its env filled in."""

    def __init__(self, host, tmp_path, private_key: str):
        self.host, self.tmp = host, tmp_path
        step = deploy_step()
        self.script, self.env_spec = step["run"], step["env"]
        self.task = self.env_spec["DEPLOY_TASK"]
        pinned = [line for line in host.known_hosts.read_text().splitlines() if line.split(" ", 1)[0] == host.ip]
        self.values = {"secrets.VPS_HOST": f"coachntt@{host.ip}", "secrets.VPS_SSH_KEY": private_key,
                       "vars.VPS_KNOWN_HOSTS": "\n".join(pinned)}

    def env(self, sha: str, **values: str) -> dict:
        filled = {}
        for name, value in self.env_spec.items():
            found = re.fullmatch(r"\$\{\{ (\S+) \}\}", str(value))
            filled[name] = {**self.values, **values}[found.group(1)] if found else str(value)
        runner_tmp = self.tmp / "runner-tmp"
        runner_tmp.mkdir(exist_ok=True)
        return {"PATH": os.environ["PATH"], "HOME": str(self.tmp), "TMPDIR": str(runner_tmp),
                "GITHUB_SHA": sha, "GITHUB_ACTOR": ACTOR, **filled}

    def command(self) -> list[str]:
        path = self.tmp / "step.sh"
        path.write_text(self.script)
        return ["bash", "-e", str(path)]  # GitHub's default shell for `run:` on Linux

    def run(self, sha: str, **values: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(), cwd=PROJECT_DIR, env=self.env(sha, **values), capture_output=True, text=True,
                              timeout=900)

    def start(self, sha: str) -> subprocess.Popen:
        # Its own process group: the runner signals the step's whole group when a job is cancelled.
        return subprocess.Popen(self.command(), cwd=PROJECT_DIR, env=self.env(sha), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    def key_left(self) -> list[str]:
        return [str(p) for p in (self.tmp / "runner-tmp").rglob("*")]


class Server:
    def __init__(self, host, repo, env):
        self.host, self.repo, self.env = host, repo, env

    def ok(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        result = fab(self.host, *args, user="coachntt", env={**self.env, **(env or {})})
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def sh(self, command: str) -> str:
        code, out = console(self.host, command)
        assert code == 0, out
        return out

    def last_entry(self) -> dict:
        return json.loads(self.sh(f"tail -n 1 {LOG}"))

    def serving(self) -> str:
        return json.loads(self.sh(through_nginx("/health")))["version"]  # from whichever slot serves


@pytest.fixture(scope="module")
def server(vps_factory_module, tmp_path_factory):
    host = vps_factory_module(flavour="provisioned")
    ready_for_the_app(host)
    with example_app_served(tmp_path_factory.mktemp("git")) as (repo, sha, env):
        srv = Server(host, repo, env)
        srv.ok("deploy.setup")
        srv.ok("deploy", "--sha", sha)
        # The hook is a server setting: tool.install writes it to the server's settings file.
        srv.ok("tool.install", env={"COACHNTT_APP__HOOKS__PRE_DEPLOY": HOOK, **RELEASE_SETTINGS})
        yield srv


@pytest.fixture(scope="module")
def ci(server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ci")
    key = tmp / "ci_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ci", "-f", str(key)], check=True)
    server.ok("secure", "--keys", key.with_name("ci_key.pub").read_text().strip())  # added; the operator's key stays
    return CI(server.host, tmp, key.read_text())


def test_a_push_is_released_by_the_workflows_own_lines(server, ci):
    sha = example_repo.commit_change(server.repo, "a push to main", {"NOTES.md": "released by CI\n"})
    assert ci.task == "release", "the workflow releases"
    result = ci.run(sha)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ci-deploy: {ci.task} --sha {sha} on coachntt@{server.host.ip}:22 (host key pinned), for {ACTOR}" in result.stdout
    entry = server.last_entry()
    assert (entry["sha"], entry["kind"], entry["result"]) == (sha, "release", "ok"), entry
    assert [p["phase"] for p in entry["extra"]["phases"]] == ["preflight", "backup", "staging", "deploy", "verify", "watch",
                                                             "drain"], entry
    assert entry["who"].startswith(f"{ACTOR} via coachntt@"), entry
    assert server.serving() == sha
    assert ci.key_left() == [], "the private key is gone from the runner"


def entry_shape(entry: dict) -> dict:
    """What must not depend on where a release was started: keys, kind, result, phases run."""
    return {"keys": sorted(entry), "kind": entry["kind"], "result": entry["result"], "slot_set": bool(entry.get("slot")),
            "phases": [(p["phase"], p["result"], sorted(p)) for p in entry["extra"]["phases"]]}


def test_the_same_release_from_fab_from_inv_on_the_server_and_from_the_workflow_logs_the_same_entry(server, ci):
    entries = {}
    sha = example_repo.commit_change(server.repo, "from the workflow", {"NOTES.md": "by CI\n"})
    assert ci.run(sha).returncode == 0
    entries["workflow"] = server.last_entry()
    sha = example_repo.commit_change(server.repo, "from a laptop", {"NOTES.md": "by fab -H\n"})
    server.ok("release", "--sha", sha, env={"COACHNTT_APP__HOOKS__PRE_DEPLOY": HOOK, **RELEASE_SETTINGS})
    entries["fab -H"] = server.last_entry()
    sha = example_repo.commit_change(server.repo, "on the server", {"NOTES.md": "by inv on the server\n"})
    code, out = console(server.host, f"cd /opt/coachntt-ops && runuser -u coachntt -- coachntt-inv release --sha {sha}")
    assert code == 0, out
    entries["inv on the server"] = server.last_entry()
    assert entries["inv on the server"]["sha"] == sha and server.serving() == sha
    shapes = {where: entry_shape(entry) for where, entry in entries.items()}
    assert shapes["fab -H"] == shapes["workflow"] == shapes["inv on the server"], shapes
    assert shapes["workflow"]["result"] == "ok" and shapes["workflow"]["kind"] == "release"
    # Only who started it differs: the actor via the deploy user, the operator's machine, the deploy user.
    assert entries["workflow"]["who"].startswith(f"{ACTOR} via coachntt@"), entries["workflow"]
    assert entries["inv on the server"]["who"].startswith("coachntt@"), entries["inv on the server"]
    assert not entries["fab -H"]["who"].startswith(("coachntt@", ACTOR)), entries["fab -H"]


def test_a_host_key_that_is_not_the_pinned_one_is_refused(server, ci, tmp_path):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    impostor = f"{server.host.ip} {' '.join(other.with_name('other.pub').read_text().split()[:2])}"
    before = server.sh(f"cat {LOG}")
    sha = example_repo.commit_change(server.repo, "never shipped", {"NOTES.md": "not this one\n"})
    result = ci.run(sha, **{"vars.VPS_KNOWN_HOSTS": impostor})
    assert result.returncode == 255, result.stdout + result.stderr
    assert "Host key verification failed" in result.stderr
    assert server.sh(f"cat {LOG}") == before and ci.key_left() == []


def test_a_held_deploy_lock_is_exit_4(server, ci):
    server.sh(f"install -d -o coachntt -g coachntt {LOCK} && printf 'holder=ops@laptop\\nsince=now\\nsha=maintenance\\n' "
              f"> {LOCK}/info && chown coachntt {LOCK}/info")
    try:
        sha = example_repo.commit_change(server.repo, "waits for the lock", {"NOTES.md": "later\n"})
        result = ci.run(sha)
        assert result.returncode == 4, result.stdout + result.stderr
        assert "deploy lock held by ops@laptop" in result.stdout + result.stderr
    finally:
        server.sh(f"rm -rf {LOCK}")


def test_a_cancelled_job_reaches_the_tool_on_the_server_and_recover_settles_it(server, ci):
    live = server.serving()
    server.sh(f"touch {HOLD}")
    sha = example_repo.commit_change(server.repo, "cancelled", {"NOTES.md": "cancelled\n"})
    step = ci.start(sha)
    try:
        deadline = time.monotonic() + 300
        while console(server.host, f"grep -qx 'pre_deploy hook' {LOCK}/job.phase")[0] != 0:
            assert step.poll() is None, step.communicate()
            assert time.monotonic() < deadline, "the release never reached its hook"
            time.sleep(0.3)
        os.killpg(step.pid, signal.SIGINT)  # the runner's cancel: SIGINT, then SIGTERM
        time.sleep(2)
        if step.poll() is None:
            os.killpg(step.pid, signal.SIGTERM)
        out, err = step.communicate(timeout=60)
        # While the hook still runs: the tool on the server heard of it at once (SIGHUP through
        # its terminal) and recorded that its client left, not at its next print.
        deadline = time.monotonic() + 15
        while console(server.host, f"test -e {LOCK}/client-left")[0] != 0:
            assert time.monotonic() < deadline, server.sh(f"ls {LOCK}; cat {LOCK}/job.phase")
            time.sleep(0.3)
        assert server.sh(f"cat {LOCK}/job.phase").strip() == "pre_deploy hook"
        assert console(server.host, f"test -e {LOCK}/job.status")[0] != 0, "the phase goes on meanwhile"
    finally:
        server.sh(f"rm -f {HOLD}")
    assert step.returncode in (130, 143), (step.returncode, out, err)
    assert ci.key_left() == [], "the key is removed on a cancel too"
    deadline = time.monotonic() + 60
    while server.last_entry().get("sha") != sha:  # the hook's phase records it when it ends
        assert time.monotonic() < deadline, server.sh(f"tail -n 3 {LOG}; ls {LOCK}")
        time.sleep(1)
    entry = server.last_entry()
    assert (entry["result"], entry["phase"]) == ("interrupted", "pre_deploy hook"), entry
    assert console(server.host, f"test -d {LOCK}")[0] == 0, "left in order: the lock stays for deploy.recover"
    recovered = server.ok("deploy.recover")
    assert f"recovered: {live[:12]} is back and healthy" in recovered.stdout, recovered.stdout
    assert server.serving() == live and console(server.host, f"test -d {LOCK}")[0] != 0
