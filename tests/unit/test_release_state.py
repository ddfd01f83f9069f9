"""Planning a rollback or a deploy as data: the release log in, the target and plans out."""

from __future__ import annotations

import dataclasses
import shlex

import pytest
from invoke.exceptions import Exit

from fabfile import deploy as deploy_module
from fabfile import rollback as rollback_module
from fabfile.core import backups, templates
from fabfile.core import task as task_module
from fabfile.core.app import App
from fabfile.core.batch import ProbeResult
from fabfile.core.errors import UsageError
from fabfile.core.slots import Slot
from fabfile.core.state import Release, backup_undoing, current_release
from fabfile.core.target import Result
from fabfile.deploy_setup import checkout_step, directories_step, env_file_step
from fabfile.rollback import choose_target, live_schema, schema_of

A, B, C, D = ("a" * 40, "b" * 40, "c" * 40, "d" * 40)
# Two releases whose shas share their first 7 digits.
TWIN_1, TWIN_2 = "abc1234" + "0" * 33, "abc1234" + "f" * 33

missing = ProbeResult("", 1)


def ok(stdout=""):
    return ProbeResult(stdout, 0)


def deploy(sha, result="ok", **kw):
    return Release(sha=sha, kind="deploy", result=result, **kw)


def rollback(sha, previous, result="ok", **kw):
    return Release(sha=sha, kind="rollback", result=result, previous=previous, **kw)


def usage_error(log, to):
    with pytest.raises(UsageError) as info:
        choose_target(log, to)
    assert info.value.exit_code == 2
    return info.value


# --- rollback: choosing the target -------------------------------------------------


def test_without_to_the_target_is_the_previous_good_release():
    current, target = choose_target([deploy(A), deploy(B), deploy(C)], "")
    assert (current.sha, target) == (C, B)


def test_without_to_failed_releases_are_skipped():
    current, target = choose_target([deploy(A), deploy(B, result="failed", rolled_back_to=A), deploy(C)], "")
    assert (current.sha, target) == (C, A)


def test_after_rolling_back_c_to_b_the_next_rollback_goes_to_a_not_c():
    current, target = choose_target([deploy(A), deploy(B), deploy(C), rollback(B, previous=C)], "")
    assert (current.sha, target) == (B, A)


def test_to_accepts_a_prefix_of_a_good_release():
    current, target = choose_target([deploy(A), deploy(B), deploy(C)], "aaaaaaa")
    assert (current.sha, target) == (C, A)


def test_to_a_release_that_failed_is_refused_listing_recent_good_ones():
    log = [deploy(A), deploy(B), deploy(C, result="failed", rolled_back_to=B)]
    error = usage_error(log, "ccccccc")
    assert error.what == "'ccccccc' is not a release that went live"
    assert error.hint == f"recent good releases: {B[:12]}, {A[:12]}"


def test_to_a_sha_never_deployed_is_refused():
    assert usage_error([deploy(A), deploy(B)], "1234567").what == "'1234567' is not a release that went live"


def test_recent_good_releases_are_at_most_five_newest_first():
    shas = [f"{i:x}" * 40 for i in range(1, 8)]
    error = usage_error([deploy(sha) for sha in shas], "0000000")
    assert error.hint == "recent good releases: " + ", ".join(sha[:12] for sha in reversed(shas[-5:]))


def test_an_ambiguous_prefix_asks_for_more_digits():
    error = usage_error([deploy(TWIN_1), deploy(TWIN_2), deploy(C)], "abc1234")
    assert error.what == "'abc1234' matches 2 releases"
    assert error.hint == "give more digits of the sha"


def test_a_longer_prefix_resolves_the_ambiguity():
    assert choose_target([deploy(TWIN_1), deploy(TWIN_2), deploy(C)], "abc12340")[1] == TWIN_1


def test_nothing_deployed_is_a_usage_error():
    for log in ([], [deploy(A, result="failed")]):
        assert usage_error(log, "").what == "nothing has been deployed yet"


def test_a_single_release_has_nothing_to_roll_back_to():
    error = usage_error([deploy(A)], "")
    assert error.what == "no earlier good release to roll back to"
    assert error.hint == f"good releases: {A[:12]}"


# --- rollback: schema and backup --------------------------------------------------


def test_schema_of_is_what_the_release_brought_when_it_first_went_live():
    log = [deploy(A, schema="1"), deploy(B, schema="2"), rollback(A, previous=B, schema="2"), deploy(A, schema="2")]
    assert schema_of(log, A) == "1"
    assert schema_of(log, B) == "2"
    assert schema_of(log, C) == ""


def test_live_schema_is_the_newest_recorded_by_any_entry():
    assert live_schema([deploy(A, schema="1"), deploy(B, schema="2"), rollback(A, previous=B, schema="2")]) == "2"
    # A rollback that restored the older dump brings the database back to the older schema.
    assert live_schema([deploy(A, schema="1"), deploy(B, schema="2"), rollback(A, previous=B, schema="1")]) == "1"
    assert live_schema([deploy(A), deploy(B)]) == ""


def test_a_failed_release_that_migrated_still_moves_the_live_schema():
    log = [deploy(A, schema="1"), deploy(B, result="failed", schema="2", rolled_back_to=A)]
    assert live_schema(log) == "2"


def test_backup_undoing_is_the_dump_taken_just_before_that_sha_migrated():
    log = [deploy(A, backup="/backups/pre-a.sql.gz"), deploy(B, backup="/backups/pre-b.sql.gz"), deploy(C, backup="/backups/pre-c.sql.gz")]
    assert backup_undoing(log, B) == "/backups/pre-b.sql.gz"


def test_backup_undoing_takes_the_newest_deploy_of_the_sha_and_ignores_rollbacks():
    log = [deploy(B, backup="/backups/pre-b-1.sql.gz"), deploy(A), deploy(B, backup="/backups/pre-b-2.sql.gz"),
           rollback(B, previous=A, backup="/backups/not-a-deploy.sql.gz")]
    assert backup_undoing(log, B) == "/backups/pre-b-2.sql.gz"


def test_a_first_deploy_has_no_backup_to_undo():
    assert backup_undoing([deploy(A)], A) == ""


# --- the tasks refuse before changing anything -----------------------------------


def test_deploy_refuses_a_sha_that_is_not_a_commit_id_before_connecting(refused_before_connecting):
    exit_ = refused_before_connecting(deploy_module.deploy, sha="main")
    assert exit_.code == 2
    assert exit_.message == "error: --sha must be a commit id (7-40 hex digits), got 'main'; copy it from `git log` or the release log"


def test_rollback_refuses_a_to_that_is_not_a_commit_id_before_connecting(refused_before_connecting):
    exit_ = refused_before_connecting(rollback_module.rollback, to="HEAD~1")
    assert exit_.code == 2
    assert "--to must be a commit id (7-40 hex digits), got 'HEAD~1'" in exit_.message


def test_rollback_to_a_failed_release_reads_the_log_then_exits_2_without_changing_anything(project_context, mocker, release_host):
    log = "\n".join(r.to_json() for r in [deploy(A), deploy(B), deploy(C, result="failed", rolled_back_to=B)])
    host = release_host(log, B)
    mocker.patch.object(task_module, "target_for", return_value=host)
    with pytest.raises(Exit) as info:
        rollback_module.rollback(project_context, to="ccccccc")
    assert info.value.code == 2
    assert info.value.message == f"error: 'ccccccc' is not a release that went live; recent good releases: {B[:12]}, {A[:12]}"
    assert "deploy-lock acquire" in host.sent[0], "the log is read under the lock"
    assert "tail -n 500 /var/lib/coachntt-ops/releases.jsonl" in host.sent[1]
    assert len(host.sent) == 3 and "deploy-lock finish" in host.sent[2], "nothing but the lock's release follows"
    assert shlex.split(host.sent[2])[-1] == "", "with no entry: nothing was tried"


def test_history_shows_the_readable_entries_and_warns_about_the_rest(project_context, mocker, release_host, capsys):
    log = "\n".join([deploy(A).to_json(), "null", '{"sha": "$(touch /tmp/x)", "kind": "deploy"}', deploy(B).to_json(), '{"sha": "b'])
    host = release_host(log, B)
    mocker.patch.object(task_module, "target_for", return_value=host)
    deploy_module.history(project_context)
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out[:2]] == [A[:12], B[:12]]
    assert out[2] == "  warning: skipped 3 unreadable line(s) of /var/lib/coachntt-ops/releases.jsonl"


def test_deploy_refuses_a_multi_line_message_before_connecting(refused_before_connecting):
    exit_ = refused_before_connecting(deploy_module.deploy, message="first\nsecond")
    assert exit_.code == 2
    assert exit_.message.startswith("error: --message must be one line of text; ")


# --- deploy.setup steps -----------------------------------------------------------


@pytest.fixture
def app(settings):
    return App.from_settings(settings)


def test_existing_env_file_is_never_overwritten(app):
    plan = env_file_step(app).plan({"env": ok()})
    assert plan.changes == ()
    assert plan.reason == "/opt/coachntt/.env.production exists (never overwritten)"


def test_missing_env_file_is_made_from_the_example_by_make_env(app):
    step = env_file_step(app)
    assert step.probes == {"env": "test -e /opt/coachntt/.env.production"}
    (change,) = step.plan({"env": missing}).changes
    assert change.summary == "create /opt/coachntt/.env.production from .env.example with generated secrets (mode 600)"
    assert change.command.startswith("sh -c ")
    assert templates.script("make-env.sh").splitlines()[-1] in change.command
    assert change.command.endswith(" make-env /opt/coachntt/.env.example /opt/coachntt/.env.production coachntt:coachntt")


def test_checkout_is_skipped_while_the_deploy_user_is_missing(app):
    plan = checkout_step(app).plan({"owner": missing, "git": missing})
    assert plan.skip
    assert plan.reason == "user coachntt missing: run `secure` first"


def test_an_existing_checkout_is_ok(app):
    plan = checkout_step(app).plan({"owner": ok("1000"), "git": ok()})
    assert (plan.changes, plan.skip) == ((), False)
    assert plan.reason == "/opt/coachntt is a checkout"


def test_a_checkout_without_a_repository_setting_is_a_usage_error(app):
    with pytest.raises(UsageError) as info:
        checkout_step(app).plan({"owner": ok("1000"), "git": missing})
    assert info.value.what == "missing config value 'app.repo'"
    assert "COACHNTT_APP__REPO=" in info.value.hint


def test_missing_checkout_is_cloned_as_the_deploy_user(app):
    app = dataclasses.replace(app, repo="https://github.com/example/coachntt.git")
    (change,) = checkout_step(app).plan({"owner": ok("1000"), "git": missing}).changes
    assert change.summary == "clone https://github.com/example/coachntt.git into /opt/coachntt"
    assert change.command == (
        "install -d -o coachntt -g coachntt /opt/coachntt && "
        "sudo -n -u coachntt sh -c 'umask 022 && exec git clone --quiet -- https://github.com/example/coachntt.git /opt/coachntt'"
    )


def test_state_and_backup_directories_are_made_with_their_modes(app):
    plan = directories_step(app).plan({"d0": ok("755 coachntt"), "d1": ok("755 root")})
    assert [c.command for c in plan.changes] == ["install -d -m 700 -o coachntt -g coachntt /backups"]


def test_ready_directories_are_ok(app):
    assert directories_step(app).plan({"d0": ok("755 coachntt"), "d1": ok("700 coachntt")}).changes == ()


def test_a_failed_rollback_never_switched_so_the_release_before_it_still_counts_as_current():
    log = [
        Release("a" * 40, "deploy", "ok"),
        Release("b" * 40, "deploy", "ok"),
        Release("a" * 40, "rollback", "failed", previous="b" * 40),
    ]
    assert current_release(log).sha == "b" * 40, "its slot failed the gate before nginx moved"


def test_a_rollback_cut_off_counts_as_current_until_recover_says_otherwise():
    log = [Release("a" * 40, "deploy", "ok"), Release("b" * 40, "deploy", "ok"),
           Release("a" * 40, "rollback", "interrupted", previous="b" * 40)]
    assert current_release(log).sha == "a" * 40


def test_recover_serving_the_other_release_records_it_as_current():
    log = [Release("a" * 40, "deploy", "ok"), Release("b" * 40, "deploy", "interrupted", previous="a" * 40),
           Release("b" * 40, "verify", "ok", previous="a" * 40, message="recover: aaaaaaaaaaaa could not be put back")]
    assert current_release(log).sha == "b" * 40


# --- hooks and the lock wait --------------------------------------------------------


def deploy_host(release_host, **replies):
    """A host where A is live and the fetch resolves the wanted sha to B."""
    log = deploy(A, schema="1").to_json()
    return release_host(log, A, replies={"git fetch --quiet origin": (0, B + "\n", ""), **replies})


def test_a_failing_pre_deploy_hook_stops_the_release_before_anything_changes(project_context, mocker, monkeypatch, release_host,
                                                                            logged):
    monkeypatch.setenv("COACHNTT_APP__HOOKS__PRE_DEPLOY", "./check-freeze")
    host = deploy_host(release_host, **{"COACHNTT_HOOK=pre_deploy": (1, "", "deploys are frozen until Monday")})
    mocker.patch.object(task_module, "target_for", return_value=host)
    with pytest.raises(Exit) as info:
        deploy_module.deploy(project_context, sha=B)
    assert info.value.code == 1 and "deploys are frozen until Monday" in info.value.message
    hook = next(c for c in host.sent if "COACHNTT_HOOK=pre_deploy" in c)
    assert f"COACHNTT_SHA={B}" in hook and f"COACHNTT_PREVIOUS_SHA={A}" in hook and "./check-freeze" in hook
    assert not any("git checkout" in c or "backup-db" in c for c in host.sent), "nothing may change after a veto"
    assert "pre_deploy hook" in info.value.message and "nothing changed" in info.value.message
    assert "deploy-lock finish" in host.sent[-1], "the lock is released"
    (entry,) = logged(host.sent)
    assert (entry.result, entry.phase) == ("failed", "pre_deploy hook"), "the attempt is logged with its phase, as the lock is freed"


def test_lock_wait_asks_again_until_the_holder_is_done(mocker, fake_host):
    from fabfile.core import lock

    sleeps = mocker.patch.object(lock.time, "sleep")
    answers = iter([(4, "holder=ci\nsince=now\nsha=x\n"), (4, "holder=ci\nsince=now\nsha=x\n"), (0, "")])

    class BusyThenFree(fake_host):
        def _execute(self, command, timeout):
            if "deploy-lock acquire" in command:
                self.sent.append(command)
                status, out = next(answers)
                return Result(command, out, "", status)
            return super()._execute(command, timeout)

    host = BusyThenFree()
    with lock.deploy_lock(host, "/var/lib/coachntt-ops", B, "", wait=60):
        pass
    assert sum("deploy-lock acquire" in c for c in host.sent) == 3
    assert sleeps.call_count == 2


# --- defence in depth: a value that slipped past validation is still one word -----

HOSTILE = "x$(touch /tmp/y);z"


def test_setup_commands_quote_the_owner_and_paths(app):
    app = dataclasses.replace(app, owner=HOSTILE, repo="https://github.com/example/coachntt.git")
    commands = [
        *(c.command for c in directories_step(app).plan({"d0": missing, "d1": missing}).changes),
        *(c.command for c in checkout_step(app).plan({"owner": ok("1000"), "git": missing}).changes),
        *(c.command for c in env_file_step(app).plan({"env": missing}).changes),
        *checkout_step(app).probes.values(),
    ]
    for command in commands:
        assert "$(touch" not in command.replace(f"'{HOSTILE}'", "").replace(f"'{HOSTILE}:{HOSTILE}'", ""), command


def test_backup_and_restore_pass_database_settings_as_single_words(app, mocker, fake_host):
    app = dataclasses.replace(app, db_container=HOSTILE, db_user=HOSTILE, db_name=HOSTILE)
    counts = '{"postgres": "16", "tables": [{"table": "public.notes", "rows": 2}]}'
    host = fake_host(replies={
        "backup-db dump": (0, "/backups/db_20261201_101010_pre-aaaaaaaaaaaa.dump\n", ""),
        "backup-db load": (0, f"restored={counts}\nmanifest={counts}\n", ""),
    })
    assert deploy_module.backup_before_migrate(host, app, "a" * 40, first_release=False).endswith("pre-aaaaaaaaaaaa.dump")
    backups.restore_in_place(host, app, "/backups/db_20261201_101010_pre-aaaaaaaaaaaa.dump", mocker.Mock(),
                             api=Slot("b", 8002).service)
    # What the host's sh runs, split the way that sh splits it:
    sent = [shlex.split(shlex.split(c)[-1]) if c.startswith("sudo") else shlex.split(c) for c in host.sent]
    dump, load, swap = (next(words for words in sent if action in words) for action in ("dump", "load", "swap"))
    assert dump[dump.index("dump") + 1:][:5] == [HOSTILE, HOSTILE, HOSTILE, "/backups", "pre-aaaaaaaaaaaa"]
    assert load[load.index("load") + 1:][:4] == [HOSTILE, HOSTILE, "/backups", "db_20261201_101010_pre-aaaaaaaaaaaa.dump"]
    assert swap[swap.index("swap") + 1:][:3] == [HOSTILE, HOSTILE, HOSTILE]
    stop, start = swap[-2:]
    assert stop.endswith("stop api_b pgbouncer") and start.endswith("start api_b pgbouncer"), "the live slot, not both"
