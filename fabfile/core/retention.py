"""Which backups `backup.prune` keeps: pure functions over names and dates, tested as data.

    keep_daily N     the newest backup of each of the last N days that have one
    keep_weekly N    ... of each of the last N ISO weeks that have one
    keep_monthly N   ... of each of the last N months that have one
    always           the newest backup; the newest verified one; the dump taken
                     before each release `rollback.list` still offers (what
                     `rollback --with-db` would restore)

Databases a restore set aside (<db>_before_<stamp>, <db>_failed_<stamp>) are
dropped once they are older than keep_daily days: by then the daily backups
cover that span. Leftovers of a restore or verify that was cut off
(<db>_restore_<stamp>, <db>_verify_<stamp>) never held live data: dropped after a day.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from . import state


@dataclass(frozen=True)
class Policy:
    daily: int
    weekly: int
    monthly: int


@dataclass(frozen=True)
class PrunePlan:
    keep: dict[str, list[str]]  # name -> why it stays
    remove: list[str]  # oldest first


def _newest_per_period(dated: list[tuple[str, datetime]], count: int, period: Callable[[datetime], Hashable]) -> list[str]:
    """The newest backup of each of the `count` most recent periods that have one."""
    chosen: list[str] = []
    seen: set[Hashable] = set()
    for name, when in dated:  # newest first
        if len(seen) >= count:
            break
        key = period(when)
        if key not in seen:
            seen.add(key)
            chosen.append(name)
    return chosen


def plan_prune(backups: Iterable[tuple[str, datetime]], protected: dict[str, str], policy: Policy) -> PrunePlan:
    """What stays (and why) and what goes. `protected` maps names to why they must stay."""
    dated = sorted(backups, key=lambda item: (item[1], item[0]), reverse=True)
    keep: dict[str, list[str]] = {}

    def mark(names: Iterable[str], why: str) -> None:
        for name in names:
            keep.setdefault(name, []).append(why)

    if dated:
        mark([dated[0][0]], "newest")
    mark(_newest_per_period(dated, policy.daily, lambda when: when.date()), "daily")
    mark(_newest_per_period(dated, policy.weekly, lambda when: when.isocalendar()[:2]), "weekly")
    mark(_newest_per_period(dated, policy.monthly, lambda when: (when.year, when.month)), "monthly")
    names = {name for name, _ in dated}
    for name, why in protected.items():
        if name in names:
            mark([name], why)
    remove = [name for name, _ in reversed(dated) if name not in keep]
    return PrunePlan(keep, remove)


def protected_backups(log: list[state.Release], backup_dir: str, newest_verified: str) -> dict[str, str]:
    """Backups prune must never remove: the newest verified one, and the dump that
    `rollback --with-db` would restore from each release rollback still offers."""
    protected: dict[str, str] = {}
    for sha in state.good_releases(log):
        path = state.backup_undoing(log, sha)
        if path and posixpath.dirname(path) == backup_dir.rstrip("/"):
            protected[posixpath.basename(path)] = f"taken before {sha[:12]} (rollback --with-db)"
    if newest_verified:
        protected[newest_verified] = "newest verified"
    return protected


def stale_set_aside(databases: Iterable[str], db_name: str, now: datetime, days: int) -> list[str]:
    """Set-aside databases older than `days` days (0: kept), scratch ones older than a day."""
    pattern = re.compile(re.escape(db_name) + r"_(before|failed|restore|verify)_(\d{8}_\d{6})")
    stale = []
    for database in databases:
        found = pattern.fullmatch(database)
        if not found:
            continue
        limit = days if found.group(1) in ("before", "failed") else 1
        when = datetime.strptime(found.group(2), "%Y%m%d_%H%M%S").replace(tzinfo=UTC)
        if limit > 0 and now - when > timedelta(days=limit):
            stale.append(database)
    return sorted(stale)
