"""The load balancer of a several-host layout as data: which host plays which part, the
lb's upstream, the app hosts' way in for the lb alone, and their firewall rule."""

from __future__ import annotations

import base64
import re

import pytest

from fabfile import nginx
from fabfile.core import balancer
from fabfile.core.batch import ProbeResult
from fabfile.core.errors import ConfigError
from fabfile.core.layout import check
from fabfile.core.settings import Settings

ROLES = {"app": ["root@10.201.0.31", "root@10.201.0.32"], "lb": "root@10.201.0.30", "db": "", "replica": []}


def here(host: str, roles=ROLES, port: int = 22):
    return balancer.balancing(check(roles), host, port, 8080)


def written(change) -> str:
    return base64.b64decode(re.search(r"printf %s (\S+) \| base64 -d", change.command)[1]).decode()


def test_each_host_knows_its_part_and_the_others_addresses():
    lb, app = here("10.201.0.30"), here("10.201.0.32")
    assert (lb.role, app.role) == ("lb", "app")
    assert lb.lb == app.lb == "10.201.0.30" and lb.apps == app.apps == ("10.201.0.31", "10.201.0.32")


@pytest.mark.parametrize(("roles", "host", "port"), [
    ({"app": [], "lb": "", "db": "", "replica": []}, "10.201.0.30", 22),  # single VPS
    ({**ROLES, "lb": ""}, "10.201.0.31", 22),  # app hosts without an lb
    (ROLES, "10.201.0.99", 22),  # a host outside the layout
    (ROLES, "10.201.0.31", 2222),  # the same address, another sshd: another machine
    (ROLES, None, 22),  # inv on the server itself
])
def test_no_lb_in_the_layout_or_not_one_of_its_hosts_changes_nothing(roles, host, port):
    assert balancer.balancing(check(roles), host, port, 8080) is None


def test_a_host_named_by_a_name_is_refused_before_any_connection():
    with pytest.raises(ConfigError, match="private IPv4 addresses"):
        here("10.201.0.30", {**ROLES, "app": ["root@app1.example.net"]})


def test_the_lb_upstream_names_every_app_host_and_retries_a_failed_one():
    text = balancer.render_upstream(here("10.201.0.30"), "coachntt_api", fail_timeout=10)
    assert re.findall(r"^    server (\S+) max_fails=1 fail_timeout=10s;$", text, re.MULTILINE) == [
        "10.201.0.31:8080", "10.201.0.32:8080"]
    assert "proxy_next_upstream error timeout http_502 http_503 http_504;" in text
    assert "non_idempotent" not in text  # a POST that may have run is never sent twice
    assert "proxy_next_upstream_tries 2;" in text and "default 0;" in text


def test_the_lb_host_keeps_its_upstream_in_step_with_roles_app(defaults):
    settings = Settings("production", defaults)
    step = nginx.upstream_step(settings, here("10.201.0.30"))
    (change,) = step.plan({"content": ProbeResult("", 1), "meta": ProbeResult("", 1)}).changes
    assert "server 10.201.0.32:8080" in written(change) and "nginx -t" in change.command
    # An app host keeps the slot include deploy and rollback own.
    assert nginx.upstream_step(settings, here("10.201.0.31")).probes == {"include": "test -f /etc/nginx/coachntt/api-upstream.conf"}


def site(defaults, balancing) -> str:
    facts = {"content": ProbeResult("", 1), "meta": ProbeResult("", 1), "certificate": ProbeResult("", 1),
             "nginx_version": ProbeResult("nginx version: nginx/1.26.3", 0)}
    (change,) = nginx.site_step(Settings("production", defaults), balancing).plan(facts).changes
    return written(change)


def test_an_app_host_lets_the_lb_alone_in_without_a_rate_limit(defaults):
    text = site(defaults, here("10.201.0.31"))
    (private,) = re.findall(r"^server \{\n    listen 8080;\n(.*?)^\}", text, re.MULTILINE | re.DOTALL)
    assert "allow 10.201.0.30;\n    deny all;" in private
    assert "limit_req" not in private and "proxy_pass http://coachntt_api;" in private
    assert "set_real_ip_from" not in private  # it would replace the address `allow` checks
    assert "proxy_set_header X-Real-IP $http_x_real_ip;" in private


def test_the_single_vps_site_and_the_lbs_have_no_such_server(defaults):
    assert "listen 8080" not in site(defaults, None)
    assert "listen 8080" not in site(defaults, here("10.201.0.30"))


def firewall(status: str):
    return nginx.lb_firewall_step(here("10.201.0.31")).plan({"ufw": ProbeResult(status, 0)})


def test_ufw_is_opened_for_the_lb_alone_once():
    (change,) = firewall("Status: active\n\nTo Action From\n22/tcp ALLOW Anywhere\n").changes
    assert change.command == "ufw allow proto tcp from 10.201.0.30 to any port 8080 comment 'coachntt load balancer'"
    assert firewall("Status: active\n\n8080/tcp                   ALLOW       10.201.0.30\n").changes == ()
    assert firewall("Status: active\n\n8080/tcp                   ALLOW       10.201.0.99\n").changes != ()
    assert firewall("Status: inactive\n").changes == ()


def test_a_host_taken_out_is_read_back_so_nginx_keeps_it_out(defaults):
    b = here("10.201.0.30")
    text = balancer.render_upstream(b, "coachntt_api", fail_timeout=10, down=frozenset({"10.201.0.31"}))
    assert "server 10.201.0.31:8080 max_fails=1 fail_timeout=10s down;" in text
    assert balancer.taken_out(text) == {"10.201.0.31"}
    facts = {"content": ProbeResult(text.rstrip("\n"), 0), "meta": ProbeResult("644 root:root", 0)}
    assert nginx.upstream_step(Settings("production", defaults), b).plan(facts).changes == ()
    # lb.in: told which are out now, the mark goes.
    (change,) = nginx.lb_upstream_step(Settings("production", defaults), b, out=frozenset()).plan(facts).changes
    assert balancer.taken_out(written(change)) == frozenset()


def test_lb_tasks_without_a_load_balancer_are_refused_before_connecting(defaults, monkeypatch):
    from fabfile import load_balancer
    from fabfile.core.errors import UsageError

    monkeypatch.setattr(load_balancer, "connect_to", lambda *a: pytest.fail("connected"))
    ops = type("Ops", (), {"settings": Settings("production", defaults), "context": None})()
    with pytest.raises(UsageError, match="roles.lb and roles.app"):
        load_balancer.the_lb(ops)


def test_the_state_of_each_app_host_comes_from_the_include_and_the_lbs_own_request():
    from fabfile import load_balancer
    from fabfile.core.errors import OpsError

    b = here("10.201.0.30")
    include = balancer.render_upstream(b, "coachntt_api", fail_timeout=10, down=frozenset({"10.201.0.32"}))
    facts = {"content": ProbeResult(include, 0), "health0": ProbeResult("200", 0), "health1": ProbeResult("", 7)}
    assert load_balancer.states(facts, b) == {"10.201.0.31": ("in", "200"), "10.201.0.32": ("out", "000")}
    with pytest.raises(OpsError, match="no api upstream"):
        load_balancer.states({**facts, "content": ProbeResult("", 1)}, b)


# --- the rolling release: when it applies, what it needs before any connection -------------


def rolling_ops(defaults, host=None, **roles):
    defaults["roles"] = {"app": [], "lb": "", "db": "", "replica": [], **roles}
    context = type("Context", (), {"host": host, "port": 22})()
    return type("Ops", (), {"settings": Settings("production", defaults), "context": context, "json": False})()


def test_a_release_rolls_only_with_an_lb_and_app_hosts_and_no_host_picked(defaults):
    from fabfile import rolling_release

    layout_roles = {"app": ROLES["app"], "lb": ROLES["lb"]}
    assert rolling_release.applies(rolling_ops(defaults, **layout_roles))
    assert not rolling_release.applies(rolling_ops(defaults, host="10.201.0.31", **layout_roles))  # -H: that host
    assert not rolling_release.applies(rolling_ops(defaults, app=ROLES["app"]))  # no lb
    assert not rolling_release.applies(rolling_ops(defaults))  # single VPS


def test_a_roll_without_a_sha_is_refused_before_any_connection(defaults, monkeypatch):
    from fabfile import load_balancer, rolling_release
    from fabfile.core.errors import UsageError

    monkeypatch.setattr(load_balancer, "connect_to", lambda *a: pytest.fail("connected"))
    with pytest.raises(UsageError, match="needs --sha"):
        rolling_release.roll(rolling_ops(defaults, app=ROLES["app"], lb=ROLES["lb"]), "", lambda *a, **k: None)


def test_the_roll_failure_setting_is_keep_or_rollback(defaults):
    from fabfile.core.settings import validate

    defaults["release"]["roll_failure"] = "sometimes"
    with pytest.raises(ConfigError, match="release.roll_failure"):
        validate(Settings("production", defaults))
