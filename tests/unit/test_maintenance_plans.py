"""maintenance.patch as data: apt's answers read, the window obeyed before connecting,
the lock, the upgrade, the reboot and the gate in order, and the wait for a host that
reboots (new boot id, bounded, a host that does not come back)."""

from __future__ import annotations

import json
import re
import shlex
from datetime import UTC, datetime

import pytest
from invoke.exceptions import Exit

from fabfile import maintenance
from fabfile.core import patching, reboot, slots, state
from fabfile.core import task as task_module
from fabfile.core.app import App
from fabfile.core.batch import ProbeResult
from fabfile.core.errors import ConnectError, HostKeyError, OpsError
from fabfile.core.settings import Settings

SHA = "a" * 40
INSIDE = datetime(2026, 12, 6, 2, 30, tzinfo=UTC)  # a Sunday, in the default window
OUTSIDE = datetime(2026, 12, 1, 23, 35, tzinfo=UTC)  # a Tuesday night

PENDING = """\
inst base-files 13.1 13.2
inst linux-image-amd64 6.12.41-1 6.12.48-1
inst linux-image-6.12.48-amd64 - 6.12.48-1
summary 2 upgraded, 1 newly installed, 0 to remove and 3 not upgraded."""

UPGRADED = """\
changed base-files 13.1 13.2
changed linux-image-amd64 6.12.41-1 6.12.48-1
changed linux-image-6.12.48-amd64 - 6.12.48-1
summary 2 upgraded, 1 newly installed, 0 to remove and 0 not upgraded.
reboot-required linux-image-6.12.48-amd64 """


# --- apt's answers ---------------------------------------------------------------------------


def test_pending_upgrades_are_read_with_from_and_to_and_what_apt_keeps_back():
    report = patching.parse(PENDING, record="inst")
    assert [p.describe() for p in report.packages] == [
        "base-files 13.1 -> 13.2", "linux-image-6.12.48-amd64 6.12.48-1 (new)", "linux-image-amd64 6.12.41-1 -> 6.12.48-1"]
    assert report.kept_back == 3 and report.reboot_for is None


def test_an_upgrade_says_what_changed_and_which_packages_ask_for_a_reboot():
    report = patching.parse(UPGRADED, record="changed")
    assert len(report.packages) == 3 and report.kept_back == 0
    assert report.reboot_for == ("linux-image-6.12.48-amd64",)
    assert patching.parse("changed old-lib 1.0 -\n", record="changed").packages[0].describe() == "old-lib 1.0 (removed)"
    assert patching.parse("reboot-required \n", record="changed").reboot_for == (), "asked, no package named"


def test_a_pending_probe_that_failed_is_one_line_saying_nothing_changed():
    with pytest.raises(OpsError) as info:
        patching.parse("error: apt-get update failed: E: Failed to fetch http://deb.debian.org/...", record="inst")
    assert info.value.one_line() == ("apt cannot tell what would be upgraded: apt-get update failed: E: Failed to fetch "
                                     "http://deb.debian.org/...; check the host's apt sources (`sudo apt-get update`); nothing changed")


def test_the_reboot_flag_names_its_packages_once():
    assert patching.reboot_asked(ProbeResult("", 1)) is None
    assert patching.reboot_asked(ProbeResult("", 0)) == ()
    assert patching.reboot_asked(ProbeResult("linux-base\nlibc6\nlinux-base\n", 0)) == ("linux-base", "libc6")


def test_the_upgrade_runs_as_root_without_questions_and_keeps_config_files():
    command = patching.upgrade_command("/var/lib/coachntt-ops/backup.lock")
    assert command.startswith("sudo -n sh -c ") and command.endswith(" host-patch upgrade /var/log/coachntt-ops-patch.log "
                                                                       "/var/run/reboot-required /var/lib/coachntt-ops/backup.lock")
    script = (patching.templates.SCRIPTS_DIR / "host-patch.sh").read_text()
    assert "export DEBIAN_FRONTEND=noninteractive" in script
    assert 'APT_KEEP="-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"' in script
    assert "$APT $APT_KEEP upgrade --with-new-pkgs" in script


# --- waiting for a reboot ----------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def asking(answers, clock: Clock, cost: float = 1.0):
    """An `ask` that answers in turn (an exception is raised), each look costing `cost` seconds."""
    answers = iter(answers)

    def ask() -> str:
        clock.now += cost
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return ask


def wait(ask, clock: Clock, timeout: float = 60):
    return reboot.wait_for_new_boot(ask, "old", timeout, where="coachntt@vps", hint="run `deploy.recover`",
                                    clock=clock, sleep=clock.sleep)


def test_the_wait_ends_when_a_new_boot_answers_not_when_ssh_does():
    clock = Clock()
    refused = ConnectError("cannot reach coachntt@vps: connection refused")
    seconds = wait(asking(["old", "old", refused, refused, "new"], clock), clock)
    assert seconds == pytest.approx(5 + 4 * reboot.POLL_SECONDS), "the old boot answering is not the host back"


def test_a_host_that_does_not_come_back_is_exit_3_with_the_lock_kept():
    clock = Clock()
    gone = ConnectError("cannot reach coachntt@vps: timed out")
    with pytest.raises(reboot.HostGone) as info:
        wait(asking(["old"] + [gone] * 100, clock, cost=10), clock, timeout=60)
    assert info.value.exit_code == 3 and info.value.keeps_lock
    assert info.value.one_line().startswith("coachntt@vps did not come back within ")
    assert "(cannot reach coachntt@vps: timed out); run `deploy.recover`" in info.value.one_line()
    assert clock.now < 60 + 10 + reboot.POLL_SECONDS + 1, "bounded: one look past the deadline at most"


def test_a_host_still_on_its_old_boot_at_the_deadline_did_not_reboot():
    clock = Clock()
    with pytest.raises(reboot.NotRebooted) as info:
        wait(asking(["old"] * 100, clock, cost=5), clock, timeout=30)
    assert info.value.exit_code == 1 and info.value.keeps_lock
    assert "was asked to reboot but still runs the same boot" in info.value.what


def test_a_changed_host_key_stops_the_wait_at_once():
    clock = Clock()
    with pytest.raises(HostKeyError):
        wait(asking([ConnectError("refused"), HostKeyError("host key for coachntt@vps has CHANGED")], clock), clock)
    assert clock.now < 10


# --- the task --------------------------------------------------------------------------------


@pytest.fixture
def app(defaults):
    return App.from_settings(Settings("production", defaults))


def containers(**states: str) -> str:
    """`docker compose ps -a --format json` lines: service -> state, each on the release's image."""
    return "\n".join(json.dumps({"Service": service, "State": state, "Image": f"coachntt/api:{SHA}"})
                     for service, state in states.items())


def host_for(fake_host, app, *, pending=PENDING, reboot_flag=None, log=None, health="200", upgraded=UPGRADED,
             replies=None, cls=None, boot="boot-1", live="b"):
    """A host whose api is served by slot `live` (b by default: a release after the first
    one), slot a kept stopped; `live=""`: no slot include yet (a host from before slots)."""
    probes = maintenance.probes(app)
    log = state.Release(sha=SHA, kind="deploy", result="ok").to_json() if log is None else log
    slot_a, slot_b = slots.slots_of(app)
    serving = slot_b if live == "b" else slot_a
    answers = {
        "pending": (pending, 0),
        "reboot": (reboot_flag or "", 0 if reboot_flag is not None else 1),
        "boot": (boot, 0 if boot else 1),
        "log": (log, 0),
        "lock": ("", 1),
        "upstream": (slots.render_upstream(serving, SHA), 0) if live else ("", 1),
        "site_slots": ("", 0 if live else 1),
        "containers": (containers(api_a="exited", api_b="running") if live == "b" else containers(api_a="running"), 0),
        "health_a": ("000" if live == "b" else health, 0),
        "health_b": (health if live == "b" else "000", 0),
    }
    replies = {"host-patch upgrade": (0, upgraded, ""), **(replies or {})}
    return (cls or fake_host)(facts={probes[name]: answer for name, answer in answers.items()}, replies=replies)


@pytest.fixture
def run_patch(project_context, mocker):
    def run(host, moment=INSIDE, **kwargs):
        mocker.patch.object(maintenance, "now", return_value=moment)
        mocker.patch.object(task_module, "target_for", return_value=host)
        return maintenance.patch(project_context, **kwargs)

    return run


# The log entry appended and the lock freed: one command (it may quote any other in its entry).
FINISH = "deploy-lock finish /var/lib/coachntt-ops "
ACQUIRE, GATE = "deploy-lock acquire", "health-gate http"
UPGRADE, REBOOT = "host-patch upgrade", "host-patch reboot"


def sent_matching(host, needle):
    return [c for c in host.sent if needle in c]


def what_was_sent(host) -> list[str]:
    """Each command named by the first of our needles it holds (the scripts' own texts travel with them)."""
    needles = (FINISH, ACQUIRE, UPGRADE, REBOOT, GATE)
    return [name for name in (next((n for n in needles if n in command), None) for command in host.sent) if name]


def test_outside_the_window_it_is_refused_before_connecting_saying_when_it_opens(refused_before_connecting, mocker):
    mocker.patch.object(maintenance, "now", return_value=OUTSIDE)
    exit_ = refused_before_connecting(maintenance.patch)
    assert exit_.code == 2
    assert exit_.message == (
        "error: maintenance.patch runs only in the maintenance window (Sun 02:00-04:00 UTC); now is Tue 2026-12-01 23:35 UTC, "
        "next window: Sun 2026-12-06 02:00 UTC; nothing changed; rerun then, or pass --force to run it now")


def test_a_window_setting_that_does_not_parse_is_exit_2_before_connecting(refused_before_connecting, mocker):
    mocker.patch.object(maintenance, "now", return_value=INSIDE)
    exit_ = refused_before_connecting(maintenance.patch, env={"COACHNTT_MAINTENANCE__WINDOW": "Sundays 2am"}, dry=True)
    assert exit_.code == 2
    assert exit_.message.startswith("error: maintenance.window must be a weekly window like 'Sun 02:00-04:00'")
    assert "fix COACHNTT_MAINTENANCE__WINDOW in the environment" in exit_.message


def test_dry_lists_pending_upgrades_outside_the_window_too_and_changes_nothing(fake_host, app, run_patch, capsys):
    host = host_for(fake_host, app)
    run_patch(host, moment=OUTSIDE, dry=True)
    out = capsys.readouterr().out
    assert "window      outside Sun 02:00-04:00 UTC: next window: Sun 2026-12-06 02:00 UTC" in out
    assert "upgrades    3 pending, 3 kept back" in out and "      - linux-image-amd64 6.12.41-1 -> 6.12.48-1" in out
    assert "reboot      not asked" in out and f"app         {SHA[:12]} in slot b (127.0.0.1:8002) (HTTP 200)" in out
    assert ("would take the deploy lock, upgrade 3 package(s), reboot if the upgrade asks for it, health-gate the app") in out
    assert len(host.sent) == 1, "one round trip of facts, nothing else"


def test_up_to_date_takes_no_lock_and_changes_nothing(fake_host, app, run_patch, capsys):
    host = host_for(fake_host, app, pending="summary 0 upgraded, 0 newly installed, 0 to remove and 0 not upgraded.")
    run_patch(host)
    assert "up to date: nothing to upgrade, no reboot asked" in capsys.readouterr().out
    assert len(host.sent) == 1


def test_a_patch_runs_under_the_deploy_lock_upgrades_gates_and_logs(fake_host, app, run_patch, capsys):
    host = host_for(fake_host, app, upgraded=UPGRADED.rsplit("\n", 1)[0])  # no reboot asked
    run_patch(host)
    assert what_was_sent(host) == [ACQUIRE, UPGRADE, GATE, FINISH]
    (upgrade,) = sent_matching(host, UPGRADE)
    assert "deploy-lock run /var/lib/coachntt-ops 'upgrade packages' 7200" in upgrade.replace("'\"'\"'", "'"), \
        "a phase of its own on the server, where the client cannot cut it (an hour for a backup, an hour for apt)"
    assert upgrade.endswith("/var/run/reboot-required /var/lib/coachntt-ops/backup.lock'\"'\"''"), \
        "the backup timers' lock: a running backup ends first, none starts meanwhile"
    (entry,) = sent_matching(host, FINISH)
    (logged,) = state.parse_log(shlex.split(entry)[-1])
    assert (logged.kind, logged.sha, logged.result, logged.previous) == ("patch", SHA, "ok", SHA)
    assert logged.message == "maintenance.patch: 3 package(s) upgraded"
    out = capsys.readouterr().out
    assert "      - linux-image-amd64 6.12.41-1 -> 6.12.48-1" in out and "patched: 3 package(s) upgraded" in out
    assert not sent_matching(host, REBOOT)


def test_the_gate_after_the_patch_asks_the_slot_that_serves_and_names_its_service(fake_host, app, run_patch):
    host = host_for(fake_host, app, upgraded="changed curl 8.1 8.2\n")
    run_patch(host)
    (gate,) = sent_matching(host, GATE)
    assert "health-gate http://127.0.0.1:8002/health " in gate, "slot b serves: slot a (8000) is stopped, kept for rollback"
    assert "logs --no-color --tail 20 api_b" in gate, "a failed gate shows the live slot's logs"
    assert len([c for c in host.sent if "@@coachntt-" in c]) == 1, "the layout came with the other facts: one round trip"


def test_without_a_slot_include_the_gate_asks_slot_a_where_health_url_points(fake_host, app, run_patch):
    host = host_for(fake_host, app, upgraded="changed curl 8.1 8.2\n", live="")
    run_patch(host)
    (gate,) = sent_matching(host, GATE)
    assert "health-gate http://127.0.0.1:8000/health " in gate and "--tail 20 api_a" in gate


def test_force_patches_outside_the_window_and_says_so(fake_host, app, run_patch, capsys):
    host = host_for(fake_host, app, upgraded=UPGRADED.rsplit("\n", 1)[0])
    run_patch(host, moment=OUTSIDE, force=True)
    assert "--force: patching outside the maintenance window (Sun 02:00-04:00 UTC)" in capsys.readouterr().out
    assert sent_matching(host, UPGRADE)


def test_a_held_deploy_lock_refuses_the_patch_with_exit_4_and_nothing_upgraded(fake_host, app, run_patch):
    host = host_for(fake_host, app, replies={"deploy-lock acquire": (4, "holder=ci\nsince=now\nsha=bbbbbbb\njob=running\n"
                                                                           "phase=migrate\n", "")})
    with pytest.raises(Exit) as info:
        run_patch(host)
    assert info.value.code == 4 and "deploy lock held by ci" in info.value.message
    assert not sent_matching(host, UPGRADE)


def test_a_failed_gate_after_the_patch_is_logged_and_exit_1_naming_the_health_before(fake_host, app, run_patch):
    host = host_for(fake_host, app, health="503", upgraded="changed curl 8.1 8.2\n",
                    replies={"health-gate": (1, "30s 503 down\n", "")})
    with pytest.raises(Exit) as info:
        run_patch(host)
    assert info.value.code == 1
    assert "/health did not answer 200 within 30s (it answered HTTP 503 before the patch too)" in info.value.message
    assert what_was_sent(host) == [ACQUIRE, UPGRADE, GATE, FINISH], "the lock is released: nothing runs on"
    (entry,) = sent_matching(host, FINISH)
    assert '"result": "failed"' in entry and '"phase": "health gate"' in entry


def test_on_the_host_itself_a_reboot_is_never_done_and_the_run_says_what_to_do(fake_host, app, run_patch):
    host = host_for(fake_host, app)  # a FakeHost is no RemoteTarget: like `inv` on the server
    with pytest.raises(Exit) as info:
        run_patch(host)
    assert info.value.code == 1
    assert info.value.message.startswith("error: the host asks for a reboot (asked by linux-image-6.12.48-amd64), "
                                         "which a run on the host itself cannot wait for; run `fab -H coachntt@HOST")
    assert what_was_sent(host) == [ACQUIRE, UPGRADE, GATE, FINISH], "no reboot"


def test_over_ssh_a_reboot_asked_for_is_done_under_the_lock_waited_for_then_gated(fake_host, app, run_patch, mocker, capsys):
    class Remote(fake_host):
        pass

    host = host_for(fake_host, app, cls=Remote)
    mocker.patch.object(maintenance, "RemoteTarget", Remote)
    boots = iter(["boot-1", "boot-2"])
    mocker.patch.object(reboot, "boot_id", side_effect=lambda target: next(boots))
    mocker.patch.object(reboot.time, "sleep")
    run_patch(host)
    assert what_was_sent(host) == [ACQUIRE, UPGRADE, REBOOT, GATE, FINISH]
    (gate,) = sent_matching(host, GATE)
    deadline = int(re.search(r"health-gate http://127.0.0.1:8002/health (\d+) 1 ", gate).group(1))
    assert 590 <= deadline <= 600, "after a boot the app gets what is left of maintenance.reboot_timeout (600s)"
    (entry,) = sent_matching(host, FINISH)
    assert "3 package(s) upgraded; rebooted (" in entry
    assert "back after " in capsys.readouterr().out


def test_a_host_that_does_not_come_back_keeps_the_lock_and_is_exit_3(fake_host, app, run_patch, mocker, defaults):
    class Remote(fake_host):
        pass

    host = host_for(fake_host, app, cls=Remote)
    mocker.patch.object(maintenance, "RemoteTarget", Remote)
    mocker.patch.object(reboot, "boot_id", side_effect=ConnectError("cannot reach coachntt@vps: timed out"))
    clock = Clock()
    mocker.patch.object(reboot.time, "monotonic", clock)
    mocker.patch.object(reboot.time, "sleep", clock.sleep)
    with pytest.raises(Exit) as info:
        run_patch(host)
    assert info.value.code == 3
    assert "did not come back within" in info.value.message and "run `deploy.recover`" in info.value.message
    assert what_was_sent(host) == [ACQUIRE, UPGRADE, REBOOT], "the lock stays held: nobody deploys onto a host in limbo"


def test_without_a_boot_id_to_compare_the_host_is_never_rebooted(fake_host, app, run_patch, mocker):
    class Remote(fake_host):
        pass

    host = host_for(fake_host, app, cls=Remote, boot="")
    mocker.patch.object(maintenance, "RemoteTarget", Remote)
    with pytest.raises(Exit) as info:
        run_patch(host)
    assert info.value.code == 1 and "cannot read the boot id of" in info.value.message
    assert what_was_sent(host) == [ACQUIRE, UPGRADE, FINISH], "logged as failed, the lock released, no reboot"
