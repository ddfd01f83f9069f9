"""The app on the server: sha validation, compose commands, fetch, health gate."""

from __future__ import annotations

import dataclasses
import getpass
import http.server
import shlex
import shutil
import threading

import invoke
import pytest

from fabfile.core.app import App, fetch_sha, health_gate, validate_sha
from fabfile.core.errors import ConfigError, OpsError, UsageError
from fabfile.core.settings import Settings
from fabfile.core.target import LocalTarget

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def app(defaults):
    return App.from_settings(Settings("production", defaults))


@pytest.mark.parametrize("sha", ["", "abc1234", SHA])
def test_valid_shas_pass_through(sha):
    assert validate_sha(sha) == sha


@pytest.mark.parametrize("sha", ["main", "abc123", "ABC1234", SHA + "0", "abc1234; rm -rf /"])
def test_anything_else_is_refused_before_connecting(sha):
    with pytest.raises(UsageError) as info:
        validate_sha(sha)
    assert info.value.what == f"--sha must be a commit id (7-40 hex digits), got '{sha}'"
    assert info.value.exit_code == 2


def test_app_comes_from_settings(app):
    assert (app.dir, app.branch, app.owner, app.state_dir) == ("/opt/coachntt", "main", "coachntt", "/var/lib/coachntt-ops")
    assert app.compose_files == ("docker-compose.prod.yml",)


def test_missing_setting_names_its_variable(defaults):
    del defaults["state_dir"]
    with pytest.raises(ConfigError) as info:
        App.from_settings(Settings("production", defaults))
    assert "COACHNTT_STATE_DIR=" in info.value.hint


def test_compose_uses_every_file_and_tags_the_release(defaults):
    defaults["app"]["compose_overrides"] = ["docker-compose.sandbox.yml"]
    app = App.from_settings(Settings("sandbox", defaults))
    assert app.compose("up -d", SHA) == (
        f"cd /opt/coachntt && API_A_PORT=8000 API_B_PORT=8002 APP_VERSION={SHA} "
        "docker compose --ansi never -f docker-compose.prod.yml -f docker-compose.sandbox.yml up -d"
    )
    assert app.compose("ps") == (
        "cd /opt/coachntt && API_A_PORT=8000 API_B_PORT=8002 "
        "docker compose --ansi never -f docker-compose.prod.yml -f docker-compose.sandbox.yml ps"
    ), "the slots' ports on every command: a slot's definition never changes between two of them"


def test_fetch_resolves_the_sha_as_the_app_owner(app, fake_host):
    host = fake_host(replies={"git fetch": (0, SHA + "\n", "")}, login_user="root")
    assert fetch_sha(host, app, "0123456") == SHA
    argv = shlex.split(host.sent[0])
    assert argv[:5] == ["sudo", "-n", "-u", "coachntt", "--"]
    assert "git rev-parse --verify --quiet '0123456^{commit}'" in argv[-1]


def test_fetch_without_sha_resolves_the_branch_tip(app, fake_host):
    host = fake_host(replies={"git fetch": (0, SHA + "\n", "")}, login_user="coachntt")
    assert fetch_sha(host, app, "") == SHA
    assert "'origin/main^{commit}'" in host.sent[0]


def test_fetch_and_resolve_are_one_command_with_their_own_exit_codes(app, fake_host):
    host = fake_host(replies={"git fetch": (0, SHA + "\n", "")}, login_user="coachntt")
    fetch_sha(host, app, "abc1234")
    assert host.round_trips == 1
    assert host.sent[0] == (
        "cd /opt/coachntt && { if ! git fetch --quiet origin; then git remote get-url origin; exit 90; fi; "
        "git rev-parse --verify --quiet 'abc1234^{commit}' || exit 91; }"
    )


def test_unknown_sha_after_a_good_fetch_is_a_usage_error(app, fake_host):
    host = fake_host(replies={"git fetch": (91, "", "")})
    with pytest.raises(UsageError) as info:
        fetch_sha(host, app, "abc1234")
    assert info.value.what == "unknown sha 'abc1234': not found in origin"
    assert info.value.exit_code == 2


def test_unknown_branch_after_a_good_fetch_is_a_config_error(app, fake_host):
    host = fake_host(replies={"git fetch": (91, "", "")})
    with pytest.raises(ConfigError) as info:
        fetch_sha(host, app, "")
    assert info.value.what == "branch 'main' not found in origin"
    assert info.value.exit_code == 2


@pytest.mark.parametrize("sha", ["abc1234", ""])
@pytest.mark.parametrize("stderr", [
    "fatal: unable to access 'https://github.com/coachntt/api.git/': Could not resolve host: github.com",
    "git@github.com: Permission denied (publickey).\nfatal: Could not read from remote repository.",
])
def test_a_failed_fetch_is_exit_1_naming_the_repository_and_gits_reason_not_an_unknown_sha(app, fake_host, sha, stderr):
    host = fake_host(replies={"git fetch": (90, "https://ci:hunter2-token@github.com/coachntt/api.git\n", stderr)})
    with pytest.raises(OpsError) as info:
        fetch_sha(host, app, sha)
    assert type(info.value) is OpsError and info.value.exit_code == 1
    assert info.value.what == f"cannot fetch from https://ci:********@github.com/coachntt/api.git: {stderr.splitlines()[-1]}"
    assert info.value.hint == "check the network / deploy key"


def test_a_missing_checkout_is_not_an_unknown_sha(app, fake_host):
    host = fake_host(replies={"git fetch": (2, "", "sh: 1: cd: can't cd to /opt/coachntt\n")})
    with pytest.raises(OpsError) as info:
        fetch_sha(host, app, "abc1234")
    assert info.value.exit_code == 1
    assert info.value.what.startswith("fetching in /opt/coachntt failed on deploy@vps (exit 2)")
    assert info.value.hint == "sh: 1: cd: can't cd to /opt/coachntt"


def test_a_fetch_answer_that_is_not_a_commit_id_never_becomes_the_release(app, fake_host):
    host = fake_host(replies={"git fetch": (0, "abc; touch /tmp/x\n", "")})
    with pytest.raises(OpsError, match="git answered"):
        fetch_sha(host, app, "abc1234")


def test_gate_result_separates_responses_from_logs(app, fake_host):
    host = fake_host(replies={"health-gate": (1, "0s 000 \n1s 502 Bad Gateway\n--- api logs ---\napi | boom\n", "")})
    gate = health_gate(host, app, url="http://127.0.0.1:8002/health", service="api_b")
    assert not gate.passed
    assert gate.responses == ["0s 000 ", "1s 502 Bad Gateway"]
    assert gate.logs == "api | boom"
    assert "http://127.0.0.1:8002/health" in host.sent[0] and "logs --no-color --tail 20 api_b" in host.sent[0]


# --- the gate script for real, against a local HTTP server -----------------------


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200 if self.path == "/health" else 503
        body = b'{"status": "ok"}' if code == 200 else b"down"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def local_app(app, tmp_path):
    """The app as the current user in tmp_path, so the gate runs without sudo or docker."""
    return dataclasses.replace(app, owner=getpass.getuser(), dir=str(tmp_path))


@pytest.mark.skipif(not shutil.which("curl"), reason="the gate uses curl")
def test_gate_passes_when_health_answers_200(local_app, http_server):
    gate = health_gate(LocalTarget(invoke.Context()), local_app, url=f"{http_server}/health", service="api_a", deadline=5)
    assert gate.passed
    assert gate.responses[-1].split()[1:] == ["200", '{"status":', '"ok"}']


@pytest.mark.skipif(not shutil.which("curl"), reason="the gate uses curl")
def test_gate_fails_at_the_deadline_showing_each_answer(local_app, http_server):
    gate = health_gate(LocalTarget(invoke.Context()), local_app, url=f"{http_server}/down", service="api_a", deadline=0)
    assert not gate.passed
    assert [line.split()[1] for line in gate.responses] == ["503"]
    assert gate.logs, "a failed gate also shows the api's logs (here: why they could not be read)"
