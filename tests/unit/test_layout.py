"""roles.* (core/layout.py): the layout's hosts and roles, and every way it is refused
before a connection (exit 2, one line)."""

from __future__ import annotations

import pytest

from fabfile.core import layout
from fabfile.core.errors import EXIT_USAGE, ConfigError, UsageError
from fabfile.core.settings import Settings, validate

A, B, C, D = "coachntt@10.201.0.11", "coachntt@10.201.0.12", "coachntt@10.201.0.13", "coachntt@10.201.0.14"
EMPTY = {"app": [], "lb": "", "db": "", "replica": []}


def test_every_role_empty_is_the_single_vps_layout(defaults):
    assert defaults["roles"] == EMPTY
    assert layout.check(EMPTY) == []
    assert layout.role_hosts(EMPTY) == {}


def test_members_carry_every_role_they_hold_in_role_order():
    members = layout.check({"app": [A, B], "lb": A, "db": C, "replica": [D]})
    assert [(m.login.login, m.roles) for m in members] == [(A, ("app", "lb")), (B, ("app",)), (C, ("db",)),
                                                           (D, ("replica",))]


@pytest.mark.parametrize("roles, words", [
    ({**EMPTY, "web": A}, "unknown role 'web' in roles.web"),
    ({**EMPTY, "lb": A}, "roles.lb is set but roles.app is empty"),
    ({**EMPTY, "app": [A], "replica": [B]}, "a replica needs a primary"),
    ({**EMPTY, "app": [A, "coachntt@10.201.0.11:22"]}, "10.201.0.11:22 is listed twice in roles.app"),
    ({**EMPTY, "app": [A, "root@10.201.0.11"]}, "listed twice in roles.app"),
    ({**EMPTY, "app": [A], "db": B, "replica": [B]}, "is both roles.db and roles.replica"),
    ({**EMPTY, "app": [A], "db": "root@10.201.0.11"}, "is reached as coachntt@10.201.0.11 and as root@10.201.0.11"),
    ({**EMPTY, "app": [A], "lb": [A, B]}, "roles.lb holds one host, got 2"),
    ({**EMPTY, "app": ["not a host"]}, "roles.app must hold user@host[:port]"),
    ("app=x", "roles must name hosts per role"),
])
def test_a_bad_layout_is_a_config_error(roles, words):
    with pytest.raises(ConfigError) as info:
        layout.check(roles)
    assert words in info.value.one_line()
    assert info.value.exit_code == EXIT_USAGE


def test_the_settings_refuse_a_bad_layout_with_the_rest(defaults):
    """validate() runs the layout check: every task refuses it before connecting."""
    bad = Settings("production", {**defaults, "roles": {**EMPTY, "replica": [A]}})
    with pytest.raises(ConfigError, match="a replica needs a primary"):
        validate(bad)
    with pytest.raises(ConfigError, match="roles.lb must be empty or one user@host"):
        validate(Settings("production", {**defaults, "roles": {**EMPTY, "app": [A], "lb": "a b"}}))
    assert validate(Settings("production", {**defaults, "roles": {**EMPTY, "app": [A, B], "lb": C}}))


def test_roles_come_from_the_environment_as_lists_and_one_host(defaults):
    from fabfile.core.settings import load

    settings = load(defaults, {"COACHNTT_ROLES__APP": f"{A},{B}", "COACHNTT_ROLES__LB": C})
    assert settings.get("roles.app") == [A, B] and settings.get("roles.lb") == C
    assert [m.roles for m in layout.check(settings.get("roles"))] == [("app",), ("app",), ("lb",)]


def test_hosts_given_with_h_take_their_roles_from_the_layout():
    members = layout.check({"app": [A], "lb": B, "db": "", "replica": []})
    chosen = layout.hosts_given([B, C], members)
    assert [(m.login.login, m.roles) for m in chosen] == [(B, ("lb",)), (C, ())]


@pytest.mark.parametrize("given, words", [
    ([A, B, A], f"{A} is given twice with -H"),
    ([A, "root@10.201.0.11"], "root@10.201.0.11 is given twice with -H (as coachntt@10.201.0.11 before)"),
    (["10.201.0.11", "10.201.0.11:22"], "given twice"),
    (["bad host!"], "-H must list user@host[:port]"),
])
def test_a_host_given_twice_with_h_is_a_usage_error(given, words):
    with pytest.raises(UsageError) as info:
        layout.hosts_given(given, [])
    assert words in info.value.one_line()


def test_logins_parse_user_host_and_port():
    assert layout.parse_login("coachntt@10.201.0.11:2222") == layout.HostLogin("coachntt@10.201.0.11:2222", "coachntt",
                                                                               "10.201.0.11", 2222)
    assert layout.parse_login("vps.example.org").port == 22
    for bad in ("", "a b", "user@", "host:0", "host:70000", "@host", "x;rm -rf /"):
        assert layout.parse_login(bad) is None, bad


def test_the_layout_never_goes_to_a_servers_settings_file():
    """`inv` on a server works on that server: it must not fan out to the whole layout."""
    from fabfile.core.server_settings import left_out

    assert left_out("roles.app", [A, B]) and left_out("roles.lb", C)
    assert left_out("fleet.parallel_reads", 10) == ""
