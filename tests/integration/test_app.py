"""examples/app on a real sandbox host: registry-free images, the production compose stack.

One provisioned host (Docker + compose inside) per module: the images built by
fabfile/sandbox/images.py are loaded, the example repo (a real git repo made here) is
copied to /opt/coachntt, .env.production written, and the plan's sequence run:
`up -d postgres`, `run --rm api_a python -m scripts.migrate`, `up -d`. The tests then
check what the deploy tasks rely on: /health (200 with sha and schema, 503 without the
database, 500 for a BROKEN_HEALTH release), notes in PostgreSQL, the /ws websocket (and
its 1001 close when a slot stops), the expand/contract migrations, PgBouncer, pg_dump
through ccp_postgres, loopback-only ports and non-root containers.

The compose files themselves are also checked as data (no host needed).
"""

from __future__ import annotations

import io
import json
import secrets
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from fabfile import sandbox
from fabfile.sandbox import example_repo, images

PROJECT_DIR = Path(__file__).resolve().parents[2]
APP_SOURCE = PROJECT_DIR / "examples" / "app"
PROD_COMPOSE = APP_SOURCE / "docker-compose.prod.yml"
OVERRIDE = PROJECT_DIR / "configs" / "sandbox" / "compose.sandbox.yml"
APP_DIR = "/opt/coachntt"
OVERRIDE_ON_HOST = "/etc/coachntt-sandbox/compose.sandbox.yml"
COMPOSE = f"cd {APP_DIR} && docker compose -f docker-compose.prod.yml -f {OVERRIDE_ON_HOST}"
HEALTH_URL = "http://127.0.0.1:8000/health"


# --------------------------------------------------------------------------- compose files as data


class ResetLoader(yaml.SafeLoader):
    """Reads compose's `!reset` tag (a value that deletes the key when merged)."""


ResetLoader.add_constructor("!reset", lambda loader, node: "!reset")


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ResetLoader)


def test_production_compose_follows_the_plan():
    compose = load_compose(PROD_COMPOSE)
    services = compose["services"]
    assert set(services) == {"postgres", "pgbouncer", "api_a", "api_b"}
    assert services["api_a"] | {"ports": None} == services["api_b"] | {"ports": None}, "two slots, one definition"
    assert services["postgres"]["container_name"] == "ccp_postgres"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["api_a"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["api_a"]["restart"] == "unless-stopped", "a slot retired after a cutover stays stopped across reboots"
    assert "FROM coachntt/python-base" in (APP_SOURCE / "Dockerfile").read_text()
    assert compose["networks"]["coachntt"]["ipam"]["config"][0]["subnet"] == "172.20.0.0/16"
    for name, service in services.items():
        for port in service.get("ports", []):
            # PostgreSQL: loopback unless db.replica sets DB_PUBLISH to the host's private address.
            loopback = "${DB_PUBLISH:-127.0.0.1}:" if name == "postgres" else "127.0.0.1:"
            assert port.startswith(loopback), f"{name} publishes {port} beyond loopback (Docker bypasses ufw)"
        assert service.get("user") not in (None, "root", "0"), f"{name} must run as a non-root user"
        assert service["env_file"] == ".env.production"
        assert "apparmor=docker-default" in service["security_opt"]
        assert "coachntt" in service["networks"]
        limits = service["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) <= 0.5 and limits["memory"], f"{name} lacks the plan's limits"
    assert services["api_a"]["ports"] == ["127.0.0.1:${API_A_PORT:-8000}:8000"]
    assert services["api_b"]["ports"] == ["127.0.0.1:${API_B_PORT:-8002}:8000"], "not 8001: staging listens there"
    assert "127.0.0.1:6432:6432" in services["pgbouncer"]["ports"]
    for api_limit in ("postgres", "api_a", "api_b"):
        assert services[api_limit]["deploy"]["resources"]["limits"] == {"cpus": "0.5", "memory": "2g"}


def test_sandbox_override_only_drops_cpu_limits():
    override = load_compose(OVERRIDE)
    production = load_compose(PROD_COMPOSE)
    limited = {name for name, s in production["services"].items() if "cpus" in s["deploy"]["resources"]["limits"]}
    assert set(override["services"]) == limited
    for service in override["services"].values():
        assert service == {"deploy": {"resources": {"limits": {"cpus": "!reset"}}}}
    assert "NanoCPUs" in OVERRIDE.read_text() and "never for production" in OVERRIDE.read_text()


def test_env_example_has_every_setting():
    lines = (APP_SOURCE / ".env.example").read_text().splitlines()
    keys = {line.split("=", 1)[0] for line in lines if "=" in line and not line.startswith("#")}
    assert {"DATABASE_URL", "POSTGRES_PASSWORD", "JWT_SECRET", "API_KEY", "CORS_ORIGINS"} <= keys


def test_image_recipes_are_keyed_and_non_root():
    for family in images.FAMILIES:
        assert family.key() == family.key() and len(family.key()) == 16
        command = family.mmdebstrap_command(Path("/tmp/out.tar"))
        assert "--variant=essential" in command and images.SUITE in command and "/tmp/out.tar" in command
        for image in family.images:
            assert image.user not in ("", "root", "0"), f"{image.tag} would run as root"
    assert {image.tag for family in images.FAMILIES for image in family.images} == {
        "coachntt/python-base:3.13-trixie", "coachntt/postgres:17-trixie", "coachntt/pgbouncer:1.24-trixie"}


def test_docker_archive_is_docker_load_format(tmp_path):
    """The archive images.py writes: manifest + one config per tag (id = its sha) + one shared layer."""
    import hashlib

    (tmp_path / "tree" / "etc").mkdir(parents=True)
    (tmp_path / "tree" / "etc" / "hello").write_text("hi\n")
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as archive:
        archive.add(tmp_path / "tree", arcname=".")
    family = images.ImageFamily(name="t", packages=("x",), images=(
        images.ImageConfig(tag="t/a:latest", user="app", cmd=("python3",)),
        images.ImageConfig(tag="t/b:latest", user="postgres", entrypoint=("/e",), expose=("1/tcp",))))
    ids = images.write_docker_archive(family, layer, tmp_path / "out.tar.zst")
    raw = subprocess.run(["zstd", "-dc", str(tmp_path / "out.tar.zst")], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(raw)) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}
    manifest = json.loads(members["manifest.json"])
    diff_id = hashlib.sha256(layer.read_bytes()).hexdigest()
    assert [entry["RepoTags"] for entry in manifest] == [["t/a:latest"], ["t/b:latest"]]
    for entry in manifest:
        config_bytes = members[entry["Config"]]
        config = json.loads(config_bytes)
        assert ids[entry["RepoTags"][0]] == "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        assert entry["Layers"] == [f"{diff_id}/layer.tar"] and config["rootfs"]["diff_ids"] == [f"sha256:{diff_id}"]
        assert config["config"]["User"] in ("app", "postgres") and config["os"] == "linux"
    assert members[f"{diff_id}/layer.tar"] == layer.read_bytes()
    assert json.loads(members[manifest[1]["Config"]])["config"]["Entrypoint"] == ["/e"]


def test_example_repo_commits_real_shas(tmp_path):
    repo = tmp_path / "app"
    first = example_repo.make_example_repo(repo)
    assert (repo / "docker-compose.prod.yml").exists() and len(first) == 40
    broken = example_repo.commit_change(repo, "break health", {"BROKEN_HEALTH": "", "notes/x.txt": b"\x00"})
    fixed = example_repo.commit_change(repo, "fix health", {"BROKEN_HEALTH": None})
    assert len({first, broken, fixed}) == 3
    assert not (repo / "BROKEN_HEALTH").exists() and (repo / "notes/x.txt").read_bytes() == b"\x00"
    with pytest.raises(sandbox.SandboxError, match="outside the repository"):
        example_repo.commit_change(repo, "escape", {"../evil": "x"})


# --------------------------------------------------------------------------- the stack on a host


@dataclass
class Stack:
    host: sandbox.Host
    repo: Path
    sha: str
    password: str
    timings: dict = field(default_factory=dict)
    migrate_output: str = ""


def sh(host, command: str, *, stdin: bytes | None = None, timeout: float = 300, check: bool = True) -> str:
    """Run a command inside the host (harness side, no ssh); its stdout. Asserts success unless check=False."""
    result = images.host_exec(host, command, stdin=stdin, timeout=timeout)
    if check:
        output = (result.stdout + result.stderr).decode(errors="replace")
        assert result.returncode == 0, f"`{command}` on {host.name} exited {result.returncode}:\n{output[-3000:]}"
    return result.stdout.decode(errors="replace")


def repo_tarball(repo: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(repo, arcname=".")
    return buffer.getvalue()


def push_repo(host, repo: Path) -> None:
    """The checkout as the deploy task leaves it: the repo (with .git) in /opt/coachntt."""
    sh(host, f"mkdir -p {APP_DIR} && find {APP_DIR} -mindepth 1 -maxdepth 1 ! -name .env.production -exec rm -rf {{}} + "
             f"&& tar -C {APP_DIR} -x", stdin=repo_tarball(repo))


def http(host, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
    data = "-H 'Content-Type: application/json' --data-binary @-" if body is not None else ""
    # status 000 (no answer yet) is a result too: callers poll
    out = sh(host, f"rm -f /tmp/app-body; curl -s -m 5 -o /tmp/app-body -w '%{{http_code}}' -X {method} {data} "
                   f"http://127.0.0.1:8000{path}; echo; cat /tmp/app-body 2>/dev/null; true",
             stdin=json.dumps(body).encode() if body is not None else None)
    status, _, text = out.partition("\n")
    return int(status or 0), text


def wait_health(host, expect: int, deadline: float = 60) -> dict:
    """Poll /health every second until it answers `expect` (bounded); return its JSON."""
    end = time.monotonic() + deadline
    seen = []
    while True:
        status, text = http(host, "GET", "/health")
        seen.append(f"{status} {text[:120]}")
        if status == expect:
            return json.loads(text)
        if time.monotonic() > end:
            logs = sh(host, f"{COMPOSE} logs --tail 30 api_a", check=False)
            pytest.fail(f"/health never answered {expect} within {deadline:.0f}s; last: {seen[-3:]}\napi logs:\n{logs[-2000:]}")
        time.sleep(1)


def env_production(password: str) -> str:
    return (
        "POSTGRES_USER=coachntt\nPOSTGRES_DB=coachntt_prod\n"
        f"POSTGRES_PASSWORD={password}\n"
        f"DATABASE_URL=postgresql://coachntt:{password}@postgres:5432/coachntt_prod\n"
        f"JWT_SECRET={secrets.token_hex(32)}\nAPI_KEY={secrets.token_hex(24)}\nCORS_ORIGINS=https://app.coachntt.ai\n"
    )


@pytest.fixture(scope="module")
def stack(sandbox_ready, tmp_path_factory):
    host = None
    try:
        started = time.monotonic()
        host = sandbox.up(flavour="provisioned")
        timings = {"host_up": time.monotonic() - started}

        started = time.monotonic()
        images.load_images(host)
        timings["images_build_or_cache_and_load"] = time.monotonic() - started

        repo = tmp_path_factory.mktemp("example") / "app"
        sha = example_repo.make_example_repo(repo)
        push_repo(host, repo)
        password = secrets.token_hex(16)
        sh(host, f"umask 077 && cat > {APP_DIR}/.env.production", stdin=env_production(password).encode())
        sh(host, f"mkdir -p {Path(OVERRIDE_ON_HOST).parent} && cat > {OVERRIDE_ON_HOST}", stdin=OVERRIDE.read_bytes())

        started = time.monotonic()
        sh(host, f"{COMPOSE} up -d postgres")
        migrate_output = sh(host, f"{COMPOSE} run --rm api_a python -m scripts.migrate")
        sh(host, f"{COMPOSE} up -d")
        wait_health(host, 200)
        timings["compose_up_migrate_healthy"] = time.monotonic() - started
        print("\nexample app stack timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        yield Stack(host, repo, sha, password, timings, migrate_output)
    except sandbox.SandboxError as exc:
        pytest.fail(f"example app stack could not be set up: {exc}")
    finally:
        if host is not None:
            sandbox.down(host.name, instance=host.instance)


def test_health_reports_release_sha_and_schema(stack):
    health = wait_health(stack.host, 200)
    assert health == {"status": "ok", "version": stack.sha, "schema": 3}


def test_migration_applies_once_and_is_idempotent(stack):
    for name in ("0001_init.sql", "0002_expand_notes_text.sql", "0003_contract_notes_body.sql"):
        assert f"applied {name}" in stack.migrate_output
    assert stack.migrate_output.strip().splitlines()[-1] == "schema version: 3"
    again = sh(stack.host, f"{COMPOSE} run --rm api_a python -m scripts.migrate")
    assert "nothing to apply" in again and again.strip().splitlines()[-1] == "schema version: 3"
    status = sh(stack.host, f"{COMPOSE} run --rm api_a python -m scripts.migrate --status")
    assert status.strip().splitlines()[-1] == "schema version: 3" and "pending" not in status


def test_notes_round_trip_through_postgres(stack):
    status, text = http(stack.host, "POST", "/api/notes", {"body": "first note from the sandbox"})
    assert status == 201, text
    note = json.loads(text)
    status, text = http(stack.host, "GET", f"/api/notes/{note['id']}")
    assert status == 200 and json.loads(text)["body"] == "first note from the sandbox"
    status, text = http(stack.host, "GET", "/api/notes")
    assert status == 200 and note["id"] in [n["id"] for n in json.loads(text)["notes"]]
    status, text = http(stack.host, "POST", "/api/notes", {"nobody": 1})
    assert status == 400 and "body" in text


def test_websocket_hello_and_echo_on_the_published_port(stack):
    out = sh(stack.host, f"python3 {APP_DIR}/scripts/ws_probe.py ws://127.0.0.1:8000/ws")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"], result
    assert result["hello"] == {"type": "hello", "version": stack.sha}


# Runs on the host: a websocket to slot b, kept open until the slot is stopped.
WS_UNTIL_STOPPED = """
import json, struct, sys
sys.path.insert(0, "/opt/coachntt/scripts")
import ws_probe as w
conn = w.connect("ws://127.0.0.1:8002/ws", 15, None, None)
hello = json.loads(w.read_message(conn))
w.send_frame(conn, 1, b"before the stop")
print(json.dumps({"hello": hello, "echo": w.read_message(conn).decode()}), flush=True)
opcode, payload = w.read_frame(conn)
w.send_frame(conn, 8, payload[:2])
after = conn.sock.recv(16)
print(json.dumps({"opcode": opcode, "code": struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None,
                  "reason": payload[2:].decode(), "after": after.decode()}), flush=True)
"""


def test_a_slot_stopping_closes_its_websockets_with_1001_going_away(stack):
    """What a cutover relies on when it retires the old slot: a close frame, never a reset."""
    sh(stack.host, "cat > /tmp/ws_until_stopped.py", stdin=WS_UNTIL_STOPPED.encode())
    sh(stack.host, f"{COMPOSE} up -d --no-deps api_b")
    deadline = time.monotonic() + 60
    while sh(stack.host, "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8002/health", check=False) != "200":
        assert time.monotonic() < deadline, "slot b never answered"
        time.sleep(1)
    try:
        out = sh(stack.host, f"python3 /tmp/ws_until_stopped.py > /tmp/ws.out 2>&1 & sleep 2; "
                             f"{COMPOSE} stop -t 20 api_b >/dev/null 2>&1; wait; cat /tmp/ws.out")
    finally:
        sh(stack.host, f"{COMPOSE} start api_b", check=False)
    opened, closed = (json.loads(line) for line in out.strip().splitlines()[-2:])
    assert opened == {"hello": {"type": "hello", "version": stack.sha}, "echo": "before the stop"}, out
    assert closed == {"opcode": 8, "code": 1001, "reason": "going away", "after": ""}, out


def test_expand_keeps_the_release_before_working_and_contract_drops_what_it_kept(stack):
    """The two example migrations do what they say, in a scratch database: after the
    expand (0002) rows written the old way (body only) and the new way (text only) read
    the same in both columns; the contract (0003) drops body and keeps every row."""
    psql = "docker exec -i ccp_postgres psql -X -q -v ON_ERROR_STOP=1 -U coachntt -At"
    sh(stack.host, f"{psql} -d postgres -c 'DROP DATABASE IF EXISTS expand_check' -c 'CREATE DATABASE expand_check'")
    try:
        for name in ("0001_init", "0002_expand_notes_text"):
            sh(stack.host, f"{psql} -d expand_check < {APP_DIR}/migrations/{name}.sql")
        rows = sh(stack.host, f"{psql} -d expand_check -c \"INSERT INTO notes (body) VALUES ('old code')\" "
                              f"-c \"INSERT INTO notes (text) VALUES ('new code')\" -c 'SELECT body, text FROM notes ORDER BY id'")
        assert rows.strip().splitlines() == ["old code|old code", "new code|new code"], rows
        sh(stack.host, f"{psql} -d expand_check < {APP_DIR}/migrations/0003_contract_notes_body.sql")
        columns = sh(stack.host, f"{psql} -d expand_check -c \"SELECT column_name FROM information_schema.columns "
                                 "WHERE table_name = 'notes' ORDER BY column_name\" -c 'SELECT text FROM notes ORDER BY id'")
        assert columns.strip().splitlines() == ["created_at", "id", "text", "old code", "new code"], columns
    finally:
        sh(stack.host, f"{psql} -d postgres -c 'DROP DATABASE IF EXISTS expand_check'", check=False)


def test_metrics_count_requests_and_time_requests_and_queries(stack):
    for _ in range(3):
        http(stack.host, "GET", "/api/notes")
    http(stack.host, "GET", "/api/notes/not-a-number")
    status, text = http(stack.host, "GET", "/metrics")
    assert status == 200, text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values['http_requests_total{status="2xx"}'] >= 3 and values['http_requests_total{status="4xx"}'] >= 1
    assert values["http_request_duration_seconds_count"] >= 4 and values["http_request_duration_seconds_sum"] > 0
    assert values['http_request_duration_seconds_bucket{le="+Inf"}'] == values["http_request_duration_seconds_count"]
    assert values["db_query_duration_seconds_count"] >= 3, "every list ran a query"
    assert "# TYPE db_query_duration_seconds histogram" in text


def test_pgbouncer_and_the_backup_path_reach_the_database(stack):
    http(stack.host, "POST", "/api/notes", {"body": "counted through pgbouncer"})
    count = sh(stack.host, f"PGPASSWORD={stack.password} psql -h 127.0.0.1 -p 6432 -U coachntt -d coachntt_prod "
                           "-Atc 'SELECT count(*) FROM notes'")
    assert int(count.strip()) >= 1
    dump = sh(stack.host, "docker exec ccp_postgres pg_dump -U coachntt coachntt_prod")
    assert "CREATE TABLE public.notes" in dump and "counted through pgbouncer" in dump
    assert "accepting connections" in sh(stack.host, "docker exec ccp_postgres pg_isready -U coachntt")


def test_ports_loopback_only_containers_non_root(stack):
    listening = sh(stack.host, "ss -Hltn")
    for port in ("8000", "8002", "6432"):
        assert f"127.0.0.1:{port} " in listening, listening
        assert f"0.0.0.0:{port} " not in listening and f"*:{port} " not in listening, listening
    assert ":5432 " not in listening, "PostgreSQL is not on its well-known port on the host"
    # Without DB_PUBLISH (db.replica), only on loopback, on a port Docker picks.
    published = sh(stack.host, "docker port ccp_postgres 5432/tcp").split()
    assert published and all(p.startswith("127.0.0.1:") for p in published), published
    for container in ("ccp_postgres", "coachntt-api_a-1", "coachntt-api_b-1", "coachntt-pgbouncer-1"):
        uid = sh(stack.host, f"docker exec {container} id -u").strip()
        assert uid != "0", f"{container} runs as root"
    subnet = sh(stack.host, "docker network inspect coachntt -f '{{range .IPAM.Config}}{{.Subnet}}{{end}}'").strip()
    assert subnet == "172.20.0.0/16"


def test_override_keeps_memory_limits_and_production_keeps_cpus(stack):
    merged = json.loads(sh(stack.host, f"{COMPOSE} config --format json 2>/dev/null"))
    production = json.loads(sh(stack.host, f"cd {APP_DIR} && docker compose -f docker-compose.prod.yml config --format json 2>/dev/null"))
    for name in ("postgres", "api_a", "api_b"):
        assert "cpus" not in merged["services"][name]["deploy"]["resources"]["limits"]
        assert merged["services"][name]["deploy"]["resources"]["limits"]["memory"]
        assert float(production["services"][name]["deploy"]["resources"]["limits"]["cpus"]) == 0.5
        assert merged["services"][name]["security_opt"] == production["services"][name]["security_opt"]


def test_health_is_503_while_the_database_is_down(stack):
    sh(stack.host, f"{COMPOSE} stop postgres")
    try:
        health = wait_health(stack.host, 503, deadline=30)
        assert health["status"] == "unavailable" and health["reason"].startswith("database:")
    finally:
        sh(stack.host, f"{COMPOSE} start postgres")
    wait_health(stack.host, 200, deadline=60)


def test_a_broken_release_fails_health_and_a_fix_recovers(stack):
    """What the deploy tests rely on: commit BROKEN_HEALTH to get a bad sha."""
    bad = example_repo.commit_change(stack.repo, "break health", {"BROKEN_HEALTH": ""})
    push_repo(stack.host, stack.repo)
    sh(stack.host, f"{COMPOSE} up -d --build api_a")
    health = wait_health(stack.host, 500, deadline=60)
    assert health["version"] == bad and health["status"] == "broken"

    good = example_repo.commit_change(stack.repo, "fix health", {"BROKEN_HEALTH": None})
    push_repo(stack.host, stack.repo)
    sh(stack.host, f"export APP_VERSION={good}; {COMPOSE} up -d --build api_a")
    health = wait_health(stack.host, 200, deadline=60)
    assert health["version"] == good and health["schema"] == 3
    tags = sh(stack.host, "docker image ls coachntt/api --format '{{.Tag}}'")
    assert good in tags.split(), "APP_VERSION should tag the api image for instant rollbacks"
