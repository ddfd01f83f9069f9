"""Migrations a release brings, and whether the release before can run on them.

Releases go live beside the one before (core/slots.py): the new release migrates
while the old one still serves, so every migration must be one the previous
code runs on — expand/contract (README, "Migrations: expand, then contract").
A migration that cannot be (a one-step rename, a drop the previous release still
reads) says so on a line of its own, with the reason:

    -- breaking: renames notes.text in one step

Such a release goes stop-the-world: nginx answers 503 with Retry-After, the old
slot stops, the migration runs, the new slot starts, is gated and switched in.
Only inside the maintenance window (`maintenance.window`, core/window.py: the same
window maintenance.patch obeys), or with --force.

The app's convention (examples/app): migrations/NNNN_name.sql, applied in order,
`python -m scripts.migrate` reporting `schema version: N`, which the release log
records; a migration numbered above the live schema is pending.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from datetime import datetime

from . import window
from .errors import UsageError
from .settings import Settings
from .state import ReleaseLog, current_release, live_schema

MIGRATIONS_DIR = "migrations"
MARKER = r"^--[[:space:]]*breaking"  # git grep -E, case-insensitive: at the start of a line
_FOUND = re.compile(r"^[0-9a-f]+:" + MIGRATIONS_DIR + r"/(\d{4})_[A-Za-z0-9_-]+\.sql:--\s*breaking\b[:\s-]*(.*)$", re.IGNORECASE)
_NAME = re.compile(r"^[0-9a-f]+:(" + MIGRATIONS_DIR + r"/\d{4}_[A-Za-z0-9_-]+\.sql):")


@dataclass(frozen=True)
class Breaking:
    number: int
    name: str  # migrations/NNNN_name.sql
    why: str


def marked_command(sha: str) -> str:
    """Every marker line in the migrations at `sha` (run in the checkout; reads git's
    objects, not the working tree: nothing is checked out)."""
    return (f"git grep -I -i -E {shlex.quote(MARKER)} {shlex.quote(sha)} -- {shlex.quote(MIGRATIONS_DIR + '/*.sql')}"
            "; test $? -le 1")  # git grep exits 1 when nothing matches


def parse_marked(output: str) -> list[Breaking]:
    """`git grep` lines (sha:migrations/NNNN_name.sql:-- breaking: why) as Breaking. Pure."""
    found: dict[int, Breaking] = {}
    for line in output.splitlines():
        matched, named = _FOUND.match(line), _NAME.match(line)
        if matched and named:
            number = int(matched.group(1))
            found.setdefault(number, Breaking(number, named.group(1), matched.group(2).strip()))
    return [found[n] for n in sorted(found)]


def pending(marked: list[Breaking], live_schema: str, *, first_release: bool) -> list[Breaking]:
    """The breaking migrations a release would apply now. A first release has no code
    before it to break; an unknown live schema counts every marked one as pending."""
    if first_release:
        return []
    if not live_schema.isdigit():
        return list(marked)
    return [m for m in marked if m.number > int(live_schema)]


def window_words(settings: Settings) -> str:
    """'the maintenance window (Sun 02:00-04:00 UTC)', as the setting names it."""
    return f"the maintenance window ({window.window_of(settings)})"


def refusal(breaking: list[Breaking], serving: str, settings: Settings) -> UsageError:
    """Why a release with breaking migrations does not go now (nothing changed)."""
    first = breaking[0]
    why = f" ({first.why})" if first.why else ""
    more = f" and {len(breaking) - 1} more" if len(breaking) > 1 else ""
    return UsageError(f"{first.name}{why}{more} is marked breaking: {serving[:12] or 'the live release'} cannot run on it, "
                      f"so this release stops the api behind a 503 page, which is allowed only in {window_words(settings)}",
                      "deploy then, or now with --force; nothing changed")


@dataclass(frozen=True)
class Decision:
    breaking: list[Breaking]
    allowed: bool  # stop-the-world may go now
    inside_window: bool
    window: str = ""  # the window's words (window_words)

    @property
    def words(self) -> str:
        names = ", ".join(m.name for m in self.breaking)
        if not self.allowed:
            return f"{names} marked breaking: refused outside {self.window} without --force"
        how = f"in {self.window}" if self.inside_window else "--force, outside the window"
        return f"{names} marked breaking: stop-the-world behind the 503 page ({how})"


def decide(grep_output: str, log: ReleaseLog, settings: Settings, now: datetime, *, force: bool) -> Decision:
    """What a release's marked migrations mean now. Pure: the `git grep` output, the log, the clock."""
    current = current_release(log)
    found = pending(parse_marked(grep_output), live_schema(log), first_release=current is None)
    inside = bool(found) and window.in_window(settings, now)
    return Decision(found, not found or inside or force, inside, window_words(settings) if found else "")
