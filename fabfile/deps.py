"""deps: what the server needs installed — nginx, certbot, Docker + compose v2.

Runbook:
    check    print the version of each dependency (one round trip)
    (install arrives with the secure/deps/nginx issue)
"""

from invoke import Collection

from .core.batch import gather
from .core.errors import OpsError
from .core.task import not_implemented, ops_task

VERSION_PROBES = {
    "nginx": "nginx -v 2>&1 | sed 's/^nginx version: //'",
    "certbot": "certbot --version 2>&1",
    "docker": "docker version --format '{{.Server.Version}}' 2>&1",
    "compose": "docker compose version --short 2>&1",
    "curl": "curl --version | head -n 1",
}


@ops_task
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
ns.add_task(not_implemented("deps", "the secure/deps/nginx issue"), name="install", default=True)
ns.add_task(check)
