"""Which release this is: $APP_VERSION, else ./REVISION, else the checked-out git sha."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_head(root: Path) -> str | None:
    """The sha HEAD points at, read from .git without running git (the image has none)."""
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
    except OSError:
        return None
    if not head.startswith("ref: "):
        return head or None  # detached HEAD: the sha itself
    ref = head[5:]
    try:
        return (git / ref).read_text().strip()
    except OSError:
        pass
    try:
        for line in (git / "packed-refs").read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name == ref:
                return sha
    except OSError:
        pass
    return None


def app_version(root: Path = ROOT) -> str:
    configured = os.environ.get("APP_VERSION", "").strip()
    if configured:
        return configured
    try:
        revision = (root / "REVISION").read_text().strip()
        if revision:
            return revision
    except OSError:
        pass
    return git_head(root) or "unknown"


def health_broken(root: Path = ROOT) -> bool:
    """A release that carries a BROKEN_HEALTH file fails its health check (for deploy tests)."""
    return (root / "BROKEN_HEALTH").exists()
