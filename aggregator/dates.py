"""The run's date window: pure functions over `today`, so every edge case is testable."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

DEFAULT_LOOKBACK_DAYS = 4
# A bound, so that an absurd --lookback is a one-line usage error instead of a date overflow.
MAX_LOOKBACK_DAYS = 3660
PACIFIC = ZoneInfo("America/Los_Angeles")
SOURCES = ("matomo", "gsc")
# Days between a site's Matomo due day (yesterday) and its Search Console due day. Google
# finalises a Pacific day two to three days after it ends, and the contract treats days before
# (Pacific today - 3) as final when an answer carries no firstIncompleteDate, so a run's newest
# final day can be Pacific today - 4. A quiet site never gets provisional rows (a provisional
# day without a row stays NULL), so only final days prove it fresh. A nightly run scheduled
# before Pacific midnight (any zone east of California) sees Pacific "today" as the local
# yesterday: hence four days before the local yesterday. Busy sites' provisional rows are
# usually far newer; a failing fetch is reported at once through the last run's errors, so the
# slack delays no alarm about a broken source.
GSC_DUE_LAG_DAYS = 4
# Search Console keeps 16 months of data (a week more is asked: Google's months are not to the
# day, and asking for a day it no longer has costs nothing).
GSC_KEEPS_MONTHS = 16
GSC_KEEPS_MARGIN_DAYS = 7


class DateError(ValueError):
    """The requested window is not valid; the message says what to change."""


@dataclass(frozen=True, slots=True)
class Window:
    """An inclusive range of calendar days. `explicit` is False for the default lookback."""

    start: date
    end: date
    explicit: bool = True

    def __post_init__(self) -> None:
        if self.start > self.end:
            raise ValueError(f"start {self.start} is after end {self.end}")

    def days(self) -> list[date]:
        return [self.start + timedelta(days=n) for n in range((self.end - self.start).days + 1)]

    def __len__(self) -> int:
        return (self.end - self.start).days + 1


def spanning(windows: Iterable[Window]) -> Window:
    """The smallest window holding every one of `windows` (at least one): a source's range
    follows from its sites' own windows, so it is derived, never stored beside them."""
    given = list(windows)
    if not given:
        raise ValueError("no window to span")
    return Window(min(w.start for w in given), max(w.end for w in given))


class SpansWindows:
    """`start`..`end` of a holder of per-site `windows`, derived from them so the two can
    never disagree (a source's plan, a source's input)."""

    __slots__ = ()
    windows: Mapping[Any, Window]

    @property
    def start(self) -> date:
        return spanning(self.windows.values()).start

    @property
    def end(self) -> date:
        return spanning(self.windows.values()).end


def search_console_window(window: Window) -> Window:
    """The part of `window` Search Console can still answer, and so the part it is asked for:
    from 16 months (and a week) before the window's last day. That day is never after Search
    Console's today (Pacific time), so no day Google keeps is cut, whatever the local clock."""
    oldest = months_before(window.end, GSC_KEEPS_MONTHS) - timedelta(days=GSC_KEEPS_MARGIN_DAYS)
    if window.start >= oldest:
        return window
    return Window(oldest, window.end, explicit=window.explicit)


def months_before(day: date, months: int) -> date:
    """The same day of the month `months` earlier (that month's last day where it is shorter)."""
    year, month = divmod(day.year * 12 + day.month - 1 - months, 12)
    month += 1
    first_of_next = date(year + month // 12, month % 12 + 1, 1)
    return date(year, month, min(day.day, (first_of_next - timedelta(days=1)).day))


def parse_day(text: str, flag: str) -> date:
    """Parse a strict YYYY-MM-DD (no times, no week dates) for the CLI flag named `flag`."""
    try:
        if len(text) != 10:
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise DateError(f"{flag} {text!r} is not a date: use YYYY-MM-DD") from None


def today_in(zone: ZoneInfo, now: datetime | None = None) -> date:
    """Today's date in `zone`: 'yesterday' is a local notion, not a UTC one."""
    return (now or datetime.now(tz=zone)).astimezone(zone).date()


def due_day(source: str, today: date) -> date:
    """The newest day `source` must have numbers for (provisional ones count for Search
    Console) for a site to be fresh, `today` being the date in AGGREGATOR_TIMEZONE.

    Matomo: yesterday. Search Console: `GSC_DUE_LAG_DAYS` before yesterday (see above): the
    newest day a nightly run made in the last 24 hours is sure to have stored, even for a site
    without traffic, wherever the job runs.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}")
    yesterday = today - timedelta(days=1)
    return yesterday - timedelta(days=GSC_DUE_LAG_DAYS) if source == "gsc" else yesterday


def resolve_window(
    today: date,
    *,
    start: date | None = None,
    end: date | None = None,
    day: date | None = None,
    lookback: int | None = None,
) -> Window:
    """Turn --from/--to, --date or --lookback into a window, or explain why it is invalid."""
    if day is not None and (start is not None or end is not None):
        raise DateError("--date cannot be combined with --from/--to")
    if lookback is not None and (day is not None or start is not None or end is not None):
        raise DateError("--lookback cannot be combined with --date or --from/--to")
    if day is not None:
        start = end = day
    if end is not None and start is None:
        raise DateError("--to needs --from")
    if start is not None:
        latest = max(start, end or start)
        if latest > today:
            raise DateError(f"{latest} is in the future (today is {today}): no data exists yet")
        end = end or today - timedelta(days=1)
        if start > end:
            raise DateError(f"--from {start} is after --to {end}")
        return Window(start, end, explicit=True)
    days = DEFAULT_LOOKBACK_DAYS if lookback is None else lookback
    if not 1 <= days <= MAX_LOOKBACK_DAYS:
        raise DateError(
            f"--lookback must be at least 1 and at most {MAX_LOOKBACK_DAYS} (ten years; "
            f"backfill further with --from/--to), got {days}"
        )
    yesterday = today - timedelta(days=1)
    return Window(yesterday - timedelta(days=days - 1), yesterday, explicit=False)


def heal_limit(window: Window, heal_days: int) -> date:
    """The oldest day a nightly window may reach back to: `heal_days` before its last day."""
    return window.end - timedelta(days=heal_days)


def site_window(window: Window, deployed_on: date, heal_from: date | None = None) -> Window | None:
    """One site's own window: `window` widened back to `heal_from` (the site's oldest day to
    heal, if older) and clipped to its deployment day, so no day before the site existed is
    fetched or written. None when the site was deployed after the window's last day."""
    start = window.start if heal_from is None else min(window.start, heal_from)
    start = max(start, deployed_on)
    if start > window.end:
        return None
    return Window(start, window.end, explicit=window.explicit)
