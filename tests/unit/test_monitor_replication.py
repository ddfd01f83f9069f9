"""monitor.check's replication row as data: the replication probe's frames on a primary
and a standby judged against roles.replica and thresholds.replication_lag_seconds_max,
no row where it was not asked or there is no database, the command that asks only
when the layout has replicas, and the script's probe run here with a stand-in docker."""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from stand_ins import script_path

from fabfile import monitor
from fabfile.core import checks
from fabfile.core.batch import ProbeResult, parse_batch
from fabfile.core.errors import OpsError
from fabfile.core.settings import Settings, validate
from fabfile.core.task import Ops, run_body

REPLICAS = ["coachntt@10.0.0.21", "coachntt@10.0.0.22"]


@pytest.fixture
def layout(defaults) -> dict:
    """Settings of a layout with a primary and two replicas."""
    values = copy.deepcopy(defaults)
    values["roles"].update(app=["coachntt@10.0.0.11"], db="coachntt@10.0.0.20", replica=list(REPLICAS))
    return values


@pytest.fixture
def cfg(layout) -> checks.CheckConfig:
    return checks.CheckConfig.from_settings(validate(Settings("production", layout)))


def row(answer: tuple[str, int], cfg: checks.CheckConfig) -> list[checks.Check]:
    return checks.replication(ProbeResult(*answer), cfg, checks.remedies(cfg))


PRIMARY_BOTH = "primary 2\nreplica 10.0.0.21 streaming 0 0\nreplica 10.0.0.22 streaming 0 0"


@pytest.mark.parametrize("answer,status,detail,remedy", [
    ((PRIMARY_BOTH, 0), checks.PASS, "primary: 2 of 2 streaming, lag 0 s / 0 B (max 30 s)", ""),
    (("primary 1\nreplica 10.0.0.21 streaming 0 0", 0), checks.FAIL, "primary: 1 of 2 streaming, lag 0 s / 0 B (max 30 s)",
     "run `fab -H coachntt@10.0.0.22 db.replica`, then read the replica's PostgreSQL log "
     "(`docker logs --tail 50 ccp_postgres` on it)"),
    (("primary 1\nreplica 10.0.0.21 streaming 0 0\nreplica 10.0.0.22 catchup 0 -", 0), checks.FAIL,
     "1 of 2 streaming", "`fab -H coachntt@10.0.0.22 db.replica`"),
    (("primary 0", 0), checks.FAIL, "primary: 0 of 2 streaming",
     "`fab -H coachntt@10.0.0.21,coachntt@10.0.0.22 db.replica`"),
    (("primary 2\nreplica 10.0.0.21 streaming 30 0\nreplica 10.0.0.22 streaming 2 0", 0), checks.PASS,
     "lag 30 s / 0 B (max 30 s)", ""),  # at the threshold
    (("primary 2\nreplica 10.0.0.21 streaming 0 0\nreplica 10.0.0.22 streaming 45 8388608", 0), checks.FAIL,
     "primary: 2 of 2 streaming, lag 45 s / 8.0 MiB (max 30 s); behind: 10.0.0.22",
     "read the replica's PostgreSQL log (`docker logs --tail 50 ccp_postgres` on it), its disk I/O"),
    (("standby streaming 0 0 10.0.0.20", 0), checks.PASS, "standby streaming from 10.0.0.20, lag 0 s / 0 B (max 30 s)", ""),
    (("standby none 0 0 -", 0), checks.FAIL, "standby none no primary, lag 0 s / 0 B",
     "read this replica's PostgreSQL log (`docker logs --tail 50 ccp_postgres`) and check the primary is up; "
     "`db.replica` on this host sets streaming up again"),
    (("standby startup 12 2048 10.0.0.20", 0), checks.FAIL, "standby startup from 10.0.0.20, lag 12 s / 2.0 KiB",
     "`db.replica` on this host"),
    (("standby streaming 31 1536 10.0.0.20", 0), checks.FAIL, "lag 31 s / 1.5 KiB (max 30 s)", "the network to the primary"),
    (("Error response from daemon: container ccp_postgres is not running", 2), checks.FAIL,
     "ccp_postgres: Error response from daemon: container ccp_postgres is not running", "docker compose up -d postgres"),
    (('psql: error: connection to server on socket "/var/run/postgresql/.s.PGSQL.5432" failed', 2), checks.FAIL,
     "ccp_postgres: psql: error: connection", "docker logs --tail 50 ccp_postgres"),
    (("", 0), checks.FAIL, "cannot read the replication state of ccp_postgres", "docker compose up -d postgres"),
])
def test_each_frame_is_one_row_with_what_was_seen_and_a_remedy_when_it_fails(cfg, answer, status, detail, remedy):
    [found] = row(answer, cfg)
    assert (found.name, found.status) == ("replication", status), found
    assert detail in found.detail
    assert (remedy in found.remedy) if remedy else found.remedy == ""


def test_a_primary_with_host_names_in_the_layout_names_every_replica_it_cannot_match(cfg):
    named = replace(cfg, replicas=("coachntt@db2.example.com", "coachntt@db3.example.com"))
    [found] = row(("primary 1\nreplica 172.17.0.1 streaming 0 0", 0), named)
    assert "`fab -H coachntt@db2.example.com,coachntt@db3.example.com db.replica`" in found.remedy


def test_a_lower_threshold_fails_the_same_lag(cfg):
    answer = ("standby streaming 20 0 10.0.0.20", 0)
    assert row(answer, cfg)[0].status == checks.PASS
    assert row(answer, replace(cfg, replication_lag_seconds_max=10))[0].status == checks.FAIL


def test_no_database_container_on_this_host_is_no_row(cfg):
    """An app host of the layout: its database row says whether a database should run there."""
    assert row(("no container ccp_postgres", checks.NO_DB_CONTAINER), cfg) == []


def all_failing() -> dict[str, ProbeResult]:
    return {name: ProbeResult("", 1) for name in checks.PROBES}


def test_the_row_follows_the_database_row_and_is_absent_when_not_asked(cfg):
    asked = [c.name for c in checks.evaluate({**all_failing(), "replication": ProbeResult(PRIMARY_BOTH, 0)}, cfg)]
    assert asked[:4] == ["api health", "database", "replication", "pgbouncer"]
    assert "replication" not in [c.name for c in checks.evaluate(all_failing(), cfg)]


def test_the_json_row_carries_the_lag_in_seconds_and_bytes(cfg):
    found = row(("primary 1\nreplica 10.0.0.21 streaming 3 1024\nreplica 10.0.0.22 catchup 7 2048", 0), cfg)
    [record] = [json.loads(line) for line in checks.json_lines(found, "coachntt@10.0.0.20")]
    assert record == {"host": "coachntt@10.0.0.20", "check": "replication", "status": "fail",
                      "detail": "primary: 1 of 2 streaming, lag 7 s / 2.0 KiB (max 30 s)", "remedy": found[0].remedy,
                      "value": 7.0, "limit": 30, "streaming": 1, "replicas": 2, "lag_seconds": 7.0, "lag_bytes": 2048}
    [standby] = [json.loads(line) for line in checks.json_lines(row(("standby streaming 2 512 10.0.0.20", 0), cfg), "r")]
    assert (standby["lag_seconds"], standby["lag_bytes"]) == (2.0, 512)


# -- the command: asked only when the layout has replicas ------------------------------


def test_the_command_asks_for_replication_only_when_told(cfg):
    asked = shlex.split(checks.command(cfg, "@@m", replication=True))
    plain = shlex.split(checks.command(cfg, "@@m"))
    assert asked[17:] == ["100", "replication=yes", "env=/opt/coachntt/.env.production", "/", "/var/lib/docker", "/backups"]
    assert plain[17:] == ["100", "replication=no", "env=/opt/coachntt/.env.production", "/", "/var/lib/docker", "/backups"]
    assert checks.probes(True) == (*checks.PROBES, "replication") and "replication" not in checks.probes(False)


def test_the_layouts_replicas_decide_whether_monitor_check_asks(cfg, defaults):
    single = checks.CheckConfig.from_settings(Settings("production", defaults))
    assert (single.replicas, single.replication) == ((), False)
    assert (cfg.replicas, cfg.replication, cfg.replication_lag_seconds_max) == (tuple(REPLICAS), True, 30)


def framed(facts: dict[str, tuple[str, int]], marker: str) -> str:
    return "".join(f"{marker} begin {name}\n{out}\n{marker} end {name} {status}\n" for name, (out, status) in facts.items())


def test_monitor_check_on_a_layout_with_replicas_sends_one_command_that_asks(layout, project_context, fake_host, mocker,
                                                                              capsys):
    from fabfile.core import task as task_module

    mocker.patch.object(checks.secrets, "token_hex", return_value="feed")
    answers = {name: ("", 1) for name in checks.PROBES}
    answers["replication"] = ("primary 1\nreplica 10.0.0.21 streaming 0 0", 0)
    host = fake_host(replies={"monitor-check": (0, framed(answers, "@@coachntt-feed"), "")}, label="coachntt@10.0.0.20")
    mocker.patch.object(task_module, "target_for", return_value=host)
    ops = Ops(project_context, json=True, settings=validate(Settings("production", layout)))
    with pytest.raises(OpsError, match="replication"):
        run_body(monitor.check, ops)
    assert len(host.sent) == 1 and " replication=yes " in host.sent[0]
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert next(r for r in records if r.get("check") == "replication")["streaming"] == 1


@pytest.mark.parametrize("env,words", [
    ({"COACHNTT_THRESHOLDS__REPLICATION_LAG_SECONDS_MAX": "0"}, "thresholds.replication_lag_seconds_max must be a whole number"),
    ({"COACHNTT_THRESHOLDS__REPLICATION_LAG_SECONDS_MAX": "soon"}, "must be a number, got 'soon'"),
])
def test_a_bad_lag_threshold_is_one_line_exit_2_before_connecting(refused_before_connecting, env, words):
    refused = refused_before_connecting(monitor.check, env=env)
    assert refused.code == 2 and words in refused.message and "\n" not in refused.message


# -- the script's probe, run by bash here with a stand-in docker -------------------------

PLAIN_TOOLS = ("sh", "bash", "cat", "mktemp", "rm", "timeout", "sleep", "df")
STAND_IN_DOCKER = """#!/bin/sh
printf '%s\\n' "$@" > "{log}"
cat > "{log}.stdin"
{answer}
"""


@pytest.fixture
def monitor_sh(cfg, tmp_path):
    """monitor-check.sh with a PATH of plain tools and a stand-in docker that records its
    arguments and stdin and gives `answer` (shell); curl is absent: the other probes fail."""

    def run(answer: str, *, replication: bool | None) -> tuple[dict[str, ProbeResult], Path]:
        log = tmp_path / "docker.args"
        bin_dir = script_path(tmp_path / "bin", PLAIN_TOOLS, {"docker": STAND_IN_DOCKER.format(log=log, answer=answer)})
        here = replace(cfg, disk_paths=(str(tmp_path),), backup_dir=str(tmp_path), cpu_sample_ms=50,
                       cert_file=str(tmp_path / "none.pem"))
        words = shlex.split(checks.command(here, "@@t", replication=bool(replication)))
        if replication is None:  # a caller from before the replication word
            words.remove("replication=no")
        result = subprocess.run(words, capture_output=True, text=True, timeout=60, env={"PATH": str(bin_dir)})
        return parse_batch(result.stdout, "@@t"), log

    return run


def test_asked_the_probe_runs_one_psql_in_the_container_with_one_statement_on_stdin(monitor_sh, cfg, tmp_path):
    facts, log = monitor_sh("printf 'primary 2\\nreplica 10.0.0.21 streaming 0 0\\nreplica 10.0.0.22 streaming 1 4096\\n'",
                            replication=True)
    assert set(facts) == set(checks.probes(True))
    assert facts["replication"] == ProbeResult("primary 2\nreplica 10.0.0.21 streaming 0 0\nreplica 10.0.0.22 streaming 1 4096", 0)
    assert log.read_text().splitlines() == ["exec", "-i", "ccp_postgres", "psql", "-AtX", "-v", "ON_ERROR_STOP=1",
                                            "-U", "coachntt", "-d", "coachntt_prod"]
    sql = (tmp_path / "docker.args.stdin").read_text()
    assert "pg_stat_replication" in sql and "pg_stat_wal_receiver" in sql and sql.count(";") == 1, "one statement"
    assert "coachntt" not in sql and "ccp_postgres" not in sql, "no value from settings in the SQL"
    assert facts["disk"].lines[0].split()[0] == str(tmp_path), "the disk paths after the word"
    [found] = checks.replication(facts["replication"], cfg, checks.remedies(cfg))
    assert (found.status, found.detail) == (checks.PASS, "primary: 2 of 2 streaming, lag 1 s / 4.0 KiB (max 30 s)")


@pytest.mark.parametrize("replication", [False, None])
def test_not_asked_there_is_no_probe_and_no_docker_exec(monitor_sh, tmp_path, replication):
    facts, log = monitor_sh("printf 'primary 0\\n'", replication=replication)
    assert set(facts) == set(checks.PROBES)
    assert not log.exists(), "docker never ran"
    assert facts["disk"].lines[0].split()[0] == str(tmp_path), "the argument order from before the word still works"


@pytest.mark.parametrize("answer,status,said", [
    ("echo 'Error response from daemon: No such container: ccp_postgres' >&2; exit 1", checks.NO_DB_CONTAINER,
     "no container ccp_postgres"),
    ("echo 'Error response from daemon: container ccp_postgres is not running' >&2; exit 1", 2,
     "Error response from daemon: container ccp_postgres is not running"),
    ("echo 'psql: error: connection to server failed' >&2; echo 'second line' >&2; exit 2", 2,
     "psql: error: connection to server failed"),
])
def test_a_missing_container_is_status_3_and_any_other_failure_2_with_its_first_line(monitor_sh, answer, status, said):
    facts, _ = monitor_sh(answer, replication=True)
    assert facts["replication"] == ProbeResult(said, status)
