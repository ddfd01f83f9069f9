"""The release log as data, and the deploy lock run for real with sh in a tmp dir."""

from __future__ import annotations

import json

import invoke
import pytest

from fabfile.core import state
from fabfile.core.state import Release, current_release, good_releases, parse_log, previous_good
from fabfile.core.target import LocalTarget

A, B, C, D = ("a" * 40, "b" * 40, "c" * 40, "d" * 40)


def deploy(sha, result="ok", **kw):
    return Release(sha=sha, kind="deploy", result=result, **kw)


def rollback(sha, previous, result="ok"):
    return Release(sha=sha, kind="rollback", result=result, previous=previous)


# --- the log as data ---------------------------------------------------------


def test_release_json_leaves_out_empty_fields_and_parses_back():
    release = deploy(A, backup="/backups/db_20250101.sql.gz", extra={"migrations": 3})
    assert json.loads(release.to_json()) == {"sha": A, "kind": "deploy", "result": "ok", "backup": "/backups/db_20250101.sql.gz", "extra": {"migrations": 3}}
    assert parse_log(release.to_json()) == [release]


def test_parse_log_skips_a_torn_line_and_ignores_unknown_fields():
    text = deploy(A).to_json() + "\n" + '{"sha": "' + B + '", "kind": "deploy", "future_field": 1}\n{"sha": "cc'
    assert parse_log(text) == [deploy(A), Release(sha=B, kind="deploy")]


def test_good_releases_are_newest_first_without_repeats():
    log = [deploy(A), deploy(B), rollback(A, previous=B), deploy(C)]
    assert good_releases(log) == [C, A, B]


def test_a_sha_that_ever_failed_its_gate_is_never_offered():
    log = [deploy(A), deploy(B), deploy(B, result="failed"), deploy(C)]
    assert good_releases(log) == [C, A]


def test_previous_good_is_the_release_deployed_before():
    log = [deploy(A), deploy(B), deploy(C)]
    assert previous_good(log, C) == B
    assert previous_good(log, B) == A
    assert previous_good(log, A) == ""


def test_after_rolling_back_b_to_a_previous_is_before_a_never_b_again():
    log = [deploy(D), deploy(A), deploy(B), rollback(A, previous=B)]
    assert previous_good(log, A) == D


def test_previous_good_skips_failed_releases():
    log = [deploy(A), deploy(B, result="failed"), deploy(C)]
    assert previous_good(log, C) == A


def test_current_release_is_the_last_that_ended_ok():
    assert current_release([deploy(A), deploy(B)]).sha == B
    assert current_release([]) is None
    assert current_release([deploy(A, result="failed")]) is None


def test_after_a_failed_deploy_that_rolled_back_the_rollback_target_is_current():
    log = [deploy(A), Release(sha=B, kind="deploy", result="failed", rolled_back_to=A)]
    current = current_release(log)
    assert (current.sha, current.kind) == (A, "rollback")


def test_operator_names_the_github_actor_when_in_actions(monkeypatch):
    monkeypatch.delenv("GITHUB_ACTOR", raising=False)
    assert "@" in state.operator() and " via " not in state.operator()
    monkeypatch.setenv("GITHUB_ACTOR", "octocat")
    assert state.operator().startswith("octocat via ")


def test_append_sends_one_json_line_that_survives_quotes(fake_host):
    host = fake_host()
    state.append(host, "/var/lib/coachntt-ops", deploy(A, message="it's \"quoted\""))
    assert host.sent[0].endswith(">> /var/lib/coachntt-ops/releases.jsonl")
    assert host.round_trips == 1


# --- for real with sh ---------------------------------------------------------


@pytest.fixture
def sh():
    local = LocalTarget(invoke.Context())
    local.is_root = True  # nothing here needs privileges
    return local


def test_appended_entries_read_back_in_order(sh, tmp_path):
    entries = [deploy(A, message="it's \"quoted\" $HOME `x`"), rollback(B, previous=A)]
    for entry in entries:
        state.append(sh, str(tmp_path), entry)
    log = sh.run(state.read_log_command(str(tmp_path))).stdout
    assert parse_log(log) == entries


def test_reading_a_missing_log_is_an_empty_log(sh, tmp_path):
    assert sh.run(state.read_log_command(str(tmp_path / "fresh"))).stdout == ""


