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
import shlex
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from .target import Target

RESULT_OK = "ok"
RESULT_FAILED = "failed"
RESULT_INTERRUPTED = "interrupted"  # cut off (Ctrl-C, lost client); `phase` says where


@dataclass
class Release:
    """One line of the release log."""

    sha: str
    kind: str  # deploy | rollback | verify
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
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in ("", {}, None)}, sort_keys=True)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def operator() -> str:
    """Who is deploying: the local user and machine (GitHub Actions adds its actor)."""
    actor = os.environ.get("GITHUB_ACTOR")
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    return f"{actor} via {who}" if actor else who


def log_path(state_dir: str) -> str:
    return f"{state_dir}/releases.jsonl"


def read_log_command(state_dir: str, lines: int = 500) -> str:
    return f"tail -n {lines} {shlex.quote(log_path(state_dir))} 2>/dev/null || true"


def parse_log(text: str) -> list[Release]:
    releases = []
    for line in text.splitlines():
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line must not hide the rest
        known = {k: v for k, v in data.items() if k in Release.__dataclass_fields__}
        releases.append(Release(**known))
    return releases


def good_releases(log: list[Release]) -> list[str]:
    """Shas that went live and passed their health gate, newest first, no repeats;
    a sha that ever failed its gate is bad and never offered."""
    bad = {r.sha for r in log if r.result == RESULT_FAILED and r.kind == "deploy"}
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
        if release.kind == "deploy" and release.result == RESULT_OK:
            if release.sha in order:
                order.remove(release.sha)  # a redeploy makes it the newest
            order.append(release.sha)
    usable = [s for s in order if s in good_releases(log)]
    if sha not in usable:
        return usable[-1] if usable else ""
    index = usable.index(sha)
    return usable[index - 1] if index > 0 else ""


def current_release(log: list[Release]) -> Release | None:
    """The release serving now: the last entry that ended ok, or the target of the last rollback."""
    for release in reversed(log):
        # A rollback leaves its sha checked out even when its health gate failed.
        if release.result == RESULT_OK or release.kind == "rollback":
            return release
        if release.rolled_back_to:
            return Release(sha=release.rolled_back_to, kind="rollback", result=RESULT_OK)
    return None


def append(target: Target, state_dir: str, release: Release) -> None:
    target.run(f"printf '%s\\n' {shlex.quote(release.to_json())} >> {shlex.quote(log_path(state_dir))}", timeout=30)
