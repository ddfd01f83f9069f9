"""deps: what the server needs installed — nginx, certbot, Docker + compose v2.

Runbook (`fab -H coachntt@HOST deps`):
    1. web packages      nginx, certbot, python3-certbot-nginx, curl
    2. Docker            a working Docker + compose plugin is kept as it is
                         (the provider's image may have it); otherwise the
                         distribution's docker.io and compose v2 plugin
    3. Docker running    enabled at boot
    4. Docker daemon     /etc/docker/daemon.json gets configs/docker/daemon.json's keys
                         (no-new-privileges, log rotation, live-restore, userland-proxy
                         off, no inter-container traffic on the default bridge), keeping
                         the file's other keys; when it changed, Docker is restarted
                         under the deploy lock (never during a release) with its
                         containers kept running. `docker.daemon_hardening: false`
                         leaves the file alone.
    5. nginx running     enabled at boot
`deps.check` prints the version of each (one round trip).
`deps.images [--pull]`: whether the registry holds newer images under the tags the
app's compose file and Dockerfiles name (one round trip; exit 1 when it does);
--pull fetches them, and the next `release` builds and runs the api on them.
"""

import base64
import json
import secrets

from invoke import Collection

from .core import lock, remote, templates
from .core.app import App
from .core.batch import gather
from .core.errors import OpsError, RemoteCommandError
from .core.fleet import CHANGES, READS
from .core.steps import Change, Facts, Plan, Step
from .core.task import ops_task

WEB_PACKAGES = ["nginx", "certbot", "python3-certbot-nginx", "curl", "ca-certificates"]

VERSION_PROBES = {
    "nginx": "nginx -v 2>&1 | sed 's/^nginx version: //'",
    "certbot": "certbot --version 2>&1",
    "docker": "docker version --format '{{.Server.Version}}' 2>&1",
    "compose": "docker compose version --short 2>&1",
    "curl": "curl --version | head -n 1",
}


DAEMON_JSON = "/etc/docker/daemon.json"
DAEMON_SCRIPT = f"sh -c {remote.q(templates.script('docker-daemon.sh'))} docker-daemon"


def hardened_daemon_config() -> dict:
    return json.loads(templates.render("docker/daemon.json"))


def daemon_step(state_dir: str, *, enabled: bool = True) -> Step:
    """daemon.json with our keys merged in; the restart holds the deploy lock when an app is set up."""

    def plan(facts: Facts) -> Plan:
        if not enabled:
            return Plan.skipped("docker.daemon_hardening is off")
        found = facts["daemon"]
        try:
            current = json.loads(found.stdout) if found.ok and found.stdout.strip() else {}
            if not isinstance(current, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise OpsError(f"{DAEMON_JSON} on the host is not a JSON object Docker can read ({exc})",
                           "fix or remove it (Docker will not start with it either), then rerun deps; "
                           "nothing was changed") from None
        ours = hardened_daemon_config()
        wanted = {**current, **ours, "log-opts": {**current.get("log-opts", {}), **ours["log-opts"]}}
        if wanted == current:
            return Plan.ok("no-new-privileges, log rotation, live-restore, userland-proxy off, icc off")
        changed = sorted(key for key in wanted if wanted[key] != current.get(key))
        return Plan.change(Change(f"daemon.json: {', '.join(changed)}; restart Docker, containers kept running",
                                  locked_restart(state_dir, json.dumps(wanted, indent=2, sort_keys=True) + "\n")))

    return Step("docker daemon", probes={"daemon": f"cat {DAEMON_JSON} 2>/dev/null || true"}, plan=plan)


def locked_restart(state_dir: str, content: str) -> str:
    """Hold the deploy lock (when the app's state directory exists) while Docker restarts."""
    token, where = secrets.token_hex(8), remote.q(state_dir)
    payload = base64.b64encode(content.encode()).decode()
    return "\n".join([
        f"unlock() {{ {lock.LOCK_SCRIPT} release {where} {token} >/dev/null; }}",
        f"if [ -d {where} ]; then",
        f"  {lock.LOCK_SCRIPT} acquire {where} {token} deps - {remote.q('deps: restart Docker for daemon.json')} >/dev/null || "
        "{ echo 'a release holds the deploy lock: rerun deps when it is done (deploy.status shows it); nothing changed' >&2; exit 4; }",
        "  trap unlock EXIT",
        "fi",
        f"{DAEMON_SCRIPT} {payload}",
    ])


def docker_step() -> Step:
    def plan(facts: Facts) -> Plan:
        docker, compose = facts["docker"], facts["compose"]
        if docker.ok and compose.ok:
            return Plan.ok(f"keeping Docker {docker.stdout} with compose {compose.stdout}")
        missing = [name for name, probe in (("Docker Engine", docker), ("compose v2 plugin", compose)) if not probe.ok]
        install = f"{remote.APT_INSTALL} || exit $?\n" + templates.script("install-docker.sh")
        return Plan.change(Change(f"install {' and '.join(missing)} from the distribution", install))

    return Step(
        "docker + compose",
        probes={"docker": VERSION_PROBES["docker"], "compose": VERSION_PROBES["compose"]},
        plan=plan,
    )


@ops_task(default=True, fleet=CHANGES)
def install(ops):
    """Install nginx, certbot and Docker + compose v2 (keeps a working Docker)."""
    ops.run_steps([
        remote.packages_step("web packages", WEB_PACKAGES),
        docker_step(),
        remote.service_step("docker running", "docker"),
        daemon_step(ops.settings.require("state_dir"), enabled=ops.settings.get("docker.daemon_hardening", True)),
        remote.service_step("nginx running", "nginx"),
    ])


@ops_task(fleet=READS)
def check(ops):
    """Print the installed version of each dependency; exit 1 if any is missing."""
    found = gather(ops.target, VERSION_PROBES)
    missing = []
    for name, probe in found.items():
        version = probe.stdout.strip().splitlines()[0] if probe.ok and probe.stdout.strip() else "missing"
        if not probe.ok:
            missing.append(name)
        ops.reporter.info(f"  {name:<10} {version}")
    if missing:
        raise OpsError(f"missing or broken on {ops.where}: {', '.join(missing)}", "run `deps` to install them")


IMAGE_UPDATES = f"sh -c {remote.q(templates.script('image-updates.sh'))} image-updates"
CURRENT, UPDATE = "current", "update"


def images_command(app: App) -> str:
    """Every image the app's compose files name, and the base image of each Dockerfile in
    the app's directory, asked of their registries (scripts/image-updates.sh)."""
    bases = app.in_dir("sed -n 's/^FROM[[:space:]]\\{1,\\}\\([^[:space:]]*\\).*/\\1/Ip' Dockerfile* 2>/dev/null")
    return (f"images=$({app.compose('config --images')}) || exit 3\n"
            f"bases=$({bases})\n"
            f"{IMAGE_UPDATES} $(printf '%s\\n' $images $bases | sort -u)")


def parse_image_lines(output: str) -> list[tuple[str, str, str]]:
    return [tuple(line.split("\t", 2)) for line in output.splitlines() if line.count("\t") >= 2]


@ops_task(fleet=READS, help={"pull": "fetch the images that have updates (nothing restarts)"})
def images(ops, pull=False):
    """Images of the app with updates in their registry; exit 1 when there are some."""
    app = App.from_settings(ops.settings)
    result = ops.target.run(images_command(app), check=False)
    if result.exit_status == 3:
        raise OpsError(f"docker compose cannot read the app's compose files in {app.dir} on {ops.where}",
                       "run `deploy.setup` (and a first release) before asking about its images")
    found = parse_image_lines(result.stdout)
    if not result.ok or not found:
        raise RemoteCommandError(f"asking the registries about the app's images failed on {ops.where}",
                                 (result.stderr.strip().splitlines() or ["no output"])[-1])
    for image, status, detail in found:
        if ops.json:
            print(json.dumps({"host": ops.where, "image": image, "status": status, "detail": detail}), flush=True)
        else:
            ops.reporter.info(f"  {status:<8} {image:<48} {detail}")
    updates = [image for image, status, _ in found if status == UPDATE]
    if updates and pull:
        for image in updates:
            ops.target.run(f"docker pull --quiet {remote.q(image)}")
        ops.reporter.info(f"  pulled {len(updates)}: the next `release` builds the api on them; a service running "
                          "one of them gets it with `docker compose up -d SERVICE` (PostgreSQL: in the maintenance window)")
        return
    if updates:
        raise OpsError(f"{len(updates)} image(s) have updates on {ops.where}: {', '.join(updates)}",
                       "`deps.images --pull` fetches them; the next `release` builds and runs the api on them")


ns = Collection("deps")
ns.add_task(install, default=True)
ns.add_task(check)
ns.add_task(images)
