#!/usr/bin/env python3
"""Backup and restore of a >= 1 GB database: ours against `pg_dump | gzip` and `gunzip | psql`.

    .venv/bin/python benchmarks/bench_backup.py [--size-gb 1.1] [--repeat 2] [--formats] [--save FILE]   # as root

Boots one `provisioned` sandbox host (or reuses --host NAME), deploys examples/app on
it as tests/integration/test_backup.py does, fills the app database server-side with
generate_series, then times, in the same run and interleaved (A B A B, so the noise
of a shared machine hits both alike), wall clock and CPU seconds:

    backup   `fab backup.now`                  vs  docker exec ccp_postgres pg_dump ... | gzip > file
    restore  `fab backup.verify`,
             backup-db.sh load (backup.restore's restore)  vs  gunzip -c file | docker exec -i ccp_postgres psql

--formats adds the dump formats and compressors weighed for backup.now (pg_dump's own
zlib, lz4, zstd; an external zstd; parallel pg_restore); --only-formats runs them with
the baselines alone. The host it booted is removed at the end, also on failure, Ctrl-C
or SIGTERM. See benchmarks/README.md for what is measured and the results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from backup_host import (
    CONTAINER,
    DB,
    PSQL,
    USER,
    WORK,
    BenchError,
    MiB,
    Remote,
    app_running,
    cpu_seconds,
    deploy_app,
    describe_database,
    docker_exec_pipe,
    drop_db,
    file_size,
    fresh_db,
    generate,
    log,
)

import endpoint as ep
from fabfile import sandbox
from fabfile.core import backups, templates
from fabfile.sandbox import rehearsal

BACKUP_REFERENCE, RESTORE_REFERENCE = "pg_dump | gzip", "gunzip | psql"


# --------------------------------------------------------------------------- contenders


def nothing(remote: Remote) -> None:
    return None


@dataclass
class Contender:
    """One way to back up (writes a file) or restore (reads the file of its backup twin).
    Only `run` is timed; `prepare` and `after` (clean-up, the dump's size) are not."""

    name: str
    kind: str  # "backup" | "restore"
    what: str
    run: Callable[[Remote], object]
    prepare: Callable[[Remote], object] = nothing
    after: Callable[[Remote], int | None] = nothing  # a backup's dump size in bytes
    role: str = "ours"  # "ours" | "baseline" | "format" (only with --formats)
    needs: str = ""  # a host package it needs besides Docker


class Ours:
    """backup.now and backup.verify through the real CLI (fab over SSH from this machine)."""

    latest = ""  # the file of the last backup.now, which backup.verify reads
    compression = ""  # what its manifest says

    @classmethod
    def clear(cls, remote: Remote) -> None:
        """The previous round's backup goes before the clock starts (disk, backup.min_free_mb)."""
        if cls.latest:
            remote.sh(f"cd /backups && rm -f {cls.latest} {cls.latest}.sha256 {cls.latest}.json {cls.latest}.verified")
            cls.latest = ""

    @classmethod
    def backup(cls, remote: Remote) -> None:
        out = remote.fab("backup.now", "--label", "bench")
        cls.latest = out.split("backup: ")[-1].split()[0].rsplit("/", 1)[1]

    @classmethod
    def backup_size(cls, remote: Remote) -> int:
        cls.compression = json.loads(remote.sh(f"cat /backups/{cls.latest}.json")).get("compression", "?")
        return file_size(remote, f"/backups/{cls.latest}")

    @classmethod
    def verify(cls, remote: Remote) -> None:
        remote.fab("backup.verify", cls.latest)

    @classmethod
    def load(cls, remote: Remote) -> None:
        """backup-db.sh's load action, as `backup.restore` runs it before the swap: sha256,
        CREATE DATABASE, pg_restore, row counts; the new database kept (dropped untimed)."""
        out = remote.sh(f"bash -c {shlex.quote(templates.script(backups.SCRIPT))} backup-db load {CONTAINER} {USER} "
                        f"/backups {cls.latest} {LOAD_DB} yes")
        fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        manifest, restored = backups.parse_manifest(fields.get("manifest", "")), backups.parse_manifest(fields.get("restored", ""))
        if manifest is None or restored is None or backups.differences(manifest, restored):
            raise BenchError(f"the load action restored {cls.latest} unlike its manifest: {out[-300:]}")


BASE_FILE, BASE_DB, LOAD_DB = f"{WORK}/base.sql.gz", "bench_restore_base", "bench_restore_load"


PLAIN_SQL: dict[str, int] = {}  # how much plain SQL pg_dump wrote (gzip -l of the baseline's file)


def baseline_size(remote: Remote) -> int:
    PLAIN_SQL["bytes"] = int(remote.sh(f"gzip -lq {BASE_FILE}").split()[1])  # exact below 4 GiB
    return file_size(remote, BASE_FILE)


def baseline_backup(remote: Remote) -> None:
    remote.sh(f"docker exec {CONTAINER} pg_dump -U {USER} -d {DB} | gzip > {BASE_FILE}")


def baseline_restore(remote: Remote) -> None:
    remote.sql(f'CREATE DATABASE "{BASE_DB}" OWNER "{USER}"', db="postgres")
    remote.sh(f"gunzip -c {BASE_FILE} | {PSQL} -d {BASE_DB} > /dev/null")


def pg_restore(source: str, target: str, jobs: int = 1) -> str:
    return f"docker exec -i {CONTAINER} pg_restore --exit-on-error -U {USER} -d {target}{f' -j {jobs}' if jobs > 1 else ''}{source}"


@dataclass(frozen=True)
class Format:
    """A dump format weighed for backup.now: how it dumps, how it restores, as host commands."""

    key: str
    name: str
    dump: str  # {out}: the file to write; "" restores the file of `source`
    restore: str  # {file}, {db}
    source: str = ""
    needs: str = ""

    @property
    def file(self) -> str:
        return f"{WORK}/{self.source or self.key}.dump"

    @property
    def db(self) -> str:
        return f"bench_restore_{self.key.replace('-', '_')}"

    def contenders(self) -> list[Contender]:
        found = []
        if self.dump:
            found.append(Contender(self.name, "backup", self.dump, lambda r: r.sh(self.dump.format(out=self.file)),
                                   after=lambda r: file_size(r, self.file), role="format", needs=self.needs))
        found.append(Contender(self.name, "restore", self.restore + " (into a new database, made and dropped untimed)",
                               lambda r: r.sh(self.restore.format(file=self.file, db=self.db)),
                               prepare=lambda r: fresh_db(r, self.db), after=lambda r: drop_db(r, self.db),
                               role="format", needs=self.needs))
        return found


PG_DUMP = f"docker exec {CONTAINER} pg_dump -U {USER} -d {DB} -Fc"
INTO_CONTAINER = f"docker exec -i {CONTAINER} sh -c 'cat > /tmp/bench.dump' < {{file}} && "
FORMATS = (
    Format("fc-zlib", "pg_dump -Fc (zlib, default level)", PG_DUMP + " > {out}", pg_restore(" < {file}", "{db}")),
    Format("fc-lz4", "pg_dump -Fc --compress=lz4", PG_DUMP + " --compress=lz4 > {out}", pg_restore(" < {file}", "{db}")),
    Format("fc-zstd1", "pg_dump -Fc --compress=zstd:1", PG_DUMP + " --compress=zstd:1 > {out}",
           pg_restore(" < {file}", "{db}")),
    Format("fc-z0-zstd", "pg_dump -Fc -Z0 | zstd -T0 -3 (on the host)", PG_DUMP + " -Z0 | zstd -q -T0 -3 > {out}",
           "zstd -q -dc {file} | " + pg_restore("", "{db}"), needs="zstd"),
    Format("fc-zstd1-j2", "zstd:1 file, copied in, pg_restore -j 2", "",
           INTO_CONTAINER + pg_restore(" /tmp/bench.dump", "{db}", jobs=2)
           + f"; status=$?; docker exec {CONTAINER} rm -f /tmp/bench.dump; exit $status", source="fc-zstd1"),
)


def contenders() -> list[Contender]:
    found = [
        Contender("backup.now", "backup",
                  "fab backup.now: snapshot + row counts, pg_dump -Fc, read back whole, sha256, manifest, rename",
                  Ours.backup, prepare=Ours.clear, after=Ours.backup_size),
        Contender(BACKUP_REFERENCE, "backup", f"docker exec {CONTAINER} pg_dump -U {USER} -d {DB} | gzip > file",
                  baseline_backup, after=baseline_size, role="baseline"),
        Contender("backup.verify", "restore",
                  "fab backup.verify: sha256, CREATE DATABASE, pg_restore < file, row counts vs manifest, DROP DATABASE",
                  Ours.verify),
        Contender("backup-db.sh load", "restore",
                  "what backup.restore runs before its swap: sha256, CREATE DATABASE, pg_restore < file, row counts "
                  "(DROP untimed)", Ours.load, prepare=lambda r: drop_db(r, LOAD_DB), after=lambda r: drop_db(r, LOAD_DB)),
        Contender(RESTORE_REFERENCE, "restore",
                  f"CREATE DATABASE; gunzip -c file | docker exec -i {CONTAINER} psql (DROP untimed)",
                  baseline_restore, prepare=lambda r: drop_db(r, BASE_DB), after=lambda r: drop_db(r, BASE_DB),
                  role="baseline"),
    ]
    for fmt in FORMATS:
        found.extend(fmt.contenders())
    return found


def installable(remote: Remote, chosen: list[Contender]) -> dict[str, str]:
    """Install on the host (apt, through the sandbox's proxy) what contenders need; {name: why not} for the rest."""
    missing: dict[str, str] = {}
    for package in sorted({c.needs for c in chosen if c.needs}):
        try:
            remote.sh(f"command -v {package} >/dev/null || {{ apt-get -q update >/dev/null && DEBIAN_FRONTEND=noninteractive "
                      f"apt-get -q -y install --no-install-recommends {package} >/dev/null; }}", timeout=300)
        except BenchError as exc:
            missing.update({c.name: f"needs {package} on the host: {exc}" for c in chosen if c.needs == package})
    return missing


# --------------------------------------------------------------------------- measuring


# --------------------------------------------------------------------------- measuring


@dataclass
class Runs:
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)


def measure(remote: Remote, chosen: list[Contender], repeat: int, deadline: float) -> tuple[dict, list[str]]:
    """Every backup contender once per round, round robin, then every restore one the same way."""
    results: dict[tuple[str, str], Runs] = {}
    notes: list[str] = []
    remote.sh(f"mkdir -p {WORK}")
    for kind in ("backup", "restore"):
        group = [c for c in chosen if c.kind == kind]
        for round_number in range(1, repeat + 1):
            round_started = time.monotonic()
            for contender in group:
                contender.prepare(remote)
                cpu_before, started = cpu_seconds(remote), time.perf_counter()
                contender.run(remote)
                seconds, cpu = time.perf_counter() - started, cpu_seconds(remote) - cpu_before
                size = contender.after(remote)
                runs = results.setdefault((kind, contender.name), Runs())
                runs.seconds.append(seconds)
                runs.cpu.append(cpu)
                if size:
                    runs.sizes.append(size)
                log(f"  [{kind} {round_number}/{repeat}] {contender.name:<44} {seconds:6.1f}s  cpu {cpu:6.1f}s"
                    + (f"  {size / MiB:6.1f} MiB" if size else ""))
            took = time.monotonic() - round_started
            if round_number < repeat and time.monotonic() + took * (1 if kind == "restore" else 2) > deadline:
                notes.append(f"{kind}: stopped after {round_number} of {repeat} rounds to stay within --budget")
                log(f"  {notes[-1]}")
                break
    return results, notes


def machine() -> dict:
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0)
    return {"cores": os.cpu_count(), "cpu": model, "ram_gib": round(mem / (1 << 30), 1), "kernel": platform.release(),
            "load_1min_at_end": os.getloadavg()[0]}


def build_report(args, database: dict, chosen: list[Contender], results: dict, notes: list[str], setup_s: float) -> dict:
    rows = []
    for contender in chosen:
        runs = results.get((contender.kind, contender.name))
        if not runs:
            continue
        median = statistics.median(runs.seconds)
        rows.append({"kind": contender.kind, "contender": contender.name, "what": contender.what,
                     "seconds": round(median, 1), "seconds_runs": [round(s, 1) for s in runs.seconds],
                     "cpu_seconds": round(statistics.median(runs.cpu), 1), "cpu_runs": [round(s, 1) for s in runs.cpu],
                     "mib_per_s": round(database["bytes"] / MiB / median, 1),
                     "dump_mib": round(statistics.median(runs.sizes) / MiB, 1) if runs.sizes else None})
    for row in rows:
        reference = BACKUP_REFERENCE if row["kind"] == "backup" else RESTORE_REFERENCE
        base = next((r for r in rows if r["kind"] == row["kind"] and r["contender"] == reference), None)
        row["ratio"] = round(row["seconds"] / base["seconds"], 2) if base else None
        row["cpu_ratio"] = round(row["cpu_seconds"] / base["cpu_seconds"], 2) if base else None
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": machine(),
            "database": database, "backup_now_compression": Ours.compression,
            "repeat": args.repeat, "setup_seconds": round(setup_s), "results": rows,
            "notes": notes}


def print_table(report: dict) -> None:
    database, host = report["database"], report["machine"]
    print(f"database {database['bytes'] / MiB:.0f} MiB (pg_database_size), PostgreSQL {database['postgres']}, "
          f"{host['cores']} cores, {host['ram_gib']} GiB RAM, {report['date']}; backup.now wrote "
          f"{report['backup_now_compression'] or '-'}")
    pipe, plain = database.get("docker_exec_pipe", {}), database.get("plain_sql_bytes")
    print(f"1 GiB through docker exec: {pipe.get('seconds_per_gib')} s, {pipe.get('cpu_seconds_per_gib')} CPU s; "
          f"plain SQL dump: {f'{plain / MiB:.0f} MiB' if plain else '-'}")
    print(f"median of {report['repeat']} runs, contenders interleaved; MiB/s = database size / seconds; "
          "ratio = seconds / seconds of the baseline; cpu = CPU seconds of the host + the client")
    print()
    header = (f"{'':8} {'contender':<40} {'seconds':>8} {'MiB/s':>6} {'ratio':>6} {'cpu s':>6} {'ratio':>6} "
              f"{'dump MiB':>9}  runs (s)")
    print(header)
    print("-" * (len(header) + 10))
    for row in report["results"]:
        dump = f"{row['dump_mib']:.0f}" if row["dump_mib"] else "-"
        ratio = f"{row['ratio']:.2f}" if row["ratio"] else "-"
        cpu_ratio = f"{row['cpu_ratio']:.2f}" if row["cpu_ratio"] else "-"
        runs = " ".join(f"{s:.1f}" for s in row["seconds_runs"])
        print(f"{row['kind']:<8} {row['contender']:<40} {row['seconds']:>8.1f} {row['mib_per_s']:>6.1f} {ratio:>6} "
              f"{row['cpu_seconds']:>6.1f} {cpu_ratio:>6} {dump:>9}  {runs}")
    print()
    for row in report["results"]:
        print(f"  {row['kind']} {row['contender']}: {row['what']}")
    for note in report["notes"]:
        print(f"NOTE  {note}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.1, help="database size to generate, GiB (default 1.1)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of every contender; the median is reported")
    parser.add_argument("--formats", action="store_true", help="also time the dump formats weighed for backup.now")
    parser.add_argument("--only-formats", action="store_true",
                        help="the formats and the baselines only (no backup.now, backup.verify, load)")
    parser.add_argument("--budget", type=float, default=20, help="minutes; no new round starts past it (default 20)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--save", metavar="FILE", type=Path, help="also write the JSON object to FILE")
    parser.add_argument("--host", metavar="NAME", help="reuse this running sandbox host (left running, its database kept)")
    args = parser.parse_args(argv)
    if not 1 <= args.repeat <= 10:
        parser.error("--repeat must be between 1 and 10")
    if not 1.0 <= args.size_gb <= 20:
        parser.error("--size-gb must be between 1 and 20")
    return args


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # the host still comes down (finally blocks run)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("run as root: the sandbox host is a systemd-nspawn machine")
        return 2
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    started = time.monotonic()
    deadline = started + args.budget * 60
    skip = {"ours"} if args.only_formats else set() if args.formats else {"format"}
    chosen = [c for c in contenders() if c.role not in skip]
    try:
        with tempfile.TemporaryDirectory(prefix="coachntt-bench-backup.") as served, ep.sandbox_host(args.host) as host:
            remote = Remote(host, {"COACHNTT_APP__COMPOSE_OVERRIDES": rehearsal.APP_OVERRIDE})
            log(f"host {host.name} ({host.ip}, {host.flavour})")
            if not app_running(remote):
                deploy_app(remote, Path(served))
                log(f"examples/app deployed in {time.monotonic() - started:.0f}s")
            generate(remote, int(args.size_gb * (1 << 30)))
            database = describe_database(remote)
            not_run = installable(remote, chosen)
            chosen = [c for c in chosen if c.name not in not_run]
            database["docker_exec_pipe"] = docker_exec_pipe(remote)
            setup_s = time.monotonic() - started
            results, notes = measure(remote, chosen, args.repeat, deadline)
            database["plain_sql_bytes"] = PLAIN_SQL.get("bytes")
            if Ours.latest:
                remote.sh(f"cd /backups && rm -f {Ours.latest}*")
            remote.sh(f"rm -rf {WORK}")
    except (BenchError, sandbox.SandboxError, subprocess.TimeoutExpired) as exc:
        log(f"benchmark failed: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted" + ("" if args.host else ": the host it booted was torn down"))
        return 130
    report = build_report(args, database, chosen, results, notes + [f"not run: {n}: {why}" for n, why in not_run.items()],
                          setup_s)
    report["total_seconds"] = round(time.monotonic() - started)
    if args.save:
        args.save.write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
