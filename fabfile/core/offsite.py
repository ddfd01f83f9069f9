"""Off-site copies of the backups: an encrypted restic repository over SFTP
(scripts/offsite-restic.sh, one round trip per action, run as the deploy user).

    backup.offsite_repo   sftp:USER@HOST:/ABSOLUTE/PATH   (empty: off)
    backup.offsite_port   the storage host's SSH port (22)
    RESTIC_PASSWORD       in the app's env file on the server, read only there

Each push is one restic snapshot of backup.dir, tagged with the name of every
backup in it; a push of a state already off-site makes none. Retention is
restic's own `forget --prune` with backup.keep_daily / keep_weekly / keep_monthly
over the snapshots of this host and directory, plus always the newest one: it
holds every backup the server has, so no backup still on the server is ever
only on the server, and the newest state is never dropped.

Exit codes: a storage host that cannot be reached, refuses the key or shows
another host key is a connection failure (3); missing set-up (no password, no
restic, no key, no pinned host key, no repository) is exit 2 naming the step
that fixes it; anything else is 1. `push` is also what a scheduled run calls.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from . import redact, templates
from .errors import AuthError, ConnectError, HostKeyError, OpsError, UsageError
from .settings import OFFSITE_REPO, Settings
from .target import Target, command_failed

SCRIPT = "offsite-restic.sh"
KEY = "~/.ssh/coachntt_offsite"
# scripts/offsite-restic.sh's exit codes that are not a failure of the work itself.
NO_DIRECTORY, NO_SUCH_BACKUP = 4, 6
(NO_PASSWORD, NO_RESTIC, NO_KEY, NOT_PINNED, UNREACHABLE, HOST_KEY_CHANGED, REFUSED, NO_REPOSITORY,
 WRONG_PASSWORD, ALREADY_THERE) = range(20, 30)


@dataclass(frozen=True)
class Storage:
    """Where the off-site copies go, from validated settings."""

    user: str
    host: str
    path: str
    port: int = 22

    @property
    def repo(self) -> str:
        return f"sftp:{self.user}@{self.host}:{self.path}"

    @property
    def address(self) -> str:
        return self.host if self.port == 22 else f"{self.host}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """How known_hosts (and ssh-keygen -R) name the host."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def authorized_line(self, public_key: str) -> str:
        """The line for ~USER/.ssh/authorized_keys on an OpenSSH storage host: SFTP only."""
        return f'restrict,command="internal-sftp" {public_key}'


def storage_from(settings: Settings) -> Storage | None:
    """The configured storage, or None when off-site copies are off (empty backup.offsite_repo)."""
    value = settings.get("backup.offsite_repo") or ""
    if not value:
        return None
    found = re.fullmatch(OFFSITE_REPO, value)
    if not found:  # validate() refuses it before any task runs; a direct caller gets the same answer
        raise UsageError(f"backup.offsite_repo must be sftp:USER@HOST:/ABSOLUTE/PATH, got '{value}'", "fix the setting")
    return Storage(found.group(1), found.group(2), found.group(3), int(settings.get("backup.offsite_port") or 22))


def require_storage(settings: Settings) -> Storage:
    storage = storage_from(settings)
    if storage is None:
        raise UsageError("off-site copies are off: backup.offsite_repo is empty",
                         f"set COACHNTT_BACKUP__OFFSITE_REPO=sftp:USER@HOST:/ABSOLUTE/PATH in .env.{settings.env}")
    return storage


def env_path(app) -> str:
    """The app's env file on the server, where RESTIC_PASSWORD lives."""
    return app.env_file if app.env_file.startswith("/") else f"{app.dir.rstrip('/')}/{app.env_file}"


def command(action: str, storage: Storage, app, *args: str) -> str:
    words = [action, storage.user, storage.host, str(storage.port), storage.path, env_path(app), *args]
    return f"bash -c {shlex.quote(templates.script(SCRIPT))} offsite-restic " + " ".join(shlex.quote(w) for w in words)


def retention_args(settings: Settings) -> list[str]:
    return [str(int(settings.require(f"backup.keep_{period}"))) for period in ("daily", "weekly", "monthly")]


def fields(stdout: str) -> dict[str, list[str]]:
    """The script's key=value lines; a key may repeat (fingerprint=)."""
    found: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[a-z]+", key):
            found.setdefault(key, []).append(value.strip())
    return found


def error_for(result, storage: Storage, app, where: str, name: str = "") -> OpsError:
    """The one line for a failed action: what is wrong, what to do."""
    said = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    why = redact.redact(said[-1]) if said else ""
    init = "run `backup.offsite --init`"
    code = result.exit_status
    if code == NO_PASSWORD:
        return UsageError(f"{why or 'no RESTIC_PASSWORD in ' + env_path(app)} on {where}",
                          f"add RESTIC_PASSWORD=<a long random password> to {env_path(app)} on the server and keep a copy "
                          "off the server (without it the off-site copies cannot be read); nothing changed")
    if code == NO_RESTIC:
        return UsageError(f"restic is not installed on {where}", f"{init} (it installs restic from the distribution)")
    if code == NO_KEY:
        return UsageError(f"{app.owner} on {where} has no off-site key ({KEY})", init)
    if code == NOT_PINNED:
        return UsageError(f"the storage host {storage.address} is not pinned in {app.owner}'s known_hosts on {where}",
                          f"{init} and check the fingerprint it prints")
    if code == UNREACHABLE:
        return ConnectError(f"cannot reach the storage host {storage.address} from {where}: {why or 'no answer'}",
                            "check that it is up and its SSH port open, or fix backup.offsite_repo / backup.offsite_port; "
                            "nothing changed")
    if code == HOST_KEY_CHANGED:
        return HostKeyError(f"the storage host {storage.address} shows another host key than the one pinned on {where} "
                            "(possible man-in-the-middle)",
                            f"if it was rebuilt, remove the old key as {app.owner} with "
                            f"`ssh-keygen -R '{storage.known_hosts_name}'` and {init}")
    if code == REFUSED:
        return AuthError(f"the storage host {storage.address} refuses the off-site key of {app.owner} on {where}",
                         f"add the line `backup.offsite --init` prints to ~{storage.user}/.ssh/authorized_keys on {storage.host}")
    if code == NO_REPOSITORY:
        return UsageError(f"no restic repository at {storage.repo}", "create it with `backup.offsite --init`; nothing changed")
    if code == WRONG_PASSWORD:
        return UsageError(f"RESTIC_PASSWORD in {env_path(app)} on {where} does not open {storage.repo}",
                          "put back the password the repository was created with; nothing changed")
    if code == NO_DIRECTORY:
        return UsageError(f"backup directory {app.backup_dir} is missing on {where}", "run `deploy.setup`")
    if code == NO_SUCH_BACKUP:
        return UsageError(f"no off-site copy of {name} in {storage.repo}", "pick a backup that was pushed (`backup.offsite`)")
    if code == ALREADY_THERE:
        return UsageError(f"{name} is already in {app.backup_dir} on {where}",
                          f"nothing fetched; `backup.verify {name}` checks it, or remove it to fetch the off-site copy")
    if why and name:  # a fetch
        return OpsError(f"{why} (on {where})", "backup.dir is as it was; fetch another backup, or check the repository "
                        "with `restic check`")
    if why:
        return OpsError(f"{why} (on {where})", "backup.dir is as it was; fix that and rerun")
    return command_failed(result, where, what=f"scripts/{SCRIPT}")


# -- what a push did ---------------------------------------------------------------


@dataclass
class Pushed:
    """What one push did, for the task and for a scheduled run to report."""

    repo: str = ""
    off: bool = False  # backup.offsite_repo is empty: nothing to do
    nothing: bool = False  # no backups in backup.dir
    snapshot: str = ""
    unchanged: bool = False
    added: int = 0
    backups: int = 0
    forgot: int = 0
    lines: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.snapshot) and not self.unchanged


def parse_push(stdout: str, repo: str) -> Pushed:
    found = fields(stdout)
    pushed = Pushed(repo=repo)
    if found.get("pushed") == ["nothing"]:
        pushed.nothing = True
        pushed.lines.append("no backups in backup.dir: nothing to push")
        return pushed
    snapshot = (found.get("snapshot") or [""])[-1].split()
    if snapshot[:1] == ["unchanged"] and len(snapshot) >= 2:
        pushed.snapshot, pushed.unchanged = snapshot[1], True
        pushed.lines.append(f"off-site already: snapshot {pushed.snapshot} in {repo} holds this state of backup.dir")
    elif snapshot[:1] == ["new"] and len(snapshot) == 4 and snapshot[2].isdigit() and snapshot[3].isdigit():
        pushed.snapshot, pushed.added, pushed.backups = snapshot[1], int(snapshot[2]), int(snapshot[3])
        forgot = (found.get("forgot") or ["0"])[-1]
        pushed.forgot = int(forgot) if forgot.isdigit() else 0
        pushed.lines.append(f"snapshot {pushed.snapshot} in {repo}: {pushed.backups} backup(s), "
                            f"{pushed.added / 1048576:.1f} MiB new")
        if pushed.forgot:
            pushed.lines.append(f"retention: {pushed.forgot} older snapshot(s) forgotten and pruned")
    else:
        raise OpsError(f"the off-site push said nothing of its snapshot ({repo})", f"check scripts/{SCRIPT}")
    return pushed


def push(target: Target, app, settings: Settings) -> Pushed:
    """Push backup.dir off-site (one round trip). Off (empty backup.offsite_repo): Pushed(off=True).

    For `backup.offsite` and for a scheduled run; raises OpsError with the one line to show."""
    storage = storage_from(settings)
    if storage is None:
        return Pushed(off=True, lines=["off-site copies are off (backup.offsite_repo is empty)"])
    result = target.run(command("push", storage, app, app.backup_dir, *retention_args(settings)),
                        user=app.owner, check=False, timeout=6 * 3600)
    if not result.ok:
        raise error_for(result, storage, app, target.label)
    return parse_push(result.stdout, storage.repo)


@dataclass
class Initialised:
    restic: str = ""
    key: str = ""
    public_key: str = ""
    host_key: str = ""
    fingerprints: list[str] = field(default_factory=list)
    repo: str = ""


def parse_init(stdout: str) -> Initialised:
    found = fields(stdout)

    def last(key: str) -> str:
        return (found.get(key) or [""])[-1]

    return Initialised(last("restic"), last("key"), last("pubkey"), last("hostkey"), found.get("fingerprint", []), last("repo"))


def init(target: Target, app, storage: Storage) -> tuple[Initialised, OpsError | None]:
    """Set up the off-site copies (one round trip); what was done so far, and the error that stopped it."""
    result = target.run(command("init", storage, app), user=app.owner, check=False, timeout=900)
    done = parse_init(result.stdout)
    return done, (None if result.ok else error_for(result, storage, app, target.label))


def fetch(target: Target, app, storage: Storage, name: str) -> tuple[str, str]:
    """The newest off-site copy of backup `name` back into backup.dir, checked; (its path, the snapshot)."""
    result = target.run(command("fetch", storage, app, app.backup_dir, name), user=app.owner, check=False, timeout=6 * 3600)
    if not result.ok:
        raise error_for(result, storage, app, target.label, name)
    fetched = (fields(result.stdout).get("fetched") or [""])[-1].split()
    if len(fetched) != 2 or fetched[0] != f"{app.backup_dir.rstrip('/')}/{name}":
        raise OpsError(f"the off-site fetch of {name} named no file", f"check {app.backup_dir} and scripts/{SCRIPT}")
    return fetched[0], fetched[1]
