"""db.replica as data: the layout it needs, each step's plan from facts, and the
refusals that keep a replica host's own database untouched."""

from __future__ import annotations

import shlex

import pytest

from fabfile import db
from fabfile.core.batch import ProbeResult
from fabfile.core.errors import ConfigError, OpsError, UsageError
from fabfile.core.layout import check
from fabfile.core.settings import Settings

PRIMARY, REPLICA = "root@10.201.0.20", "root@10.201.0.21"


def replication(defaults, **roles) -> db.Replication:
    defaults["roles"] = {"app": [], "lb": "", "db": PRIMARY, "replica": [REPLICA], **roles}
    settings = Settings("production", defaults)
    return db.Replication(settings, check(settings.get("roles")))


def probe(stdout: str = "", status: int = 0) -> ProbeResult:
    return ProbeResult(stdout, status)


# --- the layout it needs, before any connection ---------------------------------------


def test_without_a_replica_it_refuses_as_bad_usage(defaults):
    with pytest.raises(UsageError, match="roles.db .* and roles.replica"):
        replication(defaults, replica=[])


def test_a_host_named_by_a_name_not_an_address_is_refused(defaults):
    with pytest.raises(ConfigError, match="private IPv4 address"):
        replication(defaults, replica=["root@replica.example.net"])


def test_without_app_hosts_the_read_only_url_goes_to_the_primarys_host(defaults):
    rep = replication(defaults)
    assert [m.login.login for m in rep.app_hosts] == [PRIMARY]
    rep = replication(defaults, app=["root@10.201.0.30", "root@10.201.0.31"])
    assert [m.login.login for m in rep.app_hosts] == ["root@10.201.0.30", "root@10.201.0.31"]


# --- the primary ------------------------------------------------------------------------


def test_publishing_is_ok_only_on_the_hosts_own_address(defaults):
    rep = replication(defaults)
    step = db.published_step(rep.app, "10.201.0.20", "PostgreSQL restarted once")
    assert step.plan({"port": probe("10.201.0.20:5432\n")}).changes == ()
    plan = step.plan({"port": probe("127.0.0.1:5432\n")})
    (change,) = plan.changes
    assert "published on 10.201.0.20:5432" in change.summary
    publish, recreate, verify = change.command.split(" db-replication ", 1)[1].splitlines()
    assert publish == "publish /opt/coachntt 10.201.0.20"
    assert recreate.endswith("up -d --wait --no-deps postgres")
    assert verify.startswith("docker port ccp_postgres 5432/tcp | grep -qxF 10.201.0.20:5432 ||")
    # A container that is not there (a new replica) is started the same way.
    assert db.published_step(rep.app, "10.201.0.21", "started").plan({"port": probe("", 1)}).changes


def test_the_password_is_generated_only_when_missing(defaults):
    step = db.password_step(replication(defaults))
    assert step.plan({"password": probe("yes\n")}).changes == ()
    (change,) = step.plan({"password": probe("no\n")}).changes
    assert change.command.endswith("password /opt/coachntt/.env.production")


PRIMARY_READY = """recovery f
role yes
slot coachntt_10_201_0_21
hba coachntt_replicator 10.201.0.21/32
keep 2GB
receiver none
"""


def test_a_primary_with_role_slot_access_and_bound_is_ok(defaults):
    step = db.replication_step(replication(defaults))
    assert step.plan({"db": probe(PRIMARY_READY)}).changes == ()


@pytest.mark.parametrize(("line", "missing"), [
    ("role yes", "role coachntt_replicator"),
    ("slot coachntt_10_201_0_21", "slot coachntt_10_201_0_21"),
    ("hba coachntt_replicator 10.201.0.21/32", "pg_hba.conf line for 10.201.0.21"),
    ("keep 2GB", "max_slot_wal_keep_size 2GB"),
])
def test_each_missing_piece_is_named_and_granted_in_one_change(defaults, line, missing):
    rep = replication(defaults)
    facts = PRIMARY_READY.replace(line + "\n", "role noreplication\n" if line.startswith("role") else "keep -1\n"
                                  if line.startswith("keep") else "")
    (change,) = db.replication_step(rep).plan({"db": probe(facts)}).changes
    assert change.summary == f"replication: {missing}"
    words = shlex.split(change.command.split(" db-replication ", 1)[1])
    assert words == ["grant", "ccp_postgres", "coachntt", "coachntt_prod", "/opt/coachntt/.env.production",
                     "coachntt_replicator", "2GB", "coachntt_10_201_0_21=10.201.0.21"]


def test_a_primary_whose_database_does_not_answer_stops_with_what_to_do(defaults):
    with pytest.raises(OpsError, match="does not answer on the primary") as raised:
        db.replication_step(replication(defaults)).plan({"db": probe("", 1)})
    assert "rerun db.replica" in raised.value.one_line()


# --- the replica ------------------------------------------------------------------------


def copy_plan(defaults, held: str, image: ProbeResult | None = None):
    rep = replication(defaults)
    step = db.copy_step(rep, rep.replicas[0], "/tmp/coachntt-ops.abc.secret")
    return step.plan({"volume": probe(held + "\n"), "image": image or probe("coachntt/postgres:17-trixie\n")})


def test_an_empty_volume_gets_the_primarys_copy_with_its_own_slot(defaults):
    (change,) = copy_plan(defaults, "empty").changes
    words = shlex.split(change.command.split(" db-replication ", 1)[1])
    assert words == ["copy", "coachntt_pgdata", "coachntt/postgres:17-trixie", "10.201.0.20", "coachntt_replicator",
                     "coachntt_10_201_0_21", "/tmp/coachntt-ops.abc.secret"]


def test_a_standby_is_left_as_it_is(defaults):
    assert copy_plan(defaults, "standby").changes == ()


def test_a_volume_with_a_database_of_its_own_is_refused_and_never_copied_into(defaults):
    with pytest.raises(OpsError, match="holds a database of its own") as raised:
        copy_plan(defaults, "database")
    assert "nothing was changed" in raised.value.one_line()


def test_a_replica_without_the_compose_file_is_told_to_set_up_like_an_app_host(defaults):
    with pytest.raises(OpsError, match="no postgres service in the compose file") as raised:
        copy_plan(defaults, "empty", image=probe("", 1))
    assert "deploy.setup" in raised.value.one_line()


def test_streaming_is_waited_for_unless_the_receiver_streams(defaults):
    step = db.streaming_step(replication(defaults))
    assert step.plan({"db": probe("recovery t\nreceiver streaming\n")}).changes == ()
    (change,) = step.plan({"db": probe("", 1)}).changes
    assert change.command.endswith("streaming ccp_postgres coachntt coachntt_prod 120")


def test_the_read_only_url_names_every_replica(defaults):
    rep = replication(defaults, replica=[REPLICA, "root@10.201.0.22"])
    step = db.readonly_url_step(rep)
    assert step.plan({"url": probe("current\n")}).changes == ()
    (change,) = step.plan({"url": probe("differs\n")}).changes
    assert change.command.endswith("readonly-url /opt/coachntt/.env.production set 10.201.0.21:5432 10.201.0.22:5432")
    with pytest.raises(OpsError, match="no DATABASE_URL"):
        step.plan({"url": probe("", 1)})


def test_facts_lines_group_by_key():
    assert db.parse_facts("slot a\nslot b\nrole yes\n\n") == {"slot": ["a", "b"], "role": ["yes"]}


# --- the task: every host planned before any change, the password never on a command line ---


class Ops:
    def __init__(self, settings, context):
        self.settings, self.context = settings, context
        self.dry = self.json = self.diff = False


def hosts_for(defaults, fake_host, volume: str):
    """The primary (also the app host) and the replica as FakeHosts answering every probe."""
    rep = replication(defaults)
    private: dict[str, str] = {}

    class Host(fake_host):
        def put_private(self, text, remote):
            private[remote] = text

    def answers(steps, values):
        return {cmd: values[name] for step in steps for name, cmd in step.probes.items()}

    primary_steps = [db.published_step(rep.app, "10.201.0.20", ""), db.password_step(rep), db.replication_step(rep),
                     db.readonly_url_step(rep)]
    replica_steps = [db.copy_step(rep, rep.replicas[0], "x"), db.published_step(rep.app, "10.201.0.21", ""),
                     db.streaming_step(rep)]
    primary = Host(answers(primary_steps, {"port": ("127.0.0.1:5432", 0), "password": ("no", 0),
                                           "db": ("recovery f\nrole no\nkeep -1", 0), "url": ("differs", 0)}),
                   replies={"s/^REPLICATION_PASSWORD=//p": (0, "0123456789abcdef0123\n", "")}, label=PRIMARY)
    replica = Host(answers(replica_steps, {"volume": (volume, 0), "image": ("coachntt/postgres:17-trixie", 0),
                                           "port": ("", 1), "db": ("", 1)}), label=REPLICA)
    return {PRIMARY: primary, REPLICA: replica}, private


def run_replica(defaults, monkeypatch, hosts):
    defaults["roles"] = {"app": [], "lb": "", "db": PRIMARY, "replica": [REPLICA]}
    monkeypatch.setattr(db, "connect_to", lambda _c, _s, login: hosts[login])
    db.replica.body.__wrapped__(Ops(Settings("production", defaults), context=object()))


def test_a_replica_with_its_own_database_stops_the_run_before_any_host_changes(defaults, fake_host, monkeypatch):
    hosts, private = hosts_for(defaults, fake_host, "database")
    with pytest.raises(OpsError, match="holds a database of its own"):
        run_replica(defaults, monkeypatch, hosts)
    assert [h.changes_sent for h in hosts.values()] == [[], []] and private == {}


def test_the_password_reaches_the_replica_as_a_private_file_the_copy_reads(defaults, fake_host, monkeypatch, capsys):
    hosts, private = hosts_for(defaults, fake_host, "empty")
    run_replica(defaults, monkeypatch, hosts)
    ((path, password),) = private.items()
    assert password == "0123456789abcdef0123"
    (copy,) = [c for c in hosts[REPLICA].changes_sent if " db-replication copy " in c]
    assert copy.endswith(f" {path}") or f" {path}\n" in copy
    sent = [c for h in hosts.values() for c in h.sent]
    assert not [c for c in sent if password in c]
    assert password not in capsys.readouterr().out
    # The primary first (published, password, replication), then the replica, then the app host.
    assert [c.split(" db-replication ", 1)[1].split()[0] for c in hosts[PRIMARY].changes_sent
            if " db-replication " in c] == ["publish", "password", "grant", "readonly-url"]
