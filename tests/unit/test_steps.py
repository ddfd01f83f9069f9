"""The runner and reporter: facts in one round trip, then plan, apply, verify."""

from __future__ import annotations

import io
import json
import re

import invoke
import pytest

from fabfile.core import redact
from fabfile.core.errors import OpsError, RemoteCommandError
from fabfile.core.steps import Change, Plan, Reporter, Step, apply_steps, plan_steps, run_steps
from fabfile.core.target import LocalTarget

# Three steps over a host given as data: one already right, one to change, one skipped.
FACTS = {
    "cat /etc/motd": ("hello", 0),
    "systemctl is-active nginx": ("inactive", 3),
    "test -d /opt/coachntt/.git": ("", 1),
}


def motd_plan(facts):
    return Plan.ok("motd says hello") if facts["motd"].stdout == "hello" else Plan.change(Change("write motd", "echo hello > /etc/motd"))


def nginx_plan(facts):
    if facts["active"].stdout == "active":
        return Plan.ok()
    return Plan.change(
        Change("start nginx", "systemctl start nginx"), Change("enable nginx", "systemctl enable nginx"), reason="was inactive"
    )


def checkout_plan(facts):
    return Plan.skipped("no checkout yet") if not facts["git"].ok else Plan.ok()


STEPS = [
    Step("motd", probes={"motd": "cat /etc/motd"}, plan=motd_plan),
    Step("nginx running", probes={"active": "systemctl is-active nginx"}, plan=nginx_plan),
    Step("app checkout", probes={"git": "test -d /opt/coachntt/.git"}, plan=checkout_plan),
]


@pytest.fixture
def out():
    return io.StringIO()


def reporter(out, **kw):
    return Reporter("deploy@vps", stream=out, **kw)


def lines(out):
    return out.getvalue().splitlines()


def test_facts_of_all_steps_are_gathered_in_exactly_one_round_trip(fake_host, out, markers_of):
    host = fake_host(FACTS)
    run_steps(host, STEPS, reporter(out), dry=True)
    assert host.round_trips == 1
    assert len(markers_of(host.sent[0])) == 1
    for command in FACTS:
        assert command in host.sent[0]


def test_each_step_sees_only_its_own_probes_even_when_names_collide(fake_host, out):
    seen = []

    def record(facts):
        seen.append({name: result.stdout for name, result in facts.items()})
        return Plan.ok()

    host = fake_host({"echo a": ("a", 0), "echo b": ("b", 0)})
    run_steps(host, [Step("a", {"x": "echo a"}, record), Step("b", {"x": "echo b"}, record)], reporter(out))
    assert seen == [{"x": "a"}, {"x": "b"}]


def test_steps_without_probes_cost_no_fact_round_trip(fake_host, out):
    host = fake_host()
    run_steps(host, [Step("nothing to read", plan=lambda facts: Plan.ok("fine"))], reporter(out))
    assert host.round_trips == 0


def test_ok_changed_and_skipped_steps_are_reported_per_line(fake_host, out):
    host = fake_host(FACTS)
    plans = run_steps(host, STEPS, reporter(out))
    assert re.match(r"^  ok\s+motd\s+0\.00s  motd says hello$", lines(out)[0])
    assert re.match(r"^  changed\s+nginx running\s+\d+\.\d\ds  was inactive$", lines(out)[1])
    assert lines(out)[2:4] == ["      - start nginx", "      - enable nginx"]
    assert re.match(r"^  skipped\s+app checkout\s+0\.00s  no checkout yet$", lines(out)[4])
    assert set(plans) == {"motd", "nginx running", "app checkout"}


def test_changed_step_is_applied_as_one_script_that_stops_at_the_first_failure(fake_host, out):
    host = fake_host(FACTS)
    run_steps(host, STEPS, reporter(out))
    assert host.changes_sent == ["set -e\nsystemctl start nginx\nsystemctl enable nginx\n"]
    assert host.round_trips == 2, "one for facts, one for the single changed step"


def test_plan_script_really_stops_at_the_first_failing_change(tmp_path):
    marker = tmp_path / "should-not-exist"
    plan = Plan.change(Change("fail", "false"), Change("touch", f"touch '{marker}'"))
    result = LocalTarget(invoke.Context()).run(plan.script, check=False)
    assert result.exit_status != 0
    assert not marker.exists()


def test_failed_change_is_reported_FAILED_raises_and_later_steps_do_not_run(fake_host, out):
    host = fake_host(FACTS, failures={"systemctl start nginx": (1, "Job for nginx.service failed.")})
    later = Step("later", plan=lambda facts: Plan.change(Change("later change", "touch /later")))
    with pytest.raises(RemoteCommandError) as info:
        run_steps(host, STEPS[:2] + [later], reporter(out))
    assert info.value.what == "step 'nginx running' failed on deploy@vps (exit 1)"
    assert info.value.hint == "Job for nginx.service failed."
    failed_line = next(line for line in lines(out) if "nginx running" in line)
    assert failed_line.split()[0] == "FAILED"
    assert "Job for nginx.service failed." in failed_line
    assert not any("touch /later" in c for c in host.sent)


def test_check_runs_after_apply_and_its_failure_fails_the_step(fake_host, out):
    calls = []

    def check(target):
        calls.append(list(target.sent))
        raise OpsError("nginx -t failed", "see the error above")

    host = fake_host(FACTS)
    step = Step("nginx running", probes={"active": "systemctl is-active nginx"}, plan=nginx_plan, check=check)
    with pytest.raises(OpsError):
        run_steps(host, [step], reporter(out))
    assert len(calls) == 1 and calls[0][-1].startswith("set -e"), "check sees the applied change"
    assert lines(out)[0].split()[0] == "FAILED"
    assert "nginx -t failed; see the error above" in lines(out)[0]


def test_passing_check_leaves_the_step_changed(fake_host, out):
    host = fake_host(FACTS)
    step = Step("nginx running", probes={"active": "systemctl is-active nginx"}, plan=nginx_plan, check=lambda t: t.run("nginx -t"))
    run_steps(host, [step], reporter(out))
    assert host.sent[-1] == "nginx -t"
    assert lines(out)[0].split()[0] == "changed"


def test_dry_run_applies_nothing_and_prints_would_change_with_summaries(fake_host, out):
    host = fake_host(FACTS)
    checks = []
    steps = [Step(s.name, s.probes, s.plan, check=checks.append) for s in STEPS]
    run_steps(host, steps, reporter(out), dry=True)
    assert host.round_trips == 1 and host.changes_sent == []
    assert checks == [], "no verification of changes that were not made"
    assert lines(out)[1].startswith("  would change  nginx running")
    assert lines(out)[2:4] == ["      - start nginx", "      - enable nginx"]


def test_json_output_is_one_json_object_per_line(fake_host, out):
    host = fake_host(FACTS)
    rep = reporter(out, json=True)
    run_steps(host, STEPS, rep)
    rep.info("human text is not printed in json mode")
    rep.summary(host.round_trips)
    records = [json.loads(line) for line in lines(out)]
    assert [(r["step"], r["status"]) for r in records[:3]] == [("motd", "ok"), ("nginx running", "changed"), ("app checkout", "skipped")]
    assert records[1]["changes"] == ["start nginx", "enable nginx"]
    assert records[3]["summary"] == {"ok": 1, "changed": 1, "skipped": 1, "failed": 0, "would change": 0, "interrupted": 0}
    assert records[3]["round_trips"] == 2
    assert len(records) == 4


def test_summary_line_counts_statuses_and_round_trips(fake_host, out):
    host = fake_host(FACTS)
    rep = reporter(out)
    run_steps(host, STEPS, rep)
    rep.summary(host.round_trips)
    assert re.match(r"^deploy@vps: 1 ok, 1 changed, 1 skipped, 0 failed in \d+\.\ds \(2 round trips\)$", lines(out)[-1])


def test_summary_after_dry_run_counts_would_change_and_omits_zero_skipped(fake_host, out):
    host = fake_host(FACTS)
    rep = reporter(out)
    run_steps(host, STEPS[:2], rep, dry=True)
    rep.summary(host.round_trips)
    assert lines(out)[-1].startswith("deploy@vps: 1 ok, 0 changed, 0 failed, 1 would change in ")


def test_diff_is_printed_only_when_asked():
    step_changes = (Change("update /etc/x", "true", diff="-old\n+new"),)
    plain, with_diff = io.StringIO(), io.StringIO()
    Reporter("h", stream=plain).step("x", "changed", 0.1, changes=step_changes)
    Reporter("h", stream=with_diff, show_diff=True).step("x", "changed", 0.1, changes=step_changes)
    assert "+new" not in plain.getvalue()
    assert with_diff.getvalue().splitlines()[-2:] == ["        -old", "        +new"]


@pytest.mark.parametrize("as_json", [False, True])
def test_secrets_are_redacted_in_everything_the_reporter_prints(fake_host, out, as_json):
    redact.register("db-pass-8d7f6e")
    host = fake_host({"cat /srv/.env": ("", 1)})
    step = Step(
        "env file",
        probes={"env": "cat /srv/.env"},
        plan=lambda facts: Plan.change(
            Change("write DATABASE_URL=postgres://u:db-pass-8d7f6e@db", "true"), reason="password db-pass-8d7f6e"
        ),
    )
    rep = reporter(out, json=as_json)
    run_steps(host, [step], rep)
    rep.info("info db-pass-8d7f6e")
    assert "db-pass-8d7f6e" not in out.getvalue()
    assert redact.MASK in out.getvalue()


def test_plan_steps_reads_facts_once_and_applies_nothing_until_apply_steps(fake_host, out):
    host = fake_host(FACTS)
    planned = plan_steps(host, STEPS)
    assert host.round_trips == 1 and host.changes_sent == []
    changed = [(step.name, bool(plan.changes)) for step, plan in planned]
    assert changed == [("motd", False), ("nginx running", True), ("app checkout", False)]
    apply_steps(host, planned, reporter(out))
    assert host.changes_sent == ["set -e\nsystemctl start nginx\nsystemctl enable nginx\n"]


def test_phase_reports_a_block_of_work_as_changed(out):
    rep = reporter(out)
    with rep.phase("switch release", reason="now on abc1234"):
        pass
    assert re.match(r"^  changed\s+switch release\s+\d+\.\d\ds  now on abc1234$", lines(out)[0])


def test_phase_reports_FAILED_with_the_one_line_error_and_reraises(out):
    rep = reporter(out)
    with pytest.raises(OpsError):
        with rep.phase("health gate"):
            raise OpsError("health gate failed after 30s", "last answer: 502")
    assert lines(out)[0].split()[0] == "FAILED"
    assert lines(out)[0].endswith("health gate failed after 30s; last answer: 502")
    assert rep.counts["failed"] == 1
