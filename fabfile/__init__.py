"""coachntt-ops: every namespace, listed explicitly (fab and inv both load this)."""

from invoke import Collection

from . import backup, deploy, deps, monitor, nginx, release, rollback, secure, ssl
from .sandbox.tasks import sandbox as sandbox_ns

ns = Collection(
    secure.ns,
    deps.ns,
    nginx.ns,
    deploy.ns,
    ssl.ns,
    backup.ns,
    rollback.ns,
    monitor.ns,
    release.ns,
    sandbox_ns,
)
