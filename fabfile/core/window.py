"""The maintenance window: when host patching and breaking releases may run.

The setting `maintenance.window` names a weekly window in UTC:

    "Sun 02:00-04:00"          Sundays from 02:00 until 04:00 (the plan's window)
    "Sat,Sun 01:00-05:00"      two days
    "Mon-Fri 23:30-00:30"      a range of days; a window may cross midnight, its day
                               is the day it starts (Fri 23:30 until Sat 00:30)
    "Sun 02:00-04:00 UTC"      the same as the first: the zone may be said, never changed
    "always"                   no window (a sandbox, staging)

The start is inside, the end outside: at 04:00 the Sunday window is closed.
Anything else is refused by `parse` (and by the setting's rule, before a task
connects). For callers:

    in_window(settings_or_spec, now) -> bool        now: an aware datetime
    next_window(settings_or_spec, now) -> datetime  the next start after now (UTC)
    require_window(settings_or_spec, now, what)     UsageError (exit 2) outside it

`settings_or_spec` is the Settings (its maintenance.window is read), the setting's
text, or a parsed Window.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .errors import ConfigError, UsageError

SETTING = "maintenance.window"
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")  # datetime.weekday() order
ALWAYS = "always"
MINUTES_PER_DAY = 24 * 60
MINUTES_PER_WEEK = 7 * MINUTES_PER_DAY
EXAMPLES = "'Sun 02:00-04:00', 'Sat,Sun 01:00-05:00', 'Mon-Fri 23:30-00:30' (UTC) or 'always'"

_DAY = "(?:" + "|".join(DAYS) + ")"
_DAY_ITEM = f"{_DAY}(?:-{_DAY})?"
_TIME = r"(?:[01]\d|2[0-3]):[0-5]\d"
_SPEC = re.compile(rf"(?P<days>{_DAY_ITEM}(?:,{_DAY_ITEM})*) (?P<start>{_TIME})-(?P<end>{_TIME})(?: UTC)?", re.IGNORECASE)


class WindowError(ConfigError):
    """A window setting that does not parse (exit 2)."""


@dataclass(frozen=True)
class Window:
    """Weekdays (0 = Monday) on which the window opens, and its start and length in minutes."""

    days: tuple[int, ...] = ()
    start: int = 0
    length: int = 0
    always: bool = False
    spec: str = ALWAYS

    def spans(self) -> list[tuple[int, int]]:
        """(start, end) in minutes from Monday 00:00; an end may pass the week's end."""
        return [(day * MINUTES_PER_DAY + self.start, day * MINUTES_PER_DAY + self.start + self.length) for day in self.days]

    def __str__(self) -> str:
        return ALWAYS if self.always else re.sub(r" utc$", "", self.spec, flags=re.IGNORECASE) + " UTC"


def parse(spec: Any) -> Window:
    """The window a setting names; WindowError saying why when it names none."""
    if not isinstance(spec, str):
        raise WindowError(f"{SETTING} must be text like {EXAMPLES}, got {spec!r}")
    if spec == ALWAYS:
        return Window(always=True)
    found = _SPEC.fullmatch(spec)
    if not found:
        raise WindowError(f"{SETTING} must be a weekly window like {EXAMPLES}, got {spec[:80]!r}")
    days: list[int] = []
    for item in found["days"].split(","):
        first, _, last = item.partition("-")
        begin, end = _day(first), _day(last or first)
        span = [(begin + offset) % 7 for offset in range((end - begin) % 7 + 1)]  # Fri-Mon wraps the week
        for day in span:
            if day in days:
                raise WindowError(f"{SETTING} names {DAYS[day]} twice in {spec!r}", "name each day once")
            days.append(day)
    start, end = _minutes(found["start"]), _minutes(found["end"])
    if start == end:
        raise WindowError(f"{SETTING} opens and closes at the same time in {spec!r}", "give it a length, like 02:00-04:00")
    return Window(tuple(sorted(days)), start, (end - start) % MINUTES_PER_DAY, spec=spec)


def is_valid(spec: Any) -> bool:
    try:
        parse(spec)
    except WindowError:
        return False
    return True


def window_of(settings_or_spec: Any) -> Window:
    if isinstance(settings_or_spec, Window):
        return settings_or_spec
    if isinstance(settings_or_spec, str):
        return parse(settings_or_spec)
    return parse(settings_or_spec.get(SETTING))


def in_window(settings_or_spec: Any, now: datetime) -> bool:
    """Whether `now` (timezone-aware) falls inside the maintenance window."""
    window = window_of(settings_or_spec)
    if window.always:
        return True
    minute = _minute_of_week(now)
    # A span that passes Sunday midnight also covers the start of the week.
    return any(start <= minute < end or start <= minute + MINUTES_PER_WEEK < end for start, end in window.spans())


def next_window(settings_or_spec: Any, now: datetime) -> datetime | None:
    """When the window next opens after `now` (UTC, to the minute); None for 'always'."""
    window = window_of(settings_or_spec)
    if window.always:
        return None
    utc = _utc(now)
    week_start = (utc - timedelta(days=utc.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
    starts = [week_start + timedelta(minutes=start + week) for start, _ in window.spans() for week in (0, MINUTES_PER_WEEK)]
    return min(start for start in starts if start > utc)


def window_end(settings_or_spec: Any, now: datetime) -> datetime | None:
    """When the window `now` falls in closes (UTC); None outside it and for 'always'."""
    window = window_of(settings_or_spec)
    if window.always:
        return None
    utc = _utc(now)
    week_start = (utc - timedelta(days=utc.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
    for start, end in window.spans():
        for week in (0, -MINUTES_PER_WEEK):
            opened, closes = (week_start + timedelta(minutes=start + week), week_start + timedelta(minutes=end + week))
            if opened <= utc < closes:
                return closes
    return None


def when(moment: datetime) -> str:
    """'Sun 2026-12-06 02:00 UTC'"""
    utc = _utc(moment)
    return f"{DAYS[utc.weekday()]} {utc:%Y-%m-%d %H:%M} UTC"


def describe_next(settings_or_spec: Any, now: datetime) -> str:
    """'next window: Sun 2026-12-06 02:00 UTC' (or that there is no window)."""
    opens = next_window(settings_or_spec, now)
    return "no maintenance window: always open" if opens is None else f"next window: {when(opens)}"


def require_window(settings_or_spec: Any, now: datetime, what: str, *, force_flag: str = "--force") -> None:
    """Refuse `what` outside the window: a UsageError (exit 2) that says when it opens next."""
    if in_window(settings_or_spec, now):
        return
    window = window_of(settings_or_spec)
    raise UsageError(
        f"{what} runs only in the maintenance window ({window}); now is {when(now)}, {describe_next(window, now)}",
        f"nothing changed; rerun then, or pass {force_flag} to run it now",
    )


def _day(name: str) -> int:
    return [day.lower() for day in DAYS].index(name.lower())


def _minutes(hh_mm: str) -> int:
    hours, minutes = hh_mm.split(":")
    return int(hours) * 60 + int(minutes)


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("the maintenance window needs an aware datetime (datetime.now(UTC)), not a naive one")
    return now.astimezone(UTC)


def _minute_of_week(now: datetime) -> int:
    utc = _utc(now)
    return utc.weekday() * MINUTES_PER_DAY + utc.hour * 60 + utc.minute
