"""db.primary as data, and what an app host whose database runs on roles.db does
differently: where DATABASE_URL points (scripts/database-location.sh, run for real), the
release's preflight and backup host, monitor.check's rows, and the migration's --no-deps."""

from __future__ import annotations

import hashlib
import subprocess
from types import SimpleNamespace

import pytest

from fabfile import db
from fabfile import deploy as deploy_task
from fabfile.core import app as app_module
from fabfile.core import checks, database_location
from fabfile.core.app import App, HostState, preflight_error
from fabfile.core.batch import ProbeResult
from fabfile.core.errors import ConfigError, OpsError, UsageError
from fabfile.core.settings import PROJECT_DIR, Settings
from fabfile.core.state import Release

PRIMARY, APP1, APP2 = "coachntt@10.201.0.20", "coachntt@10.201.0.30", "coachntt@10.201.0.31"
SECRET = "0123456789abcdef0123456789abcdef"
URL = f"postgresql://coachntt:{SECRET}@postgres:5432/coachntt_prod"
SHARED = f"postgresql://coachntt:{SECRET}@10.201.0.20:5432/coachntt_prod"


class Ops:
    def __init__(self, settings):
        self.settings, self.context, self.where = settings, object(), APP1
        self.dry = self.json = self.diff = False


def layout(defaults, **roles) -> Settings:
    defaults["roles"] = {"app": [APP1, APP2], "lb": "", "db": PRIMARY, "replica": [], **roles}
    return Settings("production", defaults)


# --- db.primary: the primary published, each app host's DATABASE_URL naming it ---------------


def primary_run(defaults, fake_host, monkeypatch, *, current: str, url: str = URL):
    settings = layout(defaults)
    app = App.from_settings(settings)
    private: dict[str, tuple[str, str]] = {}

    class Host(fake_host):
        def put_private(self, text, remote):
            private[remote] = (self.label, text)

    digest = hashlib.sha256((current + "\n").encode()).hexdigest()
    url_probe = db.database_url_step(app, "10.201.0.20", "", "x").probes["url"]
    port_probe = db.published_step(app, "10.201.0.20", "").probes["port"]
    hosts = {PRIMARY: Host({port_probe: ("", 1)}, replies={"s/^DATABASE_URL=//p": (0, url + "\n", "")}, label=PRIMARY),
             **{login: Host({url_probe: (digest, 0)}, label=login) for login in (APP1, APP2)}}
    monkeypatch.setattr(db, "connect_to", lambda _c, _s, login: hosts[login])
    db.primary.body.__wrapped__(Ops(settings))
    return hosts, private


def test_each_app_host_gets_the_primarys_url_at_its_address_as_a_private_file(defaults, fake_host, monkeypatch, capsys):
    hosts, private = primary_run(defaults, fake_host, monkeypatch, current=URL)
    assert sorted(label for label, _ in private.values()) == [APP1, APP2]
    assert {text for _, text in private.values()} == {SHARED}, "the primary's own URL, its host its private address"
    for login in (APP1, APP2):
        (change,) = [c for c in hosts[login].changes_sent if " db-replication " in c]
        path = change.split()[-1]
        assert private[path][0] == login and " database-url /opt/coachntt/.env.production " in change
    assert any(" db-replication publish /opt/coachntt 10.201.0.20" in c for c in hosts[PRIMARY].changes_sent)
    sent = [c for h in hosts.values() for c in h.sent]
    assert not [c for c in sent if SECRET in c], "the password is never on a command line"
    assert SECRET not in capsys.readouterr().out


def test_an_app_host_already_naming_the_primary_is_left_alone(defaults, fake_host, monkeypatch):
    hosts, private = primary_run(defaults, fake_host, monkeypatch, current=SHARED)
    assert private == {} and hosts[APP1].changes_sent == [] and hosts[APP2].changes_sent == []


def test_a_primary_without_a_usable_database_url_is_refused_before_any_change(defaults, fake_host, monkeypatch):
    with pytest.raises(OpsError, match="no DATABASE_URL of the form"):
        primary_run(defaults, fake_host, monkeypatch, current=URL, url="")


def test_without_roles_db_it_is_bad_usage(defaults):
    with pytest.raises(UsageError, match="db.primary needs roles.db"):
        db.primary.body.__wrapped__(Ops(layout(defaults, db="")))


# --- where the database is: scripts/database-location.sh, run for real ----------------------


@pytest.mark.parametrize("line,where", [
    ("DATABASE_URL=postgresql://u:p@postgres:5432/db", "here"),
    ("DATABASE_URL=postgresql://u:p@pgbouncer:6432/db?sslmode=disable", "here"),
    ("DATABASE_URL=postgresql://u:p@127.0.0.1:5432/db", "here"),
    ("POSTGRES_USER=u", "here"),
    ("DATABASE_URL=postgresql://u:p@10.201.0.20:5432/db", "elsewhere 10.201.0.20:5432"),
    ("DATABASE_URL=postgresql://u:p@10.201.0.20/db", "elsewhere 10.201.0.20:5432"),
])
def test_the_location_is_read_from_database_url_and_never_prints_it(tmp_path, line, where):
    env = tmp_path / ".env.production"
    env.write_text(f"JWT_SECRET=x\n{line}\n")
    script = (PROJECT_DIR / "scripts" / "database-location.sh").read_text() + '\ndatabase_location "$1"'
    out = subprocess.run(["sh", "-c", script, "location", str(env)], capture_output=True, text=True, timeout=10)
    assert (out.returncode, out.stdout.strip()) == (0, where)
    assert ":p@" not in out.stdout


def test_the_release_probe_is_that_script_with_every_value_quoted(defaults):
    app = App.from_settings(layout(defaults))
    probe = database_location.probe(app)
    assert probe.startswith("sh -c ") and probe.endswith(" database /opt/coachntt/.env.production ccp_postgres coachntt coachntt_prod")


# --- an app host whose database is elsewhere: preflight, backup host, breaking migrations ----


def host_state(database: tuple[str, int], released: bool = True) -> HostState:
    facts = {name: ProbeResult("x", 0) for name in ("head", "env", "docker", "nginx", "disk")}
    facts["database"] = ProbeResult(*database)
    log = [Release(sha="a" * 40, kind="deploy", result="ok", schema="6")] if released else []
    return HostState(log=log, head="a" * 40,
                     facts=facts, layout=SimpleNamespace(include=True, site_uses_slots=True))


def test_a_database_elsewhere_that_does_not_answer_stops_the_preflight(defaults, monkeypatch):
    app = App.from_settings(layout(defaults))
    monkeypatch.setattr(app_module.state, "current_release", lambda log: None)
    problem = preflight_error(host_state(("elsewhere 10.201.0.20:5432", 1)), app, APP1)
    assert problem is not None and "the database at 10.201.0.20:5432 (DATABASE_URL) does not answer" in problem.one_line()
    assert preflight_error(host_state(("elsewhere 10.201.0.20:5432", 0)), app, APP1) is None


def test_the_backup_is_taken_on_roles_db_only_when_it_is_the_host_database_url_names(defaults):
    ops = Ops(layout(defaults))
    assert database_location.backup_login(ops, host_state(("elsewhere 10.201.0.20:5432", 0)).database_elsewhere) == PRIMARY
    assert database_location.backup_login(ops, host_state(("here", 0)).database_elsewhere) == ""
    with pytest.raises(ConfigError, match=r"is on 10.201.0.99:5432 \(DATABASE_URL\), but roles.db is coachntt@10.201.0.20"):
        database_location.backup_login(ops, host_state(("elsewhere 10.201.0.99:5432", 0)).database_elsewhere)
    with pytest.raises(ConfigError, match="roles.db is not set"):
        database_location.backup_login(Ops(layout(defaults, db="", app=[])), "10.201.0.20:5432")


def test_breaking_migrations_on_a_shared_database_are_refused(defaults, fake_host):
    ops = Ops(layout(defaults))
    ops.reporter = SimpleNamespace(info=print)
    app = App.from_settings(ops.settings)
    marked = "b" * 40 + ":migrations/0007_rename.sql:-- breaking: renames notes.text\n"
    host = fake_host(replies={"git grep": (0, marked, "")})
    with pytest.raises(UsageError, match="breaking migrations .*shared on 10.201.0.20:5432"):
        deploy_task.breaking_migrations(ops, host, app, "b" * 40, host_state(("elsewhere 10.201.0.20:5432", 0)), force=True)


def test_the_migration_starts_no_database_container_of_its_own(defaults, fake_host):
    app = App.from_settings(layout(defaults))
    host = fake_host()
    deploy_task.migrate(host, app, "b" * 40, SimpleNamespace(service="api_b"))
    assert any("run --rm -T --no-deps api_b python -m scripts.migrate" in c for c in host.sent)


# --- monitor.check on such a host: the primary asked, PgBouncer and backups left to it ------


def test_monitor_check_asks_the_primary_and_leaves_pgbouncer_and_backups_to_the_db_host(defaults):
    cfg = checks.CheckConfig.from_settings(layout(defaults))
    facts = {name: ProbeResult("", 0) for name in checks.PROBES}
    facts.update(health=ProbeResult("200 0.01 a", 0), now=ProbeResult("1700000000", 0),
                 database=ProbeResult("elsewhere 10.201.0.20:5432\naccepting connections", 0),
                 services=ProbeResult("[]", 0), backups=ProbeResult("", 4), pgbouncer=ProbeResult("", 1))
    names = {c.name: c for c in checks.evaluate(facts, cfg)}
    assert "pgbouncer" not in names and "backup age" not in names
    assert names["database"].status == checks.PASS and names["database"].detail.startswith("10.201.0.20:5432 (roles.db)")
    facts["database"] = ProbeResult("elsewhere 10.201.0.20:5432\nno response from 10.201.0.20:5432", 2)
    down = {c.name: c for c in checks.evaluate(facts, cfg)}["database"]
    assert down.status == checks.FAIL and "no response" in down.detail and "10.201.0.20:5432" in down.remedy
    facts["database"] = ProbeResult("accepting connections", 0)
    assert {"pgbouncer", "backup age"} <= {c.name for c in checks.evaluate(facts, cfg)}, "the single VPS keeps its rows"
