"""A rolling release on sandbox hosts: three app hosts running examples/app behind an lb host.

`fab release --sha SHA` with roles.lb and roles.app set (no -H) takes each app host out of
the load balancer, runs the release checklist there, and puts it back. The proofs, under
a bounded load through the lb (sandbox.load: this machine's threads, aimed only at the
lb's 10.201.0.x address): a release rolled over all three counts 0 failed requests and
ends with every host on the new release; a release failing its health gate on the first
host stops the roll there, that host out of the load balancer on the release before, the
other two serving, and again 0 failed requests.

Each app host is a single-VPS deployment of its own (its own PostgreSQL): the app hosts'
shared database (roles.db) is not part of this proof.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from fabfile.sandbox.load import Load
from opsrun import BIN, PROJECT_DIR, console, example_app_served, fab, one_line, ready_for_the_app, through_nginx

APPS = 3
ENV = {"COACHNTT_RATE_LIMIT__RATE": "2000r/s", "COACHNTT_RATE_LIMIT__BURST": "4000",
       "COACHNTT_RELEASE__WATCH_SECONDS": "10", "COACHNTT_MONITOR__WATCH_INTERVAL": "2",
       "COACHNTT_CUTOVER__DRAIN_SECONDS": "5"}


class Layout:
    def __init__(self, lb, apps, env, repo):
        self.lb, self.apps, self.env, self.repo, self.commits = lb, apps, env, repo, 0

    def release(self, sha: str) -> subprocess.CompletedProcess:
        """`fab release` with no -H: the layout's hosts, from roles.*."""
        return subprocess.run([str(BIN / "fab"), "-i", str(self.lb.key), "release", "--sha", sha], cwd=PROJECT_DIR,
                              capture_output=True, text=True, timeout=1500, env={**os.environ, **self.env})

    def live(self, host) -> str:
        code, out = console(host, through_nginx("/health"))
        assert code == 0, out
        return json.loads(out)["version"]

    def lb_status(self) -> str:
        result = fab(self.lb, "lb.status", env=self.env)
        return result.stdout + result.stderr

    def roll_under_load(self, files: dict, what: str) -> tuple[str, str, subprocess.CompletedProcess, Load]:
        """A new commit changing `files`, rolled out while the load runs through the lb:
        (the release serving before, the new sha, the release's result, the load)."""
        before, new = self.live(self.apps[0]), self.new_sha(files)
        with Load(self.lb.ip, workers=3) as load:
            result = self.release(new)
        print(f"\n{what} {before[:12]} -> {new[:12]} under load: {load.summary()}")
        return before, new, result, load

    def new_sha(self, files: dict) -> str:
        from fabfile.sandbox import example_repo

        self.commits += 1
        return example_repo.commit_change(self.repo, f"rolled {self.commits}", files)


def app_host(host, env: dict) -> None:
    ready_for_the_app(host, env=env)
    for args in (("deploy.setup",), ("deploy", "--sha", env["FIRST_SHA"])):
        result = fab(host, *args, user="coachntt", env=env)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def layout(vps_factory_module, tmp_path_factory):
    with ThreadPoolExecutor(APPS + 1) as pool:
        lb, *apps = list(pool.map(lambda _: vps_factory_module(flavour="provisioned"), range(APPS + 1)))
    with example_app_served(tmp_path_factory.mktemp("git")) as (repo, first, served):
        env = {**served, **ENV, "FIRST_SHA": first, "COACHNTT_ROLES__LB": f"root@{lb.ip}",
               "COACHNTT_ROLES__APP": ",".join(f"coachntt@{a.ip}" for a in apps)}
        with ThreadPoolExecutor(APPS) as pool:
            list(pool.map(lambda a: app_host(a, env), apps))
        result = fab(lb, "nginx", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        yield Layout(lb, apps, env, repo)


def test_a_release_rolled_over_three_app_hosts_fails_no_request(layout):
    before, new, result, load = layout.roll_under_load({"RELEASE": "rolled\n"}, "a rolling release")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not load.failed(), load.summary()
    assert len(load.answers) >= 200 and not load.hit_bound, load.summary()
    assert set(load.versions()) == {before, new} and load.ordered[-1].version == new, load.summary()
    assert [layout.live(a) for a in layout.apps] == [new] * APPS
    rows = re.findall(r"^  (10\.201\.0\.\d+)\s+(\S+)", result.stdout, re.MULTILINE)
    assert rows == [(a.ip, "released") for a in layout.apps], result.stdout
    status = layout.lb_status()
    assert all(re.search(rf"{re.escape(a.ip)}\s+in\s+/health 200", status) for a in layout.apps), status


def test_a_host_failing_its_gate_stops_the_roll_with_the_others_serving(layout):
    before, broken, result, load = layout.roll_under_load(
        {"BROKEN_HEALTH": "this release fails its health gate on purpose\n"}, "a rolling release failing its gate")
    assert result.returncode == 1, result.stdout + result.stderr
    first = layout.apps[0]
    one_line(result, f"the rolling release stopped at {first.ip}", "/health did not answer 200", "rolled back to",
             "out of the load balancer")
    assert not load.failed() and load.versions() == [before], load.summary()
    assert [layout.live(a) for a in layout.apps] == [before] * APPS, "the failed host is back on the release before"
    rows = re.findall(r"^  (10\.201\.0\.\d+)\s+(failed|released|not started)", result.stdout, re.MULTILINE)
    assert rows == [(first.ip, "failed"), (layout.apps[1].ip, "not started"), (layout.apps[2].ip, "not started")], result.stdout
    status = layout.lb_status()
    assert re.search(rf"{re.escape(first.ip)}\s+out\s+/health 200", status), status
    assert all(re.search(rf"{re.escape(a.ip)}\s+in\s+", status) for a in layout.apps[1:]), status

    # The operator puts it back once it is well; the next roll starts only then.
    layout.new_sha({"BROKEN_HEALTH": None})
    refused = layout.release(broken)
    assert refused.returncode == 1
    one_line(refused, "not every app host is in the load balancer", "nothing was changed")
    back = fab(layout.lb, "lb.in", "--host", first.ip, env=layout.env)
    assert back.returncode == 0, back.stdout + back.stderr


def test_dry_shows_each_hosts_plan_and_moves_nothing(layout):
    before = layout.lb_status()
    sha = layout.new_sha({"RELEASE": "dry\n"})
    result = subprocess.run([str(BIN / "fab"), "-i", str(layout.lb.key), "release", "--sha", sha, "--dry"],
                            cwd=PROJECT_DIR, capture_output=True, text=True, timeout=600, env={**os.environ, **layout.env})
    assert result.returncode == 0, result.stdout + result.stderr
    for app in layout.apps:
        assert f"coachntt@{app.ip}" in result.stdout, result.stdout
    assert layout.lb_status() == before
    assert {layout.live(a) for a in layout.apps} != {sha}
