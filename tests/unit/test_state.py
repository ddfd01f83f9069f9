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
    assert json.loads(release.to_json()) == {
        "sha": A, "kind": "deploy", "result": "ok", "backup": "/backups/db_20250101.sql.gz", "extra": {"migrations": 3},
    }
    assert parse_log(release.to_json()) == [release]


def test_parse_log_skips_a_torn_line_and_ignores_unknown_fields():
    text = deploy(A).to_json() + "\n" + '{"sha": "' + B + '", "kind": "deploy", "future_field": 1}\n{"sha": "cc'
    assert parse_log(text) == [deploy(A), Release(sha=B, kind="deploy")]


GOOD_LINE = json.dumps({"sha": A, "kind": "deploy", "result": "ok"})

UNREADABLE_LINES = {
    "json null": "null",
    "json list": "[1]",
    "json number": "7",
    "json string": '"x"',
    "json true": "true",
    "torn line": '{"sha": "' + B + '", "kind": "dep',
    "not json": "deploy " + B,
    "deeply nested": "[" * 100_000 + "]" * 100_000,
    "no sha": json.dumps({"kind": "deploy", "result": "ok"}),
    "no kind": json.dumps({"sha": B, "result": "ok"}),
    "sha not a string": json.dumps({"sha": 12345678, "kind": "deploy"}),
    "sha null": json.dumps({"sha": None, "kind": "deploy"}),
    "sha not hex": json.dumps({"sha": "main", "kind": "deploy"}),
    "sha too short": json.dumps({"sha": "abc12", "kind": "deploy"}),
    "sha upper case": json.dumps({"sha": B.upper(), "kind": "deploy"}),
    "sha with shell": json.dumps({"sha": B + ";touch /tmp/x", "kind": "deploy"}),
    "sha with substitution": json.dumps({"sha": "$(touch /tmp/x)", "kind": "rollback", "result": "ok"}),
    "unknown kind": json.dumps({"sha": B, "kind": "nuke"}),
    "unknown result": json.dumps({"sha": B, "kind": "deploy", "result": "great"}),
    "result not a string": json.dumps({"sha": B, "kind": "deploy", "result": 1}),
    "previous not hex": json.dumps({"sha": B, "kind": "deploy", "previous": "HEAD~1"}),
    "rolled_back_to with shell": json.dumps({"sha": B, "kind": "deploy", "rolled_back_to": "`id`"}),
    "extra not a dict": json.dumps({"sha": B, "kind": "deploy", "extra": [1, 2]}),
    "message a list": json.dumps({"sha": B, "kind": "deploy", "message": ["a"]}),
    "who an object": json.dumps({"sha": B, "kind": "deploy", "who": {"name": "x"}}),
    "control characters": json.dumps({"sha": B, "kind": "deploy", "message": "ok\x1b[2J\rcleared"}),
    "newline in a field": json.dumps({"sha": B, "kind": "deploy", "who": "me\nrelease c ok"}),
    "backup with shell": json.dumps({"sha": B, "kind": "deploy", "backup": "/backups/x.sql.gz; rm -rf /"}),
    "backup relative": json.dumps({"sha": B, "kind": "deploy", "backup": "-rf"}),
    "1 MB line": json.dumps({"sha": B, "kind": "deploy", "message": "x" * 1_000_000}),
}


@pytest.mark.parametrize("line", UNREADABLE_LINES.values(), ids=UNREADABLE_LINES.keys())
def test_an_unreadable_line_is_skipped_and_counted_never_raised(line):
    log = parse_log("\n".join([GOOD_LINE, line, GOOD_LINE]))
    assert log == [deploy(A), deploy(A)]
    assert log.skipped == 1


def test_a_value_from_the_log_is_kept_when_it_is_only_text():
    """Shell metacharacters in free text (the operator's message) are data, not commands."""
    line = json.dumps({"sha": B, "kind": "deploy", "result": "ok", "message": "fix $HOME; `quotes` & 'more'",
                       "backup": "/backups/db_20260101_000000_pre-bbbbbbbbbbbb.sql.gz", "extra": {"any": ["thing"]}})
    (release,) = parse_log(line)
    assert release.message == "fix $HOME; `quotes` & 'more'" and release.extra == {"any": ["thing"]}


def test_blank_lines_are_not_counted_as_skipped():
    log = parse_log("\n\n" + GOOD_LINE + "\n\n")
    assert (log, log.skipped) == ([deploy(A)], 0)


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


# --- for real with sh ---------------------------------------------------------


@pytest.fixture
def sh():
    local = LocalTarget(invoke.Context())
    local.is_root = True  # nothing here needs privileges
    return local


def test_entries_written_as_the_lock_is_freed_read_back_in_order(sh, tmp_path):
    from fabfile.core import lock

    entries = [deploy(A, message="it's \"quoted\" $HOME `x` @FINISHED@"), rollback(B, previous=A)]
    with lock.deploy_lock(sh, str(tmp_path), A, "") as held:
        for entry in entries:
            held.log(entry)
    log = sh.run(state.read_log_command(str(tmp_path))).stdout
    assert parse_log(log) == entries
    assert not (tmp_path / "deploy.lock").exists()


def test_reading_a_missing_log_is_an_empty_log(sh, tmp_path):
    assert sh.run(state.read_log_command(str(tmp_path / "fresh"))).stdout == ""


