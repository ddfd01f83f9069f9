"""deploy and rollback of examples/app on a real sandbox host with Docker.

One host goes through the life of a service, in order: setup, deploy A,
deploy B (with a migration) keeping data, a broken C rolled back
automatically, the lock refusing a concurrent deploy, rollbacks.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fabfile.sandbox import example_repo
from opsrun import console, example_app_served, fab, ready_for_the_app, through_nginx

MIGRATION_2 = "ALTER TABLE notes ADD COLUMN IF NOT EXISTS pinned boolean NOT NULL DEFAULT false;\n"


class Service:
    """The host, the repo it deploys from, and every output the tool printed."""

    def __init__(self, host, repo: Path, env: dict):
        self.host, self.repo, self.env = host, repo, env
        self.outputs: list[str] = []
        self.shas: dict[str, str] = {}

    def fab(self, *args: str) -> subprocess.CompletedProcess:
        result = fab(self.host, *args, user="coachntt", env=self.env)
        self.outputs.append(result.stdout + result.stderr)
        return result

    def health(self) -> dict:
        code, out = console(self.host, through_nginx("/health"))
        assert code == 0, out
        return json.loads(out)

    def api(self, method: str, path: str, body: dict | None = None) -> str:
        data = f"-H 'Content-Type: application/json' -d '{json.dumps(body)}'" if body else ""
        code, out = console(self.host, through_nginx(path, curl=f"curl -X {method} {data}"))
        assert code == 0, out
        return out


@pytest.fixture(scope="module")
def service(vps_factory_module, tmp_path_factory):
    host = vps_factory_module(flavour="provisioned")
    ready_for_the_app(host)
    with example_app_served(tmp_path_factory.mktemp("git")) as (repo, first, env):
        svc = Service(host, repo, env)
        svc.shas["A"] = first
        yield svc


def test_setup_clones_and_generates_secrets_once(service):
    result = service.fab("deploy.setup")
    assert result.returncode == 0, result.stdout + result.stderr
    code, out = console(service.host, "stat -c '%a %U' /opt/coachntt/.env.production && grep -c change-me /opt/coachntt/.env.production")
    assert out.splitlines()[0] == "600 coachntt", out
    assert out.splitlines()[-1] == "0", "every change-me placeholder must be replaced by a generated secret"
    _, before = console(service.host, "sha256sum /opt/coachntt/.env.production")
    again = service.fab("deploy.setup")
    assert again.returncode == 0 and "never overwritten" in again.stdout
    assert console(service.host, "sha256sum /opt/coachntt/.env.production")[1] == before


def test_deploy_serves_the_exact_sha(service):
    result = service.fab("deploy", "--sha", service.shas["A"])
    assert result.returncode == 0, result.stdout + result.stderr
    health = service.health()
    assert health["status"] == "ok" and health["version"] == service.shas["A"], health


def test_deploy_with_a_migration_keeps_existing_data(service):
    created = service.api("POST", "/api/notes", {"body": "written before B"})
    assert "written before B" in created, created
    service.shas["B"] = example_repo.commit_change(service.repo, "add pinned notes", {"migrations/0004_pinned.sql": MIGRATION_2})

    result = service.fab("deploy", "--sha", service.shas["B"])
    assert result.returncode == 0, result.stdout + result.stderr
    health = service.health()
    assert health["version"] == service.shas["B"] and health["schema"] == 4, health
    assert "written before B" in service.api("GET", "/api/notes")
    code, backups = console(service.host, "ls /backups")
    assert code == 0 and f"pre-{service.shas['B'][:12]}" in backups, backups


def test_a_release_failing_its_health_gate_is_rolled_back_automatically(service):
    service.shas["C"] = example_repo.commit_change(service.repo, "break health", {"BROKEN_HEALTH": "x"})
    result = service.fab("deploy", "--sha", service.shas["C"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "rolled back to " + service.shas["B"][:12] in result.stderr, result.stderr
    assert "500" in result.stdout, "the failed gate must show the health responses"
    assert service.health()["version"] == service.shas["B"]
    service.shas["D"] = example_repo.commit_change(service.repo, "fix health", {"BROKEN_HEALTH": None})


def test_a_concurrent_second_deploy_is_refused_by_the_lock(service):
    # Two full deploys (neither sha is live), so the winner holds the lock for seconds.
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda sha: service.fab("deploy", "--sha", sha), [service.shas["A"], service.shas["D"]]))
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 4], [r.stdout + r.stderr for r in results]
    refused = next(r for r in results if r.returncode == 4)
    assert "deploy lock held by" in refused.stderr and "since" in refused.stderr, refused.stderr
    assert console(service.host, "test -d /var/lib/coachntt-ops/deploy.lock")[0] != 0, "lock released after the run"


def test_rollback_to_an_unknown_sha_changes_nothing(service):
    _, head_before = console(service.host, "git -C /opt/coachntt rev-parse HEAD")
    result = service.fab("rollback", "--to", "deadbeef")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a release that went live" in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert service.shas["A"][:12] in lines[0], "the error lists recent good releases"
    assert console(service.host, "git -C /opt/coachntt rev-parse HEAD")[1] == head_before


def test_rollback_never_offers_a_failed_release(service):
    result = service.fab("rollback", "--to", service.shas["C"][:12])
    assert result.returncode == 2, result.stdout + result.stderr


def test_rollback_to_a_good_release_works_and_is_logged(service):
    service.fab("deploy", "--sha", service.shas["B"])
    result = service.fab("rollback", "--to", service.shas["A"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "schema" in result.stdout, "crossing a schema change warns"
    assert service.health()["version"] == service.shas["A"]
    history = service.fab("deploy.history")
    kinds = [line.split()[1] for line in history.stdout.splitlines() if line.startswith("  20")]
    assert kinds.count("deploy") >= 3 and kinds[-1] == "rollback", history.stdout
    assert "failed" in history.stdout and service.shas["C"][:12] in history.stdout


def test_redeploying_the_live_sha_only_checks_health(service):
    service.fab("deploy", "--sha", service.shas["B"])
    result = service.fab("deploy", "--sha", service.shas["B"], "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [json.loads(line)["step"] for line in result.stdout.splitlines() if line.startswith('{"') and '"step"' in line]
    assert steps == ["fetch", "health gate"], steps


def test_rollback_with_db_restores_the_dump_taken_before_the_release_it_undoes(service):
    assert service.health()["version"] == service.shas["B"], "the previous test leaves B live"
    service.api("POST", "/api/notes", {"body": "written after B went live"})
    refused = service.fab("rollback", "--to", service.shas["A"], "--with-db")
    assert refused.returncode == 2 and "--yes" in refused.stderr, "replacing the database needs confirmation"

    result = service.fab("rollback", "--to", service.shas["A"], "--with-db", "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "restore database" in result.stdout
    assert service.health()["version"] == service.shas["A"]
    notes = service.api("GET", "/api/notes")
    assert "written before B" in notes and "written after B went live" not in notes, notes


def test_secrets_never_appear_in_any_output(service):
    code, env = console(service.host, "cat /opt/coachntt/.env.production")
    assert code == 0
    secrets = [line.split("=", 1)[1] for line in env.splitlines()
               if line.split("=", 1)[0] in ("POSTGRES_PASSWORD", "JWT_SECRET", "API_KEY")]
    assert len(secrets) == 3 and all(len(s) >= 32 for s in secrets)
    assert service.outputs, "the tests above must have produced output"
    for output in service.outputs:
        for secret in secrets:
            assert secret not in output
