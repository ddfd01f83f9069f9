"""The maintenance window as data: what parses, when it is open, when it opens next."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from fabfile.core import window
from fabfile.core.errors import ConfigError, UsageError
from fabfile.core.settings import Settings, validate
from fabfile.core.window import Window, WindowError, in_window, next_window, parse, require_window, window_end

# 2026-12-06 is a Sunday.
SUNDAY = datetime(2026, 12, 6, tzinfo=UTC)


def at(day_offset: int, hh_mm: str) -> datetime:
    hours, minutes = map(int, hh_mm.split(":"))
    return SUNDAY + timedelta(days=day_offset, hours=hours, minutes=minutes)


def test_the_plans_window_is_sunday_two_to_four_utc_start_inside_end_outside():
    spec = "Sun 02:00-04:00"
    assert not in_window(spec, at(0, "01:59"))
    assert in_window(spec, at(0, "02:00"))
    assert in_window(spec, at(0, "03:59"))
    assert not in_window(spec, at(0, "04:00"))
    assert not in_window(spec, at(-1, "02:30")), "Saturday is not Sunday"
    assert not in_window(spec, at(1, "02:30"))


def test_the_default_setting_is_the_plans_window(settings):
    assert settings.get("maintenance.window") == "Sun 02:00-04:00"
    assert in_window(settings, at(0, "03:00")) and not in_window(settings, at(0, "05:00"))


def test_next_window_for_messages():
    tuesday_night = datetime(2026, 12, 1, 23, 35, tzinfo=UTC)
    assert next_window("Sun 02:00-04:00", tuesday_night) == at(0, "02:00")
    assert window.describe_next("Sun 02:00-04:00", tuesday_night) == "next window: Sun 2026-12-06 02:00 UTC"
    # Inside the window "next" is the following one; at its very start too.
    assert next_window("Sun 02:00-04:00", at(0, "02:00")) == at(7, "02:00")
    assert next_window("Sun 02:00-04:00", at(0, "01:59")) == at(0, "02:00")


def test_a_window_crossing_midnight_belongs_to_the_day_it_starts():
    spec = "Fri 23:30-00:30"
    assert in_window(spec, at(-2, "23:30")) and in_window(spec, at(-1, "00:29"))
    assert not in_window(spec, at(-1, "00:30")) and not in_window(spec, at(-2, "23:29"))
    assert not in_window(spec, at(-3, "00:15")), "Friday just after midnight belongs to Thursday's window, not Friday's"
    assert window_end(spec, at(-1, "00:10")) == at(-1, "00:30")


def test_a_sunday_window_crossing_into_monday_wraps_the_week():
    spec = "Sun 23:00-01:00"
    monday = at(1, "00:30")
    assert in_window(spec, monday) and window_end(spec, monday) == at(1, "01:00")
    assert next_window(spec, monday) == at(7, "23:00")


@pytest.mark.parametrize(("spec", "open_days"), [
    ("Sat,Sun 01:00-05:00", {"Sat", "Sun"}),
    ("Mon-Fri 01:00-05:00", {"Mon", "Tue", "Wed", "Thu", "Fri"}),
    ("Fri-Mon 01:00-05:00", {"Fri", "Sat", "Sun", "Mon"}),
    ("Mon,Wed-Thu 01:00-05:00", {"Mon", "Wed", "Thu"}),
    ("sun 01:00-05:00 UTC", {"Sun"}),
])
def test_days_lists_ranges_and_the_zone_said(spec, open_days):
    opened = {window.DAYS[(SUNDAY + timedelta(days=d)).weekday()] for d in range(7) if in_window(spec, at(d, "03:00"))}
    assert opened == open_days


def test_always_is_always_open_and_has_no_next_window():
    assert all(in_window("always", at(d, "12:00")) for d in range(7))
    assert next_window("always", SUNDAY) is None and window_end("always", SUNDAY) is None
    require_window("always", SUNDAY, "maintenance.patch")


@pytest.mark.parametrize("spec", [
    "", "Sun", "Sun 02:00", "Sunday 02:00-04:00", "Sun 2:00-4:00", "Sun 02:00-24:00", "Sun 02:60-04:00",
    "Sun  02:00-04:00", " Sun 02:00-04:00", "Sun 02:00-04:00 ", "Sun 02:00-04:00 CET", "Sun 02:00-02:00",
    "Sun,Sun 02:00-04:00", "Sat-Sun,Sun 02:00-04:00", "Sun 02:00-04:00\n", "Sun 02:00-04:00; reboot", "$(reboot)",
    "*", "daily 02:00-04:00", "ALWAYS", 3, None, ["Sun 02:00-04:00"],
])
def test_anything_else_is_refused_with_a_reason(spec):
    with pytest.raises(WindowError) as info:
        parse(spec)
    assert info.value.exit_code == 2 and "maintenance.window" in info.value.one_line()
    assert not window.is_valid(spec)


def test_a_bad_window_setting_is_refused_before_any_task_connects(defaults):
    defaults["maintenance"]["window"] = "Sunday 2-4"
    with pytest.raises(ConfigError) as info:
        validate(Settings("production", defaults))
    assert info.value.one_line().startswith("maintenance.window must be a weekly window like 'Sun 02:00-04:00'")
    assert "got 'Sunday 2-4'" in info.value.one_line()


@pytest.mark.parametrize("seconds", [59, 3601, "ten", -1])
def test_reboot_timeout_is_bounded(defaults, seconds):
    defaults["maintenance"]["reboot_timeout"] = seconds
    with pytest.raises(ConfigError, match="maintenance.reboot_timeout must be a whole number of seconds from 60 to 3600"):
        validate(Settings("production", defaults))


def test_now_must_say_its_zone_and_any_zone_is_read_as_utc():
    with pytest.raises(ValueError, match="aware datetime"):
        in_window("Sun 02:00-04:00", datetime(2026, 12, 6, 3, 0))
    amsterdam = timezone(timedelta(hours=1))
    assert in_window("Sun 02:00-04:00", datetime(2026, 12, 6, 4, 30, tzinfo=amsterdam)), "04:30 +01:00 is 03:30 UTC"


def test_require_window_is_one_usage_error_naming_the_window_now_and_the_next_one():
    with pytest.raises(UsageError) as info:
        require_window("Sun 02:00-04:00", datetime(2026, 12, 1, 23, 35, tzinfo=UTC), "maintenance.patch")
    assert info.value.one_line() == (
        "maintenance.patch runs only in the maintenance window (Sun 02:00-04:00 UTC); now is Tue 2026-12-01 23:35 UTC, "
        "next window: Sun 2026-12-06 02:00 UTC; nothing changed; rerun then, or pass --force to run it now")
    require_window("Sun 02:00-04:00", at(0, "02:30"), "maintenance.patch")


def test_callers_may_pass_settings_a_spec_or_a_parsed_window(settings):
    parsed = parse("Sun 02:00-04:00")
    assert isinstance(parsed, Window) and str(parsed) == "Sun 02:00-04:00 UTC"
    now = at(0, "02:30")
    assert in_window(settings, now) == in_window("Sun 02:00-04:00", now) == in_window(parsed, now) is True
