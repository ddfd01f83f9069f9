"""The suite-wide guard in tests/conftest.py refuses real traffic before it starts.

These tests stay harmless even if the guard were broken: they use UDP sockets,
whose connect() only records a peer address in the kernel and sends nothing,
then prove with getpeername() that not even that happened. The one TCP check
aims at 192.0.2.1 (TEST-NET-1, reserved for documentation) without blocking.
"""

import errno
import socket

import pytest


def assert_refused(family, address, method="connect"):
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        with pytest.raises(RuntimeError, match=address[0].replace(".", r"\.")) as info:
            getattr(sock, method)(address)
        with pytest.raises(OSError) as not_connected:
            sock.getpeername()
        assert not_connected.value.errno == errno.ENOTCONN, "the kernel never saw the connect"
        assert not isinstance(info.value, OSError), "must not look like an ordinary network error"
    finally:
        sock.close()


@pytest.mark.parametrize("address", ["203.0.113.10", "198.51.100.1", "10.201.1.5", "192.168.1.1"])
def test_guard_refuses_connections_outside_loopback_and_sandbox_naming_the_address(address):
    assert_refused(socket.AF_INET, (address, 22))


def test_guard_refuses_connect_ex_too():
    assert_refused(socket.AF_INET, ("203.0.113.10", 22), method="connect_ex")


def test_guard_covers_tcp_sockets():
    with socket.socket() as sock:
        sock.setblocking(False)
        with pytest.raises(RuntimeError, match=r"192\.0\.2\.1"):
            sock.connect(("192.0.2.1", 22))


def ipv6_or_skip():
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
    except OSError as exc:
        pytest.skip(f"IPv6 sockets unavailable: {exc}")


def test_guard_refuses_public_ipv6_addresses():
    ipv6_or_skip()
    assert_refused(socket.AF_INET6, ("2001:4860:4860::8888", 53, 0, 0))


def test_guard_refuses_ipv4_mapped_public_address():
    ipv6_or_skip()
    assert_refused(socket.AF_INET6, ("::ffff:198.51.100.1", 53, 0, 0))


def test_guard_refuses_host_names_other_than_localhost():
    assert_refused(socket.AF_INET, ("guard-test.invalid", 443))


@pytest.mark.parametrize("address", ["127.0.0.1", "127.3.2.1", "10.201.0.7"])
def test_guard_allows_loopback_and_the_sandbox_network(address):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((address, 9))  # UDP: records the peer, sends nothing
        assert sock.getpeername() == (address, 9)


def test_guard_allows_a_real_loopback_tcp_connection():
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
