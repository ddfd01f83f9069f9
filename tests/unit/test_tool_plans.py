"""tool.install as data: what travels, the digest that names it, the settings the server
gets (and those it never gets), and plans that change nothing on a second run."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
from invoke.exceptions import Exit

from fabfile import tool
from fabfile.core import bundle, remote, server_settings
from fabfile.core import task as task_module
from fabfile.core.batch import ProbeResult
from fabfile.core.errors import ConfigError, UsageError
from fabfile.core.settings import Settings, load

PY313 = bundle.ServerPython("3.13", "x86_64")


# --- what travels ---------------------------------------------------------------------


def test_the_bundle_holds_the_runtime_files_and_never_tests_or_env_files(project_dir):
    files = bundle.project_files(project_dir)
    for wanted in ("fabfile/__init__.py", "fabfile/tool.py", "scripts/install-tool.sh", "configs/tool/coachntt-inv.j2",
                   "tasks.py", "invoke.yaml", "fabric.yaml", "pyproject.toml"):
        assert wanted in files
    assert not [f for f in files if f.startswith(("tests/", "benchmarks/", "examples/", ".github/", ".ci/"))]
    assert not [f for f in files if ".env." in f or "__pycache__" in f or f.endswith(".pyc")]


def test_outside_git_the_runtime_set_is_walked_without_env_files_or_bytecode(tmp_path):
    for name in ("fabfile/__init__.py", "fabfile/__pycache__/x.cpython-311.pyc", "configs/a.j2", "tasks.py",
                 "invoke.yaml", ".env.production", "configs/.env.staging", "tests/unit/test_x.py", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "fabric.yaml").symlink_to("invoke.yaml")
    assert bundle.project_files(tmp_path) == ["configs/a.j2", "fabfile/__init__.py", "fabric.yaml", "invoke.yaml", "tasks.py"]


def copy_project(project_dir: Path, into: Path) -> Path:
    files = bundle.project_files(project_dir)
    archive = subprocess.run(["tar", "-c", *files], cwd=project_dir, capture_output=True, check=True).stdout
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def test_the_digest_names_exactly_what_is_installed(project_dir, tmp_path):
    copy = copy_project(project_dir, tmp_path / "copy")
    held = ["cryptography==44.0.0"]
    first = bundle.release_for(PY313, copy, constraints=held)
    assert first == bundle.release_for(PY313, copy, constraints=held), "the same files: the same digest"
    assert first.name == f"0.1.0-{first.digest[:12]}"
    assert bundle.release_for(bundle.ServerPython("3.12", "x86_64"), copy, constraints=held).digest != first.digest
    assert bundle.release_for(PY313, copy, constraints=["cryptography==45.0.0"]).digest != first.digest
    (copy / "scripts" / "install-tool.sh").write_text((copy / "scripts" / "install-tool.sh").read_text() + "\n")
    assert bundle.release_for(PY313, copy, constraints=held).digest != first.digest
    (copy / "README.md").unlink()
    assert "README.md" not in bundle.release_for(PY313, copy, constraints=held).files


def test_dependencies_below_the_pins_are_held_to_this_machines_versions():
    pins = bundle.requirements()
    assert "fabric==3.2.2" in pins and "paramiko==3.5.1" in pins
    held = dict(c.split("==") for c in bundle.local_constraints(pins))
    assert {"cryptography", "bcrypt", "markupsafe"} <= set(held), "paramiko's and Jinja2's own dependencies"
    assert not {"fabric", "invoke", "paramiko", "jinja2", "pytest", "ruff"} & set(held), "pins stay pyproject's; test tools never travel"


def test_pip_fetches_wheels_for_the_servers_python_and_reads_the_cache_offline(tmp_path):
    online = bundle.pip_download(PY313, tmp_path / "cache", ["fabric==3.2.2"], tmp_path / "c.txt", offline_from=None)
    assert online[online.index("--platform") + 1] == "manylinux2014_x86_64"
    assert online[online.index("--python-version") + 1] == "3.13"
    assert "--only-binary=:all:" in online and online[online.index("--implementation") + 1] == "cp"
    assert online[-1] == "fabric==3.2.2" and "--no-index" not in online
    offline = bundle.pip_download(bundle.ServerPython("3.12", "aarch64"), tmp_path / "into", ["x==1"], None,
                                  offline_from=tmp_path / "cache")
    assert {"--isolated", "--no-index"} <= set(offline), "a cached build never asks an index"
    assert offline[offline.index("--find-links") + 1] == str(tmp_path / "cache")
    assert "manylinux2014_aarch64" in offline and "--constraint" not in offline


def test_the_tarball_has_the_files_the_wheels_and_the_pins(project_dir, tmp_path):
    import tarfile

    release = bundle.release_for(PY313, project_dir, constraints=[])
    wheel = tmp_path / "fabric-3.2.2-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    sha = bundle.tarball(release, [wheel], tmp_path / "t.tar", project_dir)
    with tarfile.open(tmp_path / "t.tar") as tar:
        names = tar.getnames()
        assert tar.getmember("fabric.yaml").issym() and tar.getmember("scripts/install-tool.sh").mode == 0o755
        assert {m.uid for m in tar.getmembers()} == {0}
        assert tar.extractfile(".bundle/requirements.txt").read().decode().splitlines() == list(release.pins)
    assert ".bundle/wheels/fabric-3.2.2-py3-none-any.whl" in names and "fabfile/tool.py" in names
    assert len(sha) == 64


@pytest.mark.parametrize("answer, wanted", [
    ("3.13 x86_64", PY313), ("3.12 aarch64\n", bundle.ServerPython("3.12", "aarch64")),
    ("", None), ("3.13 x86_64; reboot", None), ("Python 3.13", None),
])
def test_the_servers_python_is_read_from_one_line(answer, wanted):
    assert bundle.parse_python(answer) == wanted


@pytest.mark.parametrize("python, words", [
    (bundle.ServerPython("3.13", "riscv64"), "riscv64"), (bundle.ServerPython("3.10", "x86_64"), "3.11 or newer"),
])
def test_a_python_we_cannot_build_wheels_for_is_refused(python, words):
    with pytest.raises(UsageError, match=words):
        bundle.require_supported(python, "coachntt@vps")


# --- settings for the server ------------------------------------------------------------------


def operator_settings(defaults, tmp_path, file_lines: list[str], environ: dict | None = None) -> Settings:
    env_file = tmp_path / ".env.production"
    env_file.write_text("\n".join(file_lines) + "\n")
    return load(defaults, environ or {}, project_dir=tmp_path)


def test_the_server_gets_the_overrides_but_not_the_host_the_ssh_client_or_secrets(defaults, tmp_path):
    settings = operator_settings(defaults, tmp_path, [
        "COACHNTT_HOST=coachntt@203.0.113.10",
        "COACHNTT_APP__BRANCH=release",
        "COACHNTT_SSH__KNOWN_HOSTS=/home/me/kh",
        "COACHNTT_BACKUP__OFFSITE_PASSWORD=hunter2hunter2",
        "COACHNTT_APP__REPO=https://ci:ghp_tokenvalue@github.com/x/y.git",
        "COACHNTT_SOMETHING__NOBODY_READS=1",
        "JWT_SECRET=averylongsecretvalue",
    ], {"COACHNTT_BACKUP__KEEP_DAILY": "9", "COACHNTT_KNOWN_HOSTS": "/tmp/kh"})
    assert server_settings.forwarded(settings) == {"app.branch": "release", "backup.keep_daily": 9}
    text = server_settings.render(settings)
    assert "COACHNTT_APP__BRANCH='release'\n" in text and "COACHNTT_BACKUP__KEEP_DAILY='9'\n" in text
    for never in ("203.0.113.10", "/home/me/kh", "hunter2", "ghp_", "averylong", "JWT", "NOBODY", "/tmp/kh"):
        assert never not in text


def test_command_line_flags_are_not_written_for_the_server(defaults, tmp_path):
    settings = operator_settings(defaults, tmp_path, []).with_overrides({"app.branch": "hotfix"})
    assert server_settings.forwarded(settings) == {}


def test_awkward_values_come_back_unchanged_through_the_servers_loader(defaults, tmp_path):
    hook = "echo 'it''s' \"$HOME\" ${USER} \\n `date`\nsecond line \\\\ end"
    settings = operator_settings(defaults, tmp_path, [], {
        "COACHNTT_APP__HOOKS__POST_DEPLOY": hook, "COACHNTT_FIREWALL__ALLOW": "22/tcp,8080/tcp",
        "COACHNTT_APP__HEALTH_DEADLINE": "25"})
    content = server_settings.checked(settings, defaults)
    (tmp_path / "server.env").write_text(content)
    back = load(defaults, {"COACHNTT_ENV_FILE": str(tmp_path / "server.env")}, project_dir=tmp_path / "nowhere")
    assert back.get("app.hooks.post_deploy") == hook
    assert back.get("firewall.allow") == ["22/tcp", "8080/tcp"] and back.get("app.health_deadline") == 25
    assert back.secrets == {}


def test_a_value_that_would_not_come_back_is_refused_before_connecting(defaults):
    settings = Settings("production", {**defaults, "authorized_keys": ["ssh-ed25519 AAAA me,at,home"]},
                        sources={"authorized_keys": "the environment"})
    with pytest.raises(ConfigError, match="authorized_keys cannot be written"):
        server_settings.checked(settings, defaults)


# --- plans --------------------------------------------------------------------------------------

RELEASE = bundle.Release("0.1.0", "ab" * 32, PY313, ("tasks.py",), ("fabric==3.2.2",), ())


def release_facts(link="", installed="", releases="", venv=True) -> dict:
    return {"link": ProbeResult(link, 0), "installed": ProbeResult(installed, 0 if installed else 1),
            "releases": ProbeResult(releases, 0), "venv": ProbeResult("", 0 if venv else 1),
            "python": ProbeResult("3.13 x86_64", 0)}


def test_the_installed_digest_is_ok_and_changes_nothing():
    plan = tool.plan_release(RELEASE, release_facts(f"/opt/coachntt-ops-releases/{RELEASE.name}", RELEASE.digest))
    assert not plan.changes and RELEASE.name in plan.reason


def test_a_new_digest_is_installed_and_the_release_before_kept():
    plan = tool.plan_release(RELEASE, release_facts("/opt/coachntt-ops-releases/0.1.0-000000000000", "00" * 32,
                                                    "0.1.0-000000000000 " + "00" * 32, venv=False))
    (change,) = plan.changes
    assert change.summary.startswith("apt install python3-venv; install 0.1.0-abababababab for python 3.13 x86_64")
    assert change.summary.endswith("keep 0.1.0-000000000000")


def test_going_back_to_an_unpacked_release_is_only_a_switch():
    plan = tool.plan_release(RELEASE, release_facts("/opt/coachntt-ops-releases/0.1.0-000000000000", "00" * 32,
                                                    f"{RELEASE.name} {RELEASE.digest}\n0.1.0-000000000000 {'00' * 32}"))
    assert plan.changes[0].summary.startswith(f"switch /opt/coachntt-ops to {RELEASE.name} (unpacked already)")


def test_a_copy_put_in_place_by_hand_is_kept_as_a_release():
    plan = tool.plan_release(RELEASE, release_facts("not a link"))
    assert "keep the copy in /opt/coachntt-ops as a release" in plan.changes[0].summary


def test_the_install_script_gets_every_value_quoted(project_dir):
    command = tool.install_command("/tmp/coachntt-ops.1.tar", "cd" * 32, RELEASE, "coachntt", "production")
    args = shlex.split(command)
    assert args[:2] == ["bash", "-c"] and args[3:] == ["install-tool", "/tmp/coachntt-ops.1.tar", "cd" * 32, RELEASE.name,
                                                       RELEASE.digest, "coachntt", "production", "/etc/coachntt-ops/settings.env"]
    assert args[2] == (project_dir / "scripts" / "install-tool.sh").read_text()


def file_facts(content: str | None, meta: str = "755 root:root") -> dict:
    return {"content": ProbeResult(content or "", 0 if content is not None else 1), "meta": ProbeResult(meta, 0)}


def test_inv_is_put_on_path_only_when_absent_or_ours():
    wrapper = tool.wrapper("production")
    step = tool.command_step("/usr/local/bin/inv", wrapper)
    assert step.plan(file_facts(None)).changes[0].summary.startswith("create /usr/local/bin/inv")
    assert not step.plan(file_facts(wrapper.rstrip("\n"))).changes
    older = wrapper.replace("COACHNTT_ENV:-production", "COACHNTT_ENV:-staging")
    assert step.plan(file_facts(older)).changes[0].summary.startswith("update /usr/local/bin/inv")
    foreign = step.plan(file_facts("#!/usr/bin/python3\nfrom invoke.main import program\n"))
    assert foreign.skip and "use coachntt-inv" in foreign.reason


def test_the_wrapper_runs_the_installed_inv_with_the_servers_settings():
    text = tool.wrapper("staging")
    assert "COACHNTT_ENV_FILE=${COACHNTT_ENV_FILE:-/etc/coachntt-ops/settings.env}" in text
    assert "COACHNTT_ENV=${COACHNTT_ENV:-staging}" in text
    assert text.rstrip().endswith('exec /opt/coachntt-ops/.venv/bin/inv "$@"') and tool.OURS in text


def test_the_settings_file_is_readable_by_the_deploy_users_group_only():
    step = tool.settings_step("A='1'\n", "coachntt")
    plan = step.plan({**file_facts(None), "group": ProbeResult("coachntt", 0)})
    assert plan.changes[0].summary == "create /etc/coachntt-ops/settings.env (6 bytes, mode 0640, root:coachntt)"
    with pytest.raises(UsageError) as info:
        step.plan({**file_facts(None), "group": ProbeResult("", 1)})
    assert "run `secure` first" in info.value.one_line()


# --- the task against a host given as data --------------------------------------------------


def installed_host(fake_host, defaults, *, release: bundle.Release, settings_text: str, wrapper: str):
    facts = {bundle.PYTHON_PROBE: ("3.13 x86_64", 0)}
    answers = {"venv": ("", 0), "link": (f"/opt/coachntt-ops-releases/{release.name}", 0), "installed": (release.digest, 0),
               "releases": (f"{release.name} {release.digest}", 0)}
    facts.update({tool.RELEASE_PROBES[k]: v for k, v in answers.items()})
    for path, content, meta in ((server_settings.SETTINGS_FILE, settings_text, "640 root:coachntt"),
                                *((p, wrapper, "755 root:root") for p in tool.COMMANDS)):
        probes = remote.file_probes(path)
        facts[probes["content"]] = (content.rstrip("\n"), 0)
        facts[probes["meta"]] = (meta, 0)
    facts["id -gn coachntt"] = ("coachntt", 0)
    return fake_host(facts=facts)


@pytest.fixture
def context_with(project_context, mocker, monkeypatch):
    def make(host, env: dict | None = None):
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        mocker.patch.object(task_module, "target_for", return_value=host)
        return project_context

    return make


def test_a_second_install_reads_once_and_changes_nothing(fake_host, defaults, context_with, mocker, capsys):
    mocker.patch.object(bundle, "local_constraints", return_value=[])
    release = bundle.release_for(PY313, constraints=[])
    settings = load(defaults, {"COACHNTT_BACKUP__KEEP_DAILY": "9"})
    host = installed_host(fake_host, defaults, release=release, settings_text=server_settings.render(settings),
                          wrapper=tool.wrapper("production"))
    build = mocker.patch.object(bundle, "build")
    tool.install(context_with(host, {"COACHNTT_BACKUP__KEEP_DAILY": "9"}))
    assert host.changes_sent == [] and host.round_trips == 1
    build.assert_not_called()
    out = capsys.readouterr().out
    assert "4 ok, 0 changed" in out, out


def test_install_refuses_a_host_without_python3_after_one_read(fake_host, context_with):
    host = fake_host(facts={})
    host.facts = _all_facts_failing()
    with pytest.raises(Exit) as info:
        tool.install(context_with(host))
    assert info.value.code == 2 and "no python3" in info.value.message
    assert host.changes_sent == []


def _all_facts_failing() -> dict:
    probes = {**tool.RELEASE_PROBES, "group": "id -gn coachntt"}
    for path in (server_settings.SETTINGS_FILE, *tool.COMMANDS):
        probes.update({f"{path}{k}": v for k, v in remote.file_probes(path).items()})
    return {command: ("", 1) for command in probes.values()}
