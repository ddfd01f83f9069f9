"""release as data: the phases in order, the rollback decision for a failure in each
phase, which monitor checks gate a preflight and a verify, the idle slot's kept
container, the summary table, the --json shape, and the setting's bounds."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest

from fabfile import release as release_task
from fabfile.core import checks
from fabfile.core import release_checklist as checklist
from fabfile.core.settings import Settings
from fabfile.core.steps import Reporter

OLD, NEW = "a" * 40, "b" * 40
BACKUP = "/backups/db_20261202_030000_pre-bbbbbbbbbbbb.dump"


def test_the_phases_run_in_the_checklists_order_and_the_first_three_change_nothing():
    assert checklist.PHASES == ("preflight", "backup", "staging", "deploy", "verify", "watch", "drain")
    assert checklist.CHANGES_NOTHING == ("preflight", "backup", "staging")


def test_phases_not_run_are_named_skipped_so_the_table_shows_every_phase():
    done = [checklist.PhaseResult("preflight", "ok", 1.0), checklist.PhaseResult("backup", "failed", 2.0, "disk full")]
    rest = checklist.not_run(done, "not run: backup failed")
    assert [p.name for p in rest] == ["staging", "deploy", "verify", "watch", "drain"]
    assert {p.status for p in rest} == {"skipped"} and {p.reason for p in rest} == {"not run: backup failed"}


# -- the rollback decision ----------------------------------------------------------


def decide(failed: str, **given) -> checklist.Recovery:
    facts = {"nginx_moved": False, "old_running": True, "new_running": False, "breaking_migrated": False,
             "fallback": OLD, "backup": BACKUP, **given}
    return checklist.recovery_for(failed, **facts)


@pytest.mark.parametrize("phase", ["preflight", "backup", "staging"])
def test_a_failure_before_the_deploy_phase_needs_no_rollback(phase):
    recovery = decide(phase)
    assert not recovery.needed and not recovery.restore_database
    assert "nothing had changed" in recovery.why


def test_a_gate_failing_before_the_switch_stops_the_new_slot_and_puts_the_checkout_back():
    recovery = decide("deploy", new_running=True)
    assert recovery.steps == (checklist.CHECKOUT_OLD, checklist.STOP_NEW)
    assert not recovery.restore_database


@pytest.mark.parametrize("phase", ["verify", "watch"])
def test_after_the_switch_nginx_goes_straight_back_to_the_old_slot_still_running(phase):
    recovery = decide(phase, nginx_moved=True, new_running=True)
    assert recovery.steps == (checklist.CHECKOUT_OLD, checklist.SWITCH_BACK, checklist.STOP_NEW)
    assert checklist.START_OLD not in recovery.steps and checklist.GATE_OLD not in recovery.steps, "warm: no start, no gate"
    assert "straight back" in recovery.why


def test_the_database_is_restored_only_when_breaking_migrations_ran():
    breaking = decide("watch", nginx_moved=True, old_running=False, new_running=True, breaking_migrated=True)
    assert breaking.restore_database
    assert breaking.steps == (checklist.RESTORE, checklist.CHECKOUT_OLD, checklist.START_OLD, checklist.GATE_OLD,
                              checklist.SWITCH_BACK, checklist.STOP_NEW)
    assert "declared breaking" in breaking.why
    expand_contract = decide("watch", nginx_moved=True, new_running=True)
    assert not expand_contract.restore_database and checklist.RESTORE not in expand_contract.steps


def test_a_breaking_release_failing_its_build_takes_the_503_page_off_and_starts_the_old_slot_again():
    # maintenance on and the old slot stopped, the migration never ran: no restore.
    recovery = decide("deploy", nginx_moved=True, old_running=False, breaking_migrated=False)
    assert recovery.steps == (checklist.CHECKOUT_OLD, checklist.START_OLD, checklist.GATE_OLD, checklist.SWITCH_BACK)


def test_breaking_migrations_without_a_backup_are_said_plainly():
    recovery = decide("watch", nginx_moved=True, old_running=False, breaking_migrated=True, backup="")
    assert not recovery.restore_database and "no backup was taken" in recovery.why


def test_nothing_to_go_back_to_on_a_first_release():
    recovery = decide("watch", nginx_moved=True, fallback="")
    assert not recovery.needed and "nothing to go back to" in recovery.why


# -- which checks gate -----------------------------------------------------------------


def check(name: str, status: str) -> checks.Check:
    return checks.Check(name, status, f"{name} detail", "remedy" if status != checks.PASS else "")


ALL_PASS = [check(n, checks.PASS) for n in ("api health", "database", "pgbouncer", "services", "disk /", "memory", "cpu",
                                              "certificate", "backup age")]


def with_status(name: str, status: str) -> list[checks.Check]:
    return [check(c.name, status) if c.name == name else c for c in ALL_PASS]


def test_preflight_judges_disk_memory_and_certificate_only():
    assert checklist.preflight_verdict(ALL_PASS) == ([], [])
    for name in ("disk /", "memory", "certificate"):
        failures, _ = checklist.preflight_verdict(with_status(name, checks.FAIL))
        assert [c.name for c in failures] == [name]
    for name in ("api health", "cpu", "backup age", "services"):
        assert checklist.preflight_verdict(with_status(name, checks.FAIL)) == ([], []), name


def test_a_missing_certificate_is_a_preflight_warning_as_in_monitor_check():
    failures, warnings = checklist.preflight_verdict(with_status("certificate", checks.WARN))
    assert failures == [] and [c.name for c in warnings] == ["certificate"]


def test_verify_needs_every_check_but_cpu_only_warns():
    assert checklist.verify_verdict(ALL_PASS) == ([], [])
    failures, _ = checklist.verify_verdict(with_status("api health", checks.FAIL))
    assert [c.name for c in failures] == ["api health"]
    failures, warnings = checklist.verify_verdict(with_status("cpu", checks.FAIL))
    assert failures == [] and [c.name for c in warnings] == ["cpu"]


def test_verify_of_a_first_release_only_warns_that_no_backup_exists_yet():
    failures, _ = checklist.verify_verdict(with_status("backup age", checks.FAIL))
    assert [c.name for c in failures] == ["backup age"], "after the first release a missing backup fails the verify"
    failures, warnings = checklist.verify_verdict(with_status("backup age", checks.FAIL), first_release=True)
    assert failures == [] and [c.name for c in warnings] == ["backup age"]
    failures, _ = checklist.verify_verdict(with_status("api health", checks.FAIL), first_release=True)
    assert [c.name for c in failures] == ["api health"]


# -- what a release tells ------------------------------------------------------------------


STAGING_SKIPPED = "staging is not set up on coachntt@10.201.0.5 (no /opt/coachntt-staging; `staging.setup` creates it)"


def summary(**given) -> checklist.Summary:
    phases = (checklist.PhaseResult("preflight", "ok", 1.25), checklist.PhaseResult("backup", "changed", 3.5, BACKUP),
              checklist.PhaseResult("staging", "skipped", 0.0, STAGING_SKIPPED),
              checklist.PhaseResult("deploy", "changed", 40.0), checklist.PhaseResult("verify", "ok", 1.0),
              checklist.PhaseResult("watch", "failed", 6.0, "12 of 40 requests were 5xx"),
              checklist.PhaseResult("rollback", "changed", 2.0), checklist.PhaseResult("drain", "skipped", 0.0, "not run"))
    values = {"host": "coachntt@10.201.0.5", "result": "rolled back", "sha_before": OLD, "sha_after": OLD, "backup": BACKUP,
              "url": "https://api.coachntt.ai", "phases": phases, "failed_phase": "watch", "why": "12 of 40 requests were 5xx"}
    return checklist.Summary(**{**values, **given})


def test_the_summary_table_has_phase_result_time_shas_backup_and_url():
    lines = checklist.table(summary())
    assert lines[0].split() == ["phase", "result", "time"]
    assert lines[1].split()[:3] == ["preflight", "ok", "1.2s"]
    assert "FAILED" in lines[6] and "12 of 40 requests were 5xx" in lines[6]
    assert "staging" in lines[3] and STAGING_SKIPPED in lines[3]
    assert f"  sha before  {OLD[:12]}" in lines and f"  sha after   {OLD[:12]} (unchanged)" in lines
    assert f"  backup      {BACKUP}" in lines and "  url         https://api.coachntt.ai" in lines
    assert lines[-1] == "  result      rolled back (failed during watch: 12 of 40 requests were 5xx)"


def test_a_good_release_says_its_new_sha():
    lines = checklist.table(summary(result="ok", sha_after=NEW, failed_phase="", why=""))
    assert f"  sha after   {NEW[:12]}" in lines and lines[-1] == "  result      ok"


def test_json_is_one_object_per_phase_then_the_release():
    stream = io.StringIO()
    ops = SimpleNamespace(reporter=Reporter("coachntt@10.201.0.5", json=True, stream=stream), json=True)
    run = release_task.Run(ops, app=None, cfg=None)
    for p in summary().phases:
        run.record(p.name, p.status, p.seconds, p.reason)
    record = json.loads(checklist.summary_record(summary()))
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["step"] for line in lines] == [p.name for p in summary().phases]
    assert all(set(line) == {"host", "step", "status", "seconds", "reason", "changes"} for line in lines)
    assert lines[5]["status"] == "failed" and lines[0]["seconds"] == 1.25
    assert record["release"]["phases"] == {p.name: p.status for p in summary().phases}
    assert (record["release"]["result"], record["release"]["failed_phase"], record["release"]["backup"]) == \
        ("rolled back", "watch", BACKUP)


def test_the_log_keeps_each_phases_result():
    kept = checklist.log_phases(list(summary().phases))["phases"]
    assert [p["phase"] for p in kept] == [p.name for p in summary().phases]
    assert kept[5] == {"phase": "watch", "result": "failed", "seconds": 6.0}


def test_watch_seconds_has_a_default_and_bounds(defaults):
    assert Settings("production", defaults).require("release.watch_seconds") == 120


# -- a no-op release verifies what its preflight read ---------------------------------


class NoHost:
    """A target that must not be used: every check below comes from facts already read."""

    round_trips = 0

    def run(self, *args, **kwargs):
        raise AssertionError("the verify sent a command: it must judge the preflight's checks")


def quiet_run() -> tuple[release_task.Run, io.StringIO]:
    stream = io.StringIO()
    ops = SimpleNamespace(reporter=Reporter("coachntt@10.201.0.5", json=True, stream=stream), json=True, target=NoHost())
    run = release_task.Run(ops, app=None, cfg=None)
    run.held = SimpleNamespace(phase="")
    return run, stream


def test_verify_judges_checks_it_is_given_without_a_round_trip():
    run, stream = quiet_run()
    run.verify(found=[check("api health", checks.PASS), check("disk /", checks.PASS), check("cpu", checks.FAIL)])
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert (line["step"], line["status"]) == ("verify", "ok")
    assert line["reason"] == "2 of 3 checks pass; warning: cpu: cpu detail", line


def test_verify_of_given_checks_still_fails_on_a_failing_check():
    run, _ = quiet_run()
    with pytest.raises(release_task.OpsError, match="1 of 2 checks fail: api health"):
        run.verify(found=[check("api health", checks.FAIL), check("disk /", checks.PASS)])
    assert [r.name for r in run.results] == ["verify"] and run.results[0].status == "failed"


def test_a_no_op_release_verifies_the_preflights_checks(monkeypatch):
    run, _ = quiet_run()
    preflight = [check("api health", checks.PASS)]
    given = []
    monkeypatch.setattr(release_task.Run, "verify", lambda self, first_release=False, found=None: given.append(found))
    monkeypatch.setattr(release_task.Run, "finish", lambda self, result, phase="", why="": None)
    run.entry = SimpleNamespace(sha=NEW, slot="", message="")
    run.verify_only(SimpleNamespace(layout=SimpleNamespace(serving=lambda: SimpleNamespace(name="a"))), preflight)
    assert given == [preflight], "the no-op's verify reuses the preflight's checks instead of reading them again"
    assert [r.name for r in run.results] == ["backup", "staging", "deploy", "watch", "drain"]


def preflight_then(monkeypatch, sha: str, live: str = OLD) -> tuple[list[str], list[str], release_task.Run]:
    """Run the preflight of `release --sha sha` on a host where `live` is checked out, serves and was
    released last; returns (what was fetched, what followed: verify or ship, the run)."""
    run, _ = quiet_run()
    run.ops.where = "coachntt@10.201.0.5"
    host = SimpleNamespace(log=[], head=live, layout=SimpleNamespace(serving_sha=lambda: live), database_elsewhere="")
    monkeypatch.setattr(release_task, "preflight_facts", lambda target, app, cfg: (host, []))
    monkeypatch.setattr(release_task, "preflight_error", lambda host, app, where: None)
    monkeypatch.setattr(release_task.state, "current_release", lambda log: SimpleNamespace(sha=live))
    monkeypatch.setattr(release_task.deploy_task, "breaking_migrations", lambda *args, **kwargs: False)
    fetched, then = [], []
    monkeypatch.setattr(release_task, "fetch_sha",
                        lambda held, app, wanted: fetched.append(wanted) or (live if live.startswith(wanted) else NEW))
    monkeypatch.setattr(release_task.Run, "verify_only", lambda self, host, found: then.append("verify"))
    monkeypatch.setattr(release_task.Run, "ship", lambda self, host, first_release: then.append("ship"))
    run.go(SimpleNamespace(phase=""), sha, "", False)
    return fetched, then, run


def test_the_live_sha_in_full_is_a_no_op_without_a_fetch(monkeypatch):
    fetched, then, run = preflight_then(monkeypatch, OLD)
    assert fetched == [], "checked out, serving and logged: there is nothing to fetch"
    assert then == ["verify"] and (run.entry.kind, run.entry.sha) == ("verify", OLD)


def test_a_short_sha_or_a_new_one_is_fetched_first(monkeypatch):
    fetched, then, run = preflight_then(monkeypatch, OLD[:12])
    assert fetched == [OLD[:12]] and then == ["verify"] and run.entry.sha == OLD, "a short id is resolved by the fetch"
    fetched, then, run = preflight_then(monkeypatch, NEW)
    assert fetched == [NEW] and then == ["ship"] and (run.entry.kind, run.entry.sha) == ("release", NEW)
