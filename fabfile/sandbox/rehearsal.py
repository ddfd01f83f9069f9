"""A full release rehearsed on a local VPS, through the real CLI.

What an operator does to the plan's server, in order, against a fresh sandbox host
that looks like the provider's Ubuntu 24.04 image (Docker pre-installed,
ssh.socket, cloud-init's PasswordAuthentication yes):

    secure (as root)  ->  deps  ->  nginx  ->  ssl.issue (Pebble)  ->  secure.audit
    deploy.setup      ->  staging.setup  ->  release A  ->  monitor.stack
    release B (a migration)            under load: 0 failed requests
    release C (broken, staging passes) under load: rolled back automatically by its watch
    rollback --to A                    under load: 0 failed requests
    deploy.history

monitor.stack comes after release A: it joins the app's Docker network and reads its
env file, which the first release makes. Every step is a `fab -H ... TASK` subprocess,
so the rehearsal proves the commands the README documents. The example app stands in
for the CoachNTT API; its images and the monitoring images are loaded from the cache
(there is no registry here) and its repository is served by a git daemon on the bridge
(the stand-in for GitHub). The domains are sandbox-only names (api.<host>.cntt.test,
...), mapped to this host in the sandbox DNS, so Pebble validates real http-01
challenges; nothing outside the sandbox network is ever reached.

While releases B, C and the rollback run, fabfile/sandbox/load.py sends bounded HTTPS
requests from this machine to the host's address (with the api domain as SNI, trusting
Pebble's root), under nginx's production rate limit. A failed request during a cutover
fails the rehearsal.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import example_repo, hosts, images, network
from .load import Load, connect
from .monitoring_images import MONITORING_FAMILIES
from .paths import REPO_ROOT, SandboxError, run_dir

OVERRIDES = {  # sandbox-only compose overrides (no CPU limits: cgroup v1 guests can't apply them; local images)
    REPO_ROOT / "configs" / "sandbox" / "compose.sandbox.yml": "/etc/coachntt-sandbox/compose.sandbox.yml",
    REPO_ROOT / "configs" / "monitoring" / "compose.sandbox.yml": "/etc/coachntt-sandbox/compose.monitoring.sandbox.yml",
}
APP_OVERRIDE, MONITORING_OVERRIDE = OVERRIDES.values()
# examples/app ships 0001-0003: the release with a migration adds the next one.
MIGRATION_2 = {"migrations/0004_pinned.sql": "ALTER TABLE notes ADD COLUMN IF NOT EXISTS pinned boolean NOT NULL DEFAULT false;\n"}
# Release C breaks one note's page only: staging's smoke (GET /api/notes) passes, production's
# traffic on /api/notes/<id> gets 5xx, and the release's watch rolls it back.
BROKEN_QUERY = ("FROM notes WHERE id = %s", "FROM no_such_table WHERE id = %s")
# Under nginx's production limit (10 r/s per client, burst 20): only a cutover may fail a request.
HEALTH_LOAD = {"path": "/health", "workers": 1, "pause": 0.2, "limit": 4000, "seconds": 600.0}
NOTE_LOAD = {"workers": 1, "pause": 0.4, "limit": 2000, "seconds": 600.0}


@dataclass
class Outcome:
    """One release step's line in the summary."""

    step: str
    sha: str
    result: str
    failed: int | None  # requests the cutover failed (the /health load): must be 0; None: not under load
    detail: str = ""


def fab(host: hosts.Host, user: str, *args: str, env: dict, expect: int = 0) -> None:
    """Run one task like an operator would; stop the rehearsal on a surprise."""
    command = [str(Path(sys.executable).parent / "fab"), "-H", f"{user}@{host.ip}", "-i", str(host.key), *args]
    print(f"\n$ fab -H {user}@{host.ip} {' '.join(args)}", flush=True)
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO_ROOT, env=env)
    # Where the rehearsal's minutes go, command by command (benchmarks/README.md's breakdown).
    print(f"  ({' '.join(args[:1])}: exit {result.returncode} in {time.monotonic() - started:.1f}s)", flush=True)
    if result.returncode != expect:
        raise SandboxError(f"`fab {' '.join(args)}` exited {result.returncode}, expected {expect}")


def put_overrides(host: hosts.Host) -> None:
    for source, target in OVERRIDES.items():
        payload = base64.b64encode(source.read_bytes()).decode()
        code, out = hosts.console(host.name, f"mkdir -p {Path(target).parent} && echo {payload} | base64 -d > {target}")
        if code != 0:
            raise SandboxError(f"could not place the compose override {target}: {out.strip()}")


def domains_for(name: str) -> dict[str, str]:
    """Sandbox-only names per host, so another host's certificate test never takes them over."""
    return {"api": f"api.{name}.cntt.test", "metrics": f"metrics.{name}.cntt.test", "staging": f"staging.{name}.cntt.test"}


def create_note(host: hosts.Host, tls: ssl.SSLContext, api: str) -> str:
    """A note made through nginx like a client would, so its page answers 200 before release C breaks it."""
    connection = connect(host.ip, api, tls)
    try:
        connection.request("POST", "/api/notes", body=json.dumps({"body": "rehearsal note"}),
                           headers={"Host": api, "Content-Type": "application/json", "Connection": "close"})
        response = connection.getresponse()
        answer = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise SandboxError(f"could not create a note through nginx: {type(exc).__name__}: {exc}") from None
    finally:
        connection.close()
    try:
        return f"/api/notes/{json.loads(answer)['id']}"
    except (ValueError, KeyError, TypeError):
        raise SandboxError(f"creating a note answered {response.status}: {answer[:200]!r}") from None


def under_load(host: hosts.Host, tls: ssl.SSLContext, api: str, step: str, sha: str, *args: str,
               env: dict, expect: int = 0, note: str = "") -> Outcome:
    """One release step while the bounded load runs through nginx; a failed /health request fails the rehearsal."""
    with contextlib.ExitStack() as running:
        load = running.enter_context(Load(host.ip, domain=api, tls=tls, **HEALTH_LOAD))
        notes = running.enter_context(Load(host.ip, path=note, domain=api, tls=tls, **NOTE_LOAD)) if note else None
        fab(host, "coachntt", *args, env=env, expect=expect)
    print(f"load during {step}: {load.summary()}", flush=True)
    detail = ""
    if notes:
        bad = [a for a in notes.answers if a.status >= 500]
        print(f"load on {note} during {step}: {notes.summary()}", flush=True)
        detail = (f"{len(bad)} of {len(notes.answers)} requests to {note} got 5xx "
                  "from the broken release until its watch rolled it back")
    if load.failed():
        raise SandboxError(f"{len(load.failed())} requests failed during the cutover of {step}: {load.summary()}")
    if load.hit_bound:
        raise SandboxError(f"the load hit its bound during {step} before the command ended: {load.summary()}")
    return Outcome(step, sha, "ok" if expect == 0 else "failed, rolled back", len(load.failed()), detail)


def rehearse(name: str = "rehearsal", flavour: str = "ubuntu-like", keep: bool = False) -> None:
    started = time.monotonic()
    pebble = network.ensure_pebble()
    host = hosts.up(name, flavour=flavour)
    print(f"sandbox host {host.name}: root@{host.ip} ({flavour})")
    domains = domains_for(host.name)
    outcomes: list[Outcome] = []
    try:
        for domain in domains.values():
            network.map_domain(domain, host.ip)  # undone by hosts.down with the host
        images.load_images(host)
        images.load_images(host, families=MONITORING_FAMILIES)
        put_overrides(host)
        with tempfile.TemporaryDirectory(prefix="coachntt-rehearsal-") as served:
            repo = Path(served) / "app"
            sha_a = example_repo.make_example_repo(repo)
            with example_repo.GitDaemon(Path(served)) as git:
                env = {
                    **os.environ,
                    "COACHNTT_ENV": "sandbox",
                    "COACHNTT_APP__REPO": git.url("app"),
                    "COACHNTT_APP__COMPOSE_OVERRIDES": APP_OVERRIDE,
                    "COACHNTT_MONITOR__STACK__COMPOSE_OVERRIDES": MONITORING_OVERRIDE,
                    "COACHNTT_APP__HEALTH_DEADLINE": "20",
                    # a shorter watch than production's 120s keeps the rehearsal to minutes
                    "COACHNTT_RELEASE__WATCH_SECONDS": "30",
                    "COACHNTT_MONITOR__WATCH_INTERVAL": "3",
                    "COACHNTT_SSL__EMAIL": f"ops@{host.name}.cntt.test",
                    "COACHNTT_SSL__ACME_SERVER": pebble.directory_url,
                    **{f"COACHNTT_DOMAINS__{key.upper()}": domain for key, domain in domains.items()},
                }
                fab(host, "root", "secure", env=env)
                fab(host, "coachntt", "deps", env=env)
                fab(host, "coachntt", "nginx", env=env)
                fab(host, "coachntt", "ssl.issue", env=env)
                fab(host, "coachntt", "secure.audit", env=env)
                root = pebble.issuer_root_pem()
                tls = ssl.create_default_context(cadata=root)
                ca_file = run_dir() / f"{host.name}-acme-root.pem"  # for the summary's curl line
                ca_file.write_text(root)
                fab(host, "coachntt", "deploy.setup", env=env)
                fab(host, "coachntt", "staging.setup", env=env)
                fab(host, "coachntt", "release", "--sha", sha_a, "--message", "first release", env=env)
                outcomes.append(Outcome("release A", sha_a, "ok", None, "first release: nothing served before it, no load"))
                fab(host, "coachntt", "monitor.stack", env=env)

                sha_b = example_repo.commit_change(repo, "notes can be pinned", MIGRATION_2)
                outcomes.append(under_load(host, tls, domains["api"], "release B", sha_b,
                                           "release", "--sha", sha_b, "--message", "schema 2", env=env))
                main = repo / "app" / "main.py"
                if BROKEN_QUERY[0] not in main.read_text():
                    raise SandboxError(f"examples/app/app/main.py no longer has {BROKEN_QUERY[0]!r}: release C would not break")
                broken = main.read_text().replace(*BROKEN_QUERY)
                sha_c = example_repo.commit_change(repo, "a release whose note page fails", {"app/main.py": broken})
                outcomes.append(under_load(host, tls, domains["api"], "release C", sha_c,
                                           "release", "--sha", sha_c, "--message", "broken on purpose",
                                           env=env, expect=1, note=create_note(host, tls, domains["api"])))
                fab(host, "coachntt", "deploy.status", env=env)
                outcomes.append(under_load(host, tls, domains["api"], "rollback --to A", sha_a,
                                           "rollback", "--to", sha_a, env=env))
                fab(host, "coachntt", "deploy.history", env=env)
        print_summary(host, domains, ca_file, outcomes, time.monotonic() - started, keep)
    finally:
        if keep:
            print(f"kept {host.name} (root@{host.ip}); `inv sandbox.down --name {host.name}` removes it")
        else:
            hosts.down(host.name)
            (run_dir() / f"{host.name}-acme-root.pem").unlink(missing_ok=True)


def print_summary(host: hosts.Host, domains: dict[str, str], ca_file: Path, outcomes: list[Outcome], seconds: float, keep: bool) -> None:
    print(f"\nrehearsal passed in {seconds:.0f}s: secure, deps, nginx, ssl.issue, audit, deploy.setup, staging.setup, "
          "monitor.stack, two releases, an automatic rollback and a manual one")
    print("\n  step               sha           result                failed requests during the cutover")
    for o in outcomes:
        failed = "-" if o.failed is None else o.failed
        print(f"  {o.step:<18} {o.sha[:12]}  {o.result:<21} {failed}" + (f"   ({o.detail})" if o.detail else ""))
    explore = [
        f"ssh -i {host.key} coachntt@{host.ip}",
        f"curl --cacert {ca_file} --resolve {domains['api']}:443:{host.ip} https://{domains['api']}/health",
        f"https://{domains['api']}  https://{domains['staging']}  https://{domains['metrics']} (Grafana stand-in; "
        "the password is in /opt/coachntt-monitoring/secrets/ on the host)",
        f"inv sandbox.down --name {host.name}",
    ]
    if keep:
        print("\nexplore the host:\n" + "\n".join(f"  {line}" for line in explore))
    else:
        print(f"\nthe host is removed now; `inv sandbox.release --keep` keeps it and prints how to explore it: "
              f"the ssh line, https://{domains['api']} and the other URLs, `inv sandbox.down --name {host.name}`")
