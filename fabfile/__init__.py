"""coachntt-ops: every namespace, listed explicitly (fab and inv both load this)."""

from invoke import Collection

from . import (
    backup,
    backup_copies,
    backup_schedule,
    db,
    deploy,
    deps,
    load_balancer,
    maintenance,
    monitor,
    nginx,
    release,
    rollback,
    secure,
    ssl,
    staging,
    tool,
)
from .sandbox.tasks import sandbox as sandbox_ns

# When backups run is its own module; its tasks belong to the backup namespace.
backup.ns.add_task(backup_schedule.schedule)
backup.ns.add_task(backup_schedule.scheduled)
# Copies away from the server (off-site, and on the operator's machine) too.
backup.ns.add_task(backup_copies.offsite_, name="offsite")
backup.ns.add_task(backup_copies.pull)

ns = Collection(
    secure.ns,
    deps.ns,
    nginx.ns,
    load_balancer.ns,
    deploy.ns,
    ssl.ns,
    backup.ns,
    db.ns,
    rollback.ns,
    monitor.ns,
    release.ns,
    staging.ns,
    maintenance.ns,
    tool.ns,
    sandbox_ns,
)
