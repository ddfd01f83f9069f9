"""staging.deploy on a real sandbox host, beside a production that serves.

One host: production deployed as test_deploy does, then staging set up and deployed
with the same sha. Production's containers keep their ids and answer /health 200
through nginx the whole time, staging answers through nginx on its own domain with a
database of its own, a staging release failing its health gate is one line and exit 1
with production untouched, and staging.deploy twice is safe.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from fabfile import sandbox
from fabfile.sandbox import example_repo
from opsrun import console, example_app_served, fab, json_lines, one_line, ready_for_the_app, through_nginx

# Pebble validates through the sandbox DNS, which maps names to one host at a time:
# under `-n 2` the modules that map names share a worker.
pytestmark = pytest.mark.xdist_group("sandbox-dns")

STAGING_DOMAIN = "staging.api.coachntt.ai"
PRODUCTION_CONTAINERS = "docker ps -a --filter label=com.docker.compose.project=coachntt --format '{{.ID}} {{.Names}} {{.State}}' | sort"


def staging_curl(path: str, curl: str = "curl") -> str:
    return f"{curl} -s -m 5 -H 'Host: {STAGING_DOMAIN}' http://127.0.0.1{path}"


class Host:
    def __init__(self, host, repo, env):
        self.host, self.repo, self.env = host, repo, env
        self.shas: dict[str, str] = {}

    def fab(self, *args: str):
        return fab(self.host, *args, user="coachntt", env=self.env)

    def production(self) -> str:
        code, out = console(self.host, PRODUCTION_CONTAINERS)
        assert code == 0 and out.strip(), out
        return out

    def health(self, curl=through_nginx) -> dict:
        code, out = console(self.host, curl("/health"))
        assert code == 0, out
        return json.loads(out)

    @contextmanager
    def watching_production(self) -> Iterator[list[str]]:
        """Production's /health through nginx, asked every second while the block runs."""
        codes: list[str] = []
        done = threading.Event()

        def ask():
            while not done.is_set() and len(codes) < 900:
                codes.append(console(self.host, through_nginx("/health", curl="curl -o /dev/null -w '%{http_code}'"))[1].strip())
                time.sleep(1)

        thread = threading.Thread(target=ask, daemon=True)
        thread.start()
        try:
            yield codes
        finally:
            done.set()
            thread.join(timeout=30)


@pytest.fixture(scope="module")
def box(vps_factory_module, tmp_path_factory):
    host = vps_factory_module(flavour="provisioned")
    ready_for_the_app(host)
    with example_app_served(tmp_path_factory.mktemp("git")) as (repo, first, env):
        box = Host(host, repo, env)
        box.shas["A"] = first
        setup = box.fab("deploy.setup")
        assert setup.returncode == 0, setup.stdout + setup.stderr
        deployed = box.fab("deploy", "--sha", first)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        yield box


def test_staging_never_set_up_is_skipped_with_the_reason(box):
    result = box.fab("staging.deploy", "--sha", box.shas["A"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "staging skipped: staging is not set up" in result.stdout and "staging.setup" in result.stdout, result.stdout
    dry = box.fab("staging.deploy", "--sha", box.shas["A"], "--dry")
    assert dry.returncode == 0 and "staging skipped: staging is not set up" in dry.stdout, dry.stdout + dry.stderr
    off = fab(box.host, "staging.deploy", "--sha", box.shas["A"], user="coachntt", env={**box.env, "COACHNTT_STAGING__ENABLED": "false"})
    assert off.returncode == 0 and "staging skipped: staging.enabled is false" in off.stdout, off.stdout + off.stderr


def test_setup_makes_its_own_checkout_and_env_file_once(box):
    result = box.fab("staging.setup")
    assert result.returncode == 0, result.stdout + result.stderr
    code, out = console(box.host, "stat -c '%a %U' /opt/coachntt-staging/.env.staging && "
                                  "grep -c change-me /opt/coachntt-staging/.env.staging; "
                                  "grep -h '^POSTGRES_DB=' /opt/coachntt-staging/.env.staging /opt/coachntt/.env.production; "
                                  "grep -h '^JWT_SECRET=' /opt/coachntt-staging/.env.staging /opt/coachntt/.env.production")
    lines = out.splitlines()
    assert lines[0] == "600 coachntt" and lines[1] == "0", out
    assert lines[2:4] == ["POSTGRES_DB=coachntt_staging", "POSTGRES_DB=coachntt_prod"], out
    assert lines[4] != lines[5], "staging's secrets are its own"
    for secret in (lines[4].split("=", 1)[1], lines[5].split("=", 1)[1]):
        assert secret not in result.stdout + result.stderr
    again = box.fab("staging.setup")
    assert again.returncode == 0 and "never overwritten" in again.stdout, again.stdout + again.stderr
    assert console(box.host, "grep -h '^JWT_SECRET=' /opt/coachntt-staging/.env.staging")[1].strip() == lines[4]


def test_staging_deploy_runs_the_sha_apart_from_production(box):
    before = box.production()
    dry = box.fab("staging.deploy", "--sha", box.shas["A"], "--dry")
    assert dry.returncode == 0 and "would run" in dry.stdout and "but preflight" not in dry.stdout, dry.stdout + dry.stderr
    assert console(box.host, "docker ps -aq --filter label=com.docker.compose.project=coachntt-staging")[1].strip() == "", \
        "--dry changes nothing"
    with box.watching_production() as codes:
        result = box.fab("staging.deploy", "--sha", box.shas["A"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"staging ok: {box.shas['A'][:12]}" in result.stdout, result.stdout
    assert box.production() == before, "production's containers keep their ids and states"
    assert codes and set(codes) == {"200"}, codes
    assert box.health()["version"] == box.shas["A"]
    staged = box.health(staging_curl)
    assert staged["status"] == "ok" and staged["version"] == box.shas["A"] and staged["schema"] >= 1, staged
    code, out = console(box.host, "docker ps --filter label=com.docker.compose.project=coachntt-staging --format '{{.Names}} {{.Ports}}'")
    assert "ccp_postgres_staging" in out and "127.0.0.1:8001->8000" in out and "6432" not in out, out
    assert "api_b" not in out, "staging runs one slot"
    code, images = console(box.host, "docker images --format '{{.Repository}}:{{.Tag}}'")
    assert f"coachntt-staging/api:{box.shas['A']}" in images, images


def test_staging_has_a_database_of_its_own(box):
    code, out = console(box.host, staging_curl("/api/notes", curl="curl -X POST -H 'Content-Type: application/json' "
                                                                 "-d '{\"body\": \"only on staging\"}'"))
    assert code == 0 and "only on staging" in out, out
    assert "only on staging" in console(box.host, staging_curl("/api/notes"))[1]
    assert "only on staging" not in console(box.host, through_nginx("/api/notes"))[1]
    code, out = console(box.host, "docker exec ccp_postgres_staging psql -U coachntt -d coachntt_staging -Atc 'SELECT count(*) FROM notes'"
                                  " && docker exec ccp_postgres psql -U coachntt -d coachntt_prod -Atc 'SELECT count(*) FROM notes'"
                                  " && docker volume ls --format '{{.Name}}' | grep pgdata | sort")
    assert code == 0, out
    staged, production, *volumes = out.split()
    assert int(staged) >= 1 and int(production) == 0, out
    assert volumes == ["coachntt-staging_pgdata", "coachntt_pgdata"], out


def test_staging_deploy_twice_is_safe(box):
    before = box.production()
    code, staging_before = console(box.host, "docker ps -q --filter label=com.docker.compose.project=coachntt-staging | sort")
    result = box.fab("staging.deploy", "--sha", box.shas["A"], "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [(line["step"], line["status"]) for line in json_lines(result.stdout) if "step" in line]
    assert steps == [("staging fetch", "ok"), ("staging start", "ok"), ("staging health gate", "ok"),
                     ("staging smoke", "ok")], steps
    assert console(box.host, "docker ps -q --filter label=com.docker.compose.project=coachntt-staging | sort")[1] == staging_before, \
        "the same sha again recreates nothing"
    assert box.production() == before
    assert "only on staging" in console(box.host, staging_curl("/api/notes"))[1], "staging's data stays"
    status = box.fab("staging.status")
    assert status.returncode == 0 and "HTTP 200" in status.stdout and box.shas["A"][:12] in status.stdout, status.stdout + status.stderr


def test_a_failing_staging_release_is_one_line_and_production_untouched(box):
    box.shas["B"] = example_repo.commit_change(box.repo, "break health", {"BROKEN_HEALTH": "x"})
    before = box.production()
    with box.watching_production() as codes:
        result = box.fab("staging.deploy", "--sha", box.shas["B"])
    assert result.returncode == 1, result.stdout + result.stderr
    one_line(result, "staging failed during health gate", "production was not touched")
    assert box.production() == before
    assert codes and set(codes) == {"200"}, codes
    assert box.health()["version"] == box.shas["A"]
    assert console(box.host, "git -c safe.directory='*' -C /opt/coachntt rev-parse HEAD")[1].strip() == box.shas["A"]


def test_a_missing_checkout_is_one_line_and_exit_2(box):
    code, out = console(box.host, "mv /opt/coachntt-staging/.git /opt/coachntt-staging/.git.away")
    assert code == 0, out
    try:
        result = box.fab("staging.deploy", "--sha", box.shas["A"])
        assert result.returncode == 2, result.stdout + result.stderr
        one_line(result, "staging checkout missing", "production was not touched")
    finally:
        console(box.host, "mv /opt/coachntt-staging/.git.away /opt/coachntt-staging/.git")
    assert box.health()["version"] == box.shas["A"]


# -- over HTTPS: a certificate from the sandbox's Pebble names the staging domain ----------

# Pebble's DNS map is one for the machine: names of this module's own, not test_ssl's.
TLS_DOMAINS = {"API": "api.stg-tls.cntt.test", "METRICS": "metrics.stg-tls.cntt.test", "STAGING": "staging.stg-tls.cntt.test"}


@pytest.fixture(scope="module")
def tls_box(vps_factory_module, tmp_path_factory):
    try:
        pebble = sandbox.ensure_pebble()
    except sandbox.SandboxError as exc:
        pytest.fail(f"Pebble (the sandbox's ACME server) did not start: {exc}")
    host = vps_factory_module(flavour="provisioned")
    for name in TLS_DOMAINS.values():
        sandbox.map_domain(name, host.ip)  # undone by sandbox.down with the host
    ready_for_the_app(host)
    with example_app_served(tmp_path_factory.mktemp("git-tls")) as (repo, first, app_env):
        env = {**app_env, **{f"COACHNTT_DOMAINS__{key}": name for key, name in TLS_DOMAINS.items()},
               "COACHNTT_SSL__EMAIL": "ops@cntt.test", "COACHNTT_SSL__ACME_SERVER": pebble.directory_url}
        box = Host(host, repo, env)
        box.shas["A"] = first
        for args in (("deploy.setup",), ("deploy", "--sha", first), ("nginx",), ("ssl.issue",), ("staging.setup",)):
            result = box.fab(*args)
            assert result.returncode == 0, result.stdout + result.stderr
        yield box


def test_with_a_certificate_the_smoke_goes_over_verified_https(tls_box):
    code, redirect = console(tls_box.host, f"curl -s -o /dev/null -w '%{{http_code}}' -H 'Host: {TLS_DOMAINS['STAGING']}' "
                                           "http://127.0.0.1/api/notes")
    assert redirect == "301", "plain HTTP only redirects once the certificate names staging"
    result = tls_box.fab("staging.deploy", "--sha", tls_box.shas["A"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"smoke 200 GET https://{TLS_DOMAINS['STAGING']}/api/notes" in result.stdout, result.stdout
    status = tls_box.fab("staging.status")
    assert status.returncode == 0 and f"HTTP 200 GET https://{TLS_DOMAINS['STAGING']}/api/notes" in status.stdout, status.stdout


def test_a_certificate_that_does_not_verify_fails_the_smoke(tls_box):
    """The smoke verifies: a chain.pem of another issuer fails it (no -k anywhere)."""
    chain = "/etc/letsencrypt/live/coachntt/chain.pem"
    code, out = console(tls_box.host, f"cp -L {chain} /root/chain.keep && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
                                      f"-nodes -keyout /dev/null -subj /CN=other -days 1 -out /root/other.pem 2>&1 && "
                                      f"cp /root/other.pem \"$(readlink -f {chain})\"")
    assert code == 0, out
    try:
        result = tls_box.fab("staging.deploy", "--sha", tls_box.shas["A"])
        assert result.returncode == 1, result.stdout + result.stderr
        one_line(result, "staging failed during smoke", "answered nothing (curl: (60)", "production was not touched")
    finally:
        console(tls_box.host, f"cp /root/chain.keep \"$(readlink -f {chain})\"")
