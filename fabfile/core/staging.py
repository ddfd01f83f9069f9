"""Staging as data: where it lives, its compose override, what is probed and what a
smoke request is. Pure (tested in tests/unit/test_staging_plans.py); fabfile/staging.py
runs it.

Staging is the release production is about to get, on the same host, sharing nothing
with production but the Docker daemon, the base images and nginx:

    checkout     staging.dir (its own clone of app.repo)
    env file     <staging.dir>/<staging.env_file>, secrets generated on the server,
                 the database renamed to staging.db_name
    compose      `docker compose -p <staging.project>` with the app's files plus a
                 generated override (configs/staging/compose.staging.yml.j2) that renames
                 the database container, network, volume and api image, switches the
                 second slot off and publishes the api on upstreams.staging's port only
    nginx        domains.staging -> upstreams.staging (configs/nginx, `nginx`)
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields, replace

from . import certificates, slots, templates
from .app import App
from .batch import ProbeResult
from .errors import ConfigError, OpsError
from .settings import Settings

# Beside the checkout's own files, never one of them (git leaves untracked files alone).
OVERRIDE_NAME = ".coachntt-staging.compose.yml"
# The api runs in one slot; api_b is switched off by the override.
SERVICE = "api_a"
IMAGE = "coachntt-staging/api"
UNTOUCHED = "production was not touched"
# Production's fixed names in the app's compose file (examples/app/docker-compose.prod.yml).
PRODUCTION_NETWORK = "coachntt"
PRODUCTION_VOLUME = "coachntt_pgdata"
PRODUCTION_PGBOUNCER_PORT = 6432


@dataclass(frozen=True)
class Staging:
    enabled: bool
    dir: str
    project: str
    env_file: str
    db_container: str
    db_name: str
    domain: str
    port: int
    smoke_path: str
    app: App  # production's settings: repo, compose files, health path, owner

    @classmethod
    def from_settings(cls, s: Settings) -> Staging:
        upstream = s.require("upstreams.staging")
        host, _, port = upstream.rpartition(":")
        if host not in ("127.0.0.1", "localhost"):
            raise ConfigError(f"upstreams.staging is {upstream}, but staging runs on the app's host",
                              "set upstreams.staging to 127.0.0.1:<port> (default 127.0.0.1:8001)")
        return cls(
            enabled=bool(s.get("staging.enabled", True)),
            dir=s.require("staging.dir"),
            project=s.require("staging.project"),
            env_file=s.require("staging.env_file"),
            db_container=s.require("staging.db_container"),
            db_name=s.require("staging.db_name"),
            domain=s.require("domains.staging"),
            port=int(port),
            smoke_path=s.require("staging.smoke_path"),
            app=App.from_settings(s),
        )

    @property
    def override_path(self) -> str:
        return f"{self.dir}/{OVERRIDE_NAME}"

    @property
    def network(self) -> str:
        return self.project

    @property
    def volume(self) -> str:
        return f"{self.project}_pgdata"

    @property
    def health_url(self) -> str:
        return slots.health_url(self.app, slots.Slot("a", self.port))

    def compose_app(self) -> StagingApp:
        """The app as staging runs it: every compose command names staging's project and files."""
        base = replace(self.app, dir=self.dir, env_file=self.env_file, db_container=self.db_container, db_name=self.db_name,
                       compose_files=(*self.app.compose_files, self.override_path),
                       # api_b is off (and publishes nothing): both ports only keep the definitions stable.
                       slot_ports=(self.port, self.port))
        return StagingApp(**{f.name: getattr(base, f.name) for f in fields(App)}, project=self.project)


@dataclass(frozen=True)
class StagingApp(App):
    project: str = "coachntt-staging"

    def compose(self, args: str, sha: str = "") -> str:
        """App.compose with `-p <project>`: never production's project, whatever the files say."""
        plain = super().compose(args, sha)
        return plain.replace("docker compose --ansi never ", f"docker compose --ansi never -p {shlex.quote(self.project)} ", 1)


def build_command(app: App, sha: str) -> str:
    """The api image of `sha`, built once: the tag is the release, so a second deploy of
    the same sha reuses it and `up` recreates nothing (.git is in the build context, and
    a checkout touches its index)."""
    image = shlex.quote(f"{IMAGE}:{sha}")
    return f"docker image inspect --format . {image} >/dev/null 2>&1 || {{ {app.compose(f'build --quiet {SERVICE}', sha)}; }}"


def render_override(staging: Staging) -> str:
    return templates.render(
        "staging/compose.staging.yml.j2", dir=staging.dir, project=staging.project, db_container=staging.db_container,
        production_db_container=staging.app.db_container, env_file=staging.env_file, image=IMAGE, port=staging.port,
        domain=staging.domain, network=staging.network, volume=staging.volume, pgbouncer_port=PRODUCTION_PGBOUNCER_PORT)


def collisions(staging: Staging) -> list[str]:
    """What staging would share with production, in words ([] when nothing). Pure."""
    app, found = staging.app, []
    if staging.dir.rstrip("/") == app.dir.rstrip("/") or staging.dir.startswith(app.dir.rstrip("/") + "/") \
            or app.dir.startswith(staging.dir.rstrip("/") + "/"):
        found.append(f"staging.dir {staging.dir} overlaps app.dir {app.dir}")
    if staging.db_container == app.db_container:
        found.append(f"staging.db_container is production's {app.db_container}")
    if staging.project in ("coachntt", PRODUCTION_NETWORK) or staging.volume == PRODUCTION_VOLUME:
        found.append(f"staging.project {staging.project} is production's")
    if staging.port in app.slot_ports or staging.port == PRODUCTION_PGBOUNCER_PORT:
        found.append(f"upstreams.staging's port {staging.port} is production's")
    return found


# -- facts --------------------------------------------------------------------------


def probes(staging: Staging) -> dict[str, str]:
    """One round trip, as the deploy user: is staging set up, can it run, what nginx serves."""
    app = staging.compose_app()
    directory = shlex.quote(staging.dir)
    return {
        "dir": f"test -d {directory}",
        "head": f"git -C {directory} rev-parse HEAD",
        "env": f"test -f {shlex.quote(staging.dir + '/' + staging.env_file)}",
        "override": f"cat {shlex.quote(staging.override_path)}",
        "docker": "docker info --format '{{.ServerVersion}}'",
        "site": f"grep -qF {shlex.quote('server_name ' + staging.domain + ';')} {shlex.quote(slots.SITE_FILE)}",
        # The certificate's private key is root's: only this probe asks sudo.
        "certificate": f"sudo -n sh -c {shlex.quote(certificates.CERTIFICATE_PROBE)}",
        "containers": app.compose("ps -a --format json"),
    }


def already_runs(staging: Staging, facts: dict[str, ProbeResult], sha: str, override: str) -> bool:
    """Staging's checkout is `sha`, its api runs that release, its override is this one:
    a deploy of the same sha only checks (health gate, smoke). Pure."""
    api = slots.parse_containers(facts["containers"].stdout).get(SERVICE)
    return (facts["head"].stdout.strip() == sha and facts["override"].stdout.strip() == override.strip()
            and api is not None and api.state == "running" and api.sha == sha)


def not_set_up(staging: Staging, facts: dict[str, ProbeResult], where: str) -> str:
    """Why staging is skipped ('' when it runs): switched off, or never set up on this host."""
    if not staging.enabled:
        return "staging.enabled is false"
    if not facts["dir"].ok:
        return f"staging is not set up on {where} (no {staging.dir}; `staging.setup` creates it)"
    return ""


def preflight_error(staging: Staging, facts: dict[str, ProbeResult], where: str) -> OpsError | None:
    """Why a staging deploy must not start, or None. Pure."""
    shared = collisions(staging)
    if shared:
        return ConfigError(f"staging would share production's resources: {shared[0]}", f"change the staging.* settings; {UNTOUCHED}")
    if not facts["head"].ok:
        return ConfigError(f"staging checkout missing in {staging.dir} on {where}", f"run `staging.setup`; {UNTOUCHED}")
    if not facts["env"].ok:
        return ConfigError(f"{staging.dir}/{staging.env_file} is missing on {where}", f"run `staging.setup`; {UNTOUCHED}")
    if not facts["docker"].ok or not facts["docker"].stdout.strip():
        return OpsError(f"Docker is not answering on {where}", f"start it and rerun staging; {UNTOUCHED}")
    if not facts["site"].ok:
        return ConfigError(f"nginx on {where} does not serve {staging.domain} (staging)",
                           f"run `nginx` with staging.enabled true; {UNTOUCHED}")
    return None


def uses_tls(staging: Staging, facts: dict[str, ProbeResult]) -> bool:
    """nginx serves staging over HTTPS once the certificate names its domain (`nginx` renders it so)."""
    certificate = certificates.parse_certificate(facts["certificate"])
    return bool(certificate and certificate.covers(staging.domain))


def smoke_command(staging: Staging, *, tls: bool) -> str:
    """A client's request through nginx, on the host: the HTTP code of GET smoke_path.

    Over HTTPS the name resolves to 127.0.0.1 (--resolve: SNI and the name check are
    the real ones) and the certificate is verified against the issuer in our own
    lineage's chain.pem (curl accepts an intermediate as trust anchor), so the
    sandbox's Pebble CA verifies as Let's Encrypt does, without -k. chain.pem is
    root's: that request runs with sudo."""
    fmt = "-sS -o /dev/null -m 10 -w '%{http_code}'"  # -S: curl's own error (TLS, connection) on stderr
    if tls:
        url = f"https://{staging.domain}{staging.smoke_path}"
        return (f"sudo -n curl {fmt} --resolve {shlex.quote(staging.domain + ':443:127.0.0.1')} "
                f"--cacert {shlex.quote(certificates.LIVE_DIR + '/chain.pem')} {shlex.quote(url)}")
    url = f"http://127.0.0.1{staging.smoke_path}"
    return f"curl {fmt} -H {shlex.quote('Host: ' + staging.domain)} {shlex.quote(url)}"


def smoke_url(staging: Staging, *, tls: bool) -> str:
    return f"{'https' if tls else 'http'}://{staging.domain}{staging.smoke_path}"


def env_db_command(staging: Staging) -> str:
    """After make-env: the staging env file names staging's database."""
    script = shlex.quote(templates.script("staging-env-db.sh"))
    return f"sh -c {script} staging-env-db {shlex.quote(staging.dir + '/' + staging.env_file)} {shlex.quote(staging.db_name)}"
