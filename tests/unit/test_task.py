"""@ops_task: shared flags, the `ops` handle, one-line errors with exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import invoke
import pytest
from invoke.exceptions import Exit

from fabfile.core import redact
from fabfile.core import task as task_module
from fabfile.core.errors import ConfigError, ConnectError, LockHeldError, OpsError, UsageError
from fabfile.core.settings import PROJECT_DIR
from fabfile.core.task import COMMON_HELP, ops_task

# The venv's own fab and inv, found without the venv on PATH (CI runs with the system PATH).
BIN = Path(sys.executable).parent
NAMESPACES = ["secure", "deps", "nginx", "deploy", "ssl", "backup", "rollback", "monitor", "release", "maintenance"]


@ops_task(help={"sha": "commit to deploy"})
def deploy_like(ops, sha="", retries=3):
    """A task shaped like the real ones."""
    return (ops, sha, retries)


# --- what invoke sees ---------------------------------------------------------


def test_task_exposes_body_parameters_plus_dry_and_json_to_invoke():
    args = {arg.name: arg for arg in deploy_like.get_arguments()}
    assert list(args) == ["sha", "retries", "dry", "json", "diff"]
    assert args["retries"].kind is int and args["retries"].default == 3
    assert args["dry"].kind is bool and args["dry"].default is False
    assert args["json"].kind is bool
    assert args["sha"].help == "commit to deploy"
    assert args["dry"].help == COMMON_HELP["dry"]


def test_bare_decorator_works_and_keeps_name_and_docstring():
    @ops_task
    def status(ops):
        """Show status."""

    assert [a.name for a in status.get_arguments()] == ["dry", "json", "diff"]
    assert status.name == "status"
    assert status.__doc__ == "Show status."


def test_body_gets_ops_with_settings_and_the_flags(project_context):
    ops, sha, retries = deploy_like(project_context, sha="abc123", dry=True, json=True)
    assert (sha, retries, ops.dry, ops.json) == ("abc123", 3, True, True)
    assert ops.settings.get("deploy_user") == "coachntt"
    assert ops.where == "localhost"


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "error,code",
    [
        (UsageError("domain must be a host name, got 'api coachntt.ai'"), 2),
        (ConfigError("missing config value 'app.repo'", "set COACHNTT_APP__REPO"), 2),
        (OpsError("health gate failed", "see the logs"), 1),
        (ConnectError("cannot reach x", "check it"), 3),
        (LockHeldError("deploy lock held by alice since 10:02"), 4),
    ],
)
def test_ops_error_becomes_exit_with_one_line_and_its_code(project_context, error, code):
    @ops_task
    def failing(ops):
        raise error

    with pytest.raises(Exit) as info:
        failing(project_context)
    assert info.value.code == code
    assert info.value.message == f"error: {error.one_line()}"
    assert "\n" not in info.value.message


def test_recognised_connection_failure_in_the_body_becomes_exit_3(project_context):
    @ops_task
    def connects(ops):
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(Exit) as info:
        connects(project_context)
    assert info.value.code == 3
    assert info.value.message.startswith("error: cannot reach localhost: connection refused; ")


def test_unknown_exceptions_propagate_with_their_traceback(project_context):
    bug = ValueError("a real bug")

    @ops_task
    def buggy(ops):
        raise bug

    with pytest.raises(ValueError) as info:
        buggy(project_context)
    assert info.value is bug


def test_secrets_are_redacted_from_the_error_line(project_context):
    redact.register("hunter2-hunter2")

    @ops_task
    def leaky(ops):
        raise OpsError("login with hunter2-hunter2 refused")

    with pytest.raises(Exit) as info:
        leaky(project_context)
    assert "hunter2" not in info.value.message


def test_missing_configuration_is_a_usage_exit_not_a_traceback():
    @ops_task
    def anything(ops):
        raise AssertionError("body must not run")

    with pytest.raises(Exit) as info:
        anything(invoke.Context(config=invoke.Config()))
    assert info.value.code == 2
    assert "no 'coachntt' section" in info.value.message


def test_argument_validation_happens_before_any_connection(project_context, mocker):
    target_for = mocker.patch.object(task_module, "target_for")

    @ops_task
    def validated(ops, domain=""):
        if " " in domain:
            raise UsageError(f"domain must be a host name, got '{domain}'")
        ops.target.run("true")

    with pytest.raises(Exit):
        validated(project_context, domain="api coachntt.ai")
    target_for.assert_not_called()


def test_a_run_that_reported_steps_ends_with_a_summary_and_closes_the_target(project_context, mocker, capsys, fake_host):
    host = fake_host()
    close = mocker.spy(host, "close")
    mocker.patch.object(task_module, "target_for", return_value=host)

    @ops_task
    def work(ops):
        ops.target.run("true")
        ops.reporter.step("something", "ok", 0.0)

    work(project_context)
    out = capsys.readouterr().out.splitlines()
    assert "something" in out[0]
    assert out[-1].startswith("localhost: 1 ok, 0 changed, 0 failed in ")
    assert out[-1].endswith("(1 round trips)")
    close.assert_called_once()


def test_a_report_only_task_prints_no_step_summary(project_context, mocker, capsys, fake_host):
    mocker.patch.object(task_module, "target_for", return_value=fake_host())

    @ops_task
    def report(ops):
        ops.target.run("true")
        ops.reporter.info("working")

    report(project_context)
    assert capsys.readouterr().out.splitlines() == ["working"]


def test_the_target_is_closed_even_when_the_task_fails(project_context, mocker, fake_host):
    host = fake_host(failures={"false": (1, "nope")})
    close = mocker.spy(host, "close")
    mocker.patch.object(task_module, "target_for", return_value=host)

    @ops_task
    def work(ops):
        ops.target.run("false")

    with pytest.raises(Exit) as info:
        work(project_context)
    assert info.value.code == 1
    close.assert_called_once()


def cli_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("COACHNTT_")}


@pytest.fixture(scope="module")
def cli():
    """The real `fab` and `inv` in the project directory, run side by side (each costs ~0.5 s)."""
    fab, inv = str(BIN / "fab"), str(BIN / "inv")
    commands = {
        "fab --list": [fab, "--list"],
        "inv --list": [inv, "--list"],
        "unreachable": [fab, "-H", "nobody@127.0.0.1:1", "deps.check"],
        "missing key": [fab, "-H", "nobody@127.0.0.1:1", "-i", "/nonexistent", "deps.check"],
    }
    procs = {
        key: subprocess.Popen(argv, cwd=PROJECT_DIR, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for key, argv in commands.items()
    }
    results = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        results[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


def listed_tasks(output):
    return [line.split()[0] for line in output.splitlines() if line.startswith("  ") and line.split()]


@pytest.mark.parametrize("tool", ["fab", "inv"])
def test_both_tools_list_every_namespace(cli, tool):
    result = cli[f"{tool} --list"]
    assert result.returncode == 0, result.stderr
    namespaces = {name.split(".")[0] for name in listed_tasks(result.stdout)}
    assert set(NAMESPACES) <= namespaces


def test_fab_and_inv_list_the_same_tasks(cli):
    assert listed_tasks(cli["fab --list"].stdout) == listed_tasks(cli["inv --list"].stdout)


def test_unreachable_host_is_one_error_line_without_traceback(cli):
    result = cli["unreachable"]
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert result.returncode == 3


def test_a_missing_key_file_is_named_with_exit_2_not_cannot_reach(cli):
    result = cli["missing key"]
    assert result.stderr == "error: key file /nonexistent does not exist; pass the private key with -i\n"
    assert result.returncode == 2


def test_diff_flag_shows_file_content_changes_in_a_dry_run(project_context, mocker, capsys, fake_host):
    from fabfile.core.remote import file_step

    missing_file = fake_host(facts={"cat -- /etc/motd": ("", 1), "stat -c '%a %U:%G' -- /etc/motd": ("", 1)})
    mocker.patch.object(task_module, "target_for", return_value=missing_file)

    @ops_task
    def configure(ops):
        ops.run_steps([file_step("motd", "/etc/motd", "hello\n")])

    configure(project_context, dry=True, diff=True)
    out = capsys.readouterr().out
    assert "would change" in out and "+hello" in out


# --- settings are validated for every task, before any connection ---------------


def ops_tasks():
    from fabfile import ns

    return [name for name in ns.task_names if not name.startswith("sandbox.")]


@pytest.mark.parametrize("name", ops_tasks())
@pytest.mark.parametrize("dry", [False, True])
def test_every_task_refuses_a_bad_setting_before_connecting(refused_before_connecting, name, dry):
    from fabfile import ns

    exit_ = refused_before_connecting(ns[name], env={"COACHNTT_DEPLOY_USER": "coachntt;touch /tmp/x"}, dry=dry)
    assert exit_.code == 2
    assert exit_.message.startswith("error: deploy_user must be a user name"), exit_.message
    assert "got 'coachntt;touch /tmp/x'" in exit_.message
