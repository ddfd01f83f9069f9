"""The sandbox host of bench_backup.py: examples/app deployed, its database filled, and
what a run costs there (wall clock and CPU seconds).

    remote = Remote(host)             # shell through the console, the real CLI through fab
    deploy_app(remote, served)        # as tests/integration/test_backup.py's fixture does
    generate(remote, 1.1 * 2**30)     # server-side generate_series, kept across --host runs
"""

from __future__ import annotations

import base64
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import endpoint as ep
from fabfile import sandbox
from fabfile.sandbox import example_repo, images, rehearsal

PROJECT_DIR = ep.PROJECT_DIR
BIN = Path(sys.executable).parent
CONTAINER, USER, DB = "ccp_postgres", "coachntt", "coachntt_prod"
WORK = "/var/tmp/coachntt-bench"  # on the host: the baselines' files, beside /backups on the same disk
PSQL = f"docker exec -i {CONTAINER} psql -X -q -At -v ON_ERROR_STOP=1 -U {USER}"
MiB = 1 << 20
COMMAND_TIMEOUT = 1800


class BenchError(Exception):
    """Something the benchmark needs did not work: one line, the run stops (host torn down)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the host


@dataclass
class Remote:
    """The sandbox host: shell through the console (no SSH), the real CLI through fab."""

    host: sandbox.Host
    env: dict = field(default_factory=dict)

    def sh(self, command: str, timeout: float = COMMAND_TIMEOUT) -> str:
        result = sandbox.hosts.enter(self.host.name, f"bash -o pipefail -c {shlex.quote(command)}", timeout=timeout)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
            raise BenchError(f"on {self.host.name}: `{command[:120]}` exited {result.returncode}: "
                             f"{detail[-1] if detail else 'no message'}")
        return result.stdout.decode(errors="replace")

    def sql(self, text: str, db: str = DB, timeout: float = COMMAND_TIMEOUT) -> str:
        payload = base64.b64encode(text.encode()).decode()
        return self.sh(f"echo {payload} | base64 -d | {PSQL} -d {db}", timeout=timeout).strip()

    def fab(self, *args: str, user: str = USER, timeout: float = COMMAND_TIMEOUT) -> str:
        command = [str(BIN / "fab"), "-H", f"{user}@{self.host.ip}", "-i", str(self.host.key), *args]
        result = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, **self.env})
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            raise BenchError(f"`fab {' '.join(args)}` exited {result.returncode}: {lines[-1] if lines else ''}")
        return result.stdout


def deploy_app(remote: Remote, served: Path) -> None:
    """examples/app on the host exactly as test_backup.py's fixture puts it there: images
    loaded, the sandbox compose override, `secure`, `nginx`, `deploy.setup`, `deploy --sha` from a
    git daemon on the bridge (stopped again once deployed)."""
    images.load_images(remote.host, log=log)
    rehearsal.put_overrides(remote.host)
    sha = example_repo.make_example_repo(served / "app")
    with example_repo.GitDaemon(served) as git:
        remote.env.update({"COACHNTT_APP__REPO": git.url("app"), "COACHNTT_APP__HEALTH_DEADLINE": "25"})
        remote.fab("secure", user="root")
        remote.fab("nginx")  # a release switches nginx between the api's slots and refuses without it
        remote.fab("deploy.setup")
        remote.fab("deploy", "--sha", sha)


def app_running(remote: Remote) -> bool:
    try:
        return remote.sh(f"docker inspect -f '{{{{.State.Running}}}}' {CONTAINER}").strip() == "true"
    except BenchError:
        return False


# --------------------------------------------------------------------------- the database

# What an app like CoachNTT keeps: events with numbers, timestamps, short and long text
# (prose that compresses, hashes that do not) and a jsonb document; a users table; a
# primary key and a composite index on each. Generated in the server, in chunks.
SCHEMA = """
CREATE TABLE IF NOT EXISTS bench_users (
  id int PRIMARY KEY, email text NOT NULL, name text NOT NULL, created_at timestamptz NOT NULL,
  plan text NOT NULL, settings jsonb NOT NULL);
CREATE TABLE IF NOT EXISTS bench_events (
  id bigint NOT NULL, user_id int NOT NULL, created_at timestamptz NOT NULL, kind text NOT NULL,
  amount numeric(12, 2), score double precision, title text NOT NULL, body text, payload jsonb NOT NULL);
"""
USERS = """
INSERT INTO bench_users
SELECT i, 'user' || i || '@example.com', initcap(md5(i::text)), now() - i * interval '17 minutes',
       (ARRAY['free', 'coach', 'team', 'enterprise'])[1 + i % 4],
       jsonb_build_object('locale', (ARRAY['en', 'de', 'nl', 'fr'])[1 + i % 4], 'units', 'metric',
                          'notifications', i % 3 = 0, 'goal', 5000 + i % 10000)
FROM generate_series(1, 100000) i ON CONFLICT DO NOTHING;
"""
LOREM = ("Coaching notes: warm up for ten minutes, then intervals at threshold pace with full recovery; "
         "the athlete reported good sleep, mild soreness in the left calf and asked about nutrition before "
         "long runs. Next week we add a tempo session and keep the long run easy. Hydration and stretching "
         "were discussed, and the plan for the race block is on track. ")
EVENTS = """
INSERT INTO bench_events
SELECT i, 1 + (hashint % 100000), now() - (i % 31536000) * interval '1 second',
       (ARRAY['login', 'workout', 'message', 'payment', 'goal', 'note'])[1 + i % 6],
       round((random() * 1000)::numeric, 2), random(),
       'session ' || i || ' ' || md5(i::text),
       substr(repeat({lorem}, 3), (1 + hashint % 300)::int, (60 + hashint % 240)::int) || ' #' || md5(random()::text),
       jsonb_build_object('device', (ARRAY['watch', 'phone', 'web', 'tablet'])[1 + i % 4],
                          'steps', (random() * 20000)::int, 'heart_rate', 60 + (random() * 100)::int,
                          'tags', jsonb_build_array('t' || i % 50, 'w' || i % 7), 'ok', i % 10 <> 0)
FROM (SELECT i, hashtext(i::text)::bigint & 2147483647 AS hashint FROM generate_series({first}, {last}) i) s;
"""
INDEXES = """
ALTER TABLE bench_events ADD PRIMARY KEY (id);
CREATE INDEX bench_events_user_time ON bench_events (user_id, created_at);
CREATE INDEX bench_users_plan ON bench_users (plan, created_at);
VACUUM ANALYZE bench_events;
VACUUM ANALYZE bench_users;
"""
CHUNK_ROWS = 500_000


def database_size(remote: Remote, db: str = DB) -> int:
    return int(remote.sql(f"SELECT pg_database_size('{db}')"))


def generate(remote: Remote, target_bytes: int) -> None:
    """Fill the app database until it holds target_bytes (tables + indexes); kept if already there."""
    if remote.sql("SELECT to_regclass('bench_events') IS NOT NULL") == "t" and database_size(remote) >= target_bytes:
        log(f"database already holds {database_size(remote) / MiB:.0f} MiB: kept")
        return
    started = time.monotonic()
    remote.sql("DROP TABLE IF EXISTS bench_events, bench_users;" + SCHEMA + USERS)
    lorem = "'" + LOREM.replace("'", "''") + "'"
    rows = 0
    # indexes come last (as a restore builds them); they add ~15 % on top of the heap
    while database_size(remote) * 1.15 < target_bytes:
        remote.sql(EVENTS.format(lorem=lorem, first=rows + 1, last=rows + CHUNK_ROWS))
        rows += CHUNK_ROWS
        log(f"  {rows:>9,} events, {database_size(remote) / MiB:6.0f} MiB, {time.monotonic() - started:4.0f}s")
    remote.sql(INDEXES)
    remote.sql("CHECKPOINT")
    log(f"database generated: {rows:,} events, {database_size(remote) / MiB:.0f} MiB in {time.monotonic() - started:.0f}s")


def describe_database(remote: Remote) -> dict:
    """Size, tables (rows as PostgreSQL's statistics estimate them) and versions."""
    tables = json.loads(remote.sql(
        "SELECT json_agg(json_build_object('table', relname, 'rows', n_live_tup, "
        "'heap_mib', round(pg_table_size(relid) / 1048576.0), 'indexes_mib', round(pg_indexes_size(relid) / 1048576.0)) "
        "ORDER BY relname) FROM pg_stat_user_tables"))
    return {"bytes": database_size(remote), "tables": tables,
            "postgres": remote.sql("SHOW server_version"),
            "pg_dump": remote.sh(f"docker exec {CONTAINER} pg_dump --version").strip()}


def fresh_db(remote: Remote, name: str) -> None:
    remote.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE); CREATE DATABASE "{name}" OWNER "{USER}";', db="postgres")


def drop_db(remote: Remote, name: str) -> None:
    remote.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE);', db="postgres")


def file_size(remote: Remote, path: str) -> int:
    return int(remote.sh(f"stat -c %s {shlex.quote(path)}").strip())


# --------------------------------------------------------------------------- cost


def cpu_seconds(remote: Remote) -> float:
    """CPU used so far by everything in the host (its cgroup: PostgreSQL, pg_dump, sshd, dockerd ...)
    plus this process's waited-for children (fab, and the console's shells: gzip, docker exec)."""
    stats = [d / "cpu.stat" for d in sandbox.hosts.cgroup_dirs(remote.host.name) if (d / "cpu.stat").exists()]
    if not stats:
        raise BenchError(f"no cgroup v2 cpu.stat for {remote.host.name}: cannot count CPU seconds")
    usage = next(int(line.split()[1]) / 1e6 for line in stats[0].read_text().splitlines() if line.startswith("usage_usec "))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage + children.ru_utime + children.ru_stime


def docker_exec_pipe(remote: Remote) -> dict:
    """What one GiB costs to cross `docker exec` (container -> shim -> dockerd -> docker CLI),
    the road every dump takes here: wall and CPU seconds."""
    cpu_before, started = cpu_seconds(remote), time.perf_counter()
    remote.sh(f"docker exec {CONTAINER} head -c {1 << 30} /dev/zero > /dev/null")
    seconds, cpu = time.perf_counter() - started, cpu_seconds(remote) - cpu_before
    return {"seconds_per_gib": round(seconds, 1), "cpu_seconds_per_gib": round(cpu, 1)}
