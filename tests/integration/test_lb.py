"""The load balancer on sandbox hosts: an lb host in front of two app hosts, `nginx` run
on all three with the layout's roles (roles.lb, roles.app). A stand-in answers /health on
each app host's slot port (python3's http.server, naming its host), so the answers say which
app host served them; the api itself behind the lb is proven by test_multihost.py's rolling
release. The proofs, under a bounded load through the lb (sandbox.load: this machine's
threads, aimed only at the lb's 10.201.0.x address): requests reach every app host and only
the lb reaches them; a host that fails is passed over without a failed request; `lb.out`
takes a host out under load with none failed, `nginx` keeps it out, the last host is never
taken out, and `lb.in` puts a host back only when it answers.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fabfile.sandbox.load import Load
from fabfile.sandbox.network import port_open
from opsrun import fab_many, one_line, put, sh

LB_ENV = {"COACHNTT_RATE_LIMIT__RATE": "2000r/s", "COACHNTT_RATE_LIMIT__BURST": "4000"}


def api_standin(host) -> None:
    """What answers on the api's slot port: /health naming its host (as `version`, the field
    sandbox.load reads), so the answers say which app host served them."""
    put(host, "/srv/api-standin/health", f'{{"status": "ok", "version": "{host.name}"}}'.encode())
    sh(host, "systemd-run --unit=api-standin --property=Restart=always "
             "python3 -m http.server --bind 127.0.0.1 --directory /srv/api-standin 8000 >/dev/null && "
             "for i in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:8000/health && exit 0; sleep 0.2; done; exit 1")


@pytest.fixture(scope="module")
def balanced(vps_factory_module):
    """An lb host and two app hosts, `nginx` run on all three with the layout's roles; the
    app hosts' ufw on (SSH allowed), so only what `nginx` opens for the lb gets through."""
    with ThreadPoolExecutor(3) as pool:
        lb, *apps = list(pool.map(lambda _: vps_factory_module(flavour="provisioned"), range(3)))
    for app in apps:
        api_standin(app)
        sh(app, "ufw allow 22/tcp >/dev/null && ufw --force enable >/dev/null")
    env = {**LB_ENV, "COACHNTT_ROLES__LB": f"root@{lb.ip}", "COACHNTT_ROLES__APP": ",".join(f"root@{a.ip}" for a in apps)}
    result, _ = fab_many([lb, *apps], "nginx", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return lb, apps, env


def test_the_lb_sends_requests_to_every_app_host_and_only_it_reaches_them(balanced):
    lb, apps, env = balanced
    with Load(lb.ip, workers=2, limit=40, seconds=30) as load:
        while load.sent < 40 and time.monotonic() - load.began < 30:
            time.sleep(0.2)
    assert not load.failed(), load.failed()[:3]
    assert set(load.versions()) == {a.name for a in apps}, load.versions()
    # This machine is not the lb: ufw on the app hosts does not let it reach their lb port.
    assert not port_open(apps[0].ip, 8080)
    # A second run changes nothing on any host.
    again, _ = fab_many([lb, *apps], "nginx", env=env)
    assert again.returncode == 0 and not re.search(r"^\s+changed ", again.stdout, re.MULTILINE), again.stdout


def test_an_app_host_that_fails_is_passed_over_without_a_failed_request(balanced):
    lb, apps, _ = balanced
    down, up = apps
    with Load(lb.ip, workers=2, limit=200, seconds=60) as load:
        while load.sent < 30:
            time.sleep(0.1)
        sh(down, "systemctl stop api-standin")  # its nginx now answers 502: the lb retries the other host
        stopped_at = time.monotonic() - load.began
        while load.sent < 200 and time.monotonic() - load.began < 60:
            time.sleep(0.2)
    api_standin(down)  # a transient unit is gone once stopped: a new one
    assert load.sent == 200 and not load.failed(), load.failed()[:3]
    after = [a.version for a in load.ordered if a.at > stopped_at + 1]
    assert after and set(after) == {up.name}, set(after)


def test_an_app_host_taken_out_gets_no_new_requests_and_comes_back_only_when_it_answers(balanced):
    lb, (first, second), env = balanced
    with Load(lb.ip, workers=2, limit=300, seconds=90) as load:
        while load.sent < 20:
            time.sleep(0.1)
        taken, _ = fab_many([lb], "lb.out", "--host", first.ip, env=env)
        after_out = time.monotonic() - load.began
        while load.sent < 150 and time.monotonic() - load.began < 90:
            time.sleep(0.2)
    assert taken.returncode == 0, taken.stdout + taken.stderr
    assert not load.failed(), load.failed()[:3]
    assert {a.version for a in load.answers if a.at > after_out} == {second.name}

    status, _ = fab_many([lb], "lb.status", env=env)
    assert status.returncode == 0 and re.search(rf"{re.escape(first.ip)}\s+out\s+/health 200", status.stdout), status.stdout
    # `nginx` keeps it out; the last host in is never taken out.
    kept, _ = fab_many([lb, first, second], "nginx", env=env)
    assert kept.returncode == 0 and not re.search(r"^\s+changed ", kept.stdout, re.MULTILINE), kept.stdout
    last, _ = fab_many([lb], "lb.out", "--host", second.ip, env=env)
    assert last.returncode == 1
    one_line(last, "last app host in the load balancer")

    # Back in only when it answers the lb.
    sh(first, "systemctl stop api-standin")
    refused, _ = fab_many([lb], "lb.in", "--host", first.ip, env=env)
    assert refused.returncode == 1
    one_line(refused, f"{first.ip} answers the load balancer 502", "stays out")
    api_standin(first)
    back, _ = fab_many([lb], "lb.in", "--host", first.ip, env=env)
    assert back.returncode == 0, back.stdout + back.stderr
    with Load(lb.ip, workers=2, limit=40, seconds=30) as load:
        while load.sent < 40 and time.monotonic() - load.began < 30:
            time.sleep(0.2)
    assert not load.failed() and set(load.versions()) == {first.name, second.name}, load.versions()
