"""How the sandbox hands out addresses and tears hosts down, as data (no host is booted)."""

from __future__ import annotations

import json

import pytest

from fabfile.sandbox import hosts
from fabfile.sandbox.paths import FIRST_HOST_OCTET, LAST_HOST_OCTET, SandboxError


def test_a_freed_address_is_not_handed_out_again_at_once(tmp_path):
    record = tmp_path / "last"
    first = hosts.next_free_octet(set(), record)
    second = hosts.next_free_octet({first}, record)
    # The first host is gone (a test took it down); the next host still gets a new address.
    third = hosts.next_free_octet({second}, record)
    assert (first, second, third) == (FIRST_HOST_OCTET, FIRST_HOST_OCTET + 1, FIRST_HOST_OCTET + 2)
    assert record.read_text() == str(third)


def test_the_addresses_wrap_around_and_skip_those_in_use(tmp_path):
    record = tmp_path / "last"
    record.write_text(str(LAST_HOST_OCTET - 1))
    assert hosts.next_free_octet({LAST_HOST_OCTET, FIRST_HOST_OCTET}, record) == FIRST_HOST_OCTET + 1


def test_an_unreadable_record_starts_at_the_first_address(tmp_path):
    record = tmp_path / "last"
    record.write_text("garbage")
    assert hosts.next_free_octet(set(), record) == FIRST_HOST_OCTET


def test_no_free_address_is_one_line_saying_what_to_do(tmp_path):
    with pytest.raises(SandboxError, match="sandbox.down --all"):
        hosts.next_free_octet(set(range(FIRST_HOST_OCTET, LAST_HOST_OCTET + 1)), tmp_path / "last")


def test_down_of_an_earlier_boot_leaves_the_host_now_under_that_name_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("COACHNTT_SANDBOX_CACHE", str(tmp_path))
    monkeypatch.setattr(hosts, "require_root", lambda: None)
    touched = []
    monkeypatch.setattr(hosts, "kill_host_processes", touched.append)
    hosts.host_dir("vps20").mkdir(parents=True)
    hosts.state_file("vps20").write_text(json.dumps({"name": "vps20", "ip": "10.201.0.20", "instance": "newer"}))

    hosts.down("vps20", instance="older")

    assert touched == [] and hosts.state_file("vps20").exists()
