"""What the server remembers about releases: the release log.

It lives in the state directory on the server (settings `state_dir`, default
/var/lib/coachntt-ops), outside the app checkout, beside the deploy lock
(core/lock.py):

    releases.jsonl      append-only, one JSON object per deploy/rollback attempt
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shlex
import socket
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

RESULT_OK = "ok"
RESULT_FAILED = "failed"
RESULT_INTERRUPTED = "interrupted"  # cut off (Ctrl-C, lost client); `phase` says where


@dataclass
class Release:
    """One line of the release log."""

    sha: str
    kind: str  # deploy | release | rollback | verify | restore (backup.restore) | patch (maintenance.patch)
    result: str = ""  # ok | failed | interrupted
    phase: str = ""  # where a failed or interrupted release stopped
    previous: str = ""
    who: str = ""
    started: str = ""
    finished: str = ""
    backup: str = ""
    schema: str = ""
    message: str = ""
    rolled_back_to: str = ""
    slot: str = ""  # the api slot the release went live from (a | b, core/slots.py)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in ("", {}, None)}, sort_keys=True)


# Set in a release's `extra` as its breaking migrations start: from then on, undoing the
# release needs the database back from the backup it took (core/cutoff.py settles so).
BREAKING_MIGRATED = "breaking_migrated"


def breaking_migrated(release: Release) -> bool:
    return bool(release.extra.get(BREAKING_MIGRATED))


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def operator() -> str:
    """Who is deploying: the local user and machine (GitHub Actions adds its actor)."""
    actor = os.environ.get("GITHUB_ACTOR")
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    return f"{actor} via {who}" if actor else who


def log_path(state_dir: str) -> str:
    return f"{state_dir}/releases.jsonl"


def read_log_command(state_dir: str, lines: int = 500) -> str:
    return f"tail -n {lines} {shlex.quote(log_path(state_dir))} 2>/dev/null || true"


class ReleaseLog(list):
    """The readable releases, oldest first; `skipped` counts lines that were not."""

    skipped = 0


# The log lives on a server: a line may be torn, edited by hand or hostile.
# Only well-formed entries count, and their shas are hex before they can reach
# a shell (checkout, APP_VERSION, backup labels).
MAX_LINE = 64 * 1024
KINDS = ("deploy", "release", "rollback", "verify", "restore", "patch")
# What ships a new sha: `deploy`, and `release` (the checklist around deploy's cutover).
SHIPS = ("deploy", "release")
SLOTS = ("", "a", "b")
RESULTS = ("", RESULT_OK, RESULT_FAILED, RESULT_INTERRUPTED)
_SHA = re.compile(r"[0-9a-f]{7,64}")
_BACKUP = re.compile(r"/[A-Za-z0-9._/-]+")


def parse_log(text: str) -> ReleaseLog:
    releases = ReleaseLog()
    for line in text.splitlines():
        if not line.strip():
            continue
        release = _release_from(line)
        if release is None:
            releases.skipped += 1
        else:
            releases.append(release)
    return releases


def _release_from(line: str) -> Release | None:
    """One log line as a Release, or None when it is not a well-formed entry."""
    if len(line) > MAX_LINE:
        return None
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        return None  # a torn last line must not hide the rest
    if not isinstance(data, dict):
        return None
    # Unknown keys are ignored: a newer version of the tool may add fields.
    known = {k: v for k, v in data.items() if k in Release.__dataclass_fields__}
    if not isinstance(known.get("extra", {}), dict):
        return None
    texts = {k: v for k, v in known.items() if k != "extra"}
    if not all(isinstance(v, str) and v.isprintable() for v in texts.values()):
        return None
    if not _SHA.fullmatch(known.get("sha", "")) or known.get("kind") not in KINDS or known.get("result", "") not in RESULTS:
        return None
    if any(known.get(k) and not _SHA.fullmatch(known[k]) for k in ("previous", "rolled_back_to")):
        return None
    if known.get("backup") and not _BACKUP.fullmatch(known["backup"]):
        return None
    if known.get("slot", "") not in SLOTS:
        return None
    return Release(**known)


def good_releases(log: list[Release]) -> list[str]:
    """Shas that went live and passed their health gate, newest first, no repeats;
    a sha that ever failed its gate is bad and never offered."""
    bad = {r.sha for r in log if r.result == RESULT_FAILED and r.kind in SHIPS}
    seen: list[str] = []
    for release in reversed(log):
        if release.result == RESULT_OK and release.sha not in bad and release.sha not in seen:
            seen.append(release.sha)
    return seen


def previous_good(log: list[Release], sha: str) -> str:
    """The good release deployed before `sha`, in deploy order ('' if none).

    Deploy order, not log order: after rolling back B -> A, "previous" from A
    is the release before A, never B again.
    """
    order: list[str] = []
    for release in log:
        if release.kind in SHIPS and release.result == RESULT_OK:
            if release.sha in order:
                order.remove(release.sha)  # a redeploy makes it the newest
            order.append(release.sha)
    usable = [s for s in order if s in good_releases(log)]
    if sha not in usable:
        return usable[-1] if usable else ""
    index = usable.index(sha)
    return usable[index - 1] if index > 0 else ""


def backup_undoing(log: list[Release], sha: str) -> str:
    """The dump taken just before `sha` migrated the database (what rollback --with-db restores)."""
    return next((r.backup for r in reversed(log) if r.sha == sha and r.kind in SHIPS and r.backup), "")


def schema_of(log: list[Release], sha: str) -> str:
    """The schema a release brought: recorded when it FIRST went live. A later
    redeploy of old code over a newer database records the newer schema."""
    return next((r.schema for r in log if r.sha == sha and r.schema and r.kind in SHIPS), "")


def live_schema(log: list[Release]) -> str:
    """The database's schema now: the newest schema recorded by any release."""
    return next((r.schema for r in reversed(log) if r.schema), "")


def current_release(log: list[Release]) -> Release | None:
    """The release serving now: the last entry that ended ok, or the target of the last rollback."""
    for release in reversed(log):
        # A rollback that failed never switched (its slot failed the gate before nginx
        # moved); one cut off may have, and deploy.recover settles which.
        if release.result == RESULT_OK or (release.kind == "rollback" and release.result != RESULT_FAILED):
            return release
        if release.rolled_back_to:
            return Release(sha=release.rolled_back_to, kind="rollback", result=RESULT_OK)
    return None
