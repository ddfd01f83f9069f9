"""deps: what the server needs installed — nginx, certbot, Docker + compose v2.

Runbook (`fab -H coachntt@HOST deps`):
    1. web packages      nginx, certbot, python3-certbot-nginx, curl
    2. Docker            a working Docker + compose plugin is kept as it is
                         (the provider's image may have it); otherwise the
                         distribution's docker.io and compose v2 plugin
    3. Docker running    enabled at boot
`deps.check` prints the version of each (one round trip).
"""

from invoke import Collection

from .core import remote, templates
from .core.batch import gather
from .core.errors import OpsError
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


ns = Collection("deps")
ns.add_task(install, default=True)
ns.add_task(check)
