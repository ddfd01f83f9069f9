"""The suite-wide guard in tests/conftest.py refuses real traffic before it starts."""

import errno
import socket

import pytest


def _refused(family, address):
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        with pytest.raises(RuntimeError, match=address[0].replace(".", r"\.")) as info:
            sock.connect(address)
        # Nothing was sent: the socket never got a peer.
        with pytest.raises(OSError) as not_connected:
            sock.getpeername()
        assert not_connected.value.errno == errno.ENOTCONN
        return info.value
    finally:
        sock.close()


@pytest.mark.parametrize("address", ["145.79.0.118", "8.8.8.8", "10.201.1.5", "192.168.1.1"])
def test_guard_refuses_connections_outside_loopback_and_sandbox_naming_the_address(address):
    error = _refused(socket.AF_INET, (address, 22))
    assert not isinstance(error, OSError), "must not look like an ordinary network error"


def test_guard_refuses_connect_ex_too():
    with socket.socket() as sock, pytest.raises(RuntimeError, match=r"145\.79\.0\.118"):
        sock.connect_ex(("145.79.0.118", 22))


def test_guard_refuses_public_ipv6_addresses():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        _refused(socket.AF_INET6, ("2001:4860:4860::8888", 53, 0, 0))
    except OSError as exc:  # the kernel has IPv6 disabled: cannot even create the socket
        pytest.skip(f"IPv6 sockets unavailable: {exc}")


def test_guard_refuses_host_names_other_than_localhost():
    with socket.socket() as sock, pytest.raises(RuntimeError, match="api.coachntt.ai"):
        sock.connect(("api.coachntt.ai", 443))


def test_guard_refuses_ipv4_mapped_public_address():
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError as exc:
        pytest.skip(f"IPv6 sockets unavailable: {exc}")
    with sock, pytest.raises(RuntimeError, match="8.8.8.8"):
        sock.connect(("::ffff:8.8.8.8", 53, 0, 0))


def test_guard_allows_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=2) as client:
            assert client.getpeername() == server.getsockname()


def test_guard_allows_unix_sockets(tmp_path):
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(1)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            assert client.getpeername() == path
