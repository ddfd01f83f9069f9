"""Backups as data: names, manifests, listings, retention, and bad input refused before connecting."""

from __future__ import annotations

import shlex
from datetime import UTC, datetime, timedelta

import pytest

from fabfile import backup as backup_module
from fabfile import deploy as deploy_module
from fabfile.core import backups, data_archives, retention
from fabfile.core.app import App
from fabfile.core.errors import OpsError, UsageError
from fabfile.core.settings import Settings, validate
from fabfile.core.state import Release

A, B, C = "a" * 40, "b" * 40, "c" * 40


@pytest.fixture
def app(defaults):
    return App.from_settings(Settings("production", defaults))


# --- names -------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "db_20261201_210455_manual.dump",
    "db_20261201_210455_pre-0123456789ab.dump",
    "db_20261201_210455_manual-2.dump",
    "db_20261125_030000_pre-0123456789ab.sql.gz",  # plain dumps of earlier versions still restore
    "data_20261206_030000_weekly.tar.gz",
])
def test_backup_names_of_ours_are_accepted(name):
    assert backups.validate_name(name) == name


@pytest.mark.parametrize("name, words", [
    ("", "name a backup"),
    ("../etc/passwd", "no '/' or '..'"),
    ("/backups/db_20261201_210455_manual.dump", "no '/' or '..'"),
    ("db_20261201_210455_..dump", "no '/' or '..'"),
    ("db_20261201_210455_manual.dump.sha256", "not a backup name"),
    ("db_2026_manual.dump", "not a backup name"),
    ("db_20261201_210455_$(reboot).dump", "not a backup name"),
    ("db_20261201_210455_a b.dump", "not a backup name"),
    ("db_20261201_210455_manual.tar.gz", "not a backup name"),  # kind and format go together
    ("data_20261201_210455_manual.dump", "not a backup name"),
    ("data_20261201_210455_../x.tar.gz", "no '/' or '..'"),
])
def test_anything_else_is_bad_input(name, words):
    with pytest.raises(UsageError) as info:
        backups.validate_name(name)
    assert words in info.value.one_line() and info.value.exit_code == 2


def test_a_name_says_when_and_what_kind():
    assert backups.taken_at("db_20261201_210455_manual.dump") == datetime(2026, 12, 1, 21, 4, 55, tzinfo=UTC)
    assert backups.taken_at("db_20261399_210455_manual.dump") is None
    assert backups.kind_of("db_20261201_210455_pre-0123456789ab.dump") == "pre-deploy"
    assert backups.kind_of("db_20261201_210455_manual-3.dump") == "manual"
    assert backups.kind_of("db_20261201_210455_daily.sql.gz") == "daily (sql.gz)"
    assert backups.kind_of("data_20261206_030000_weekly-2.tar.gz") == "data/weekly"
    assert backups.taken_at("data_20261206_030000_weekly.tar.gz") == datetime(2026, 12, 6, 3, 0, 0, tzinfo=UTC)
    assert backups.is_data("data_20261206_030000_weekly.tar.gz")
    assert not backups.is_data("db_20261201_210455_manual.dump") and not backups.is_data("data_x.tar.gz")


@pytest.mark.parametrize("label", ["manual", "daily", "pre-abc", "x_1"])
def test_labels_are_plain_words(label):
    assert backups.validate_label(label) == label


@pytest.mark.parametrize("label", ["", "a/b", "-x", "a b", "x" * 42, "a.dump"])
def test_other_labels_are_refused(label):
    with pytest.raises(UsageError):
        backups.validate_label(label)


# --- manifests and listings ------------------------------------------------------------

MANIFEST = ('{"format": "pg_dump custom", "name": "db_20261201_210455_manual.dump", "database": "coachntt_prod", '
            '"size": 7957, "sha256": "88", "release": "abcdef1234567", "postgres" : "16.4", '
            '"tables" : [{"table" : "public.notes", "rows" : 1001}, {"table" : "s2.we ird", "rows" : 0}]}')


def test_a_manifest_is_read_as_tables_with_row_counts():
    manifest = backups.parse_manifest(MANIFEST)
    assert manifest.tables == {"public.notes": 1001, "s2.we ird": 0}
    assert (manifest.release, manifest.postgres, manifest.size) == ("abcdef1234567", "16.4", 7957)


@pytest.mark.parametrize("text", ["", "{", "[]", '{"tables": {}}', '{"tables": [{"table": "t", "rows": "3"}]}',
                                  '{"tables": [{"table": "t", "rows": true}]}', '{"tables": [1]}'])
def test_anything_that_is_not_a_manifest_is_none(text):
    assert backups.parse_manifest(text) is None


def test_a_hostile_release_in_a_manifest_is_ignored():
    assert backups.parse_manifest('{"tables": [], "release": "$(reboot)"}').release == ""


def test_differences_name_missing_extra_and_miscounted_tables():
    expected = backups.Manifest({"public.a": 3, "public.b": 1, "public.c": 0})
    restored = backups.Manifest({"public.a": 2, "public.c": 0, "public.d": 5})
    assert backups.differences(expected, restored) == [
        "public.a has 2 rows, the manifest 3", "public.b missing", "public.d not in the manifest"]
    assert backups.differences(expected, expected) == []


def test_the_listing_is_parsed_oldest_first_skipping_foreign_lines():
    text = ("db_20261202_010000_manual.dump\t100\t1796158632\tyes\tyes\tok 2026-12-02T02:00:00Z \n"
            "db_20261201_010000_pre-abc.dump\t200\t1796158000\tyes\tyes\tfailed 2026-12-02T02:00:00Z backup x fails its sha256 check\n"
            "notes.txt\t1\t1\tno\tno\t\n"
            "db_20261130_010000_manual.dump\tbig\t1\tyes\tyes\t\n"
            "db_20261129_010000_old.sql.gz\t50\t1796150000\tno\tno\t\n")
    found = backups.parse_list(text)
    assert [b.name for b in found] == ["db_20261129_010000_old.sql.gz", "db_20261201_010000_pre-abc.dump",
                                       "db_20261202_010000_manual.dump"]
    assert [b.checksum_state for b in found] == ["no sha256", "BAD", "ok"]
    assert [b.verified_ok for b in found] == [False, False, True]


def test_a_recorded_backup_path_must_lie_in_the_backup_directory():
    assert backups.split_path("/backups/db_20261201_010000_pre-abc.dump", "/backups") == "db_20261201_010000_pre-abc.dump"
    with pytest.raises(UsageError):
        backups.split_path("/tmp/db_20261201_010000_pre-abc.dump", "/backups")
    with pytest.raises(UsageError):
        backups.split_path("/backups/x.dump", "/backups")


# --- retention -------------------------------------------------------------------------


def dated(*stamps: str) -> list[tuple[str, datetime]]:
    return [(f"db_{s}_daily.dump", backups.taken_at(f"db_{s}_daily.dump")) for s in stamps]


def test_daily_keeps_the_newest_of_each_of_the_last_n_days():
    found = dated("20261201_010000", "20261201_130000", "20261202_010000", "20261203_010000", "20261203_020000")
    plan = retention.plan_prune(found, {}, retention.Policy(daily=2, weekly=0, monthly=0))
    assert sorted(plan.keep) == ["db_20261202_010000_daily.dump", "db_20261203_020000_daily.dump"]
    assert plan.remove == ["db_20261201_010000_daily.dump", "db_20261201_130000_daily.dump", "db_20261203_010000_daily.dump"]


def test_weekly_and_monthly_reach_back_further():
    # 90 days, one backup a day at 03:00, ending on Tuesday 2026-12-01.
    end = datetime(2026, 12, 1, 3, tzinfo=UTC)
    found = [(f"db_{backups.stamp(end - timedelta(days=d))}_daily.dump", end - timedelta(days=d)) for d in range(90)]
    plan = retention.plan_prune(found, {}, retention.Policy(daily=7, weekly=4, monthly=3))
    kept = {name[3:11] for name in plan.keep}
    daily = {f"202611{d}" for d in range(25, 31)} | {"20261201"}
    weekly = {"20261129", "20261122", "20261115"}  # Sundays end ISO weeks; the current week's newest is 12-01
    monthly = {"20261031"}  # December's and November's newest (12-01, 11-30) are daily ones already
    assert kept == daily | weekly | monthly
    assert len(plan.keep) + len(plan.remove) == 90
    assert plan.keep["db_20261201_030000_daily.dump"] == ["newest", "daily", "weekly", "monthly"]


def test_protected_backups_stay_whatever_the_policy_says():
    found = dated("20260101_010000", "20260601_010000", "20261201_010000")
    protected = {"db_20260101_010000_daily.dump": "newest verified", "db_20250101_010000_gone.dump": "not there"}
    plan = retention.plan_prune(found, protected, retention.Policy(daily=0, weekly=0, monthly=0))
    assert plan.keep == {"db_20261201_010000_daily.dump": ["newest"], "db_20260101_010000_daily.dump": ["newest verified"]}
    assert plan.remove == ["db_20260601_010000_daily.dump"]


def test_nothing_to_prune_in_an_empty_directory():
    assert retention.plan_prune([], {}, retention.Policy(7, 4, 6)) == retention.PrunePlan({}, [])


def test_the_dumps_rollback_may_still_restore_are_protected():
    log = [Release(sha=A, kind="deploy", result="ok", backup="/backups/db_20261101_010000_pre-a.dump"),
           Release(sha=B, kind="deploy", result="ok", backup="/backups/db_20261102_010000_pre-b.dump"),
           Release(sha=C, kind="deploy", result="failed", backup="/backups/db_20261103_010000_pre-c.dump"),
           Release(sha=B, kind="deploy", result="ok", backup="/elsewhere/db_20261104_010000_pre-b.dump")]
    protected = retention.protected_backups(log, "/backups", "db_20261105_010000_manual.dump")
    assert protected == {"db_20261101_010000_pre-a.dump": f"taken before {A[:12]} (rollback --with-db)",
                         "db_20261105_010000_manual.dump": "newest verified"}


def test_set_aside_databases_go_after_keep_daily_days():
    now = datetime(2026, 12, 10, tzinfo=UTC)
    names = ["coachntt_prod", "coachntt_prod_before_20261201_000000", "coachntt_prod_before_20261209_000000",
             "coachntt_prod_restore_20261208_000000", "coachntt_prod_verify_20261209_120000",
             "coachntt_prod_failed_20261101_000000", "other_before_20261101_000000", "postgres"]
    assert retention.stale_set_aside(names, "coachntt_prod", now, 7) == [
        "coachntt_prod_before_20261201_000000", "coachntt_prod_failed_20261101_000000", "coachntt_prod_restore_20261208_000000"]
    assert retention.stale_set_aside(names, "coachntt_prod", now, 0) == ["coachntt_prod_restore_20261208_000000"]


# --- the script's contract ---------------------------------------------------------


def test_the_dump_prints_its_path_last_and_passes_settings_as_words(app, fake_host):
    host = fake_host(replies={"backup-db dump": (0, "warning: this dump is small\n/backups/db_20261201_010000_manual.dump\n", "")})
    path, warnings = backups.dump(host, app, "manual", min_free_mb=64, tool=backups.TOOL)
    assert path == "/backups/db_20261201_010000_manual.dump" and warnings == ["warning: this dump is small"]
    words = shlex.split(host.sent[0] if not host.sent[0].startswith("sudo") else shlex.split(host.sent[0])[-1])
    assert words[words.index("dump") + 1:] == ["ccp_postgres", "coachntt", "coachntt_prod", "/backups", "manual",
                                               "/var/lib/coachntt-ops", "64", backups.TOOL]
    assert words[2] == backups.script_text("backup-db.sh")


def test_no_database_container_is_no_backup_on_a_first_release_only(app, fake_host):
    host = fake_host(replies={"backup-db dump": (3, "", "no running database container ccp_postgres")})
    assert deploy_module.backup_before_migrate(host, app, A, first_release=True) == ""
    with pytest.raises(backups.NoDatabase) as info:
        deploy_module.backup_before_migrate(host, app, A, first_release=False)
    assert "not running" in info.value.one_line()


def test_an_app_host_whose_database_runs_elsewhere_is_told_where_to_back_it_up(app, fake_host):
    host = fake_host(replies={"backup-db dump": (3, "", "no running database container ccp_postgres"),
                              "database_ready": (1, "elsewhere 10.201.0.20:5432\n", "")})
    with pytest.raises(backups.UsageError) as info:
        backups.dump(host, app, "manual", min_free_mb=64, tool=backups.TOOL)
    assert "runs on 10.201.0.20:5432 (its DATABASE_URL), not here" in info.value.one_line()
    assert "docker compose up" not in info.value.one_line(), "never the advice to start a database of its own"


def test_a_failed_dump_is_its_own_last_line(app, fake_host):
    host = fake_host(replies={"backup-db dump": (1, "", "  \n  pg_dump of coachntt_prod failed: no space left in /backups\n")})
    with pytest.raises(OpsError) as info:
        backups.dump(host, app, "manual", min_free_mb=64, tool=backups.TOOL)
    assert info.value.one_line() == ("pg_dump of coachntt_prod failed: no space left in /backups (on deploy@vps); "
                                     "nothing kept; fix that and rerun")


def test_a_restore_that_does_not_match_its_manifest_is_dropped_before_any_swap(app, fake_host, mocker):
    counts = '{"tables": [{"table": "public.notes", "rows": 2}]}'
    host = fake_host(replies={"backup-db load": (0, f"restored={counts}\nmanifest={counts.replace('2', '3')}\n", "")})
    with pytest.raises(OpsError) as info:
        backups.restore_checked(host, app, "db_20261201_010000_manual.dump", datetime(2026, 12, 1, tzinfo=UTC), mocker.Mock())
    assert "public.notes has 2 rows, the manifest 3" in info.value.what
    assert "live database was not touched" in info.value.hint
    assert any("backup-db drop" in c and "coachntt_prod_restore_20261201_000000" in c for c in host.sent)
    assert not any("backup-db swap" in c for c in host.sent)


def test_min_free_mb_is_a_validated_setting(defaults):
    defaults["backup"]["min_free_mb"] = "64; reboot"
    with pytest.raises(Exception) as info:
        validate(Settings("production", defaults))
    assert "backup.min_free_mb" in str(info.value)


# --- refused before connecting ------------------------------------------------------


@pytest.mark.parametrize("task, kwargs, words", [
    (backup_module.restore, {"name": "../x"}, "no '/' or '..'"),
    (backup_module.restore, {"name": "db_20261201_010000_manual.dump"}, "--yes"),
    (backup_module.restore, {"name": ""}, "name a backup"),
    (backup_module.verify, {"name": "x/y"}, "no '/' or '..'"),
    (backup_module.verify, {}, "name a backup"),
    (backup_module.verify, {"name": "--latest"}, "not a backup name"),
    (backup_module.now, {"label": "a b"}, "--label"),
])
def test_bad_input_is_one_line_and_exit_2_before_connecting(refused_before_connecting, task, kwargs, words):
    refused = refused_before_connecting(task, **kwargs)
    assert refused.code == 2 and words in refused.message and "\n" not in refused.message


def test_restore_without_yes_says_what_would_be_replaced(refused_before_connecting):
    refused = refused_before_connecting(backup_module.restore, name="db_20261201_010000_manual.dump")
    assert "replaces the database coachntt_prod" in refused.message and "coachntt_prod_before_" in refused.message


def test_verify_and_restore_take_the_name_as_a_positional_argument():
    # invoke fills a positional argument only while its value is None.
    for task in (backup_module.verify, backup_module.restore):
        name = next(arg for arg in task.get_arguments() if arg.name == "name")
        assert name.positional and name.default is None


# --- data archives ------------------------------------------------------------------


def test_a_data_manifest_is_entries_and_bytes():
    assert data_archives.parse_contents('{"format": "tar.gz", "entries": 12, "bytes": 4096, "size": 900}') == \
        data_archives.Contents(12, 4096)
    for text in ("", "[]", '{"entries": "12", "bytes": 1}', '{"entries": 1}', '{"entries": true, "bytes": 1}'):
        assert data_archives.parse_contents(text) is None, text


def test_data_differences_name_what_was_extracted_and_what_was_promised():
    assert data_archives.differences(data_archives.Contents(3, 10), data_archives.Contents(3, 10)) == []
    assert data_archives.differences(data_archives.Contents(3, 10), data_archives.Contents(2, 9)) == [
        "2 entries extracted, the manifest says 3", "9 bytes of files extracted, the manifest says 10"]


def test_the_archive_runs_as_the_deploy_user_with_root_only_inside(app, fake_host):
    host = fake_host(replies={"backup-data archive": (0, "/backups/data_20261201_010000_manual.tar.gz\n", "")})
    path, warnings = data_archives.archive(host, app, "manual", min_free_mb=64, tool=backups.TOOL)
    assert path == "/backups/data_20261201_010000_manual.tar.gz" and warnings == []
    command = host.sent[0] if not host.sent[0].startswith("sudo -n -u") else shlex.split(host.sent[0])[-1]
    words = shlex.split(command)
    assert words[:3] == ["sudo", "-n", "bash"] and words[4] == backups.script_text("backup-data.sh")
    assert words[words.index("archive") + 1:] == ["/backups", "/opt/coachntt/data", "manual", "/var/lib/coachntt-ops", "64",
                                                  backups.TOOL, "coachntt"]


def test_a_missing_data_directory_is_bad_input(app, fake_host):
    host = fake_host(replies={"backup-data archive": (7, "", "data directory /opt/coachntt/data is missing")})
    with pytest.raises(UsageError) as info:
        data_archives.archive(host, app, "manual", min_free_mb=64, tool=backups.TOOL)
    assert "app.data_dir" in info.value.one_line() and info.value.exit_code == 2


def test_an_extracted_copy_unlike_its_manifest_is_removed_before_any_swap(app, fake_host):
    host = fake_host(replies={"backup-data load": (0, 'restored={"entries": 2, "bytes": 5}\nmanifest={"entries": 3, "bytes": 5}\n', "")})
    with pytest.raises(OpsError) as info:
        data_archives.restore_checked(host, app, "data_20261201_010000_manual.tar.gz", "/opt/coachntt/data.restore_x")
    assert "2 entries extracted, the manifest says 3" in info.value.what and "was not touched" in info.value.hint
    assert any("backup-data remove" in c and "/opt/coachntt/data.restore_x" in c for c in host.sent)
    assert not any("backup-data swap" in c for c in host.sent)


def test_data_archives_keep_the_newest_n_and_the_newest_verified():
    names = [f"data_202611{day:02d}_030000_weekly.tar.gz" for day in (1, 8, 15, 22, 29)]
    archives = [(name, backups.taken_at(name)) for name in names]
    plan = retention.plan_keep_newest(archives, 2, {names[1]: "newest verified"})
    assert plan.remove == [names[0], names[2]]
    assert plan.keep[names[4]] == ["newest", "newest 2"] and plan.keep[names[1]] == ["newest verified"]
    assert retention.plan_keep_newest(archives, 0, {}).remove == names[:-1], "the newest always stays"


def test_set_aside_data_directories_go_like_databases():
    now = datetime(2026, 12, 10, tzinfo=UTC)
    names = ["/opt/coachntt/data.before_20261201_000000", "/opt/coachntt/data.before_20261209_000000",
             "/opt/coachntt/data.verify_20261208_000000", "/opt/coachntt/data.old", "/opt/coachntt/data_before_20261201_000000"]
    assert retention.stale_set_aside(names, "/opt/coachntt/data", now, 7, separator=".") == [
        "/opt/coachntt/data.before_20261201_000000", "/opt/coachntt/data.verify_20261208_000000"]
