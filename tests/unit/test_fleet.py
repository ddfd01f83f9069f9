"""core/fleet.py: hosts in parallel (bounded), per-host results and output, one table or
JSON per host, the worst host's exit code; Fabric's per-host calls gathered into one."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fabric.tasks import ConnectionCall
from invoke import Call
from invoke.exceptions import Exit

from fabfile.core import fleet, layout
from fabfile.core.errors import EXIT_CONNECT, EXIT_FAILED, EXIT_INTERRUPTED, ConnectError, LockHeldError, OpsError
from fabfile.core.fleet import CHANGES, READS, FleetCall, FleetContext, HostResult
from fabfile.core.settings import PROJECT_DIR
from fabfile.core.task import ops_task

BIN = Path(sys.executable).parent
HOSTS = [f"root@10.201.0.{n}" for n in range(11, 16)]


def members(*logins: str, roles: tuple[str, ...] = ()) -> list[layout.Member]:
    return [layout.Member(layout.parse_login(login), roles) for login in logins]


def result(login: str, status: str, code: int = 0, line: str = "", output=(), roles=()) -> HostResult:
    return HostResult(members(login, roles=roles)[0], status, code, line, list(output), seconds=0.5)


# --- running -------------------------------------------------------------------------


def test_every_host_runs_once_and_its_outcome_is_its_own():
    def work(member):
        host = member.login.host
        print(f"{member.login.login}: looked")
        if host.endswith(".12"):
            raise OpsError(f"2 of 10 checks fail on {member.login.login}: disk /", "see above")
        if host.endswith(".13"):
            raise ConnectionRefusedError()
        if host.endswith(".14"):
            raise LockHeldError("the deploy lock is held", "wait")

    results = fleet.run(members(*HOSTS), work, parallel=5)
    assert [(r.host, r.status, r.exit_code) for r in results] == [
        (HOSTS[0], "ok", 0), (HOSTS[1], "failed", 1), (HOSTS[2], "unreachable", 3), (HOSTS[3], "failed", 4),
        (HOSTS[4], "ok", 0)]
    assert results[1].line == f"2 of 10 checks fail on {HOSTS[1]}: disk /; see above"
    assert results[2].line.startswith(f"cannot reach {HOSTS[2]}: connection refused")
    assert [r.output for r in results] == [[f"{h}: looked"] for h in HOSTS]
    assert results[0].summary == "looked"
    assert fleet.exit_code(results) == 4


def test_at_most_parallel_hosts_run_at_once():
    running, most, lock = [0], [0], threading.Lock()

    def work(member):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1

    started = time.monotonic()
    results = fleet.run(members(*HOSTS, "root@10.201.0.16"), work, parallel=2)
    assert most[0] == 2
    assert {r.status for r in results} == {"ok"}
    assert time.monotonic() - started >= 0.15  # three turns of two
    starts = sorted(r.started for r in results)
    assert starts[2] >= 0.04 and starts[4] >= 0.09


def test_hosts_run_in_parallel_not_one_after_another():
    gate = threading.Barrier(len(HOSTS), timeout=5)  # breaks (fails) unless all hosts run together
    results = fleet.run(members(*HOSTS), lambda member: gate.wait(), parallel=20)
    assert {r.status for r in results} == {"ok"}


def test_each_hosts_output_is_kept_apart_and_the_main_thread_still_prints(capsys):
    turn = threading.Barrier(2, timeout=5)

    def work(member):
        for n in range(3):
            print(f"{member.login.host} line {n}")
            turn.wait()  # the two hosts print in lockstep: their lines would interleave

    results = fleet.run(members(HOSTS[0], HOSTS[1]), work, parallel=2)
    assert results[0].output == [f"10.201.0.11 line {n}" for n in range(3)]
    assert results[1].output == [f"10.201.0.12 line {n}" for n in range(3)]
    assert capsys.readouterr().out == ""
    print("after")
    assert capsys.readouterr().out == "after\n"
    assert sys.stdout is not None and not isinstance(sys.stdout, fleet.PerThreadStdout)


def test_a_bug_on_one_host_still_lets_the_others_finish_then_shows_its_traceback():
    seen = []

    def work(member):
        if member.login.host.endswith(".11"):
            raise ValueError("a bug")
        time.sleep(0.02)
        seen.append(member.login.host)

    with pytest.raises(ValueError, match="a bug"):
        fleet.run(members(*HOSTS[:3]), work, parallel=3)
    assert sorted(seen) == ["10.201.0.12", "10.201.0.13"]


def test_ctrl_c_starts_no_further_host_and_lets_the_running_one_finish():
    import _thread

    def work(member):
        if member.login.host.endswith(".11"):
            time.sleep(0.1)
            _thread.interrupt_main()  # Ctrl-C reaches the main thread while this host runs
            time.sleep(0.3)
            print(f"{member.login.login}: finished")

    with pytest.raises(KeyboardInterrupt) as info:
        fleet.run(members(*HOSTS[:3]), work, parallel=1)
    results = info.value.results
    assert [(r.status, r.summary) for r in results] == [
        ("ok", "finished"), ("not run", "not started (the run was interrupted)"),
        ("not run", "not started (the run was interrupted)")]
    assert fleet.exit_code(results) == EXIT_INTERRUPTED
    assert fleet.counts(results) == {"ok": 1, "failed": 0, "unreachable": 0, "not run": 2}


# --- verdict and rendering --------------------------------------------------------------


@pytest.mark.parametrize("statuses, code", [
    ([("ok", 0), ("ok", 0)], 0),
    ([("ok", 0), ("failed", EXIT_FAILED)], EXIT_FAILED),
    ([("failed", EXIT_FAILED), ("unreachable", EXIT_CONNECT), ("ok", 0)], EXIT_CONNECT),
    ([("ok", 0), ("not run", 0)], EXIT_INTERRUPTED),
    ([], 0),
])
def test_the_exit_code_is_the_worst_hosts(statuses, code):
    assert fleet.exit_code([result(HOSTS[i], s, c) for i, (s, c) in enumerate(statuses)]) == code


def test_the_table_has_a_row_per_host_and_the_counts():
    results = [result(HOSTS[0], "ok", output=[f"{HOSTS[0]}: 9 pass, 1 warn, 0 fail in 0.3s (1 round trip)"],
                      roles=("app", "lb")),
               result(HOSTS[1], "unreachable", 3, f"cannot reach {HOSTS[1]}: timed out; check the address")]
    lines = fleet.table(results, "monitor.check", 1.23)
    assert lines[0].split() == ["HOST", "ROLES", "RESULT", "TIME", "monitor.check"]
    assert lines[1].split()[:4] == [HOSTS[0], "app,lb", "ok", "0.5s"]
    assert lines[1].endswith("9 pass, 1 warn, 0 fail in 0.3s (1 round trip)")
    assert lines[2].split()[:4] == [HOSTS[1], "-", "unreachable", "0.5s"]
    assert lines[2].endswith(f"cannot reach {HOSTS[1]}: timed out; check the address")
    assert lines[1].index("ok") == lines[2].index("unreachable")  # columns line up
    assert lines[-1] == "monitor.check on 2 hosts in 1.2s: 1 ok, 0 failed, 1 unreachable"


def test_json_has_each_hosts_own_objects_then_one_per_host_then_the_counts():
    own = json.dumps({"host": HOSTS[0], "check": "memory", "status": "pass"})
    results = [result(HOSTS[0], "ok", output=[own, "not json"]), result(HOSTS[1], "failed", 1, "2 checks fail")]
    records = [json.loads(line) for line in fleet.json_lines(results, "monitor.check", 0.8)]
    assert records[0] == json.loads(own)
    assert records[1] == {"host": HOSTS[0], "roles": [], "task": "monitor.check", "result": "ok", "exit_code": 0,
                          "error": "", "started": 0.0, "seconds": 0.5}
    assert records[2]["result"] == "failed" and records[2]["error"] == "2 checks fail"
    assert records[3] == {"task": "monitor.check", "hosts": 2, "ok": 1, "failed": 1, "unreachable": 0, "seconds": 0.8,
                          "exit_code": 1}


def test_the_verdict_names_the_hosts_that_did_not_pass():
    results = [result(HOSTS[0], "ok"), result(HOSTS[1], "failed", 1, "x"), result(HOSTS[2], "unreachable", 3, "y")]
    assert fleet.verdict(results, "secure.audit", json=False) == (
        f"secure.audit: 2 of 3 hosts did not pass: 1 failed ({HOSTS[1]}); 1 unreachable ({HOSTS[2]}); "
        "each host's line is in the table above")


# --- the task decorator and Fabric's calls -----------------------------------------------


@ops_task(fleet=READS)
def probe(ops, word="hello"):
    """Touches no host: says its word, fails where told to."""
    host = ops.context.host
    if host.endswith(".12"):
        raise ConnectError(f"cannot reach {ops.where}: timed out", "check the address")
    print(f"{ops.where}: {word}")


@ops_task
def plain(ops):
    """Not a fleet task."""


def test_a_fleet_task_given_several_hosts_runs_once_per_host(project_context, capsys):
    context = FleetContext(project_context.config, HOSTS[:3])
    with pytest.raises(Exit) as info:
        probe(context, word="hi")
    assert info.value.code == EXIT_CONNECT
    assert info.value.message == (f"error: test_fleet.probe: 1 of 3 hosts did not pass: 1 unreachable ({HOSTS[1]}); "
                                  "each host's line is in the table above")
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [row[:3] for row in rows[1:4]] == [[HOSTS[0], "-", "ok"], [HOSTS[1], "-", "unreachable"], [HOSTS[2], "-", "ok"]]
    assert rows[1][-1] == "hi"


def test_a_host_list_or_layout_that_is_wrong_is_refused_before_any_host_runs(project_context, monkeypatch, capsys):
    with pytest.raises(Exit) as info:
        probe(FleetContext(project_context.config, [HOSTS[0], HOSTS[0]]))
    assert info.value.code == 2 and "given twice" in info.value.message
    monkeypatch.setenv("COACHNTT_ROLES__REPLICA", HOSTS[0])
    with pytest.raises(Exit) as info:
        probe(FleetContext(project_context.config, HOSTS[:2]))
    assert info.value.code == 2 and "a replica needs a primary" in info.value.message
    assert capsys.readouterr().out == ""


def test_without_h_the_layouts_hosts_run(project_context, monkeypatch, capsys):
    monkeypatch.setenv("COACHNTT_ROLES__APP", f"{HOSTS[0]},{HOSTS[2]}")
    monkeypatch.setenv("COACHNTT_ROLES__LB", HOSTS[3])
    probe(project_context)
    rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines()[1:4]]
    assert rows == [[HOSTS[0], "app", "ok"], [HOSTS[2], "app", "ok"], [HOSTS[3], "lb", "ok"]]


def test_the_fan_out_bound_comes_from_the_settings(project_context, monkeypatch, mocker):
    ran = mocker.spy(fleet, "run")
    monkeypatch.setenv("COACHNTT_FLEET__PARALLEL_READS", "3")
    probe(FleetContext(project_context.config, [HOSTS[0], HOSTS[2]]))
    assert ran.call_args.kwargs["parallel"] == 3
    monkeypatch.setenv("COACHNTT_FLEET__PARALLEL_READS", "0")
    with pytest.raises(Exit) as info:
        probe(FleetContext(project_context.config, [HOSTS[0], HOSTS[2]]))
    assert info.value.code == 2 and "fleet.parallel_reads must be a whole number of hosts from 1 to 100" in info.value.message


def test_fabrics_per_host_calls_of_a_fleet_task_become_one_call(project_context):
    per_host = [ConnectionCall(probe, init_kwargs={"host": h}, kwargs={"word": "x"}) for h in HOSTS[:3]]
    other = [ConnectionCall(plain, init_kwargs={"host": h}) for h in HOSTS[:2]]
    gathered = fleet.gather([*per_host, *other], HOSTS[:3])
    assert isinstance(gathered[0], FleetCall) and gathered[0].hosts == HOSTS[:3]
    assert gathered[0].task is probe and gathered[0].kwargs == {"word": "x"}
    assert gathered[1:] == other  # not a fleet task: Fabric's call per host, one after another
    same_twice = [ConnectionCall(probe, init_kwargs={"host": h}) for h in [HOSTS[0], HOSTS[0]]]
    assert [c.hosts for c in fleet.gather(same_twice, [HOSTS[0], HOSTS[0]])] == [[HOSTS[0]] * 2]  # refused later
    context = gathered[0].make_context(project_context.config)
    assert isinstance(context, FleetContext) and context.fleet_hosts == HOSTS[:3]


def test_one_host_stays_fabrics_own_call_and_different_arguments_stay_apart():
    one = [ConnectionCall(probe, init_kwargs={"host": HOSTS[0]})]
    assert fleet.gather(one, HOSTS[:1]) == one
    two_words = [ConnectionCall(probe, init_kwargs={"host": h}, kwargs={"word": w}) for h, w in zip(HOSTS[:2], "ab", strict=True)]
    assert fleet.gather(two_words, HOSTS[:2]) == two_words
    with_port = [ConnectionCall(probe, init_kwargs={"host": h, "port": 2222}) for h in HOSTS[:2]]
    assert fleet.gather(with_port, HOSTS[:2]) == with_port
    assert fleet.gather([Call(probe)], HOSTS[:2]) == [Call(probe)]
    twice = [ConnectionCall(probe, init_kwargs={"host": h}) for h in HOSTS[:2] * 2]  # fab -H a,b probe probe
    assert [c.hosts for c in fleet.gather(twice, HOSTS[:2])] == [HOSTS[:2], HOSTS[:2]]
    mixed = [ConnectionCall(plain, init_kwargs={"host": HOSTS[0]}), *twice[:2], ConnectionCall(plain, init_kwargs={"host": HOSTS[1]})]
    assert [type(c).__name__ for c in fleet.gather(mixed, HOSTS[:2])] == ["ConnectionCall", "FleetCall", "ConnectionCall"]
    assert fleet.fleet_kind(probe) == READS and fleet.fleet_kind(plain) is None


def test_the_real_tasks_declare_their_kind():
    from fabfile import deploy, deps, monitor, nginx, secure, ssl

    assert {t.name: fleet.fleet_kind(t) for t in (monitor.check, secure.audit, deps.check, ssl.status, deploy.status)} \
        == {"check": READS, "audit": READS, "status": READS}
    assert [fleet.fleet_kind(t) for t in (secure.secure, deps.install, nginx.install)] == [CHANGES] * 3
    assert fleet.fleet_kind(deploy.deploy) is None


def run_fab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fab"), *args], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)


def test_fab_with_several_hosts_runs_the_task_once_per_host_in_one_table():
    """The real CLI: Fabric's own loop would run the body once per host and print two
    one-line errors; the fleet executor gives one table and one line. Nothing listens on
    loopback port 1, so each host is unreachable at once."""
    result = run_fab("-H", "root@127.0.0.1:1,root@127.0.0.1:2", "monitor.check")
    assert result.returncode == EXIT_CONNECT, result.stderr
    rows = [line.split()[:3] for line in result.stdout.splitlines() if line.startswith("  root@")]
    assert rows == [["root@127.0.0.1:1", "-", "unreachable"], ["root@127.0.0.1:2", "-", "unreachable"]]
    assert result.stderr.count("\n") == 1 and "2 of 2 hosts did not pass" in result.stderr


def test_fab_with_one_host_prints_what_it_always_did():
    result = run_fab("-H", "root@127.0.0.1:1", "monitor.check")
    assert (result.returncode, result.stdout) == (EXIT_CONNECT, "")
    assert result.stderr.startswith("error: cannot reach root@127.0.0.1:1: connection refused")
    assert result.stderr.count("\n") == 1
