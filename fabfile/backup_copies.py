"""backup.offsite and backup.pull: copies of the backups away from the server.

Runbook:
    backup.offsite --init         once per server, as the deploy user: restic from the
                                  distribution, a key of its own (~/.ssh/coachntt_offsite,
                                  ed25519; prints the public key and the line to add on the
                                  storage host), the storage host's key pinned in
                                  known_hosts (fingerprint shown), `restic init` when the
                                  repository does not exist yet. Rerun after authorizing
                                  the key: each step is kept when already done.
    backup.offsite                push backup.dir (backups, .sha256, .json, .verified) as
                                  one restic snapshot tagged with every backup's name; a
                                  state already off-site adds nothing. Retention:
                                  `restic forget --prune` with backup.keep_* (core/offsite.py)
    backup.offsite --fetch NAME   the newest off-site copy of NAME back into backup.dir:
                                  restored under a temporary name, sha256 checked, renamed
    backup.pull NAME|latest[-data]  a backup and its sidecars to <backup.pull_dir>/<host> on
                                  this machine over SFTP, sha256 checked here before the
                                  rename; a mismatch leaves nothing (exit 1)

The repository password is RESTIC_PASSWORD in the app's env file on the server: read
there only, never on a command line or in any output. No password: exit 2, nothing
changed. A storage host that cannot be reached (or refuses the key, or shows another
host key): exit 3, nothing changed here.
"""

from __future__ import annotations

import time

from .backup import LATEST, read_backups
from .core import backups, offsite, pulled
from .core.app import App
from .core.errors import OpsError, UsageError
from .core.target import RemoteTarget
from .core.task import ops_task


@ops_task(name="offsite", help={
    "init": "set up: restic, the off-site key, the storage host's key, the repository",
    "fetch": "bring this backup (from the off-site copies) back into backup.dir",
})
def offsite_(ops, init=False, fetch=""):
    """Push backup.dir to the encrypted off-site restic repository (--init sets it up, --fetch NAME brings one back)."""
    if init and fetch:
        raise UsageError("--init and --fetch are separate steps", "run --init first, then --fetch NAME")
    if fetch:
        backups.validate_name(fetch)
    storage = offsite.require_storage(ops.settings)
    app = App.from_settings(ops.settings)
    if ops.dry:
        what = (f"set up {storage.repo} (restic, key, host key, repository)" if init else
                f"fetch {fetch} from {storage.repo} into {app.backup_dir}" if fetch else
                f"push {app.backup_dir} to {storage.repo}, then forget snapshots past backup.keep_*")
        ops.reporter.info(f"  would {what}")
        return
    reporter, started = ops.reporter, time.monotonic()  # the run's summary counts from here
    try:
        if init:
            set_up(ops, app, storage)
        elif fetch:
            path, snapshot = offsite.fetch(ops.target, app, storage, fetch)
            reporter.step("fetch from off-site", "changed", time.monotonic() - started, reason=f"{fetch} (snapshot {snapshot})")
            reporter.info(f"  {path}: sha256 ok; `backup.verify {fetch}` restores it into a scratch database")
        else:
            pushed = offsite.push(ops.target, app, ops.settings)
            reporter.step("push off-site", "changed" if pushed.changed else "ok", time.monotonic() - started,
                          reason=storage.repo)
            for line in pushed.lines:
                reporter.info(f"  {line}")
    except OpsError as exc:
        reporter.step("off-site", "failed", time.monotonic() - started, reason=exc.one_line())
        raise


def set_up(ops, app: App, storage: offsite.Storage) -> None:
    started = time.monotonic()
    done, error = offsite.init(ops.target, app, storage)
    # What was done is shown also when a later step stopped: the public key above all.
    if done.restic:
        ops.reporter.info(f"  restic {done.restic}")
    if done.key:
        state, _, path = done.key.partition(" ")
        ops.reporter.info(f"  off-site key {path} of {app.owner} ({'created now' if state == 'created' else 'kept'})")
    if done.public_key:
        ops.reporter.info(f"  public key: {done.public_key}")
        ops.reporter.info(f"  on {storage.host}, add this line to ~{storage.user}/.ssh/authorized_keys (SFTP only):")
        ops.reporter.info(f"    {storage.authorized_line(done.public_key)}")
    if done.host_key:
        state, _, path = done.host_key.partition(" ")
        verb = "pinned now" if state == "pinned" else "already pinned"
        ops.reporter.info(f"  storage host key {verb} in {path}; check it with the storage provider:")
        for line in done.fingerprints:
            ops.reporter.info(f"    {line}")
    if error is not None:
        raise error
    changed = (done.repo == "created" or done.restic.endswith("(installed now)") or done.key.startswith("created ")
               or done.host_key.startswith("pinned "))
    ops.reporter.step("off-site set-up", "changed" if changed else "ok", time.monotonic() - started,
                      reason=f"{storage.repo} ({'created' if done.repo == 'created' else 'exists'})")


@ops_task(positional=["name"], help={"name": "the backup (from backup.list), `latest` (database) or `latest-data`"})
def pull(ops, name=None):
    """Copy a backup and its sidecars from the server to this machine, sha256 checked before it is kept."""
    name = name or ""  # None, not "": invoke fills a positional argument only while it is None
    if name not in LATEST:
        backups.validate_name(name)
    reporter, started = ops.reporter, time.monotonic()  # the run's summary counts from here
    target = ops.target
    if not isinstance(target, RemoteTarget):
        raise UsageError("backup.pull copies a backup from a server to this machine, and no server was named",
                         "run it from your machine with -H coachntt@HOST (or COACHNTT_HOST); on the server the "
                         "backups are already in backup.dir")
    app = App.from_settings(ops.settings)
    into = pulled.destination(ops.settings, target.connection.host, target.connection.port)
    found = {b.name: b for b in read_backups(target, app)}
    if name in LATEST:
        data = name == "latest-data"
        newest = [n for n in found if backups.is_data(n) == data]  # read_backups: oldest first
        if not newest:
            raise UsageError(f"no {'data archives' if data else 'database backups'} in {app.backup_dir} on {ops.where}",
                             f"take one with `backup.now{' --data' if data else ''}`")
        name = newest[-1]
    backup = found.get(name)
    if backup is None:
        raise UsageError(f"no backup {name} in {app.backup_dir} on {ops.where}", "see `backup.list`")
    sidecars = tuple(s for s, there in ((".sha256", backup.has_checksum), (".json", backup.has_manifest),
                                        (".verified", bool(backup.verification))) if there)
    if ops.dry:
        ops.reporter.info(f"  would copy {name} ({backup.size / 1048576:.1f} MiB) to {into}, checked against its .sha256")
        return
    try:
        got = pulled.pull(target, app.backup_dir, name, sidecars, into)
    except OpsError as exc:
        reporter.step("pull", "failed", time.monotonic() - started, reason=exc.one_line())
        raise
    reporter.step("pull", "ok" if got.already else "changed", time.monotonic() - started,
                  reason=f"{name} ({got.size / 1048576:.1f} MiB)")
    reporter.info(f"  {got.path}: sha256 {got.sha256} ok" + (" (already here)" if got.already else ""))
