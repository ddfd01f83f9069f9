"""Who runs a command: target selection, sudo wrapping, round trips, failures."""

from __future__ import annotations

import shlex

import fabric
import invoke
import pytest

from fabfile.core import redact, target
from fabfile.core.errors import ConfigError, ConnectError, RemoteCommandError
from fabfile.core.settings import Settings
from fabfile.core.target import LocalTarget, RemoteTarget, Result, command_failed, target_for


@pytest.fixture
def no_connect(mocker):
    """open_hardened replaced: selection is tested without any socket."""
    return mocker.patch.object(target, "open_hardened")


# --- selection --------------------------------------------------------------


def test_fabric_connection_gives_a_remote_target(no_connect, settings):
    connection = fabric.Connection("coachntt@203.0.113.7")
    chosen = target_for(connection, settings)
    assert isinstance(chosen, RemoteTarget)
    assert chosen.connection is connection
    assert chosen.label == "coachntt@203.0.113.7"
    no_connect.assert_called_once_with(connection, settings, accept_new=False)


def test_configured_host_gives_a_remote_target_to_that_host(no_connect, defaults):
    settings = Settings("sandbox", {**defaults, "host": "deploy@203.0.113.8:2222"})
    chosen = target_for(invoke.Context(), settings)
    assert isinstance(chosen, RemoteTarget)
    assert (chosen.connection.user, chosen.connection.host, chosen.connection.port) == ("deploy", "203.0.113.8", 2222)
    assert chosen.label == "deploy@203.0.113.8:2222"
    assert no_connect.call_count == 1


@pytest.mark.parametrize("key_filename", ["/nonexistent", ["/nonexistent"], ["~/no-such-key-here"]])
def test_a_missing_key_file_is_a_config_error_before_connecting(no_connect, settings, key_filename):
    connection = fabric.Connection("coachntt@203.0.113.7", connect_kwargs={"key_filename": key_filename})
    with pytest.raises(ConfigError) as info:
        target_for(connection, settings)
    name = key_filename if isinstance(key_filename, str) else key_filename[0]
    assert info.value.one_line() == f"key file {name} does not exist; pass the private key with -i"
    assert info.value.exit_code == 2
    no_connect.assert_not_called()


def test_a_key_file_that_is_a_directory_is_refused(no_connect, settings, tmp_path):
    connection = fabric.Connection("coachntt@203.0.113.7", connect_kwargs={"key_filename": [str(tmp_path)]})
    with pytest.raises(ConfigError, match="is not a file"):
        target_for(connection, settings)


def test_an_existing_key_file_is_passed_on(no_connect, settings, tmp_path):
    key = tmp_path / "id_ed25519"
    key.write_text("not read here")
    target_for(fabric.Connection("coachntt@203.0.113.7", connect_kwargs={"key_filename": [str(key)]}), settings)
    no_connect.assert_called_once()


def test_no_host_anywhere_gives_the_local_target(no_connect, settings):
    context = invoke.Context()
    chosen = target_for(context, settings)
    assert isinstance(chosen, LocalTarget)
    assert chosen.context is context
    no_connect.assert_not_called()


def test_accept_new_host_key_opt_in_is_passed_to_open_hardened(no_connect, settings, monkeypatch):
    monkeypatch.setenv("COACHNTT_ACCEPT_NEW_HOST_KEY", "1")
    target_for(fabric.Connection("coachntt@203.0.113.7"), settings)
    assert no_connect.call_args.kwargs == {"accept_new": True}


def test_root_login_is_root_and_needs_no_sudo(no_connect, settings):
    assert RemoteTarget(fabric.Connection("root@203.0.113.7"), settings).is_root
    assert not RemoteTarget(fabric.Connection("coachntt@203.0.113.7"), settings).is_root


def test_connection_failure_while_opening_becomes_a_connect_error(no_connect, settings):
    no_connect.side_effect = ConnectionRefusedError(111, "Connection refused")
    with pytest.raises(ConnectError) as info:
        RemoteTarget(fabric.Connection("coachntt@203.0.113.7:2200"), settings)
    assert info.value.what == "cannot reach coachntt@203.0.113.7:2200: connection refused"


def test_unknown_exception_while_opening_propagates_unchanged(no_connect, settings):
    no_connect.side_effect = KeyError("bug")
    with pytest.raises(KeyError):
        RemoteTarget(fabric.Connection("coachntt@203.0.113.7"), settings)


def test_remote_target_runs_through_the_connection_without_a_pty_or_stdin(no_connect, settings, mocker):
    connection = fabric.Connection("coachntt@203.0.113.7")
    run = mocker.patch.object(connection, "run", return_value=mocker.Mock(stdout="out", stderr="", exited=0))
    put = mocker.patch.object(connection, "put")
    remote = RemoteTarget(connection, settings)
    result = remote.run("uptime", timeout=5)
    remote.put_file("/tmp/a", "/etc/a")
    assert result == Result("uptime", "out", "", 0)
    # Every command starts with the tool's umask: what it creates has the modes it sets.
    run.assert_called_once_with("umask 022; uptime", hide=True, warn=True, in_stream=False, timeout=5)
    put.assert_called_once_with("/tmp/a", "/etc/a")
    assert remote.round_trips == 2


# --- running commands -------------------------------------------------------


def test_sudo_wraps_the_command_in_sudo_n_sh_c_when_not_root(fake_host):
    host = fake_host(is_root=False)
    result = host.run("echo 'it''s' && id -u", sudo=True)
    assert shlex.split(host.sent[0]) == ["sudo", "-n", "--", "sh", "-c", "echo 'it''s' && id -u"]
    assert result.command == "echo 'it''s' && id -u", "results and errors show the command as written"


def test_sudo_is_not_used_when_already_root(fake_host):
    host = fake_host(is_root=True)
    host.run("id -u", sudo=True)
    assert host.sent == ["id -u"]


def test_without_sudo_the_command_is_sent_as_is(fake_host):
    host = fake_host(is_root=False)
    host.run("id -u")
    assert host.sent == ["id -u"]


def test_run_as_another_user_uses_sudo_u(fake_host):
    host = fake_host(is_root=True, login_user="root")
    host.run("git fetch origin", user="coachntt", sudo=True)
    assert shlex.split(host.sent[0]) == ["sudo", "-n", "-u", "coachntt", "--", "sh", "-c", "git fetch origin"]


def test_run_as_the_login_user_needs_no_sudo(fake_host):
    host = fake_host(is_root=False, login_user="coachntt")
    host.run("git fetch origin", user="coachntt")
    assert host.sent == ["git fetch origin"]


def test_every_run_counts_one_round_trip(fake_host):
    host = fake_host()
    for _ in range(3):
        host.run("true")
    assert host.round_trips == 3


def test_failed_command_raises_unless_check_is_false(fake_host):
    host = fake_host(failures={"false": (1, "nope")})
    assert host.run("false", check=False).exit_status == 1
    with pytest.raises(RemoteCommandError):
        host.run("false")


def test_local_target_runs_with_sh_and_reports_stdout_stderr_and_status():
    local = LocalTarget(invoke.Context())
    result = local.run("echo out; echo err >&2; exit 3", check=False)
    assert (result.stdout, result.stderr, result.exit_status) == ("out\n", "err\n", 3)
    assert local.label.endswith("@localhost")


def test_local_target_copies_files_with_awkward_names(tmp_path):
    src, dst = tmp_path / "a file 'x'", tmp_path / "copy; rm -rf nothing"
    src.write_text("payload")
    LocalTarget(invoke.Context()).put_file(src, str(dst))
    assert dst.read_text() == "payload"


# --- command_failed ---------------------------------------------------------


@pytest.mark.parametrize(
    "stderr",
    ["sudo: a password is required\n", "sudo: a terminal is required to read the password; either use -S"],
)
def test_sudo_password_prompt_gets_the_passwordless_sudo_hint(stderr):
    error = command_failed(Result("apt-get update", "", stderr, 1), "coachntt@vps")
    assert error.hint == target.SUDO_PASSWORD_HINT.format(user="coachntt", host="vps")
    assert error.hint.startswith("coachntt needs passwordless sudo on vps: add a sudoers drop-in from the provider's console")
    assert "run `secure` as root once" not in error.hint, "useless advice once root login is off"


def test_failure_message_names_command_host_and_exit_with_last_stderr_line_as_hint():
    result = Result("nginx -t\nsystemctl reload nginx", "", "first\nnginx: configuration file test failed\n", 1)
    error = command_failed(result, "coachntt@vps")
    assert error.what == "`nginx -t` failed on coachntt@vps (exit 1)"
    assert error.hint == "nginx: configuration file test failed"
    assert error.exit_status == 1
    assert "first" in error.output


def test_failure_without_stderr_uses_last_stdout_line_then_a_fallback():
    assert command_failed(Result("x", "a\nlast out\n", "", 2), "h").hint == "last out"
    assert command_failed(Result("x", "", "", 2), "h").hint.startswith("no output")


def test_long_command_is_shortened_and_what_replaces_it():
    long = "echo " + "x" * 200
    assert command_failed(Result(long, "", "", 1), "h").what == f"`{long[:77]}...` failed on h (exit 1)"
    assert command_failed(Result(long, "", "", 1), "h", what="step 'nginx'").what == "step 'nginx' failed on h (exit 1)"


def test_secrets_are_redacted_in_failure_message_hint_and_output():
    redact.register("sup3r-s3cret")
    error = command_failed(Result("echo sup3r-s3cret | login", "got sup3r-s3cret", "bad sup3r-s3cret", 1), "h")
    assert "sup3r-s3cret" not in error.what + error.hint + error.output
    assert redact.MASK in error.what and redact.MASK in error.hint and redact.MASK in error.output


def test_command_that_exceeds_its_timeout_is_a_one_line_remote_command_error():
    local = LocalTarget(invoke.Context())
    with pytest.raises(RemoteCommandError, match="sleep"):
        local.run("exec sleep 5", timeout=1)  # exec: the kill reaches sleep, so this takes 1 s


def test_command_too_long_for_one_shell_argument_still_runs_via_a_script_file():
    local = LocalTarget(invoke.Context())
    result = local.run("printf %s " + "x" * 200_000 + " | wc -c")
    assert result.stdout.strip() == "200000"
    assert local.round_trips == 1


# --- a second login (proving key login before sshd hardening) ---------------


def test_second_login_opens_a_new_connection_as_the_user_with_the_same_keys(no_connect, settings):
    connection = fabric.Connection("root@203.0.113.7", port=2222, connect_kwargs={"key_filename": ["/k"], "sock": object()})
    first = RemoteTarget(connection, settings)
    second = target.second_login(first, settings, "coachntt")
    assert second.connection is not first.connection
    assert (second.connection.user, second.connection.host, second.connection.port) == ("coachntt", "203.0.113.7", 2222)
    assert second.connection.connect_kwargs["key_filename"] == ["/k"]
    assert "sock" not in second.connection.connect_kwargs, "a new login needs its own socket"
    assert no_connect.call_count == 2


def test_second_login_needs_ssh():
    with pytest.raises(ConfigError, match="over SSH"):
        target.second_login(LocalTarget(invoke.Context()), Settings("production", {}), "coachntt")


def test_login_public_keys_come_from_the_pub_file_or_the_private_key(no_connect, settings, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    with_pub, without_pub = tmp_path / "id_a", tmp_path / "id_b"
    for path in (with_pub, without_pub):
        path.write_bytes(pem)
    (tmp_path / "id_a.pub").write_text("ssh-ed25519 AAAAfromthepubfile me@laptop\n")
    connection = fabric.Connection("coachntt@203.0.113.7", connect_kwargs={"key_filename": [str(with_pub), str(without_pub)]})
    keys = target.login_public_keys(RemoteTarget(connection, settings))
    assert keys == ["ssh-ed25519 AAAAfromthepubfile", public]
    assert target.login_public_keys(LocalTarget(invoke.Context())) == []


# --- one connection per host for the whole run --------------------------------


def test_a_run_reuses_its_open_connection_for_the_next_task(no_connect, settings, mocker):
    """fab -H root@HOST secure deps: deps must not log in again (root login is off by then)."""
    mocker.patch.object(fabric.Connection, "is_connected", new_callable=mocker.PropertyMock, return_value=True)
    first = target_for(fabric.Connection("root@203.0.113.21"), settings)
    second = target_for(fabric.Connection("root@203.0.113.21"), settings)
    assert second is first
    assert no_connect.call_count == 1
    close = mocker.patch.object(first.connection, "close")
    first.close()  # what Ops.finish does after each task
    close.assert_not_called()
    target.close_run_connections()  # at process exit
    close.assert_called_once()


def test_another_user_or_port_gets_its_own_connection(no_connect, settings, mocker):
    mocker.patch.object(fabric.Connection, "is_connected", new_callable=mocker.PropertyMock, return_value=True)
    root = target_for(fabric.Connection("root@203.0.113.22"), settings)
    assert target_for(fabric.Connection("coachntt@203.0.113.22"), settings) is not root
    assert target_for(fabric.Connection("root@203.0.113.22:2222"), settings) is not root
    target.close_run_connections()


def test_a_dropped_connection_is_opened_again(no_connect, settings):
    first = target_for(fabric.Connection("root@203.0.113.23"), settings)  # never really connected
    assert target_for(fabric.Connection("root@203.0.113.23"), settings) is not first
    assert no_connect.call_count == 2
    target.close_run_connections()


def test_a_second_login_is_its_own_connection_and_really_closes(no_connect, settings, mocker):
    from fabfile.core.target import second_login

    run = target_for(fabric.Connection("root@203.0.113.24"), settings)
    proof = second_login(run, settings, "coachntt")
    close = mocker.patch.object(proof.connection, "close")
    proof.close()
    close.assert_called_once()
    target.close_run_connections()


def test_refused_root_login_suggests_the_deploy_user(settings, mocker):
    import paramiko

    from fabfile.core.errors import AuthError

    mocker.patch.object(target, "open_hardened", side_effect=paramiko.AuthenticationException("no"))
    with pytest.raises(AuthError) as info:
        RemoteTarget(fabric.Connection("root@203.0.113.25:2222"), settings)
    assert info.value.what == "authentication failed for root@203.0.113.25:2222"
    assert "root login is now off: continue with fab -H coachntt@203.0.113.25:2222" in info.value.hint


# --- a secret for the host: a private file, never a command line ----------------------------


def test_a_secret_goes_to_a_private_file_made_private_before_it_is_written(no_connect, settings, mocker):
    connection = fabric.Connection("coachntt@203.0.113.7")
    events = []

    class File:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            events.append("closed")

        def chmod(self, mode):
            events.append(f"chmod {mode:o}")

        def write(self, text):
            events.append(f"write {text}")

    sftp = mocker.Mock()
    sftp.open.return_value = File()
    mocker.patch.object(fabric.Connection, "sftp", return_value=sftp)
    run = mocker.patch.object(connection, "run")
    remote = RemoteTarget(connection, settings)
    remote.put_private("s3cret-value", "/tmp/coachntt-ops.x.secret")
    sftp.open.assert_called_once_with("/tmp/coachntt-ops.x.secret", "wx")  # never over an existing file
    assert events == ["chmod 600", "write s3cret-value", "closed"]
    run.assert_not_called()


def test_a_local_secret_file_is_private_and_never_replaces_one(project_context, tmp_path):
    local = LocalTarget(project_context)
    path = tmp_path / "secret"
    local.put_private("s3cret-value", str(path))
    assert path.read_text() == "s3cret-value" and oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):
        local.put_private("other", str(path))
