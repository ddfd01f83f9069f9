"""Apply the numbered SQL migrations in migrations/ (NNNN_name.sql) that the DB lacks.

    python -m scripts.migrate            apply pending migrations, print the schema version
    python -m scripts.migrate --status   print current version and pending files, change nothing

Each migration runs in its own transaction together with its schema_version row, under an
advisory lock, so concurrent runs and re-runs are safe. The last line of output is always
`schema version: N`. Exit 1 with a one-line reason on failure.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import psycopg2

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
NAME = re.compile(r"^(\d{4})_[A-Za-z0-9_-]+\.sql$")
LOCK_ID = 0x636F6163  # "coac": one advisory lock for all migrate runs


class MigrationError(Exception):
    pass


def discover(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, str, Path]]:
    """Migrations as (version, file name, path), sorted; duplicate numbers are an error."""
    found: dict[int, Path] = {}
    for path in sorted(directory.glob("*.sql")):
        match = NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files must be named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migrations numbered {version:04d}: {found[version].name}, {path.name}")
        found[version] = path
    return [(version, path.name, path) for version, path in sorted(found.items())]


def connect(url: str, wait: float):
    """Connect, retrying while the server is still starting (up to `wait` seconds)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return psycopg2.connect(url, connect_timeout=3)
        except psycopg2.OperationalError as exc:
            if time.monotonic() >= deadline:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else "connection failed"
                raise MigrationError(f"cannot connect to the database: {first}") from None
            time.sleep(1)


def current_version(cur) -> int:
    cur.execute("SELECT to_regclass('schema_version') IS NOT NULL")
    if not cur.fetchone()[0]:
        return 0
    cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
    return int(cur.fetchone()[0])


def migrate(url: str, *, status_only: bool = False, wait: float = 30.0, out=print) -> int:
    migrations = discover()
    conn = connect(url, wait)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
            try:
                version = current_version(cur)
                pending = [m for m in migrations if m[0] > version]
                if status_only:
                    for _, name, _ in pending:
                        out(f"pending {name}")
                    out(f"schema version: {version}")
                    return version
                for number, name, path in pending:
                    started = time.monotonic()
                    try:
                        cur.execute("BEGIN")
                        cur.execute(path.read_text())
                        cur.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)", (number, name))
                        cur.execute("COMMIT")
                    except psycopg2.Error as exc:
                        cur.execute("ROLLBACK")
                        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                        raise MigrationError(f"{name} failed and was rolled back: {first}") from None
                    out(f"applied {name} ({time.monotonic() - started:.2f}s)")
                    version = number
                if not pending:
                    out("nothing to apply")
                out(f"schema version: {version}")
                return version
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (LOCK_ID,))
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.migrate", description=__doc__.splitlines()[0])
    parser.add_argument("--status", action="store_true", help="show the schema version and pending migrations only")
    parser.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the database (default 30)")
    args = parser.parse_args(argv)
    url = os.environ.get("DATABASE_URL", "")
    if not url:
        print("migrate: DATABASE_URL is not set (it comes from .env.production)", file=sys.stderr)
        return 1
    try:
        migrate(url, status_only=args.status, wait=args.wait)
    except MigrationError as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
