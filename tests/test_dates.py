from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from aggregator.dates import (
    DateError,
    Window,
    months_before,
    parse_day,
    resolve_window,
    search_console_window,
    spanning,
    today_in,
)

TODAY = date(2026, 3, 1)


def test_default_window_is_four_full_days_ending_yesterday_across_a_leap_day() -> None:
    window = resolve_window(date(2024, 3, 2))
    assert (window.start, window.end, window.explicit) == (
        date(2024, 2, 27),
        date(2024, 3, 1),
        False,
    )
    assert date(2024, 2, 29) in window.days()
    assert len(window) == 4


def test_lookback_crosses_the_year_end() -> None:
    window = resolve_window(date(2027, 1, 2), lookback=3)
    assert window.days() == [date(2026, 12, 30), date(2026, 12, 31), date(2027, 1, 1)]


def test_explicit_range_and_single_day() -> None:
    assert resolve_window(TODAY, start=date(2026, 1, 31), end=date(2026, 2, 1)) == Window(
        date(2026, 1, 31), date(2026, 2, 1)
    )
    assert resolve_window(TODAY, day=date(2026, 2, 28)) == Window(
        date(2026, 2, 28), date(2026, 2, 28)
    )


def test_a_span_reaches_from_the_earliest_start_to_the_latest_end() -> None:
    healed = Window(date(2026, 1, 5), date(2026, 2, 10), explicit=False)
    lookback = Window(date(2026, 2, 7), date(2026, 2, 12), explicit=False)
    assert spanning([lookback, healed]) == Window(date(2026, 1, 5), date(2026, 2, 12))
    with pytest.raises(ValueError, match="no window"):
        spanning([])


def test_from_alone_runs_until_yesterday() -> None:
    assert resolve_window(TODAY, start=date(2026, 2, 20)).end == date(2026, 2, 28)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": date(2026, 2, 10), "end": date(2026, 2, 1)}, "is after --to"),
        ({"start": date(2026, 2, 10), "end": date(2026, 3, 2)}, "in the future"),
        ({"day": date(2026, 3, 5)}, "in the future"),
        ({"end": date(2026, 2, 1)}, "--to needs --from"),
        ({"day": date(2026, 2, 1), "start": date(2026, 2, 1)}, "--date cannot be combined"),
        ({"lookback": 2, "day": date(2026, 2, 1)}, "--lookback cannot be combined"),
        ({"lookback": 0}, "at least 1"),
        ({"lookback": 999_999_999}, "at most 3660"),
    ],
)
def test_invalid_windows_say_what_to_change(kwargs: dict, message: str) -> None:
    with pytest.raises(DateError, match=message):
        resolve_window(TODAY, **kwargs)


@pytest.mark.parametrize(
    "text", ["2024-02-30", "2024-13-01", "24-1-1", "2024-01-01T00:00", "yesterday"]
)
def test_parse_day_rejects_anything_but_a_calendar_date(text: str) -> None:
    with pytest.raises(DateError, match="--from"):
        parse_day(text, "--from")


def test_parse_day_accepts_leap_day() -> None:
    assert parse_day("2024-02-29", "--date") == date(2024, 2, 29)


def test_yesterday_is_computed_in_the_configured_zone() -> None:
    instant = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)  # still Dec 31 in Los Angeles
    assert today_in(ZoneInfo("America/Los_Angeles"), instant) == date(2025, 12, 31)
    assert today_in(ZoneInfo("Asia/Tokyo"), instant) == date(2026, 1, 1)


@pytest.mark.parametrize(
    ("day", "months", "expected"),
    [
        (date(2026, 12, 2), 16, date(2025, 8, 2)),
        (date(2026, 6, 30), 16, date(2025, 2, 28)),  # no 30 February: the month's last day
        (date(2024, 12, 31), 12, date(2023, 12, 31)),
        (date(2026, 1, 15), 1, date(2025, 12, 15)),
        (date(2025, 4, 30), 14, date(2024, 2, 29)),  # a leap year's February
    ],
)
def test_months_before_keeps_the_day_of_the_month_where_it_exists(day, months, expected) -> None:
    assert months_before(day, months) == expected


def test_search_console_is_asked_no_further_back_than_it_keeps() -> None:
    yesterday = date(2026, 12, 2)
    cut = date(2025, 8, 2) - timedelta(days=7)  # 16 months and a week before the last day
    long = Window(yesterday - timedelta(days=2999), yesterday, explicit=False)
    assert search_console_window(long) == Window(cut, yesterday, explicit=False)
    backfill = Window(date(2018, 1, 1), yesterday)
    assert search_console_window(backfill) == Window(cut, yesterday, explicit=True)
    short = Window(yesterday - timedelta(days=30), yesterday, explicit=False)
    assert search_console_window(short) is short
    # Relative to the window's own last day, never to the clock: an old range is asked as is.
    old = Window(date(2018, 1, 1), date(2018, 3, 31))
    assert search_console_window(old) is old
