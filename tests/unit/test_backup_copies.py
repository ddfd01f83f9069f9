"""backup.offsite and backup.pull as data: settings, the script's words and exit
codes, what a push said, the password parser, and local copies checked before
they are kept."""

from __future__ import annotations

import copy
import hashlib
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from fabfile import backup as backup_module
from fabfile import backup_copies
from fabfile.core import offsite, pulled, redact, settings, templates
from fabfile.core.app import App
from fabfile.core.errors import EXIT_CONNECT, EXIT_FAILED, EXIT_USAGE, ConfigError, OpsError
from fabfile.core.settings import PROJECT_DIR, Settings
from fabfile.core.target import LocalTarget, Result, Target

REPO = "sftp:offsite@10.201.0.14:/home/offsite/coachntt"
NAME = "db_20261201_010000_manual.dump"


@pytest.fixture
def configured(defaults):
    values = copy.deepcopy(defaults)
    values["backup"]["offsite_repo"] = REPO
    return Settings("production", values)


@pytest.fixture
def app(configured):
    return App.from_settings(configured)


def validated(defaults, tmp_path, **environ):
    return settings.validate(settings.load(defaults, environ=environ, project_dir=tmp_path))


# --- settings ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", REPO, "sftp:u123456@u123456.your-storagebox.de:/home/backups/coachntt",
                                   "sftp:backup_1@storage.example.org:/srv/restic/coachntt.prod"])
def test_offsite_repositories_that_pass(defaults, tmp_path, value):
    assert validated(defaults, tmp_path, COACHNTT_BACKUP__OFFSITE_REPO=value).get("backup.offsite_repo") == value


@pytest.mark.parametrize("value", [
    "sftp:offsite@10.201.0.14:relative/path",  # restic would read it relative to the login's home
    "sftp:offsite@10.201.0.14:/",
    "sftp:offsite@10.201.0.14:/srv/../etc",
    "sftp:offsite@10.201.0.14:/srv/repo/",
    "sftp:offsite@-oProxyCommand=id:/srv",
    "sftp:-oProxyCommand=id@host:/srv",
    "sftp:offsite@host:/srv/a b",
    "sftp:offsite@host:/srv/$(id)",
    "sftp:offsite@host:/srv;reboot",
    "sftp:Offsite@host:/srv",
    "sftp:offsite@[::1]:/srv",
    "sftp://offsite@host:2222//srv",
    "s3:s3.amazonaws.com/bucket",
    "/srv/local-repo",
    "offsite@host:/srv",
])
def test_offsite_repositories_refused_before_connecting(defaults, tmp_path, value):
    with pytest.raises(ConfigError) as info:
        validated(defaults, tmp_path, COACHNTT_BACKUP__OFFSITE_REPO=value)
    assert info.value.one_line().startswith("backup.offsite_repo must be empty (off) or sftp:USER@HOST:/ABSOLUTE/PATH")


@pytest.mark.parametrize("key, value", [("COACHNTT_BACKUP__OFFSITE_PORT", "0"), ("COACHNTT_BACKUP__OFFSITE_PORT", "65536"),
                                        ("COACHNTT_BACKUP__PULL_DIR", "../elsewhere"), ("COACHNTT_BACKUP__PULL_DIR", "~/pulled"),
                                        ("COACHNTT_BACKUP__PULL_DIR", "pulled copies"), ("COACHNTT_BACKUP__PULL_DIR", "-rf")])
def test_port_and_pull_dir_are_checked(defaults, tmp_path, key, value):
    with pytest.raises(ConfigError) as info:
        validated(defaults, tmp_path, **{key: value})
    assert info.value.exit_code == EXIT_USAGE


def test_storage_comes_from_the_settings(configured, defaults):
    assert offsite.storage_from(Settings("production", defaults)) is None, "empty: off"
    storage = offsite.storage_from(configured)
    assert (storage.user, storage.host, storage.path, storage.port) == ("offsite", "10.201.0.14", "/home/offsite/coachntt", 22)
    assert storage.repo == REPO and storage.known_hosts_name == "10.201.0.14"
    other = offsite.Storage("offsite", "storage.example.org", "/srv", 2222)
    assert other.known_hosts_name == "[storage.example.org]:2222" and other.address == "storage.example.org:2222"
    assert other.authorized_line("ssh-ed25519 AAAA k") == 'restrict,command="internal-sftp" ssh-ed25519 AAAA k'


# --- the script's words ---------------------------------------------------------------


def words_sent(host) -> list[str]:
    command = host.sent[-1]
    if command.startswith("sudo -n -u "):
        command = shlex.split(command)[-1]
    return shlex.split(command)


def test_a_push_runs_the_script_as_the_deploy_user_with_settings_as_words(fake_host, app, configured):
    host = fake_host(replies={"offsite-restic push": (0, "snapshot=new 0123abcd 1048576 3\nforgot=2\n", "")})
    pushed = offsite.push(host, app, configured)
    assert host.sent[0].startswith("sudo -n -u coachntt -- sh -c ")
    words = words_sent(host)
    assert words[:2] == ["bash", "-c"] and words[2] == templates.script("offsite-restic.sh")
    assert words[3:] == ["offsite-restic", "push", "offsite", "10.201.0.14", "22", "/home/offsite/coachntt",
                         "/opt/coachntt/.env.production", "/backups", "7", "4", "6"]
    assert (pushed.snapshot, pushed.added, pushed.backups, pushed.forgot, pushed.changed) == ("0123abcd", 1048576, 3, 2, True)
    assert pushed.lines == [f"snapshot 0123abcd in {REPO}: 3 backup(s), 1.0 MiB new",
                            "retention: 2 older snapshot(s) forgotten and pruned"]


def test_a_push_with_offsite_copies_off_sends_nothing(fake_host, app, defaults):
    host = fake_host()
    pushed = offsite.push(host, app, Settings("production", defaults))
    assert pushed.off and not pushed.changed and host.sent == []


@pytest.mark.parametrize("stdout, unchanged, nothing", [
    ("snapshot=unchanged 0123abcd\n", True, False),
    ("pushed=nothing\n", False, True),
])
def test_a_push_with_nothing_new_changes_nothing(stdout, unchanged, nothing):
    pushed = offsite.parse_push(stdout, REPO)
    assert (pushed.unchanged, pushed.nothing, pushed.changed) == (unchanged, nothing, False)


def test_a_push_that_names_no_snapshot_is_an_error():
    with pytest.raises(OpsError):
        offsite.parse_push("snapshot=new zz\n", REPO)


def test_an_absolute_env_file_is_used_as_it_is(app):
    assert offsite.env_path(app) == "/opt/coachntt/.env.production"
    assert offsite.env_path(App(**{**app.__dict__, "env_file": "config/.env"})) == "/opt/coachntt/config/.env"


# --- exit codes -----------------------------------------------------------------------


@pytest.mark.parametrize("status, stderr, exit_code, words", [
    (offsite.NO_PASSWORD, "no RESTIC_PASSWORD in /opt/coachntt/.env.production",
     EXIT_USAGE, "no RESTIC_PASSWORD in /opt/coachntt/.env.production on deploy@vps; add RESTIC_PASSWORD="),
    (offsite.NO_RESTIC, "restic is not installed", EXIT_USAGE, "run `backup.offsite --init`"),
    (offsite.NO_KEY, "no key", EXIT_USAGE, "no off-site key"),
    (offsite.NOT_PINNED, "x", EXIT_USAGE, "not pinned"),
    (offsite.UNREACHABLE, "ssh: connect to host 10.201.0.14 port 22: Connection refused", EXIT_CONNECT,
     "cannot reach the storage host 10.201.0.14 from deploy@vps: ssh: connect to host 10.201.0.14 port 22: Connection refused"),
    (offsite.HOST_KEY_CHANGED, "x", EXIT_CONNECT, "ssh-keygen -R '10.201.0.14'"),
    (offsite.REFUSED, "Permission denied (publickey)", EXIT_CONNECT, "~offsite/.ssh/authorized_keys on 10.201.0.14"),
    (offsite.NO_REPOSITORY, "x", EXIT_USAGE, f"no restic repository at {REPO}"),
    (offsite.WRONG_PASSWORD, "x", EXIT_USAGE, "does not open"),
    (offsite.NO_SUCH_BACKUP, "x", EXIT_USAGE, f"no off-site copy of {NAME}"),
    (offsite.ALREADY_THERE, "x", EXIT_USAGE, f"{NAME} is already in /backups"),
    (offsite.NO_DIRECTORY, "x", EXIT_USAGE, "run `deploy.setup`"),
    (1, "the off-site copy of x fails its sha256 check: nothing kept", EXIT_FAILED, "fails its sha256 check: nothing kept (on deploy@vps)"),
])
def test_each_way_a_script_run_ends_is_one_line_and_its_exit_code(app, configured, status, stderr, exit_code, words):
    error = offsite.error_for(Result("cmd", "", stderr + "\n", status), offsite.storage_from(configured), app, "deploy@vps", NAME)
    assert error.exit_code == exit_code and words in error.one_line() and "\n" not in error.one_line()


def test_a_secret_in_the_scripts_last_line_is_masked(app, configured):
    redact.register("hunter2-secret")
    error = offsite.error_for(Result("cmd", "", "oops hunter2-secret\n", 1), offsite.storage_from(configured), app, "vps")
    assert "hunter2" not in error.one_line()


def test_init_reports_what_it_did_also_when_a_later_step_stopped(fake_host, app, configured):
    said = ("restic=0.18.0 (installed now)\nkey=created /home/coachntt/.ssh/coachntt_offsite\npubkey=ssh-ed25519 AAAA c@h\n"
            "hostkey=pinned /home/coachntt/.ssh/known_hosts\nfingerprint=256 SHA256:abc 10.201.0.14 (ED25519)\n")
    host = fake_host(replies={"offsite-restic init": (offsite.REFUSED, said, "Permission denied (publickey)")})
    done, error = offsite.init(host, app, offsite.storage_from(configured))
    assert done.public_key == "ssh-ed25519 AAAA c@h" and done.fingerprints == ["256 SHA256:abc 10.201.0.14 (ED25519)"]
    assert done.host_key.startswith("pinned ") and done.repo == "" and error.exit_code == EXIT_CONNECT


def test_a_fetch_names_the_file_it_brought_back(fake_host, app, configured):
    host = fake_host(replies={"offsite-restic fetch": (0, f"fetched=/backups/{NAME} 0123abcd\n", "")})
    assert offsite.fetch(host, app, offsite.storage_from(configured), NAME) == (f"/backups/{NAME}", "0123abcd")
    assert words_sent(host)[-2:] == ["/backups", NAME]


# --- the password, read on the server only --------------------------------------------


def parsed_password(tmp_path, env_text: str) -> subprocess.CompletedProcess:
    """The script's own password() against an env file, with its helpers stubbed."""
    script = (PROJECT_DIR / "scripts" / "offsite-restic.sh").read_text()
    function = script[script.index("password() {"):]
    function = function[: function.index("\n}\n") + 3]
    (tmp_path / "env").write_text(env_text)
    harness = (f"scratch={shlex.quote(str(tmp_path))}\nenv_file={shlex.quote(str(tmp_path / 'env'))}\n"
               'quit() { echo "$2" >&2; exit "$1"; }\nfail() { echo "$*" >&2; exit 1; }\n'
               f'{function}password\n[ "$RESTIC_PASSWORD_FILE" = "$scratch/password" ] && stat -c %a "$RESTIC_PASSWORD_FILE"\n')
    return subprocess.run(["bash", "-c", "umask 077\n" + harness], capture_output=True, text=True, timeout=10)


@pytest.mark.parametrize("text, password", [
    ("RESTIC_PASSWORD=plain-password-1\n", "plain-password-1"),
    ('A=1\nRESTIC_PASSWORD="with space # and hash" # a comment\n', "with space # and hash"),
    ("export RESTIC_PASSWORD='single'\n", "single"),
    ("RESTIC_PASSWORD=first\nRESTIC_PASSWORD=second   # the last one counts\n", "second"),
    ("RESTIC_PASSWORD=pa#ss\n", "pa#ss"),
])
def test_the_password_is_read_from_the_env_file_into_a_private_file(tmp_path, text, password):
    result = parsed_password(tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "600"
    assert (tmp_path / "password").read_text() == password
    assert password not in result.stdout + result.stderr


@pytest.mark.parametrize("text", ["", "RESTIC_PASSWORD=\n", "# RESTIC_PASSWORD=commented\n", "OTHER_RESTIC_PASSWORD=x\n"])
def test_no_password_is_exit_20_and_no_file(tmp_path, text):
    result = parsed_password(tmp_path, text)
    assert result.returncode == offsite.NO_PASSWORD and "no RESTIC_PASSWORD" in result.stderr
    assert not (tmp_path / "password").exists()


# --- tasks: refused before connecting -------------------------------------------------


@pytest.mark.parametrize("task, kwargs, env, words", [
    (backup_copies.offsite_, {}, {}, "backup.offsite_repo is empty"),
    (backup_copies.offsite_, {"fetch": "../x"}, {"COACHNTT_BACKUP__OFFSITE_REPO": REPO}, "no '/' or '..'"),
    (backup_copies.offsite_, {"fetch": "a/b"}, {"COACHNTT_BACKUP__OFFSITE_REPO": REPO}, "no '/' or '..'"),
    (backup_copies.offsite_, {"fetch": NAME, "init": True}, {"COACHNTT_BACKUP__OFFSITE_REPO": REPO}, "separate steps"),
    (backup_copies.offsite_, {}, {"COACHNTT_BACKUP__OFFSITE_REPO": "sftp:a@b:rel"}, "backup.offsite_repo must be"),
    (backup_copies.pull, {"name": "../x"}, {}, "no '/' or '..'"),
    (backup_copies.pull, {"name": "a/b"}, {}, "no '/' or '..'"),
    (backup_copies.pull, {}, {}, "name a backup"),
])
def test_bad_input_is_one_line_and_exit_2_before_connecting(refused_before_connecting, task, kwargs, env, words):
    refused = refused_before_connecting(task, env=env, **kwargs)
    assert refused.code == 2 and words in refused.message and "\n" not in refused.message


def test_pull_on_the_server_itself_is_refused(project_context, mocker):
    from invoke.exceptions import Exit

    from fabfile.core import task as task_module

    local = LocalTarget(project_context)
    mocker.patch.object(task_module, "target_for", return_value=local)
    run = mocker.spy(local, "run")
    with pytest.raises(Exit) as info:
        backup_copies.pull(project_context, name="latest")
    assert info.value.code == 2 and "no server was named" in info.value.message and "-H" in info.value.message
    run.assert_not_called()


def test_the_backup_namespace_has_offsite_and_pull():
    assert {"offsite", "pull"} <= set(backup_module.ns.tasks)
    name = next(arg for arg in backup_module.ns.tasks["pull"].get_arguments() if arg.name == "name")
    assert name.positional and name.default is None


# --- local copies -------------------------------------------------------------------


class Server(Target):
    """A host whose get_file reads a local directory."""

    label = "coachntt@10.201.0.11"
    login_user = "coachntt"

    def __init__(self, root: Path):
        super().__init__()
        self.root = root
        self.got: list[str] = []

    def get_file(self, remote, local):
        self.got.append(remote)
        Path(local).write_bytes((self.root / Path(remote).name).read_bytes())


def server_with(tmp_path, content=b"dump bytes", flip=False) -> Server:
    root = tmp_path / "server"
    root.mkdir()
    (root / NAME).write_bytes(content)
    (root / f"{NAME}.sha256").write_text(f"{hashlib.sha256(content).hexdigest()}  {NAME}\n")
    (root / f"{NAME}.json").write_text("{}")
    if flip:
        (root / NAME).write_bytes(b"X" + content[1:])
    return Server(root)


def test_a_pulled_copy_is_checked_then_renamed_private(tmp_path):
    server = server_with(tmp_path)
    into = tmp_path / "pulled" / "10.201.0.11"
    (tmp_path / "pulled").mkdir(mode=0o755)  # an existing parent is the operator's: left as it is
    (tmp_path / "pulled").chmod(0o755)
    got = pulled.pull(server, "/backups", NAME, (".sha256", ".json"), into)
    assert sorted(p.name for p in into.iterdir()) == sorted([NAME, f"{NAME}.sha256", f"{NAME}.json"])
    assert got.sha256 == hashlib.sha256(b"dump bytes").hexdigest() and not got.already
    assert server.got == [f"/backups/{NAME}.sha256", f"/backups/{NAME}.json", f"/backups/{NAME}"], "the dump last"
    assert stat.S_IMODE(into.stat().st_mode) == 0o700 and stat.S_IMODE((into / NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "pulled").stat().st_mode) == 0o755

    again = pulled.pull(server, "/backups", NAME, (".sha256", ".json"), into)
    assert again.already and server.got.count(f"/backups/{NAME}") == 1, "a checked copy is not copied again"


def test_a_copy_that_does_not_match_its_checksum_leaves_nothing(tmp_path):
    server = server_with(tmp_path, flip=True)
    into = tmp_path / "new" / "pulled"
    with pytest.raises(OpsError) as info:
        pulled.pull(server, "/backups", NAME, (".sha256", ".json"), into)
    assert "does not match its .sha256" in info.value.what and "nothing kept" in info.value.what
    assert list(into.iterdir()) == []
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700, "every directory made here is private"


def test_a_backup_without_a_checksum_is_not_copied(tmp_path):
    server = server_with(tmp_path)
    with pytest.raises(OpsError, match="cannot be checked"):
        pulled.pull(server, "/backups", NAME, (".json",), tmp_path / "pulled")
    assert server.got == []


@pytest.mark.parametrize("text", ["", "nonsense", f"{'0' * 64}  other.dump", f"{'0' * 63}  {NAME}"])
def test_a_sidecar_that_is_not_a_checksum_of_the_backup_is_an_error(text):
    with pytest.raises(OpsError):
        pulled.expected_sha256(text, NAME)


def test_a_sidecar_in_binary_mode_is_read():
    assert pulled.expected_sha256(f"{'a' * 64} *{NAME}\n", NAME) == "a" * 64


def test_pulled_copies_go_below_the_project_or_an_absolute_directory(defaults, tmp_path):
    assert pulled.destination(Settings("production", defaults), "10.201.0.11") == PROJECT_DIR / "backups" / "10.201.0.11"
    defaults["backup"]["pull_dir"] = str(tmp_path)
    assert pulled.destination(Settings("production", defaults), "api.example.org", 2222) == tmp_path / "api.example.org_2222"
