"""Staging as data: the generated compose override, the commands, the preflight, and
deploy_staging against a host given as data. Nothing of staging may name production's
containers, project, network, volume, image or published ports."""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest
import yaml

from fabfile import staging as task
from fabfile.core import certificates, settings, staging
from fabfile.core.batch import ProbeResult
from fabfile.core.errors import ConfigError, OpsError, UsageError
from fabfile.core.settings import PROJECT_DIR
from fabfile.core.steps import Reporter

PRODUCTION_COMPOSE = PROJECT_DIR / "examples" / "app" / "docker-compose.prod.yml"
SHA = "a" * 40


class ComposeLoader(yaml.SafeLoader):
    """Compose's merge tags as data: ('override', value) / ('reset', value)."""


ComposeLoader.add_constructor("!override", lambda loader, node: ("override", loader.construct_sequence(node)
                                                                  if isinstance(node, yaml.SequenceNode)
                                                                  else loader.construct_mapping(node)))
ComposeLoader.add_constructor("!reset", lambda loader, node: ("reset", loader.construct_sequence(node)
                                                               if isinstance(node, yaml.SequenceNode) else None))


@pytest.fixture
def cfg(defaults) -> staging.Staging:
    return staging.Staging.from_settings(settings.validate(settings.Settings("production", defaults)))


@pytest.fixture
def override(cfg) -> dict:
    return yaml.load(staging.render_override(cfg), Loader=ComposeLoader)  # noqa: S506 - SafeLoader subclass


@pytest.fixture
def production() -> dict:
    return yaml.safe_load(PRODUCTION_COMPOSE.read_text())


def published(service: dict) -> list[str]:
    return [str(port) for port in service.get("ports", [])]


def test_override_renames_every_name_production_fixes(override, production, cfg):
    assert override["name"] == cfg.project == "coachntt-staging" != production["name"]
    assert override["services"]["postgres"]["container_name"] == "ccp_postgres_staging"
    assert production["services"]["postgres"]["container_name"] == "ccp_postgres"
    assert override["networks"]["coachntt"]["name"] == "coachntt-staging" != production["networks"]["coachntt"]["name"]
    # Production's fixed subnet would collide: staging's network lets Docker pick one.
    assert override["networks"]["coachntt"]["ipam"] == ("override", {"driver": "default"})
    assert override["volumes"]["pgdata"]["name"] == "coachntt-staging_pgdata" != production["volumes"]["pgdata"]["name"]
    for service in ("api_a", "api_b"):
        assert override["services"][service]["image"].startswith("coachntt-staging/api:")
        assert not production["services"][service].get("image", "coachntt/api").startswith("coachntt-staging/")


def test_every_service_of_production_that_holds_a_fixed_name_or_port_is_overridden(override, production):
    for name, service in production["services"].items():
        if "container_name" in service:
            assert override["services"][name]["container_name"] != service["container_name"]
        if published(service):
            assert name in override["services"], f"{name} publishes {published(service)} in production"


def test_override_publishes_only_the_staging_port(override):
    services = override["services"]
    assert services["api_a"]["ports"] == ("override", ["127.0.0.1:8001:8000"])
    assert services["pgbouncer"]["ports"] == ("reset", [])  # production holds 127.0.0.1:6432
    assert services["api_b"]["ports"] == ("reset", [])
    assert services["api_b"]["profiles"] == ["coachntt-staging-off"], "the second slot is never started"


def test_every_service_reads_stagings_env_file(override, production):
    for name in production["services"]:
        assert override["services"][name]["env_file"] == ("override", [".env.staging"]), name


def test_staging_port_comes_from_upstreams_staging(defaults):
    defaults["upstreams"]["staging"] = "127.0.0.1:8010"
    cfg = staging.Staging.from_settings(settings.Settings("production", defaults))
    assert cfg.port == 8010 and cfg.health_url == "http://127.0.0.1:8010/health"
    assert '"127.0.0.1:8010:8000"' in staging.render_override(cfg)


def test_staging_elsewhere_is_refused(defaults):
    defaults["upstreams"]["staging"] = "10.0.0.5:8001"
    with pytest.raises(ConfigError, match="upstreams.staging"):
        staging.Staging.from_settings(settings.Settings("production", defaults))


def test_every_compose_command_names_stagings_project_and_files(cfg):
    app = cfg.compose_app()
    for command in (app.compose("ps -a --format json"), app.compose("up -d --no-deps api_a", SHA),
                    staging.build_command(app, SHA), staging.probes(cfg)["containers"]):
        words = shlex.split(command.split("&& ", 1)[1] if command.startswith("cd ") else command)
        assert "-p" in words and words[words.index("-p") + 1] == "coachntt-staging", command
        assert words.count("-f") == 2 and words[-1] != "coachntt" and "/opt/coachntt-staging/.coachntt-staging.compose.yml" in words
    assert app.compose("ps").startswith("cd /opt/coachntt-staging && API_A_PORT=8001 API_B_PORT=8001 ")


def test_the_sandbox_overrides_stay_and_staging_comes_last(defaults):
    defaults["app"]["compose_overrides"] = ["/etc/coachntt-sandbox/compose.sandbox.yml"]
    cfg = staging.Staging.from_settings(settings.Settings("production", defaults))
    assert cfg.compose_app().compose_files == ("docker-compose.prod.yml", "/etc/coachntt-sandbox/compose.sandbox.yml",
                                               "/opt/coachntt-staging/.coachntt-staging.compose.yml")


def test_the_default_settings_share_nothing_with_production(cfg):
    assert staging.collisions(cfg) == []
    app, staged = cfg.app, cfg.compose_app()
    assert (staged.dir, staged.db_container, staged.db_name) != (app.dir, app.db_container, app.db_name)
    assert staged.dir != app.dir and staged.db_container != app.db_container and staged.db_name != app.db_name
    assert cfg.port not in app.slot_ports


@pytest.mark.parametrize(("key", "value", "words"), [
    ("staging.dir", "/opt/coachntt", "overlaps app.dir"),
    ("staging.dir", "/opt/coachntt/staging", "overlaps app.dir"),
    ("staging.db_container", "ccp_postgres", "production's ccp_postgres"),
    ("staging.project", "coachntt", "is production's"),
])
def test_a_setting_that_would_share_with_production_is_named(defaults, key, value, words):
    section, name = key.split(".")
    defaults[section][name] = value
    cfg = staging.Staging.from_settings(settings.Settings("production", defaults))
    assert any(words in found for found in staging.collisions(cfg)), staging.collisions(cfg)


@pytest.mark.parametrize(("key", "bad"), [
    ("COACHNTT_STAGING__DIR", "relative/dir"), ("COACHNTT_STAGING__PROJECT", "Prod;rm"),
    ("COACHNTT_STAGING__DB_NAME", "x-y"), ("COACHNTT_STAGING__SMOKE_PATH", "api/notes"),
    ("COACHNTT_STAGING__DB_CONTAINER", "$(id)"), ("COACHNTT_STAGING__ENV_FILE", "../.env.production"),
])
def test_bad_staging_settings_are_refused(defaults, tmp_path, key, bad):
    with pytest.raises(ConfigError, match=key.split("__")[1].lower()):
        settings.validate(settings.load(defaults, {key: bad}, project_dir=tmp_path))


def test_smoke_over_http_sends_the_staging_host_header(cfg):
    words = shlex.split(staging.smoke_command(cfg, tls=False))
    assert words[0] == "curl" and "Host: staging.api.coachntt.ai" in words and words[-1] == "http://127.0.0.1/api/notes"
    assert "-k" not in words and "-L" not in words


def test_smoke_over_https_verifies_the_name_against_our_issuer_without_k(cfg):
    words = shlex.split(staging.smoke_command(cfg, tls=True))
    assert words[:2] == ["sudo", "-n"] and words[-1] == "https://staging.api.coachntt.ai/api/notes"
    assert words[words.index("--resolve") + 1] == "staging.api.coachntt.ai:443:127.0.0.1"
    assert words[words.index("--cacert") + 1] == f"{certificates.LIVE_DIR}/chain.pem"
    assert "-k" not in words and "--insecure" not in words


# -- facts -> skipped / refused ------------------------------------------------------

GOOD = {"dir": ("", 0), "head": (SHA, 0), "env": ("", 0), "override": ("", 1), "docker": ("26.1.5", 0),
        "site": ("", 0), "certificate": ("", 1), "containers": ("", 0)}


def host_for(fake_host, cfg, replies=None, **facts):
    answers = {**GOOD, **facts}
    return fake_host(facts={cmd: answers[name] for name, cmd in staging.probes(cfg).items()}, replies=replies,
                     is_root=False, login_user="coachntt")


def reporter():
    return Reporter("coachntt@vps", stream=open("/dev/null", "w"))  # noqa: SIM115 - closed with the process


def test_off_is_skipped_without_connecting(defaults, fake_host):
    defaults["staging"]["enabled"] = False
    host = fake_host()
    result = task.deploy_staging(host, settings.Settings("production", defaults), SHA, reporter())
    assert result.skipped and result.reason == "staging.enabled is false" and host.sent == []


def test_never_set_up_is_skipped_with_the_reason(defaults, fake_host, cfg):
    host = host_for(fake_host, cfg, dir=("", 1), head=("", 128), env=("", 1))
    result = task.deploy_staging(host, settings.Settings("production", defaults), SHA, reporter(), "vps")
    assert result.status == "skipped" and "not set up on vps" in result.reason and "staging.setup" in result.reason
    assert host.changes_sent == []


@pytest.mark.parametrize(("fact", "error", "words"), [
    ("head", ConfigError, "staging checkout missing in /opt/coachntt-staging"),
    ("env", ConfigError, ".env.staging is missing"),
    ("docker", OpsError, "Docker is not answering"),
    ("site", ConfigError, "does not serve staging.api.coachntt.ai"),
])
def test_set_up_but_not_ready_is_one_line_and_changes_nothing(defaults, fake_host, cfg, fact, error, words):
    host = host_for(fake_host, cfg, **{fact: ("", 1)})
    with pytest.raises(error, match=words) as info:
        task.deploy_staging(host, settings.Settings("production", defaults), SHA, reporter(), "vps")
    assert "production was not touched" in info.value.one_line()
    assert host.changes_sent == []


def sent_words(host) -> str:
    return "\n".join(host.changes_sent)


def test_a_deploy_sends_only_staging_commands_in_order(defaults, fake_host, cfg):
    host = host_for(fake_host, cfg, replies={"git fetch": (0, SHA + "\n", ""), "curl -sS -o /dev/null": (0, "200", "")})
    result = task.deploy_staging(host, settings.Settings("production", defaults), SHA[:12], reporter())
    assert result.status == "ok" and result.sha == SHA and result.health == "200 on http://127.0.0.1:8001/health"
    assert result.smoke == "200 GET http://staging.api.coachntt.ai/api/notes"
    sent = sent_words(host)
    order = ["git fetch", ".coachntt-staging.compose.yml.coachntt", "git checkout", "build --quiet api_a",
             "up -d --wait postgres", "run --rm -T api_a python -m scripts.migrate", "up -d --no-deps api_a",
             "health-gate", "Host: staging.api.coachntt.ai"]
    positions = [sent.index(word) for word in order]
    assert positions == sorted(positions), positions
    for command in host.changes_sent:
        assert "/opt/coachntt " not in command and "/opt/coachntt/" not in command and "ccp_postgres " not in command
        if "docker compose" in command:
            assert "-p coachntt-staging" in command


def test_a_rerun_with_the_override_in_place_does_not_rewrite_it(defaults, fake_host, cfg):
    host = host_for(fake_host, cfg, override=(staging.render_override(cfg), 0),
                    replies={"git fetch": (0, SHA + "\n", ""), "curl -sS -o /dev/null": (0, "200", "")})
    task.deploy_staging(host, settings.Settings("production", defaults), SHA, reporter())
    assert ".coachntt-staging.compose.yml.coachntt" not in sent_words(host)


def test_a_failed_gate_names_the_phase_and_that_production_was_not_touched(defaults, fake_host, cfg):
    host = host_for(fake_host, cfg, replies={"git fetch": (0, SHA + "\n", ""), "health-gate": (1, "500 broken", "")})
    with pytest.raises(OpsError) as info:
        task.deploy_staging(host, settings.Settings("production", defaults), SHA, reporter())
    line = info.value.one_line()
    assert info.value.exit_code == 1 and line.startswith("staging failed during health gate: /health did not answer 200 on 127.0.0.1:8001")
    assert line.endswith("production was not touched") and "\n" not in line
    assert "Host: staging" not in sent_words(host), "no smoke after a failed gate"


def test_a_failed_smoke_names_what_nginx_answered(defaults, fake_host, cfg):
    host = host_for(fake_host, cfg, replies={"git fetch": (0, SHA + "\n", ""), "curl -sS -o /dev/null": (0, "502", "")})
    with pytest.raises(OpsError, match="staging failed during smoke: GET http://staging.api.coachntt.ai/api/notes "
                                       "through nginx answered 502, not 200"):
        task.deploy_staging(host, settings.Settings("production", defaults), SHA, reporter())


def test_an_unknown_sha_keeps_exit_2(defaults, fake_host, cfg):
    host = host_for(fake_host, cfg, replies={"git fetch": (91, "", "")})
    with pytest.raises(OpsError) as info:
        task.deploy_staging(host, settings.Settings("production", defaults), SHA, reporter())
    assert info.value.exit_code == UsageError.exit_code and "staging failed during fetch: unknown sha" in info.value.what


def test_the_env_db_script_renames_the_database_and_prints_no_secret(tmp_path):
    env = tmp_path / ".env.staging"
    env.write_text("POSTGRES_DB=coachntt_prod\nPOSTGRES_PASSWORD=s3cr3t\n"
                   "DATABASE_URL=postgresql://coachntt:s3cr3t@postgres:5432/coachntt_prod\nJWT_SECRET=x\n")
    env.chmod(0o600)
    done = subprocess.run(["sh", str(PROJECT_DIR / "scripts" / "staging-env-db.sh"), str(env), "coachntt_staging"],
                          capture_output=True, text=True, check=True)
    assert "s3cr3t" not in done.stdout + done.stderr
    assert env.read_text() == ("POSTGRES_DB=coachntt_staging\nPOSTGRES_PASSWORD=s3cr3t\n"
                               "DATABASE_URL=postgresql://coachntt:s3cr3t@postgres:5432/coachntt_staging\nJWT_SECRET=x\n")
    assert env.stat().st_mode & 0o777 == 0o600


def test_the_sha_staging_already_runs_is_only_checked(defaults, fake_host, cfg):
    running = json.dumps({"Service": "api_a", "State": "running", "Image": f"coachntt-staging/api:{SHA}"})
    host = host_for(fake_host, cfg, override=(staging.render_override(cfg), 0), containers=(running, 0),
                    replies={"git fetch": (0, SHA + "\n", ""), "curl -sS -o /dev/null": (0, "200", "")})
    result = task.deploy_staging(host, settings.Settings("production", defaults), SHA, reporter())
    assert result.status == "ok"
    sent = sent_words(host)
    assert "git fetch" in sent and "health-gate" in sent and "Host: staging.api.coachntt.ai" in sent
    for change in ("git checkout", "build", "up -d", "scripts.migrate"):
        assert change not in sent, change


def test_another_sha_in_the_running_container_ships(cfg):
    running = json.dumps({"Service": "api_a", "State": "running", "Image": f"coachntt-staging/api:{'b' * 40}"})
    facts = {name: ProbeResult(out, status) for name, (out, status) in
             {**GOOD, "override": (staging.render_override(cfg), 0), "containers": (running, 0)}.items()}
    assert not staging.already_runs(cfg, facts, SHA, staging.render_override(cfg))
    facts["containers"] = ProbeResult(running.replace("b" * 40, SHA), 0)
    assert staging.already_runs(cfg, facts, SHA, staging.render_override(cfg))
    assert not staging.already_runs(cfg, facts, SHA, staging.render_override(cfg) + "# edited\n")


def test_a_smoke_nobody_answers_says_what_curl_said(defaults, fake_host, cfg):
    host = host_for(fake_host, cfg, replies={"git fetch": (0, SHA + "\n", ""),
                                             "curl -sS -o /dev/null": (60, "000", "curl: (60) SSL certificate problem\nMore details here: https://curl.se/docs/sslcerts.html\n")})
    with pytest.raises(OpsError, match=r"answered nothing \(curl: \(60\) SSL certificate problem\), not 200"):
        task.deploy_staging(host, settings.Settings("production", defaults), SHA, reporter())


class FakeOps:
    def __init__(self, s, target):
        self.settings, self.target, self.where = s, target, "vps"
        self.lines: list[str] = []
        self.reporter = type("R", (), {"info": lambda _, text: self.lines.append(text)})()


@pytest.mark.parametrize(("facts", "words"), [
    ({}, "would run abc1234 in /opt/coachntt-staging (project coachntt-staging)"),
    ({"dir": ("", 1)}, "staging skipped: staging is not set up on vps"),
    ({"site": ("", 1)}, "but preflight refuses now: nginx on vps does not serve staging.api.coachntt.ai"),
])
def test_dry_run_reads_facts_only_and_says_what_would_run(defaults, fake_host, cfg, facts, words):
    host = host_for(fake_host, cfg, **facts)
    ops = FakeOps(settings.Settings("production", defaults), host)
    task.dry_run(ops, "abc1234")
    assert any(words in line for line in ops.lines), ops.lines
    assert host.changes_sent == []
