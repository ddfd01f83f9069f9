"""scripts/db-replication.sh's file work, run for real on temporary env files: the
replication password made once and never printed, DB_PUBLISH for compose, the read-only
URL derived from DATABASE_URL, and a copy that refuses a volume that is not empty."""

from __future__ import annotations

import os
import subprocess

from stand_ins import script_path

from fabfile.core.settings import PROJECT_DIR

SCRIPT = PROJECT_DIR / "scripts" / "db-replication.sh"
TOOLS = ("sh", "sed", "tail", "grep", "mktemp", "chmod", "chown", "mv", "cat", "rm", "printf", "paste", "head", "od", "tr")


def run(tmp_path, *args: str, stand_ins: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        script_path(bin_dir, TOOLS, stand_ins)
    return subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True,
                          env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, timeout=30)


def env_file(tmp_path, text: str):
    path = tmp_path / ".env.production"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_the_password_is_generated_once_kept_private_and_never_printed(tmp_path):
    path = env_file(tmp_path, "POSTGRES_USER=coachntt\n")
    first = run(tmp_path, "password", str(path))
    assert first.returncode == 0, first.stderr
    (line,) = [x for x in path.read_text().splitlines() if x.startswith("REPLICATION_PASSWORD=")]
    password = line.split("=", 1)[1]
    assert len(password) == 64 and password not in first.stdout + first.stderr
    assert path.read_text().startswith("POSTGRES_USER=coachntt\n")
    assert oct(path.stat().st_mode & 0o777) == "0o600"

    again = run(tmp_path, "password", str(path))
    assert again.returncode == 0 and "kept" in again.stdout
    assert path.read_text().count("REPLICATION_PASSWORD=") == 1 and password in path.read_text()


def test_db_publish_replaces_its_line_and_keeps_the_others(tmp_path):
    (tmp_path / ".env").write_text("COMPOSE_PROJECT_NAME=coachntt\nDB_PUBLISH=127.0.0.1\n")
    result = run(tmp_path, "publish", str(tmp_path), "10.201.0.20")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / ".env").read_text() == "COMPOSE_PROJECT_NAME=coachntt\nDB_PUBLISH=10.201.0.20\nDB_PUBLISH_PORT=5432\n"


def test_the_read_only_url_is_database_url_with_the_replicas_and_read_only_sessions(tmp_path):
    path = env_file(tmp_path, "DATABASE_URL=postgresql://coachntt:s3cret-pw@postgres:5432/coachntt_prod\n")
    assert run(tmp_path, "readonly-url", str(path), "check", "10.201.0.21:5432").stdout.strip() == "differs"

    result = run(tmp_path, "readonly-url", str(path), "set", "10.201.0.21:5432", "10.201.0.22:5432")
    assert result.returncode == 0, result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr
    assert path.read_text().splitlines()[-1] == (
        "DATABASE_URL_READONLY=postgresql://coachntt:s3cret-pw@10.201.0.21:5432,10.201.0.22:5432/coachntt_prod"
        "?target_session_attrs=read-only")
    assert run(tmp_path, "readonly-url", str(path), "check", "10.201.0.21:5432", "10.201.0.22:5432").stdout.strip() == "current"


def test_a_url_with_its_own_query_keeps_it(tmp_path):
    path = env_file(tmp_path, "DATABASE_URL=postgresql://u:p@db:6432/app?sslmode=disable\n")
    assert run(tmp_path, "readonly-url", str(path), "set", "10.201.0.21:5432").returncode == 0
    assert path.read_text().splitlines()[-1] == (
        "DATABASE_URL_READONLY=postgresql://u:p@10.201.0.21:5432/app?sslmode=disable&target_session_attrs=read-only")


def test_no_database_url_is_one_line_on_stderr_and_a_failure(tmp_path):
    path = env_file(tmp_path, "POSTGRES_USER=coachntt\n")
    result = run(tmp_path, "readonly-url", str(path), "check", "10.201.0.21:5432")
    assert result.returncode == 1 and result.stderr.strip() == f"no DATABASE_URL in {path} to derive the read-only URL from"


def test_a_volume_that_is_not_empty_is_never_copied_into_and_the_secret_is_removed(tmp_path):
    calls = tmp_path / "docker-calls"
    # A stand-in docker: the volume lists one file (a database's PG_VERSION).
    docker = f"""#!/bin/sh
echo "$*" >> {calls}
case "$*" in *"--entrypoint ls "*) echo PG_VERSION ;; esac
"""
    secret = tmp_path / "secret"
    secret.write_text("the-password")
    result = run(tmp_path, "copy", "coachntt_pgdata", "coachntt/postgres:17-trixie", "10.201.0.20", "coachntt_replicator",
                 "coachntt_10_201_0_21", str(secret), stand_ins={"docker": docker})
    assert result.returncode == 1
    assert result.stderr.strip() == "the volume coachntt_pgdata is not empty; nothing was copied into it"
    assert not [c for c in calls.read_text().splitlines() if "pg_basebackup" in c or "-delete" in c]
    assert not secret.exists()
    assert "the-password" not in calls.read_text()


def test_a_failed_copy_empties_the_volume_it_found_empty(tmp_path):
    calls = tmp_path / "docker-calls"
    docker = f"""#!/bin/sh
echo "$*" >> {calls}
case "$*" in *pg_basebackup*) echo "pg_basebackup: error: connection to server failed: FATAL:  no pg_hba.conf entry" >&2; exit 1 ;; esac
"""
    secret = tmp_path / "secret"
    secret.write_text("the-password")
    result = run(tmp_path, "copy", "coachntt_pgdata", "img", "10.201.0.20", "rep", "slot", str(secret),
                 stand_ins={"docker": docker})
    assert result.returncode == 1
    assert result.stderr.strip() == ("pg_basebackup from 10.201.0.20 failed: "
                                     "pg_basebackup: error: connection to server failed: FATAL:  no pg_hba.conf entry")
    sent = calls.read_text().splitlines()
    assert sent[-1].endswith("--entrypoint find img /var/lib/postgresql/data -mindepth 1 -delete")
    assert not secret.exists() and not [p for p in os.listdir("/tmp") if p == secret.name]


def test_the_database_url_handed_over_replaces_the_app_hosts_own_and_its_file_is_removed(tmp_path):
    path = env_file(tmp_path, "POSTGRES_USER=coachntt\nDATABASE_URL=postgresql://coachntt:old@postgres:5432/db\nAPI_KEY=k\n")
    secret = tmp_path / "handed.secret"
    secret.write_text("postgresql://coachntt:0123456789abcdef@10.201.0.20:5432/db")
    done = run(tmp_path, "database-url", str(path), str(secret))
    assert done.returncode == 0, done.stderr
    assert path.read_text().splitlines() == ["POSTGRES_USER=coachntt", "API_KEY=k",
                                             "DATABASE_URL=postgresql://coachntt:0123456789abcdef@10.201.0.20:5432/db"]
    assert oct(path.stat().st_mode & 0o777) == "0o600" and not secret.exists()
    assert "0123456789abcdef" not in done.stdout + done.stderr
    missing = run(tmp_path, "database-url", str(path), str(tmp_path / "none.secret"))
    assert missing.returncode == 1 and "no URL was handed over" in missing.stderr
