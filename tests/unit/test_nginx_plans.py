"""nginx as data: settings validated before any connection, the site rendered from facts."""

from __future__ import annotations

import base64
import os
import re
import subprocess

import pytest

from fabfile import nginx
from fabfile.core.batch import ProbeResult
from fabfile.core.errors import ConfigError
from fabfile.core.settings import Settings, validate
from fabfile.nginx import DEFAULT_SITE, SITE_FILE, default_site_step, site_settings, site_step

missing = ProbeResult("", 1)


def ok(stdout=""):
    return ProbeResult(stdout, 0)


def settings_with(defaults, **dotted):
    return Settings("production", defaults).with_overrides(dotted)


NGINX_1_26 = ProbeResult("nginx version: nginx/1.26.3", 0)
NGINX_1_24 = ProbeResult("nginx version: nginx/1.24.0 (Ubuntu)", 0)


def certificate_for(*names: str) -> ProbeResult:
    """What CERTIFICATE_PROBE prints for a certificate naming `names`."""
    return ok("issuer=C=US, O=Let's Encrypt, CN=E5\nnotAfter=Mar  1 12:00:00 2031 GMT\n"
              "sha256 Fingerprint=AB:CD:EF\nX509v3 Subject Alternative Name: \n    "
              + ", ".join(f"DNS:{name}" for name in names))


def site_facts(certificate=missing, content=missing, meta=missing, nginx_version=NGINX_1_26) -> dict:
    return {"content": content, "meta": meta, "certificate": certificate, "nginx_version": nginx_version}


def written(change) -> str:
    """The file content a write_file_command carries inline (base64)."""
    payload = re.search(r"printf %s (\S+) \| base64 -d", change.command)[1]
    return base64.b64decode(payload).decode()


def rendered(settings, certificate=missing, nginx_version=NGINX_1_26) -> str:
    plan = site_step(settings).plan(site_facts(certificate, nginx_version=nginx_version))
    (change,) = plan.changes
    return written(change)


def servers(config: str) -> list[str]:
    """Each top-level `server { ... }` block of the rendered file."""
    return re.findall(r"^server \{\n(.*?)^\}", config, re.MULTILINE | re.DOTALL)


def servers_named(config: str, name: str) -> list[str]:
    return [block for block in servers(config) if f"    server_name {name};" in block.splitlines()]


# --- validation, before any connection -------------------------------------------


def test_default_settings_give_three_sites(settings):
    assert site_settings(settings) == [
        {"name": "api", "domain": "api.coachntt.ai", "upstream": "coachntt_api"},
        {"name": "metrics", "domain": "metrics.coachntt.ai", "upstream": "127.0.0.1:3000"},
        {"name": "staging", "domain": "staging.api.coachntt.ai", "upstream": "127.0.0.1:8001"},
    ]


def test_staging_disabled_leaves_its_site_out(defaults):
    settings = settings_with(defaults, **{"staging.enabled": False})
    assert [site["name"] for site in site_settings(settings)] == ["api", "metrics"]
    assert "staging.api.coachntt.ai" not in rendered(settings)


def test_staging_enabled_must_be_true_or_false(defaults):
    with pytest.raises(ConfigError) as info:
        validate(settings_with(defaults, **{"staging.enabled": "sometimes"}))
    assert info.value.what == "staging.enabled must be true or false, got 'sometimes'"


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("domains.api", "api coachntt.ai", "domains.api must be a host name, got 'api coachntt.ai'"),
        ("domains.metrics", "https://metrics.coachntt.ai", "domains.metrics must be a host name, got 'https://metrics.coachntt.ai'"),
        ("domains.staging", "staging", "domains.staging must be a host name, got 'staging'"),
        ("upstreams.metrics", "http://127.0.0.1:3000", "upstreams.metrics must be host:port, got 'http://127.0.0.1:3000'"),
        ("upstreams.staging", "127.0.0.1:8001; evil", "upstreams.staging must be host:port, got '127.0.0.1:8001; evil'"),
    ],
)
def test_bad_domain_or_upstream_is_a_config_error_naming_key_and_value(defaults, key, value, message):
    with pytest.raises(ConfigError) as info:
        validate(settings_with(defaults, **{key: value}))
    assert info.value.what == message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("upstream", ["127.0.0.1:99999", "127.0.0.1:0"])
def test_upstream_port_outside_1_to_65535_is_refused(defaults, upstream):
    with pytest.raises(ConfigError):
        validate(settings_with(defaults, **{"upstreams.staging": upstream}))


@pytest.mark.parametrize("rate", ["10/s", "fast", "10r/h", "10 r/s"])
def test_bad_rate_is_refused(defaults, rate):
    with pytest.raises(ConfigError) as info:
        validate(settings_with(defaults, **{"rate_limit.rate": rate}))
    assert info.value.what == f"rate_limit.rate must be a rate like 10r/s or 600r/m, got '{rate}'"


def test_nginx_task_refuses_a_bad_domain_with_exit_2_before_connecting(refused_before_connecting):
    exit_ = refused_before_connecting(nginx.install, env={"COACHNTT_DOMAINS__API": "api coachntt.ai"})
    assert exit_.code == 2
    assert exit_.message == "error: domains.api must be a host name, got 'api coachntt.ai'; fix COACHNTT_DOMAINS__API in the environment"


def test_nginx_status_refuses_a_bad_upstream_before_connecting(refused_before_connecting):
    assert refused_before_connecting(nginx.status, env={"COACHNTT_UPSTREAMS__STAGING": "localhost"}).code == 2


# --- the rendered site -----------------------------------------------------------


def test_site_step_reads_the_file_the_certificate_and_the_nginx_version(settings):
    step = site_step(settings)
    assert step.probes["content"] == f"cat -- {SITE_FILE}"
    assert step.probes["certificate"] == (
        "test -r /etc/letsencrypt/live/coachntt/privkey.pem && openssl x509 -in /etc/letsencrypt/live/coachntt/fullchain.pem "
        "-noout -issuer -enddate -fingerprint -sha256 -ext subjectAltName")
    assert step.probes["nginx_version"] == "nginx -v 2>&1"


def test_new_site_is_written_then_tested_with_nginx_t_before_reload(settings):
    plan = site_step(settings).plan(site_facts())
    (change,) = plan.changes
    assert change.summary.startswith(f"create {SITE_FILE} ")
    assert "why=$(nginx -t -q 2>&1)" in change.command
    assert change.command.index("nginx -t -q") < change.command.index("systemctl reload nginx")


def test_without_certificates_every_site_is_plain_http(settings):
    config = rendered(settings)
    assert "listen 443" not in config
    assert "Strict-Transport-Security" not in config
    assert "return 301" not in config
    for domain in ("api.coachntt.ai", "metrics.coachntt.ai", "staging.api.coachntt.ai"):
        (block,) = servers_named(config, domain)
        assert "    listen 80;" in block.splitlines()


def test_a_certificate_naming_api_gives_api_tls_hsts_and_a_redirect_only(settings):
    config = rendered(settings, certificate_for("api.coachntt.ai"))
    redirect, tls = servers_named(config, "api.coachntt.ai")
    assert "location / { return 301 https://$host$request_uri; }" in redirect
    assert "location /.well-known/acme-challenge/ { root /var/www/html; }" in redirect
    assert redirect.index("acme-challenge") < redirect.index("return 301"), "challenges are answered, not redirected"
    assert "listen 80;" in redirect and "443" not in redirect
    assert "Strict-Transport-Security" not in redirect, "HSTS on TLS only"
    assert "    listen 443 ssl;" in tls.splitlines()
    assert "listen 80" not in tls
    assert "    ssl_certificate /etc/letsencrypt/live/coachntt/fullchain.pem;" in tls.splitlines()
    assert "    ssl_certificate_key /etc/letsencrypt/live/coachntt/privkey.pem;" in tls.splitlines()
    assert 'add_header Strict-Transport-Security "max-age=31536000; includeSubDomains" always;' in tls
    (metrics,) = servers_named(config, "metrics.coachntt.ai")
    assert "listen 443" not in metrics and "Strict-Transport-Security" not in metrics


def test_one_certificate_naming_every_domain_gives_every_site_tls(settings):
    config = rendered(settings, certificate_for("api.coachntt.ai", "metrics.coachntt.ai", "staging.api.coachntt.ai"))
    for domain in ("api.coachntt.ai", "metrics.coachntt.ai", "staging.api.coachntt.ai"):
        redirect, tls = servers_named(config, domain)
        assert "return 301 https://$host$request_uri;" in redirect
        assert "ssl_certificate /etc/letsencrypt/live/coachntt/fullchain.pem;" in tls
    assert config.count("Strict-Transport-Security") == 3


def test_a_certificate_for_other_names_gives_no_tls(settings):
    config = rendered(settings, certificate_for("www.example.org"))
    assert "listen 443" not in config and "Strict-Transport-Security" not in config


def test_tls_is_1_2_and_1_3_with_forward_secret_aead_ciphers_only(settings):
    config = rendered(settings, certificate_for("api.coachntt.ai"))
    (_, tls) = servers_named(config, "api.coachntt.ai")
    assert "    ssl_protocols TLSv1.2 TLSv1.3;" in tls.splitlines()
    ciphers = re.search(r"^    ssl_ciphers (\S+);$", tls, re.MULTILINE)[1].split(":")
    assert ciphers and all(c.startswith("ECDHE-") and ("GCM" in c or "CHACHA20" in c) for c in ciphers), ciphers
    assert "    ssl_prefer_server_ciphers off;" in tls.splitlines()
    assert "    ssl_session_tickets off;" in tls.splitlines()


def test_other_names_on_443_get_no_certificate_and_the_same_tls_parameters(settings):
    config = rendered(settings, certificate_for("api.coachntt.ai"))
    (plain_default, tls_default) = servers_named(config, "_")
    assert "listen 80 default_server;" in plain_default
    assert "    listen 443 ssl default_server;" in tls_default.splitlines()
    assert "    ssl_reject_handshake on;" in tls_default.splitlines()
    assert "ssl_certificate" not in tls_default
    (_, api) = servers_named(config, "api.coachntt.ai")
    tls_parameter = ("ssl_protocols", "ssl_ciphers", "ssl_prefer", "ssl_session")
    parameters = [line for line in api.splitlines() if line.strip().startswith(tls_parameter)]
    assert len(parameters) == 6
    assert all(line in tls_default.splitlines() for line in parameters)


def test_without_any_tls_site_nothing_listens_on_443(settings):
    assert "443" not in rendered(settings)


@pytest.mark.parametrize("version,listen,directive", [
    (NGINX_1_26, "    listen 443 ssl;", True),
    (NGINX_1_24, "    listen 443 ssl http2;", False),
    (ProbeResult("nginx version: nginx/1.25.1", 0), "    listen 443 ssl;", True),
    (ProbeResult("nginx version: nginx/1.25.0", 0), "    listen 443 ssl http2;", False),
    (missing, "    listen 443 ssl;", True),
])
def test_http2_is_spelled_the_way_the_installed_nginx_reads_it(settings, version, listen, directive):
    (_, tls) = servers_named(rendered(settings, certificate_for("api.coachntt.ai"), nginx_version=version), "api.coachntt.ai")
    assert listen in tls.splitlines()
    assert ("    http2 on;" in tls.splitlines()) is directive


def test_rate_and_burst_come_from_settings(defaults):
    config = rendered(settings_with(defaults, **{"rate_limit.rate": "30r/m", "rate_limit.burst": 7}))
    assert "limit_req_zone $binary_remote_addr zone=coachntt_api:10m rate=30r/m;" in config
    # Three sites, two proxied locations each (/ws and /), every one limited with the same burst.
    assert re.findall(r"limit_req zone=coachntt_api burst=(\d+) nodelay;", config) == ["7"] * 6


def test_websocket_location_upgrades_and_stays_open_for_an_hour(settings):
    (api,) = servers_named(rendered(settings), "api.coachntt.ai")
    ws = re.search(r"location /ws \{\n(.*?)\n    \}", api, re.DOTALL)[1]
    assert "proxy_pass http://coachntt_api;" in ws, "the live slot, through the upstream the slot include defines"
    assert "proxy_http_version 1.1;" in ws
    assert "proxy_set_header Upgrade $http_upgrade;" in ws
    assert "proxy_set_header Connection $connection_upgrade;" in ws
    assert "proxy_read_timeout 3600s;" in ws


def test_each_site_proxies_to_its_own_upstream(settings):
    config = rendered(settings)
    (metrics,) = servers_named(config, "metrics.coachntt.ai")
    assert set(re.findall(r"proxy_pass (\S+);", metrics)) == {"http://127.0.0.1:3000"}


def test_any_other_name_gets_no_answer_from_the_default_server(settings):
    (default,) = servers_named(rendered(settings), "_")
    assert "listen 80 default_server;" in default
    assert "location / { return 444; }" in default


def test_unchanged_site_is_ok(settings):
    content = rendered(settings, certificate_for("api.coachntt.ai"))
    plan = site_step(settings).plan(
        site_facts(certificate_for("api.coachntt.ai"), ok(content.rstrip("\n")), ok("644 root:root"))
    )
    assert plan.changes == ()
    assert plan.reason == f"{SITE_FILE} up to date"


def test_a_new_certificate_updates_an_unchanged_site_to_tls(settings):
    content = rendered(settings)
    plan = site_step(settings).plan(
        site_facts(certificate_for("api.coachntt.ai"), ok(content.rstrip("\n")), ok("644 root:root"))
    )
    (change,) = plan.changes
    assert change.summary.startswith(f"update {SITE_FILE} ")
    assert "+    listen 443 ssl;" in change.diff


# --- default site ----------------------------------------------------------------


def test_enabled_default_site_is_removed_then_nginx_tested_and_reloaded():
    plan = default_site_step().plan({"default": ok()})
    (change,) = plan.changes
    assert change.summary == f"remove {DEFAULT_SITE}"
    assert change.command.startswith(f"rm -f {DEFAULT_SITE} && nginx -t -q && ")
    assert change.command.index("nginx -t -q") < change.command.index("systemctl reload nginx")


def run_with_stubs(tmp_path, script, nginx_status):
    """`script` under sh with stub nginx/systemctl; returns (exit status, systemctl calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "systemctl.log"
    (bin_dir / "nginx").write_text(f"#!/bin/sh\necho 'nginx: [emerg] broken' >&2\nexit {nginx_status}\n")
    (bin_dir / "systemctl").write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    result = subprocess.run(["sh", "-c", script], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                            capture_output=True, text=True, timeout=10)
    return result.returncode, calls.read_text().splitlines() if calls.exists() else []


def default_site_script(tmp_path):
    site = tmp_path / "sites-enabled-default"
    site.write_text("server { listen 80 default_server; }\n")
    # Never the real /etc/nginx: the file is a copy in tmp_path.
    return default_site_step().plan({"default": ok()}).script.replace(DEFAULT_SITE, str(site))


def test_removing_the_default_site_reloads_nginx_when_its_test_passes(tmp_path):
    status, calls = run_with_stubs(tmp_path, default_site_script(tmp_path), nginx_status=0)
    assert (status, calls) == (0, ["reload nginx"])
    assert not (tmp_path / "sites-enabled-default").exists()


def test_a_failing_nginx_test_after_removing_the_default_site_neither_reloads_nor_restarts(tmp_path):
    status, calls = run_with_stubs(tmp_path, default_site_script(tmp_path), nginx_status=1)
    assert calls == []
    assert status != 0


def test_no_default_site_is_ok():
    plan = default_site_step().plan({"default": missing})
    assert plan.changes == ()
    assert plan.reason == "default site not enabled"


# --- who holds ports 80/443 (preflight and status) ---------------------------------

from fabfile.core.errors import OpsError  # noqa: E402
from fabfile.nginx import foreign_holder, listeners, web_ports_step  # noqa: E402

SS_NGINX = (
    'LISTEN 0 511 0.0.0.0:80 0.0.0.0:* users:(("nginx",pid=2301,fd=5),("nginx",pid=2300,fd=5))\n'
    'LISTEN 0 511 [::]:80 [::]:* users:(("nginx",pid=2301,fd=6),("nginx",pid=2300,fd=6))'
)
SS_PYTHON = 'LISTEN 0 5 0.0.0.0:80 0.0.0.0:* users:(("python3",pid=1234,fd=3))'


def test_listeners_name_each_program_once_per_port():
    assert listeners(SS_NGINX.splitlines()) == {"80": [("nginx", "2301"), ("nginx", "2300")]}
    assert listeners(["LISTEN 0 5 [::]:443 [::]:*"]) == {"443": [("unknown", "?")]}


def test_nginx_or_nobody_on_the_web_ports_is_fine():
    assert foreign_holder(SS_NGINX.splitlines()) is None
    assert foreign_holder([]) is None
    assert web_ports_step().plan({"listeners": ok(SS_NGINX)}).changes == ()


def test_another_program_on_port_80_is_named_with_its_pid():
    assert foreign_holder(SS_PYTHON.splitlines()) == ("80", "python3", "1234")


def test_another_program_on_443_beside_nginx_on_80_is_found_too():
    lines = SS_NGINX.splitlines() + ['LISTEN 0 4096 0.0.0.0:443 0.0.0.0:* users:(("docker-proxy",pid=88,fd=4))']
    assert foreign_holder(lines) == ("443", "docker-proxy", "88")


def test_the_preflight_refuses_in_one_line_with_exit_1():
    with pytest.raises(OpsError) as info:
        web_ports_step().plan({"listeners": ok(SS_PYTHON)})
    assert info.value.one_line() == "port 80 is held by python3 (pid 1234); stop it or move it, then rerun"
    assert info.value.exit_code == 1


def test_the_preflight_is_planned_with_every_other_step_before_any_applies(settings, mocker):
    """run_steps plans all steps first: the refusal comes before the default site is removed."""
    from fabfile.core import steps as steps_module

    facts = [{"listeners": ok(SS_PYTHON)}, {"default": ok("")}]
    mocker.patch.object(steps_module, "gather_facts", return_value=facts)
    apply = mocker.patch.object(steps_module, "apply_plan")
    with pytest.raises(OpsError):
        steps_module.run_steps(mocker.Mock(), [web_ports_step(), default_site_step()], mocker.Mock())
    apply.assert_not_called()
