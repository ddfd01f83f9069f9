"""Archives of the app's data directory (app.data_dir) on the server: made,
checked and restored by scripts/backup-data.sh as root, one round trip each.

They live beside the database dumps in backup.dir, with the same sidecars
(.sha256, .json manifest, .verified), so `backup.list`, `verify`, `prune`,
off-site copies and pulls treat both kinds alike. A restore extracts into a new
directory (<data_dir>.restore_<stamp>), checks it against the manifest, and only
then swaps it in by renaming; the directory before is kept as
<data_dir>.before_<stamp> until prune.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from .backups import DATA_SCRIPT, NO_DATA_DIR, NO_DIRECTORY, NO_SUCH_BACKUP, failed, script_text
from .errors import OpsError, UsageError
from .target import Target


@dataclass(frozen=True)
class Contents:
    """What an archive holds (its manifest) or an extracted copy holds."""

    entries: int
    bytes: int


def parse_contents(text: str) -> Contents | None:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or type(data.get("entries")) is not int or type(data.get("bytes")) is not int:
        return None
    return Contents(data["entries"], data["bytes"])


def differences(expected: Contents, restored: Contents) -> list[str]:
    found = []
    if expected.entries != restored.entries:
        found.append(f"{restored.entries} entries extracted, the manifest says {expected.entries}")
    if expected.bytes != restored.bytes:
        found.append(f"{restored.bytes} bytes of files extracted, the manifest says {expected.bytes}")
    return found


def _script(action: str, *args: str) -> str:
    # Run as the deploy user, root only inside: phases under the deploy lock keep
    # their job files the deploy user's (lock.HeldLock), and root reads every file.
    return (f"sudo -n bash -c {shlex.quote(script_text(DATA_SCRIPT))} backup-data {action} "
            + " ".join(shlex.quote(a) for a in args))


def archive(target: Target, app, label: str, *, min_free_mb: int, tool: str) -> tuple[str, list[str]]:
    """tar.gz of app.data_dir into a new backup; (its path, warnings)."""
    result = target.run(_script("archive", app.backup_dir, app.data_dir, label, app.state_dir, str(min_free_mb), tool, app.owner),
                        user=app.owner, check=False, timeout=3600)
    if result.exit_status == NO_DIRECTORY:
        raise UsageError(f"backup directory {app.backup_dir} is missing on {target.label}", "run `deploy.setup`; nothing changed")
    if result.exit_status == NO_DATA_DIR:
        raise UsageError(f"the data directory {app.data_dir} is missing on {target.label}",
                         "set app.data_dir to the app's data directory; nothing changed")
    if not result.ok:
        raise failed(result, target.label, "archiving the data directory failed", "nothing kept; fix that and rerun")
    lines = result.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith(app.backup_dir + "/"):
        raise OpsError(f"the data archive on {target.label} named no file", f"check {app.backup_dir} and scripts/{DATA_SCRIPT}")
    return lines[-1], [line for line in lines[:-1] if line.startswith("warning:")]


def load(target: Target, app, name: str, directory: str, *, keep: bool) -> tuple[Contents | None, Contents]:
    """Extract archive `name` into the new `directory` (removed again unless `keep`);
    (what its manifest says, what was extracted)."""
    result = target.run(_script("load", app.backup_dir, name, directory, "yes" if keep else "no"),
                        user=app.owner, check=False, timeout=3600)
    if result.exit_status == NO_SUCH_BACKUP:
        raise UsageError(f"no backup {name} in {app.backup_dir} on {target.label}", "see `backup.list`; nothing changed")
    if not result.ok:
        raise failed(result, target.label, f"extracting {name} failed", f"{app.data_dir} was not touched")
    fields = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    restored = parse_contents(fields.get("restored", ""))
    if restored is None:
        raise OpsError(f"extracting {name} on {target.label} did not say what it extracted", f"check scripts/{DATA_SCRIPT}")
    return parse_contents(fields.get("manifest", "")), restored


def restore_checked(target: Target, app, name: str, directory: str) -> None:
    """Extract `name` into `directory` and check it against its manifest; on any
    failure the new directory is removed and the live one was never touched."""
    manifest, restored = load(target, app, name, directory, keep=True)
    wrong = ["no manifest to compare with"] if manifest is None else differences(manifest, restored)
    if wrong:
        remove(target, app, directory)
        raise OpsError(f"{name} extracts, but not as its manifest says ({'; '.join(wrong)})",
                       f"{app.data_dir} was not touched; verify an older archive with `backup.verify`")


def swap(target: Target, app, replacement: str, aside: str, *, api: str) -> None:
    """The live api slot's service `api` stopped, data_dir renamed to `aside`,
    `replacement` renamed to data_dir, the api started (always)."""
    result = target.run(_script("swap", app.data_dir, replacement, aside, app.compose(f"stop {shlex.quote(api)}"),
                                app.compose(f"start {shlex.quote(api)}")),
                        user=app.owner, check=False, timeout=600)
    if not result.ok:
        raise failed(result, target.label, f"swapping in {replacement} failed", "the api was started again")


def remove(target: Target, app, *paths: str) -> None:
    target.run(_script("remove", *paths), user=app.owner, timeout=600)


def set_aside_command(app) -> str:
    """Directories restores and verifications set aside or left behind, one per line (prune's facts)."""
    return f"ls -1d {shlex.quote(app.data_dir)}.*_* 2>/dev/null; true"
