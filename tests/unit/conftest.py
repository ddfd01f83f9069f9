"""Fixtures for the unit tests: isolated environment, real defaults, a fake host."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import invoke
import pytest
import yaml

from fabfile.core import redact
from fabfile.core.settings import PROJECT_DIR, Settings
from fabfile.core.target import TOOL_UMASK, Result, Target

INVOKE_YAML = PROJECT_DIR / "invoke.yaml"
# The one command that appends a release's entries to its log and frees the lock (core/lock.py).
LOG_APPEND = "deploy-lock finish "


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """No COACHNTT_* variable from the shell running pytest, no secret left over from another test."""
    import os

    for key in list(os.environ):
        if key.startswith("COACHNTT_"):
            monkeypatch.delenv(key)
    redact.forget_all()
    yield
    redact.forget_all()


@pytest.fixture(scope="session")
def yaml_defaults() -> dict:
    """The `coachntt` section of invoke.yaml as plain data."""
    return yaml.safe_load(INVOKE_YAML.read_text())["coachntt"]


@pytest.fixture
def defaults(yaml_defaults) -> dict:
    return copy.deepcopy(yaml_defaults)


@pytest.fixture
def settings(defaults) -> Settings:
    return Settings("production", defaults)


@pytest.fixture
def project_context() -> invoke.Context:
    """An invoke Context configured the way `inv` configures it in the project directory."""
    config = invoke.Config(project_location=str(PROJECT_DIR))
    config.load_project()
    return invoke.Context(config=config)


# One framed probe inside a script built by core/batch.batch_script.
_PROBE = re.compile(
    r"^printf '%s\\n' '(?P<marker>\S+) begin (?P<name>\S+)'\n\( (?P<command>.*?)\n\) </dev/null 2>/dev/null$",
    re.MULTILINE | re.DOTALL,
)


def unwrapped_umask(command: str) -> str:
    """A sent command without the umask every command starts with (core/target.TOOL_UMASK)."""
    if command.startswith("sudo -n ") and f"{TOOL_UMASK}; " in command:
        words = shlex.split(command)
        return shlex.join(words[:-1]) + " " + shlex.quote(words[-1].removeprefix(f"{TOOL_UMASK}; "))
    return command.removeprefix(f"{TOOL_UMASK}; ")


class FakeHost(Target):
    """A host given as data.

    `facts` maps a probe command to (stdout, status); a fact script gets the
    framed answer a real shell would print. `replies` maps a substring of any
    other command to (exit status, stdout, stderr); `failures` is the short form
    (exit status, stderr). Anything else succeeds silently. Every command sent
    is kept in `sent` exactly as the target would send it.
    """

    def __init__(self, facts=None, failures=None, *, replies=None, is_root=True, login_user="", label="deploy@vps"):
        super().__init__()
        self.facts = dict(facts or {})
        self.replies = {needle: (status, "", stderr) for needle, (status, stderr) in (failures or {}).items()}
        self.replies.update(replies or {})
        self.is_root = is_root
        self.login_user = login_user
        self.label = label
        self.sent: list[str] = []

    def _execute(self, command, timeout):
        command = unwrapped_umask(command)
        self.sent.append(command)
        if command.startswith("sudo -n "):
            command = unwrapped_umask(shlex.split(command)[-1])  # what the host's sh would run
        probes = list(_PROBE.finditer(command))
        if probes:
            out = ""
            for probe in probes:
                command_text = probe["command"]
                if command_text not in self.facts:
                    raise AssertionError(f"FakeHost has no fact for probe {command_text!r}")
                stdout, status = self.facts[command_text]
                out += f"{probe['marker']} begin {probe['name']}\n{stdout}\n{probe['marker']} end {probe['name']} {status}\n"
            return Result(command, out, "", 0)
        appending_to_log = LOG_APPEND in command
        for needle, (status, stdout, stderr) in self.replies.items():
            # A logged failure quotes the failed command: only a reply aimed at the lock's finish fails it.
            if needle in command and (not appending_to_log or LOG_APPEND in needle):
                return Result(command, stdout, stderr, status)
        return Result(command, "", "", 0)

    @property
    def changes_sent(self) -> list[str]:
        return [c for c in self.sent if not _PROBE.search(c)]


@pytest.fixture
def fake_host():
    return FakeHost


def logged_entries(sent: list[str]) -> list:
    """The release log entries a run wrote: the ENTRY lines of its `deploy-lock.sh finish`."""
    from fabfile.core import state

    lines = [shlex.split(command)[-1] for command in sent if LOG_APPEND in command]
    return [entry for line in lines for entry in state.parse_log(line)]


@pytest.fixture
def logged():
    return logged_entries


def probe_markers(script: str) -> set[str]:
    return {m["marker"] for m in _PROBE.finditer(script)}


@pytest.fixture
def markers_of():
    return probe_markers


@pytest.fixture
def current_owner() -> str:
    import grp
    import os
    import pwd

    return f"{pwd.getpwuid(os.geteuid()).pw_name}:{grp.getgrgid(os.getegid()).gr_name}"


@pytest.fixture
def project_dir() -> Path:
    return PROJECT_DIR


@pytest.fixture
def refused_before_connecting(project_context, mocker, monkeypatch):
    """Run a task with environment overrides; it must exit without ever opening a target.

    Returns the invoke Exit it raised (code and one-line message).
    """
    from invoke.exceptions import Exit

    from fabfile.core import task as task_module

    def run(task, env: dict | None = None, **kwargs):
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        target_for = mocker.patch.object(task_module, "target_for")
        with pytest.raises(Exit) as info:
            task(project_context, **kwargs)
        target_for.assert_not_called()
        return info.value

    return run


def host_with_release_facts(fake_host, log: str, head: str, *, replies=None, **overrides):
    """A FakeHost answering a release's preflight probes: a healthy host with `log`
    and `head`; `overrides` replace single facts by name (env=("", 1), ...)."""
    from fabfile.core import slots
    from fabfile.core.app import App, release_probes
    from fabfile.core.settings import Settings

    defaults = yaml.safe_load(INVOKE_YAML.read_text())["coachntt"]
    probes = release_probes(App.from_settings(Settings("production", defaults)))
    # nginx sends the api to slot a, which runs `head` (and slot b holds nothing yet).
    live = json.dumps({"Service": "api_a", "State": "running", "Image": f"coachntt/api:{head}"})
    answers = {"log": (log, 0), "head": (head, 0), "env": ("", 0), "docker": ("26.1.5", 0), "database": ("", 0),
               "disk": ("/ 24%\n/ 24%", 0), "upstream": (slots.render_upstream(slots.Slot("a", 8000), head), 0),
               "site_slots": ("", 0), "containers": (live, 0), "nginx": ("", 0), **overrides}
    return fake_host(facts={probes[name]: answer for name, answer in answers.items()}, replies=replies)


@pytest.fixture
def release_host(fake_host):
    return lambda log, head, **kw: host_with_release_facts(fake_host, log, head, **kw)
