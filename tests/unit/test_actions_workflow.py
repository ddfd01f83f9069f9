"""The GitHub Actions deploy as data: .github/workflows/deploy.yml's properties, and
.github/ci-deploy.sh (the deploy step's lines) run here against a stand-in for ssh.

The script runs with a PATH of the stand-in and a few plain tools only: the real ssh
is never found, and the host it is given is loopback anyway.
"""

from __future__ import annotations

import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from stand_ins import script_path

from fabfile.core.settings import PROJECT_DIR

WORKFLOWS = PROJECT_DIR / ".github" / "workflows"
SCRIPT = PROJECT_DIR / ".github" / "ci-deploy.sh"
SHA = "0123456789abcdef0123456789abcdef01234567"
KNOWN = "127.0.0.1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDvYJdaKkBzbdPPL1ztG3Te2yRAXX4LBpQp/bxLmuVdm"
KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-real-key\n-----END OPENSSH PRIVATE KEY-----"


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


@pytest.fixture(scope="module")
def workflow() -> dict:
    return load("deploy.yml")


@pytest.fixture(scope="module")
def deploy_job(workflow) -> dict:
    return workflow["jobs"]["deploy"]


@pytest.fixture(scope="module")
def deploy_step(deploy_job) -> dict:
    (step,) = [step for step in deploy_job["steps"] if "run" in step]
    return step


def triggers(workflow: dict) -> dict:
    return workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true


def strings(node, path=()):
    """(path, text) of every string value in the workflow."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from strings(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from strings(value, (*path, str(index)))
    elif isinstance(node, str):
        yield path, node


# --- the workflow ------------------------------------------------------------------------------


def test_it_runs_for_pushes_to_main_only(workflow):
    assert triggers(workflow) == {"push": {"branches": ["main"]}}


def test_the_token_can_only_read(workflow):
    assert workflow["permissions"] == {"contents": "read"}
    for name, job in workflow["jobs"].items():
        assert job.get("permissions", {"contents": "read"}) == {"contents": "read"}, name


def test_the_deploy_job_runs_only_after_the_tests_job_passes(workflow, deploy_job):
    assert deploy_job["needs"] == "tests"
    assert "if" not in deploy_job, "no condition that could run it after failed tests"
    tests = workflow["jobs"]["tests"]
    assert tests["uses"] == "./.github/workflows/tests.yml"
    called = load("tests.yml")
    assert "workflow_call" in triggers(called)
    assert called["permissions"] == {"contents": "read"}


def test_one_release_at_a_time_and_a_running_one_is_never_cancelled(deploy_job):
    assert deploy_job["concurrency"] == {"group": "deploy-production", "cancel-in-progress": False}


def test_the_job_timeout_is_above_the_releases_worst_case(deploy_job):
    # The server's own bounds on a deploy's phases (core/lock.py runs each with its timeout),
    # plus a minute per phase for the client: GitHub must never be the one to cut it off.
    phases = {"fetch": 10, "pre_deploy hook": 10, "backup": 60, "checkout + build": 35, "database up": 5, "migrate": 10,
              "start": 15, "health gate": 3, "automatic rollback": 20, "post_deploy hook": 10}
    worst = sum(phases.values()) + len(phases)
    assert worst < deploy_job["timeout-minutes"] <= 360, "GitHub's hosted runners stop at 360 minutes"


def test_approvals_come_from_a_github_environment(deploy_job):
    assert deploy_job["environment"] == "production"


def test_secrets_reach_the_step_only_through_env_and_no_expression_is_spliced_into_shell(workflow, deploy_step):
    for path, text in strings(workflow):
        if "secrets." in text:
            assert path[-2] == "env", f"a secret outside env: {'.'.join(path)}"
    for path, text in strings(workflow):
        if path[-1] == "run":
            assert "${{" not in text, f"an expression in shell text ({'.'.join(path)}): pass it through env"
    env = deploy_step["env"]
    assert env["DEPLOY_HOST"] == "${{ secrets.VPS_HOST }}" and env["DEPLOY_SSH_KEY"] == "${{ secrets.VPS_SSH_KEY }}"
    assert env["DEPLOY_KNOWN_HOSTS"] == "${{ vars.VPS_KNOWN_HOSTS }}"


def test_the_step_runs_the_script_that_holds_its_lines_with_the_release_task(deploy_step):
    assert deploy_step["run"].strip() == ".github/ci-deploy.sh"
    assert deploy_step["env"]["DEPLOY_TASK"] == "release"
    assert SCRIPT.stat().st_mode & stat.S_IXUSR, "executable, as the step calls it"


def test_every_action_is_pinned_to_a_full_commit(workflow):
    uses = [text for name in ("deploy.yml", "tests.yml") for path, text in strings(load(name)) if path[-1] == "uses"]
    remote = [u for u in uses if not u.startswith("./")]
    assert remote and all(re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", u) for u in remote), remote


def test_the_checkout_keeps_no_token_for_later_steps(deploy_job):
    (checkout,) = [step for step in deploy_job["steps"] if step.get("uses", "").startswith("actions/checkout@")]
    assert checkout["with"]["persist-credentials"] is False


# --- the script: the step's lines ----------------------------------------------------------------

PLAIN_TOOLS = ("bash", "grep", "mktemp", "rm", "cat", "stat")
STAND_IN_SSH = """#!/bin/sh
# Records what it was asked, the files it was pointed at and their modes.
printf '%s\\n' "$@" > "$REC/args"
while [ $# -gt 0 ]; do
    case "$1" in
        -i) cp "$2" "$REC/key"; stat -c %a "$2" > "$REC/key.mode"; stat -c %a "$(dirname "$2")" > "$REC/dir.mode"
            echo "$(dirname "$2")" > "$REC/dir"; shift ;;
        -o) case "$2" in UserKnownHostsFile=*) cp "${2#UserKnownHostsFile=}" "$REC/known_hosts" ;; esac; shift ;;
    esac
    shift
done
exit "${SSH_EXIT:-0}"
"""


@pytest.fixture
def ci(tmp_path):
    bin_dir, rec = tmp_path / "bin", tmp_path / "rec"
    rec.mkdir()
    script_path(bin_dir, (*PLAIN_TOOLS, "cp", "dirname", "sh"), {"ssh": STAND_IN_SSH})

    def run(**env: str) -> subprocess.CompletedProcess:
        given = {"DEPLOY_TASK": "release", "DEPLOY_HOST": "127.0.0.1", "DEPLOY_SSH_KEY": KEY, "DEPLOY_KNOWN_HOSTS": KNOWN,
                 "GITHUB_SHA": SHA, "GITHUB_ACTOR": "octocat", **env}
        return subprocess.run([str(bin_dir / "bash"), str(SCRIPT)], capture_output=True, text=True, timeout=30, cwd=PROJECT_DIR,
                              env={"PATH": str(bin_dir), "REC": str(rec), "TMPDIR": str(tmp_path), **given})

    run.rec = rec
    return run


def test_it_runs_the_task_on_the_server_over_ssh_with_the_host_key_pinned(ci):
    result = ci()
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"ci-deploy: release --sha {SHA} on coachntt@127.0.0.1:22 (host key pinned), for octocat\n"
    args = (ci.rec / "args").read_text().splitlines()
    assert args[0] == "-tt", "a terminal the tool holds (exec): a cancelled job reaches it as SIGHUP"
    options = [args[i + 1] for i, arg in enumerate(args) if arg == "-o"]
    assert {"BatchMode=yes", "IdentitiesOnly=yes", "StrictHostKeyChecking=yes", "GlobalKnownHostsFile=/dev/null",
            "UpdateHostKeys=no"} <= set(options)
    assert args[args.index("-F") + 1] == "none", "no ssh config of the runner's decides anything"
    assert args[args.index("-p") + 1] == "22"
    assert args[-2:] == ["coachntt@127.0.0.1", f"cd /opt/coachntt-ops && exec env GITHUB_ACTOR='octocat' coachntt-inv release --sha {SHA}"]
    assert (ci.rec / "known_hosts").read_text() == KNOWN + "\n", "the pinned key, and only it"
    assert (ci.rec / "key").read_text() == KEY + "\n"
    assert (ci.rec / "key.mode").read_text().strip() == "600" and (ci.rec / "dir.mode").read_text().strip() == "700"
    assert not Path((ci.rec / "dir").read_text().strip()).exists(), "the key is gone when the step ends"


def test_a_user_and_port_in_the_host_are_used(ci):
    assert ci(DEPLOY_HOST="deploy@127.0.0.1:2222").returncode == 0
    args = (ci.rec / "args").read_text().splitlines()
    assert args[args.index("-p") + 1] == "2222" and args[-2] == "deploy@127.0.0.1"


def test_the_tasks_exit_status_is_the_steps(ci):
    result = ci(SSH_EXIT="4")
    assert result.returncode == 4
    assert not Path((ci.rec / "dir").read_text().strip()).exists(), "the key is removed on failure too"


@pytest.mark.parametrize(("env", "says"), [
    ({"DEPLOY_KNOWN_HOSTS": ""}, "DEPLOY_KNOWN_HOSTS is empty (the VPS_KNOWN_HOSTS variable): an unknown host key is never trusted"),
    ({"DEPLOY_KNOWN_HOSTS": " \n"}, "DEPLOY_KNOWN_HOSTS is empty"),
    ({"DEPLOY_SSH_KEY": ""}, "DEPLOY_SSH_KEY is empty (the VPS_SSH_KEY secret)"),
    ({"GITHUB_SHA": "main"}, "GITHUB_SHA must be a full commit id, got 'main'"),
    ({"GITHUB_SHA": SHA + "; reboot"}, "GITHUB_SHA must be a full commit id"),
    ({"DEPLOY_TASK": "release; reboot"}, "DEPLOY_TASK must be a task name like release"),
    ({"DEPLOY_TASK": ""}, "DEPLOY_TASK must be a task name like release, got ''"),
    ({"DEPLOY_HOST": ""}, "DEPLOY_HOST must be HOST or USER@HOST[:PORT] (the VPS_HOST secret)"),
    ({"DEPLOY_HOST": "-oProxyCommand=reboot"}, "DEPLOY_HOST must be HOST or USER@HOST[:PORT]"),
])
def test_bad_input_is_exit_2_before_ssh_is_asked_anything(ci, env, says):
    result = ci(**env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"ci-deploy: {says}"), result.stderr
    assert not (ci.rec / "args").exists()


def test_an_actor_that_is_not_a_plain_login_is_not_passed_on(ci):
    assert ci(GITHUB_ACTOR="x'; reboot; '").returncode == 0
    assert (ci.rec / "args").read_text().splitlines()[-1].startswith("cd /opt/coachntt-ops && exec env GITHUB_ACTOR='unknown' ")
    assert ci(GITHUB_ACTOR="dependabot[bot]").returncode == 0
    assert "GITHUB_ACTOR='dependabot[bot]'" in (ci.rec / "args").read_text()
