"""deps as data: a working Docker is kept, a missing piece is installed by the script."""

from __future__ import annotations

import base64
import json

import pytest

from fabfile.core import lock, remote, templates
from fabfile.core.batch import ProbeResult
from fabfile.core.errors import OpsError
from fabfile.deps import DAEMON_SCRIPT, VERSION_PROBES, daemon_step, docker_step

missing = ProbeResult("", 127)


def ok(stdout=""):
    return ProbeResult(stdout, 0)


def test_docker_step_asks_docker_and_compose_for_their_versions():
    assert docker_step().probes == {"docker": VERSION_PROBES["docker"], "compose": VERSION_PROBES["compose"]}


def test_working_docker_and_compose_are_kept_as_they_are():
    plan = docker_step().plan({"docker": ok("27.5.1"), "compose": ok("2.32.4")})
    assert plan.changes == ()
    assert plan.reason == "keeping Docker 27.5.1 with compose 2.32.4"


def test_missing_docker_runs_the_install_script():
    plan = docker_step().plan({"docker": missing, "compose": missing})
    (change,) = plan.changes
    assert change.summary == "install Docker Engine and compose v2 plugin from the distribution"
    assert change.command == f"{remote.APT_INSTALL} || exit $?\n" + templates.script("install-docker.sh")


def test_missing_compose_alone_names_only_compose():
    plan = docker_step().plan({"docker": ok("26.1.3"), "compose": ProbeResult("docker: 'compose' is not a docker command.", 1)})
    (change,) = plan.changes
    assert change.summary == "install compose v2 plugin from the distribution"
    assert "Docker Engine" not in change.summary
    assert change.command == f"{remote.APT_INSTALL} || exit $?\n" + templates.script("install-docker.sh")


def test_a_daemon_that_does_not_answer_counts_as_missing_docker():
    plan = docker_step().plan({"docker": ProbeResult("Cannot connect to the Docker daemon", 1), "compose": ok("2.24.6")})
    assert [c.summary for c in plan.changes] == ["install Docker Engine from the distribution"]


# --- docker daemon -------------------------------------------------------------

STATE_DIR = "/var/lib/coachntt-ops"


def daemon_plan(found: str, *, ok: bool = True, **options):
    return daemon_step(STATE_DIR, **options).plan({"daemon": ProbeResult(found, 0 if ok else 1)})


def written(change) -> dict:
    payload = change.command.rsplit(" ", 1)[-1]
    return json.loads(base64.b64decode(payload))


def test_no_daemon_json_gets_every_hardening_key():
    (change,) = daemon_plan("").changes
    assert written(change) == {"icc": False, "live-restore": True, "log-driver": "json-file",
                               "log-opts": {"max-file": "3", "max-size": "10m"},
                               "no-new-privileges": True, "userland-proxy": False}
    assert change.summary == ("daemon.json: icc, live-restore, log-driver, log-opts, no-new-privileges, userland-proxy; "
                              "restart Docker, containers kept running")


def test_the_operators_own_keys_are_kept_and_only_what_differs_is_named():
    found = {"registry-mirrors": ["http://mirror.internal"], "live-restore": True, "icc": False,
             "log-opts": {"labels": "service", "max-size": "50m"}, "no-new-privileges": True,
             "log-driver": "json-file", "userland-proxy": False}
    (change,) = daemon_plan(json.dumps(found)).changes
    assert written(change) == {**found, "log-opts": {"labels": "service", "max-size": "10m", "max-file": "3"}}
    assert change.summary.startswith("daemon.json: log-opts; restart Docker")


def test_a_hardened_daemon_json_is_left_alone_however_it_is_laid_out():
    hardened = {"userland-proxy": False, "no-new-privileges": True, "log-opts": {"max-size": "10m", "max-file": "3"},
                "log-driver": "json-file", "live-restore": True, "icc": False, "debug": False}
    plan = daemon_plan(json.dumps(hardened))
    assert plan.changes == () and not plan.skip


def test_turned_off_it_is_skipped_with_the_setting_named():
    plan = daemon_plan("", enabled=False)
    assert plan.skip and plan.reason == "docker.daemon_hardening is off"


@pytest.mark.parametrize("found", ['{"icc": false,', "[1, 2]", "not json"])
def test_a_daemon_json_docker_cannot_read_is_refused_before_any_change(found):
    with pytest.raises(OpsError) as info:
        daemon_plan(found)
    assert info.value.one_line().startswith("/etc/docker/daemon.json on the host is not a JSON object Docker can read")
    assert "nothing was changed" in info.value.one_line()


def test_the_restart_holds_the_deploy_lock_when_an_app_is_set_up_and_frees_it_on_every_exit():
    (change,) = daemon_plan("").changes
    script = change.command.replace(lock.LOCK_SCRIPT, "LOCK").replace(DAEMON_SCRIPT, "DAEMON")
    lines = script.splitlines()
    token = lines[2].split()[3]
    assert lines[0] == f"unlock() {{ LOCK release {STATE_DIR} {token} >/dev/null; }}"
    assert lines[1] == f"if [ -d {STATE_DIR} ]; then", "no app set up yet: no lock to take"
    assert lines[2].startswith(f"  LOCK acquire {STATE_DIR} {token} deps - 'deps: restart Docker for daemon.json' >/dev/null || ")
    assert lines[2].endswith("'a release holds the deploy lock: rerun deps when it is done (deploy.status shows it); "
                             "nothing changed' >&2; exit 4; }")
    assert lines[3:5] == ["  trap unlock EXIT", "fi"]
    assert lines[5].startswith("DAEMON "), "the restart comes after the lock"
    assert len(lines) == 6
