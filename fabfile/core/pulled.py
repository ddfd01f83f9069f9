"""Backups pulled to the operator's machine (`backup.pull`): where they go, and
how a copy is made whole or not at all.

    <backup.pull_dir>/<host>/db_20261201_210455_manual.dump        (+ .sha256, .json, .verified)

Every file is copied over SFTP under a temporary name (.NAME.partial), the
dump's sha256 is computed here and compared with the server's .sha256; only a
match is renamed into place, sidecars first and the dump last. A mismatch, a
lost connection or Ctrl-C leaves no file behind. Directories are mode 700,
files 600: a dump holds the whole database.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import OpsError, UsageError
from .settings import PROJECT_DIR, Settings
from .target import Target

SIDECARS = (".sha256", ".json", ".verified")
_SHA256_LINE = re.compile(r"([0-9a-f]{64})[ \t]+\*?(\S+)\s*")


def destination(settings: Settings, host: str, port: int = 22) -> Path:
    """<backup.pull_dir>/<host>[_<port>]; a relative pull_dir is relative to the project."""
    root = Path(settings.require("backup.pull_dir"))
    if not root.is_absolute():
        root = PROJECT_DIR / root
    if not re.fullmatch(r"[A-Za-z0-9._:-]+", host) or host in (".", ".."):
        raise UsageError(f"cannot name a directory after the host '{host}'", "connect by a host name or address")
    return root / (host if port == 22 else f"{host}_{port}")


def expected_sha256(text: str, name: str) -> str:
    """The checksum a .sha256 sidecar (sha256sum's format) gives for `name`."""
    for line in text.splitlines():
        found = _SHA256_LINE.fullmatch(line)
        if found and found.group(2) == name:
            return found.group(1)
    raise OpsError(f"the .sha256 of {name} on the server is not a checksum of it", f"check {name}.sha256 there")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def private_dir(path: Path) -> None:
    """`path` and every parent it needs, each made mode 700; an existing `path` is tightened too."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):  # mkdir's parents=True would make them with the umask's mode
        directory.mkdir(mode=0o700, exist_ok=True)
        directory.chmod(0o700)
    path.chmod(0o700)


@dataclass(frozen=True)
class Pulled:
    path: Path
    sha256: str
    size: int
    already: bool = False  # a checked copy was there: nothing copied


def pull(target: Target, backup_dir: str, name: str, sidecars: tuple[str, ...], into: Path) -> Pulled:
    """Copy backup `name` (and the given `sidecars`, ".sha256" among them) from `backup_dir`
    on the target into `into`, checked against its .sha256. Raises OpsError on a mismatch,
    leaving nothing."""
    if ".sha256" not in sidecars:
        raise OpsError(f"{name} has no .sha256 on {target.label}: a copy of it cannot be checked",
                       "take a new backup with `backup.now`")
    private_dir(into)
    remote = f"{backup_dir.rstrip('/')}/{name}"
    final = into / name
    partial = {suffix: into / f".{name}{suffix}.partial" for suffix in ("", *sidecars)}
    try:
        for suffix, path in partial.items():
            if suffix:
                _get(target, remote + suffix, path)
        expected = expected_sha256(partial[".sha256"].read_text(errors="replace"), name)
        already = final.is_file() and sha256_of(final) == expected
        if not already:
            _get(target, remote, partial[""])
            got = sha256_of(partial[""])
            if got != expected:
                raise OpsError(f"the copy of {name} from {target.label} does not match its .sha256 "
                               f"(sha256 {got[:12]}..., expected {expected[:12]}...): nothing kept",
                               f"check it on the server with `backup.verify {name}`")
        for suffix in sidecars:  # the dump last: until it is there, nothing of it shows
            os.replace(partial[suffix], into / f"{name}{suffix}")
        if not already:
            os.replace(partial[""], final)
        return Pulled(final, expected, final.stat().st_size, already)
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)


def _get(target: Target, remote: str, local: Path) -> None:
    """One file over SFTP into a new private file."""
    local.unlink(missing_ok=True)
    os.close(os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        target.get_file(remote, local)
    except PermissionError:
        raise OpsError(f"cannot read {remote} on {target.label} as {target.login_user}",
                       "log in as the deploy user (the owner of backup.dir)") from None
    except FileNotFoundError:
        raise OpsError(f"{remote} went away on {target.label} while it was being copied",
                       "a prune may have removed it: pick another backup from `backup.list`") from None
    local.chmod(0o600)
