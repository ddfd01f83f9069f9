"""Which backups `backup.prune` keeps: pure functions over names and dates, tested as data.

    keep_daily N     the newest backup of each of the last N days that have one
    keep_weekly N    ... of each of the last N ISO weeks that have one
    keep_monthly N   ... of each of the last N months that have one
    always           the newest backup; the newest verified one; the dump taken
                     before each release `rollback.list` still offers (what
                     `rollback --with-db` would restore)
    keep_data N      data archives (data_*.tar.gz) apart: the newest N, and the
                     newest verified one

Databases a restore set aside (<db>_before_<stamp>, <db>_failed_<stamp>) and
data directories likewise (<data_dir>.before_<stamp>, ...) are dropped once they
are older than keep_daily days: by then the daily backups cover that span.
Leftovers of a restore or verify that was cut off (<db>_restore_<stamp>,
<db>_verify_<stamp>, ...) never held live data: dropped after a day.
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


def plan_keep_newest(backups: Iterable[tuple[str, datetime]], count: int, protected: dict[str, str]) -> PrunePlan:
    """The newest `count` (and the protected ones) stay; never fewer than the newest one."""
    dated = sorted(backups, key=lambda item: (item[1], item[0]), reverse=True)
    keep: dict[str, list[str]] = {}
    for index, (name, _) in enumerate(dated):
        if index == 0:
            keep.setdefault(name, []).append("newest")
        if index < count:
            keep.setdefault(name, []).append(f"newest {count}")
        if name in protected:
            keep.setdefault(name, []).append(protected[name])
    return PrunePlan(keep, [name for name, _ in reversed(dated) if name not in keep])


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


def stale_set_aside(names: Iterable[str], base: str, now: datetime, days: int, separator: str = "_") -> list[str]:
    """Set-aside copies of `base` (<base><separator>before_<stamp>, ...) older than `days`
    days (0: kept), scratch ones (restore, verify) older than a day."""
    pattern = re.compile(re.escape(base) + re.escape(separator) + r"(before|failed|restore|verify)_(\d{8}_\d{6})")
    stale = []
    for name in names:
        found = pattern.fullmatch(name)
        if not found:
            continue
        limit = days if found.group(1) in ("before", "failed") else 1
        when = datetime.strptime(found.group(2), "%Y%m%d_%H%M%S").replace(tzinfo=UTC)
        if limit > 0 and now - when > timedelta(days=limit):
            stale.append(name)
    return sorted(stale)
