"""deps as data: a working Docker is kept, a missing piece is installed by the script."""

from __future__ import annotations

from fabfile.core import remote, templates
from fabfile.core.batch import ProbeResult
from fabfile.deps import VERSION_PROBES, docker_step

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
