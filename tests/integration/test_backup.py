"""backup.* on a real sandbox host with examples/app deployed and a real PostgreSQL.

One host, in order: awkward rows written, a backup taken (zstd), a zlib dump
of earlier versions still verified, rows changed and
deleted, the backup restored and every original row back exactly; a dump cut
off by the database container stopping; verify catching a flipped byte and a
truncated file; a corrupt restore and a restore whose client is killed leaving
the live database untouched (or cleanly swapped) and /health at 200; prune on a
synthetic dated set; a full disk; data archives made, verified, restored exactly
and refused when damaged or out of space; bad input. Every failure is one line on
stderr, never a traceback.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time

import pytest

from opsrun import BIN, PROJECT_DIR, console, example_app_served, fab, one_line, ready_for_the_app, through_nginx

PSQL = "docker exec -i ccp_postgres psql -X -q -v ON_ERROR_STOP=1 -U coachntt -d coachntt_prod"
# Non-ASCII text, control characters, NULLs, bytea with zero bytes, large values.
PROBE_ROWS = r"""
CREATE TABLE IF NOT EXISTS probe (id int PRIMARY KEY, t text, b bytea, j jsonb, n numeric);
INSERT INTO probe VALUES
  (1, 'Grüße, 日本語, emoji 🎉, tab	and a
newline, back\slash, quote '' "', '\x00ff0001'::bytea, '{"a": null, "ü": [1, 2]}', 3.14159265358979323846),
  (2, NULL, NULL, NULL, NULL),
  (3, repeat('large value ', 200000), decode(repeat('00ff7f80', 250000), 'hex'), '[]', -1e-30),
  (4, '', ''::bytea, '{}', 0);
"""


def sql(host, text: str) -> str:
    payload = base64.b64encode(text.encode()).decode()
    code, out = console(host, f"echo {payload} | base64 -d | {PSQL}")
    assert code == 0, out
    return out


def table_digest(host, table: str) -> str:
    """A digest of the whole ordered table, every byte of every row."""
    code, out = console(host, f"{PSQL} -c 'COPY (SELECT * FROM {table} ORDER BY id) TO STDOUT' | sha256sum")
    assert code == 0, out
    return out.split()[0]


class Service:
    def __init__(self, host, env: dict):
        self.host, self.env = host, env
        self.names: dict[str, str] = {}

    def fab(self, *args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
        return fab(self.host, *args, user="coachntt", env={**self.env, **(env or {})}, timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen:
        command = [str(BIN / "fab"), "-H", f"coachntt@{self.host.ip}", "-i", str(self.host.key), *args]
        import os

        return subprocess.Popen(command, cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **self.env})

    def sh(self, command: str) -> str:
        code, out = console(self.host, command)
        assert code == 0, out
        return out

    def health(self) -> int:
        # As a client gets it: through nginx, from the slot that serves.
        code, out = console(self.host, through_nginx("/health", curl="curl -o /dev/null -w '%{http_code}'"))
        return int(out.strip() or 0) if code == 0 else 0

    def wait_healthy(self, seconds: int = 60) -> None:
        deadline = time.monotonic() + seconds
        while self.health() != 200:
            assert time.monotonic() < deadline, "the app did not come back to /health 200"
            time.sleep(1)

    def backups(self) -> list[str]:
        return self.sh("ls -A /backups").split()

    def listed(self) -> dict[str, str]:
        result = self.fab("backup.list")
        assert result.returncode == 0, result.stdout + result.stderr
        return {line.split()[0]: line for line in result.stdout.splitlines() if line.strip().startswith(("db_", "data_"))}

    def databases(self) -> list[str]:
        return self.sh(f"{PSQL} -At -d postgres -c 'SELECT datname FROM pg_database'").split()

    def backup_now(self, *args: str) -> str:
        result = self.fab("backup.now", *args)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.split("backup: ")[-1].split()[0].rsplit("/", 1)[1]


@pytest.fixture(scope="module")
def service(vps_factory_module, tmp_path_factory):
    host = vps_factory_module(flavour="provisioned")
    ready_for_the_app(host)
    with example_app_served(tmp_path_factory.mktemp("git")) as (_, sha, env):
        svc = Service(host, env)
        for args in (("deploy.setup",), ("deploy", "--sha", sha)):
            result = svc.fab(*args)
            assert result.returncode == 0, result.stdout + result.stderr
        yield svc


def test_a_backup_is_whole_checked_and_listed(service):
    sql(service.host, PROBE_ROWS)
    name = service.backup_now()
    service.names["good"] = name
    files = service.backups()
    assert {name, f"{name}.sha256", f"{name}.json"} <= set(files), files
    assert not [f for f in files if f.endswith(".partial")], files
    manifest = json.loads(service.sh(f"cat /backups/{name}.json"))
    tables = {t["table"]: t["rows"] for t in manifest["tables"]}
    assert tables["public.probe"] == 4 and "public.notes" in tables, manifest
    assert manifest["database"] == "coachntt_prod" and manifest["release"] and manifest["postgres"], manifest
    # PostgreSQL 17 in the app's image: zstd:1, the measured choice (benchmarks/README.md)
    assert manifest["compression"] == "zstd:1", manifest
    assert "Compression: zstd" in service.sh(f"docker exec -i ccp_postgres pg_restore -l < /backups/{name}")
    assert service.sh(f"cd /backups && sha256sum -c {name}.sha256").strip().endswith("OK")
    assert service.sh(f"stat -c '%a %U' /backups/{name}").strip() == "600 coachntt"
    line = service.listed()[name]
    assert "manual" in line and "never verified" in line, line

    verified = service.fab("backup.verify", "latest")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "ok " in service.listed()[name]
    assert not [d for d in service.databases() if "_verify_" in d], "the scratch database is dropped"

    again = service.backup_now()
    assert again != name, "a second backup never overwrites the first"


def test_a_zlib_dump_of_earlier_versions_still_verifies(service):
    """backup.now wrote pg_dump's default zlib before it chose zstd: those files must still restore."""
    name = service.backup_now()  # nothing writes in between: its manifest fits the zlib dump too
    old = "db_20200101_000000_zlib.dump"
    service.sh(f"cd /backups && docker exec ccp_postgres pg_dump -Fc -U coachntt -d coachntt_prod > {old} && "
               f"cp {name}.json {old}.json && sha256sum {old} > {old}.sha256 && chown coachntt:coachntt {old}*")
    assert "Compression: gzip" in service.sh(f"docker exec -i ccp_postgres pg_restore -l < /backups/{old}")
    verified = service.fab("backup.verify", old)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "ok " in service.listed()[old]
    service.sh(f"cd /backups && rm -f {old}* {name}*")


def test_restore_brings_every_original_row_back_exactly(service):
    before = {table: table_digest(service.host, table) for table in ("probe", "notes")}
    sql(service.host, "UPDATE probe SET t = 'changed' WHERE id = 1; DELETE FROM probe WHERE id IN (2, 3); "
                      "INSERT INTO probe VALUES (9, 'new', NULL, NULL, NULL);")
    assert table_digest(service.host, "probe") != before["probe"]

    refused = service.fab("backup.restore", service.names["good"])
    assert refused.returncode == 2, refused.stdout + refused.stderr
    one_line(refused, "replaces the database coachntt_prod", "--yes")

    result = service.fab("backup.restore", service.names["good"], "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {table: table_digest(service.host, table) for table in ("probe", "notes")} == before
    assert service.health() == 200
    assert [d for d in service.databases() if d.startswith("coachntt_prod_before_")], "the old database is kept"
    assert not [d for d in service.databases() if "_restore_" in d]
    history = service.fab("deploy.history")
    assert " restore " in history.stdout, history.stdout
    assert console(service.host, "test -d /var/lib/coachntt-ops/deploy.lock")[0] != 0


def copy_as(service, source: str, name: str, damage: str) -> None:
    """A copy of a good backup under another name, with a matching checksum, then damaged."""
    service.sh(f"cd /backups && cp -p {source} {name} && cp -p {source}.json {name}.json && "
               f"sha256sum {name} > {name}.sha256 && chown coachntt:coachntt {name}* && {damage}")


def test_verify_catches_a_flipped_byte_and_a_truncated_file(service):
    good = service.names["good"]
    flipped, truncated = "db_20200101_000000_flipped.dump", "db_20200101_000000_truncated.dump"
    copy_as(service, good, flipped, f"printf '\\377' | dd of={flipped} bs=1 seek=4000 conv=notrunc status=none")
    copy_as(service, good, truncated, f"truncate -s -100 {truncated}")
    service.names["flipped"] = flipped
    for name in (flipped, truncated):
        result = service.fab("backup.verify", name)
        assert result.returncode == 1, result.stdout + result.stderr
        one_line(result, "sha256", name)
        assert "BAD" in service.listed()[name] and "failed" in service.listed()[name]
    assert not [d for d in service.databases() if "_verify_" in d]


def test_restoring_a_corrupt_backup_changes_nothing(service):
    before = table_digest(service.host, "probe")
    result = service.fab("backup.restore", service.names["flipped"], "--yes")
    assert result.returncode == 1, result.stdout + result.stderr
    one_line(result, "sha256")
    assert table_digest(service.host, "probe") == before and service.health() == 200
    assert not [d for d in service.databases() if "_restore_" in d]
    assert console(service.host, "test -d /var/lib/coachntt-ops/deploy.lock")[0] != 0


def test_a_dump_cut_off_by_the_database_stopping_leaves_nothing(service):
    sql(service.host, "CREATE TABLE IF NOT EXISTS ballast AS SELECT i AS id, md5(i::text) || md5(random()::text) AS x "
                      "FROM generate_series(1, 1500000) i;")
    before = set(service.backups())
    process = service.start("backup.now", "--label", "cutoff")
    try:
        deadline = time.monotonic() + 120
        # pg_dump writes its header at once: a non-empty partial file means it runs.
        while console(service.host, "find /backups -name '*.partial' -size +0 | grep -q .")[0] != 0:
            assert time.monotonic() < deadline and process.poll() is None, "the dump never started"
            time.sleep(0.2)
        service.sh("docker stop -t 0 ccp_postgres >/dev/null")
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
        service.sh("docker start ccp_postgres >/dev/null")
    assert process.returncode == 1, out + err
    one_line(subprocess.CompletedProcess([], 1, out, err), "pg_dump of coachntt_prod failed", "stopped")
    assert set(service.backups()) == before, "no partial file, no sidecar, nothing new"
    assert not [name for name in service.listed() if "cutoff" in name]
    service.wait_healthy()


def test_a_restore_killed_after_its_new_database_exists_is_settled_by_recover(service):
    name = service.backup_now("--label", "big")  # with the ballast: the restore takes a few seconds
    original = table_digest(service.host, "probe")
    sql(service.host, "DELETE FROM probe WHERE id = 4;")
    changed = table_digest(service.host, "probe")
    process = service.start("backup.restore", name, "--yes")
    try:
        deadline = time.monotonic() + 120
        while not [d for d in service.databases() if "_restore_" in d]:
            assert time.monotonic() < deadline and process.poll() is None, "the restore never created its database"
            time.sleep(0.2)
        process.kill()  # SIGKILL: the client is gone, the phase goes on on the server
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    recovered = service.fab("deploy.recover")
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert console(service.host, "test -d /var/lib/coachntt-ops/deploy.lock")[0] != 0, "recover frees the lock"
    assert table_digest(service.host, "probe") in (original, changed), "live untouched or cleanly swapped"
    service.wait_healthy()
    sql(service.host, "DROP TABLE IF EXISTS ballast;")


def test_prune_keeps_exactly_what_the_policy_says(service):
    d = "/backups-prune"
    synthetic = ["db_20251225_030000_daily.dump", "db_20260901_030000_daily.dump", "db_20260915_030000_daily.dump",
                 "db_20261005_030000_daily.dump", "db_20261020_030000_daily.dump", "db_20261020_010000_daily.dump"]
    make = " && ".join(f"echo x > {d}/{n} && sha256sum {d}/{n} > {d}/{n}.sha256 && echo '{{}}' > {d}/{n}.json" for n in synthetic)
    service.sh(f"rm -rf {d} && install -d -m 700 -o coachntt -g coachntt {d} && {make} && "
               f"echo 'ok 2026-01-01T00:00:00Z ' > {d}/db_20251225_030000_daily.dump.verified && chown -R coachntt:coachntt {d}")
    env = {"COACHNTT_BACKUP__DIR": d, "COACHNTT_BACKUP__KEEP_DAILY": "1", "COACHNTT_BACKUP__KEEP_WEEKLY": "1",
           "COACHNTT_BACKUP__KEEP_MONTHLY": "2"}
    dry = service.fab("backup.prune", "--dry", env=env)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    going = ["db_20260901_030000_daily.dump", "db_20261005_030000_daily.dump", "db_20261020_010000_daily.dump"]
    assert [line.split()[-1] for line in dry.stdout.splitlines() if "would remove" in line] == going, dry.stdout
    assert len(service.sh(f"ls -A {d}").split()) == 6 * 3 + 1, "--dry changes nothing"

    result = service.fab("backup.prune", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    kept = ["db_20251225_030000_daily.dump",  # the newest verified one
            "db_20260915_030000_daily.dump",  # September's newest
            "db_20261020_030000_daily.dump"]  # the newest: daily, weekly, October's
    left = sorted(service.sh(f"ls -A {d}").split())
    assert left == sorted([*kept, *(f"{n}.sha256" for n in kept), *(f"{n}.json" for n in kept),
                           "db_20251225_030000_daily.dump.verified"]), left
    service.sh(f"rm -rf {d}")


def test_a_full_disk_fails_cleanly_and_the_service_stays_up(service):
    sql(service.host, "CREATE TABLE IF NOT EXISTS ballast AS SELECT md5(random()::text) || md5(random()::text) AS x "
                      "FROM generate_series(1, 120000);")
    service.sh("mount -t tmpfs -o size=2m,mode=700 tmpfs /backups && chown coachntt:coachntt /backups")
    try:
        refused = service.fab("backup.now")  # backup.min_free_mb (64) is not there
        assert refused.returncode == 1, refused.stdout + refused.stderr
        one_line(refused, "not enough free space")
        full = service.fab("backup.now", env={"COACHNTT_BACKUP__MIN_FREE_MB": "0"})
        assert full.returncode == 1, full.stdout + full.stderr
        assert "space" in one_line(full).lower()
        assert service.sh("ls -A /backups") == "", "no partial dump, no sidecar"
    finally:
        service.sh("umount /backups; " + f"echo {base64.b64encode(b'DROP TABLE IF EXISTS ballast;').decode()} | base64 -d | {PSQL}")
    assert service.health() == 200


DATA = "/opt/coachntt/data"
# Owners other than the deploy user, modes it cannot read, a symlink, an empty
# directory, non-ASCII and spaces in names, binary content.
DATA_FILES = f"""
rm -rf {DATA} {DATA}.* && install -d -m 750 -o 1000 -g 1000 {DATA} &&
mkdir -p {DATA}/uploads/ü-dir {DATA}/empty &&
printf 'private to uid 1000' > {DATA}/uploads/private.txt && chmod 600 {DATA}/uploads/private.txt &&
head -c 300000 /dev/urandom > {DATA}/uploads/ü-dir/blob.bin &&
ln -s uploads/private.txt {DATA}/link && printf x > "{DATA}/name with spaces" &&
chown -R 1000:1000 {DATA}/uploads
"""
# Every path with its type, mode, owner, size and link target; then every file's sha256.
DATA_SNAPSHOT = (f"cd {DATA} && find . -printf '%p %y %m %U %G %s %l\\n' | sort && "
                 "find . -type f -exec sha256sum {} + | sort")


def test_a_data_archive_is_whole_verified_and_restored_exactly(service):
    service.sh(DATA_FILES)
    original = service.sh(DATA_SNAPSHOT)
    name = service.backup_now("--data")
    assert name.startswith("data_") and name.endswith("_manual.tar.gz"), name
    assert {name, f"{name}.sha256", f"{name}.json"} <= set(service.backups())
    assert service.sh(f"stat -c '%a %U' /backups/{name}").strip() == "600 coachntt"
    manifest = json.loads(service.sh(f"cat /backups/{name}.json"))
    assert manifest["directory"] == DATA and manifest["entries"] == 8 and manifest["bytes"] == 300000 + 19 + 1, manifest
    assert "data/manual" in service.listed()[name]

    verified = service.fab("backup.verify", "latest-data")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "8 entries" in verified.stdout and "ok " in service.listed()[name]
    assert service.sh(f"ls -d {DATA}.* 2>/dev/null; true").strip() == "", "the scratch copy is removed"

    service.sh(f"rm {DATA}/uploads/ü-dir/blob.bin && echo changed > {DATA}/uploads/private.txt && touch {DATA}/new")
    result = service.fab("backup.restore", name, "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert service.sh(DATA_SNAPSHOT) == original, "every file back with its owner, mode and content"
    kept = service.sh(f"ls -d {DATA}.before_*").split()
    assert len(kept) == 1 and service.sh(f"cat {kept[0]}/uploads/private.txt").strip() == "changed", "the one before is kept"
    assert service.health() == 200
    assert console(service.host, "test -d /var/lib/coachntt-ops/deploy.lock")[0] != 0


def test_a_damaged_data_archive_is_caught_and_restores_nothing(service):
    good = service.sh("ls /backups | grep '^data_.*tar.gz$' | tail -n 1").strip()
    bad = "data_20200101_000000_cut.tar.gz"
    # Cut short, with a checksum that matches the cut file: only reading it all back can tell.
    service.sh(f"cd /backups && head -c 150000 {good} > {bad} && cp {good}.json {bad}.json && sha256sum {bad} > {bad}.sha256 && "
               f"chown coachntt:coachntt {bad}*")
    before = service.sh(DATA_SNAPSHOT)
    for args in (("backup.verify", bad), ("backup.restore", bad, "--yes")):
        result = service.fab(*args)
        assert result.returncode == 1, result.stdout + result.stderr
        one_line(result, f"extracting {bad} failed")
    assert "failed" in service.listed()[bad]
    assert service.sh(DATA_SNAPSHOT) == before and service.health() == 200
    assert not service.sh(f"ls -d {DATA}.verify_* {DATA}.restore_* 2>/dev/null; true").strip()
    service.sh(f"rm -f /backups/{bad}*")


def test_a_data_archive_on_a_full_disk_leaves_nothing(service):
    service.sh(f"head -c 4000000 /dev/urandom > {DATA}/big.bin")
    service.sh("mount -t tmpfs -o size=2m,mode=700 tmpfs /backups && chown coachntt:coachntt /backups")
    try:
        full = service.fab("backup.now", "--data", env={"COACHNTT_BACKUP__MIN_FREE_MB": "0"})
        assert full.returncode == 1, full.stdout + full.stderr
        assert "space" in one_line(full, "archiving").lower()
        assert service.sh("ls -A /backups") == "", "no partial archive, no sidecar"
    finally:
        service.sh(f"umount /backups; rm -f {DATA}/big.bin")
    assert service.health() == 200


@pytest.mark.parametrize("args, env, code, words", [
    (("backup.restore", "db_20200101_000000_nothere.dump", "--yes"), {}, 2, "no backup db_20200101_000000_nothere.dump"),
    (("backup.verify", "db_20200101_000000_nothere.dump"), {}, 2, "no backup"),
    (("backup.restore", "../../etc/passwd", "--yes"), {}, 2, "no '/' or '..'"),
    (("backup.verify", "db_x/../y.dump"), {}, 2, "no '/' or '..'"),
    (("backup.list",), {"COACHNTT_BACKUP__DIR": "/nonexistent"}, 2, "missing"),
    (("backup.now",), {"COACHNTT_BACKUP__DIR": "/nonexistent"}, 2, "missing"),
    (("backup.now", "--data"), {"COACHNTT_APP__DATA_DIR": "/nonexistent"}, 2, "data directory /nonexistent is missing"),
    (("backup.restore", "data_20200101_000000_x.tar.gz", "--yes"), {}, 2, "no backup data_20200101_000000_x.tar.gz"),
])
def test_bad_input_is_one_line_and_changes_nothing(service, args, env, code, words):
    before = service.backups()
    result = service.fab(*args, env=env)
    assert result.returncode == code, result.stdout + result.stderr
    one_line(result, words)
    assert service.backups() == before


def test_a_stopped_database_container_is_said_plainly(service):
    before = service.backups()
    service.sh("docker stop ccp_postgres >/dev/null")
    try:
        for args in (("backup.now",), ("backup.verify", "latest")):
            result = service.fab(*args)
            assert result.returncode == 1, result.stdout + result.stderr
            one_line(result, "ccp_postgres is not running", "start it")
    finally:
        service.sh("docker start ccp_postgres >/dev/null")
    assert service.backups() == before
    service.wait_healthy()
