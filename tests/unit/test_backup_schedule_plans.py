"""backup.schedule as data: the units it renders, the plans it makes from a host's
facts, what it refuses, and what backup.scheduled runs in which order."""

from __future__ import annotations

import pytest
from invoke.exceptions import Exit

from fabfile import backup, backup_copies, backup_schedule, tool
from fabfile.core import bundle, remote
from fabfile.core import task as task_module
from fabfile.core.batch import ProbeResult
from fabfile.core.errors import ConfigError, UsageError
from fabfile.core.settings import Settings, validate

DB_SERVICE = "/etc/systemd/system/coachntt-backup-db.service"
DB_TIMER = "/etc/systemd/system/coachntt-backup-db.timer"
DATA_SERVICE = "/etc/systemd/system/coachntt-backup-data.service"
DATA_TIMER = "/etc/systemd/system/coachntt-backup-data.timer"


def unit_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_each_service_is_a_oneshot_of_the_installed_tool_under_one_shared_lock(settings):
    units = backup_schedule.units(settings)
    assert list(units) == [DB_SERVICE, DB_TIMER, DATA_SERVICE, DATA_TIMER]
    db, data = unit_lines(units[DB_SERVICE]), unit_lines(units[DATA_SERVICE])
    for lines in (db, data):
        assert {"Type=oneshot", "User=coachntt", "WorkingDirectory=/opt/coachntt-ops", "StandardOutput=journal",
                "StandardError=journal", "TimeoutStartSec=6h"} <= set(lines)
        assert ("Environment=COACHNTT_ENV=production COACHNTT_ENV_FILE=/etc/coachntt-ops/settings.env "
                "PYTHONUNBUFFERED=1") in lines
    lock = "/usr/bin/flock --verbose --wait 10800 /var/lib/coachntt-ops/backup.lock /opt/coachntt-ops/.venv/bin/inv"
    assert f"ExecStart={lock} backup.scheduled" in db
    assert f"ExecStart={lock} backup.scheduled --data" in data


def test_each_timer_runs_its_service_on_the_plans_schedule_and_makes_up_missed_runs(settings):
    units = backup_schedule.units(settings)
    db, data = unit_lines(units[DB_TIMER]), unit_lines(units[DATA_TIMER])
    assert "OnCalendar=*-*-* 02:00:00" in db and "Unit=coachntt-backup-db.service" in db
    assert "OnCalendar=Sun *-*-* 03:00:00" in data and "Unit=coachntt-backup-data.service" in data
    for lines in (db, data):
        assert {"Persistent=true", "RandomizedDelaySec=5min", "WantedBy=timers.target"} <= set(lines)


def test_units_follow_the_settings(defaults):
    defaults.update(deploy_user="ops", state_dir="/srv/state/")
    defaults["backup"].update(db_schedule="Mon..Fri *-*-* 01:30", data_schedule="monthly")
    units = backup_schedule.units(Settings("staging", defaults))
    assert "User=ops" in units[DB_SERVICE] and "/srv/state/backup.lock " in units[DB_SERVICE]
    assert "COACHNTT_ENV=staging " in units[DATA_SERVICE]
    assert "OnCalendar=Mon..Fri *-*-* 01:30\n" in units[DB_TIMER] and "OnCalendar=monthly\n" in units[DATA_TIMER]


@pytest.mark.parametrize("spec", ["daily", "*-*-* 02:00:00", "Sun *-*-* 03:00:00", "Mon..Fri 01:30", "*-*-01 04:00 UTC",
                                  "Sat,Sun 05:00 Europe/Amsterdam", "*:0/15", "hourly"])
def test_calendar_specs_pass(defaults, spec):
    defaults["backup"]["db_schedule"] = spec
    validate(Settings("production", defaults))


@pytest.mark.parametrize("spec", ["", " daily", "02:00\nExecStart=/bin/sh", "daily; reboot", "$(reboot)", "'daily'",
                                  "daily\n", "OnCalendar=daily", "x" * 101])
def test_anything_that_could_reach_beyond_the_oncalendar_line_is_refused(defaults, spec):
    defaults["backup"]["data_schedule"] = spec
    with pytest.raises(ConfigError) as info:
        validate(Settings("production", defaults))
    assert "backup.data_schedule must be a systemd calendar time" in info.value.one_line()


# --- plans from facts ---------------------------------------------------------------------------


def facts(settings, *, present: dict | None = None, enabled=("enabled", "enabled"), active=("active", "active"),
          tool_digest="ab" * 32, calendar_ok=(True, True)) -> dict:
    """Facts as the probes answer them; `present` maps unit path -> content on the host."""
    found = {"tool": ProbeResult(tool_digest, 0 if tool_digest else 1), "python": ProbeResult("3.13 x86_64", 0),
             "user": ProbeResult("1000", 0), "state_dir": ProbeResult("", 0)}
    for index, path in enumerate(backup_schedule.units(settings)):
        content = (present or {}).get(path)
        found[f"u{index}_content"] = ProbeResult((content or "").rstrip("\n"), 0 if content is not None else 1)
        found[f"u{index}_meta"] = ProbeResult("644 root:root", 0)
    for timer, on, running, ok in zip(backup_schedule.TIMERS, enabled, active, calendar_ok, strict=True):
        said = "Normalized form: ..." if ok else "Failed to parse calendar specification"
        found[f"{timer.setting}_ok"] = ProbeResult(said, 0 if ok else 1)
        found[f"{timer.name}_enabled"] = ProbeResult(on, 0 if on == "enabled" else 1)
        found[f"{timer.name}_active"] = ProbeResult(running, 0 if running == "active" else 3)
    return found


def summaries(plan) -> list[str]:
    return [change.summary.split(" (")[0] for change in plan.changes]


def test_a_host_without_timers_gets_the_units_a_reload_and_both_timers_started(settings):
    wanted = backup_schedule.units(settings)
    plan = backup_schedule.plan_schedule(wanted, facts(settings, enabled=("not-found",) * 2, active=("inactive",) * 2))
    assert summaries(plan) == [f"create {DB_SERVICE}", f"create {DB_TIMER}", f"create {DATA_SERVICE}", f"create {DATA_TIMER}",
                               "systemctl daemon-reload", "enable coachntt-backup-db.timer", "start coachntt-backup-db.timer",
                               "enable coachntt-backup-data.timer", "start coachntt-backup-data.timer"]
    assert "systemctl restart coachntt-backup-db.timer" in plan.script


def test_the_same_units_enabled_and_running_are_ok(settings):
    wanted = backup_schedule.units(settings)
    plan = backup_schedule.plan_schedule(wanted, facts(settings, present=wanted))
    assert not plan.changes
    assert plan.reason == ("timers enabled: coachntt-backup-db (*-*-* 02:00:00), coachntt-backup-data (Sun *-*-* 03:00:00)")


def test_a_new_schedule_rewrites_one_timer_and_restarts_only_it(settings, defaults):
    before = backup_schedule.units(settings)
    defaults["backup"]["db_schedule"] = "*-*-* 04:00:00"
    wanted = backup_schedule.units(Settings("production", defaults))
    plan = backup_schedule.plan_schedule(wanted, facts(settings, present=before))
    assert summaries(plan) == [f"update {DB_TIMER}", "systemctl daemon-reload", "start coachntt-backup-db.timer"]


def test_a_timer_someone_disabled_is_enabled_again(settings):
    wanted = backup_schedule.units(settings)
    plan = backup_schedule.plan_schedule(wanted, facts(settings, present=wanted, enabled=("enabled", "disabled"),
                                                       active=("active", "inactive")))
    assert summaries(plan) == ["enable coachntt-backup-data.timer", "start coachntt-backup-data.timer"]


def test_remove_stops_the_timers_and_removes_every_unit_file(settings):
    wanted = backup_schedule.units(settings)
    plan = backup_schedule.plan_remove(wanted, facts(settings, present=wanted))
    assert summaries(plan) == ["stop and disable coachntt-backup-db.timer", "stop and disable coachntt-backup-data.timer",
                               "remove coachntt-backup-db.service, coachntt-backup-db.timer, coachntt-backup-data.service, "
                               "coachntt-backup-data.timer"]
    assert "systemctl daemon-reload" in plan.script and "systemctl stop coachntt-backup-db.service" not in plan.script, \
        "a backup running now finishes"
    gone = backup_schedule.plan_remove(wanted, facts(settings, enabled=("not-found",) * 2, active=("inactive",) * 2))
    assert not gone.changes and gone.reason == "no backup timers"


@pytest.mark.parametrize("change, words, code", [
    ({"tool_digest": ""}, "the tool is not installed on coachntt@vps (/opt/coachntt-ops); run `tool.install` first", 2),
    ({"calendar_ok": (True, False)}, "backup.data_schedule must be a systemd calendar time", 2),
])
def test_schedule_is_refused_with_one_line_before_anything_changes(settings, change, words, code):
    problem = backup_schedule.refusal(settings, facts(settings, **change), "coachntt@vps")
    assert words in problem.one_line() and problem.exit_code == code


def test_a_missing_state_dir_or_deploy_user_is_said(settings):
    found = facts(settings)
    found["state_dir"] = ProbeResult("", 1)
    assert "run `deploy.setup` first" in backup_schedule.refusal(settings, found, "h").one_line()
    found["user"] = ProbeResult("", 1)
    assert isinstance(backup_schedule.refusal(settings, found, "h"), UsageError)


# --- the tasks against a host given as data ----------------------------------------------------


def host_answering(fake_host, settings, found: dict):
    probes = backup_schedule.probes(settings)
    return fake_host(facts={probes[name]: (result.stdout, result.status) for name, result in found.items()})


@pytest.fixture
def on_host(project_context, mocker):
    def run(task, host, **kwargs):
        mocker.patch.object(task_module, "target_for", return_value=host)
        return task(project_context, **kwargs)

    return run


def test_schedule_twice_reads_once_and_changes_nothing(fake_host, settings, on_host, mocker, capsys):
    mocker.patch.object(bundle, "release_for", return_value=bundle.Release("0.1.0", "ab" * 32, None, (), (), ()))
    host = host_answering(fake_host, settings, facts(settings, present=backup_schedule.units(settings)))
    on_host(backup_schedule.schedule, host)
    assert host.changes_sent == [] and host.round_trips == 1
    out = capsys.readouterr().out
    assert "1 ok, 0 changed" in out and "warning" not in out


def test_schedule_without_the_tool_exits_2_after_reading_once(fake_host, settings, on_host):
    host = host_answering(fake_host, settings, facts(settings, tool_digest=""))
    with pytest.raises(Exit) as info:
        on_host(backup_schedule.schedule, host)
    assert info.value.code == 2 and "run `tool.install` first" in info.value.message
    assert "\n" not in info.value.message and host.changes_sent == []


def test_schedule_warns_when_the_installed_tool_is_another_version(fake_host, settings, on_host, mocker, capsys):
    mocker.patch.object(bundle, "release_for", return_value=bundle.Release("0.1.0", "cd" * 32, None, (), (), ()))
    host = host_answering(fake_host, settings, facts(settings, present=backup_schedule.units(settings)))
    on_host(backup_schedule.schedule, host)
    assert "warning: the tool on" in capsys.readouterr().out


def test_remove_needs_no_tool(fake_host, settings, on_host):
    wanted = backup_schedule.units(settings)
    host = host_answering(fake_host, settings, facts(settings, present=wanted, tool_digest=""))
    on_host(backup_schedule.schedule, host, remove=True)
    (script,) = host.changes_sent
    assert "systemctl disable --now --quiet coachntt-backup-db.timer" in script and remote.q(DB_SERVICE) in script


def test_a_scheduled_run_backs_up_then_prunes(on_host, mocker, fake_host):
    calls = mocker.patch.object(backup_schedule, "run_body")
    on_host(backup_schedule.scheduled, fake_host())
    assert [(c.args[0], c.kwargs) for c in calls.call_args_list] == [(backup.now, {"label": "daily"}), (backup.prune, {})]


def test_a_failed_backup_is_not_pruned_after_and_fails_the_run(on_host, mocker, fake_host):
    from fabfile.core.errors import OpsError

    calls = mocker.patch.object(backup_schedule, "run_body", side_effect=OpsError("pg_dump of coachntt_prod failed"))
    with pytest.raises(Exit) as info:
        on_host(backup_schedule.scheduled, fake_host())
    assert info.value.code == 1 and calls.call_count == 1


def test_with_an_off_site_repo_the_run_pushes_after_the_backup_and_the_prune(on_host, mocker, fake_host, monkeypatch):
    monkeypatch.setenv("COACHNTT_BACKUP__OFFSITE_REPO", "sftp:offsite@storage.example.org:/srv/offsite")
    calls = mocker.patch.object(backup_schedule, "run_body")
    on_host(backup_schedule.scheduled, fake_host())
    assert [c.args[0] for c in calls.call_args_list] == [backup.now, backup.prune, backup_copies.offsite_]


def test_a_failed_push_fails_the_scheduled_run(on_host, fake_host, monkeypatch, mocker):
    from fabfile.core import offsite

    monkeypatch.setenv("COACHNTT_BACKUP__OFFSITE_REPO", "sftp:offsite@storage.example.org:/srv/offsite")
    mocker.patch.object(backup_schedule, "run_body", side_effect=lambda task, ops, **kw: None if task is not backup_copies.offsite_
                        else task.body.__wrapped__(ops, **kw))
    host = fake_host(replies={"offsite-restic push": (offsite.UNREACHABLE, "", "ssh: connect to host storage.example.org port 22: "
                                                                                 "Connection timed out")})
    with pytest.raises(Exit) as info:
        on_host(backup_schedule.scheduled, host)
    assert info.value.code == 3 and "cannot reach the storage host storage.example.org" in info.value.message


def test_the_data_run_archives_the_data_directory_then_prunes(on_host, mocker, fake_host):
    calls = mocker.patch.object(backup_schedule, "run_body")
    on_host(backup_schedule.scheduled, fake_host(), data=True)
    assert [(c.args[0], c.kwargs) for c in calls.call_args_list] == [(backup.now, {"label": "weekly", "data": True}),
                                                                     (backup.prune, {})]


def test_run_body_runs_another_tasks_body_with_the_same_ops(mocker):
    seen = []
    mocker.patch.object(backup.now.body, "__wrapped__", side_effect=lambda ops, **kw: seen.append((ops, kw)))
    task_module.run_body(backup.now, "OPS", label="daily")
    assert seen == [("OPS", {"label": "daily"})]


def test_the_tool_link_is_where_the_units_look(settings):
    assert f"WorkingDirectory={tool.LINK}" in backup_schedule.units(settings)[DB_SERVICE]
