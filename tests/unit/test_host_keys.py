"""Host keys are checked: unknown keys refused, the opt-in records them once.

The policies are tested with real paramiko keys, then end to end against a
paramiko SSH server on 127.0.0.1 (loopback only, well under a second).
"""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import threading
from contextlib import contextmanager

import fabric
import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fabfile.core.errors import HostKeyError
from fabfile.core.settings import Settings
from fabfile.core.target import AcceptOnceAndRecord, RefuseUnknownHostKey, RemoteTarget, fingerprint, known_hosts_file


def new_ed25519() -> paramiko.Ed25519Key:
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    return paramiko.Ed25519Key(file_obj=io.StringIO(pem.decode()))


@pytest.fixture(scope="module")
def ed_key():
    return new_ed25519()


@pytest.fixture(scope="module")
def rsa_key():
    return paramiko.RSAKey.generate(1024)


# --- the policies with real keys --------------------------------------------


@pytest.mark.parametrize("which", ["ed_key", "rsa_key"])
def test_refuse_unknown_host_key_raises_with_fingerprint_and_opt_in_hint(request, which):
    key = request.getfixturevalue(which)
    with pytest.raises(HostKeyError) as info:
        RefuseUnknownHostKey().missing_host_key(None, "[203.0.113.10]:22", key)
    assert info.value.what == f"unknown host key for [203.0.113.10]:22 ({key.get_name()} {fingerprint(key)})"
    assert "COACHNTT_ACCEPT_NEW_HOST_KEY=1" in info.value.hint
    assert info.value.exit_code == 3


@pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="needs ssh-keygen as the reference")
@pytest.mark.parametrize("which", ["ed_key", "rsa_key"])
def test_fingerprint_matches_what_ssh_keygen_prints(request, which, tmp_path):
    key = request.getfixturevalue(which)
    pub = tmp_path / "key.pub"
    pub.write_text(f"{key.get_name()} {key.get_base64()}\n")
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout
    assert out.split()[1] == fingerprint(key)


def test_accept_once_appends_a_known_hosts_line_paramiko_can_read(ed_key, rsa_key, tmp_path, capsys):
    path = tmp_path / "new-dir" / "known_hosts"
    AcceptOnceAndRecord(path).missing_host_key(None, "[10.201.0.2]:22", ed_key)
    AcceptOnceAndRecord(path).missing_host_key(None, "203.0.113.10", rsa_key)
    assert len(path.read_text().splitlines()) == 2, "appends, never rewrites"
    known = paramiko.HostKeys(str(path))
    assert known.lookup("[10.201.0.2]:22")[ed_key.get_name()] == ed_key
    assert known.lookup("203.0.113.10")[rsa_key.get_name()] == rsa_key
    assert fingerprint(rsa_key) in capsys.readouterr().out


def test_project_known_hosts_can_be_moved_by_environment(settings, monkeypatch, tmp_path):
    assert str(known_hosts_file(settings)).endswith(".config/coachntt-ops/known_hosts")
    assert "~" not in str(known_hosts_file(settings))
    monkeypatch.setenv("COACHNTT_KNOWN_HOSTS", str(tmp_path / "kh"))
    assert known_hosts_file(settings) == tmp_path / "kh"


# --- end to end against a local SSH server -----------------------------------


class _AnyKeyServer(paramiko.ServerInterface):
    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        return paramiko.AUTH_SUCCESSFUL


@contextmanager
def ssh_server(host_key):
    """An SSH server on 127.0.0.1 presenting `host_key`; yields its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.1)
    stop, transports = threading.Event(), []

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            transport = paramiko.Transport(conn)
            transport.add_server_key(host_key)
            transports.append(transport)
            try:
                transport.start_server(server=_AnyKeyServer())
            except (paramiko.SSHException, EOFError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        for transport in transports:
            transport.close()
        listener.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A HOME without ~/.ssh, so only the keys a test writes are known."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


@pytest.fixture
def lab(tmp_path, home, ed_key):
    """Settings pointing at a scratch known_hosts, a client key, and a connect() helper."""
    known = tmp_path / "known_hosts"
    lab_settings = Settings("sandbox", {"ssh": {"known_hosts": str(known), "connect_timeout": 5}})
    opened = []

    def connect(port, environ=None):
        connection = fabric.Connection(
            "tester@127.0.0.1",
            port=port,
            connect_kwargs={"pkey": ed_key, "look_for_keys": False, "allow_agent": False},
        )
        opened.append(connection)
        return RemoteTarget(connection, lab_settings, environ=environ or {})

    yield known, connect
    for connection in opened:
        connection.close()


def test_unknown_server_is_refused_and_nothing_is_recorded(lab, rsa_key):
    known, connect = lab
    with ssh_server(rsa_key) as port, pytest.raises(HostKeyError) as info:
        connect(port)
    assert f"unknown host key for [127.0.0.1]:{port}" in info.value.what
    assert fingerprint(rsa_key) in info.value.what
    assert not known.exists()


def test_opt_in_records_the_key_once_and_later_connections_trust_it(lab, rsa_key, capsys):
    known, connect = lab
    with ssh_server(rsa_key) as port:
        first = connect(port, {"COACHNTT_ACCEPT_NEW_HOST_KEY": "1"})
        assert first.connection.is_connected
        assert known.read_text().startswith(f"[127.0.0.1]:{port} ssh-rsa ")
        second = connect(port)  # no opt-in this time
        assert second.connection.is_connected
    assert len(known.read_text().splitlines()) == 1
    assert "recorded new host key" in capsys.readouterr().out


def test_changed_host_key_is_refused_as_possible_man_in_the_middle(lab, rsa_key):
    known, connect = lab
    impostor = new_ed25519()
    with ssh_server(impostor) as port:
        known.write_text(f"[127.0.0.1]:{port} ssh-ed25519 {new_ed25519().get_base64()}\n")
        with pytest.raises(HostKeyError) as info:
            connect(port, {"COACHNTT_ACCEPT_NEW_HOST_KEY": "1"})
    assert "CHANGED" in info.value.what
    assert "ssh-keygen -R" in info.value.hint


def test_key_in_the_users_own_known_hosts_is_trusted(lab, home, rsa_key):
    known, connect = lab
    with ssh_server(rsa_key) as port:
        (home / ".ssh").mkdir()
        (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{port} ssh-rsa {rsa_key.get_base64()}\n")
        assert connect(port).connection.is_connected
    assert not known.exists()


def test_the_ssh_socket_has_tcp_nodelay_and_the_configured_timeout(lab, rsa_key, home):
    known, connect = lab
    with ssh_server(rsa_key) as port:
        known.write_text(f"[127.0.0.1]:{port} ssh-rsa {rsa_key.get_base64()}\n")
        remote = connect(port)
        sock = remote.connection.connect_kwargs["sock"]
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert remote.connection.connect_timeout == 5
