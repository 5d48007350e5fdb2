"""The in-memory table's join rules, with an explicit clock: a half row waits for its other
half only while that half is still to come, never longer than the flush interval and never more
than a flush's worth of rows."""

from __future__ import annotations

from datetime import date, timedelta

from aggregator.daily_table import DailyTable
from aggregator.dates import Window
from aggregator.model import GscDay, MatomoDay, SiteError
from aggregator.storage import DailyRow

D1 = date(2025, 6, 1)
DAYS = Window(D1, D1 + timedelta(days=9))
S = 30.0  # AGGREGATOR_FLUSH_SECONDS


def _table(limit: int = 100, sites: range = range(1, 4)) -> DailyTable:
    table = DailyTable(limit, hold_seconds=S, started=0.0)
    table.expect("matomo", {site: DAYS for site in sites})
    table.expect("gsc", {site: DAYS for site in sites})
    return table


def _gsc(site: int, day: date) -> GscDay:
    return GscDay(site, day, 3, 40, 0.075, 4.5, True)


def test_a_half_still_to_be_completed_waits_and_its_day_is_taken_whole() -> None:
    table = _table()
    table.add(MatomoDay(1, D1, 10, 30))
    table.add(MatomoDay(2, D1, 11, 31))
    table.add(_gsc(2, D1))

    first = table.take(5.0)
    assert list(first.rows) == [(2, D1)]  # the whole day goes, the half one waits
    assert table.oldest_held == 0.0  # it may have arrived right after the start

    table.add(_gsc(1, D1))
    second = table.take(6.0)
    assert list(second.rows) == [(1, D1)]
    assert second.rows[(1, D1)][2:] == [True, 10, 30, True, 3, 40, 0.075, 4.5, True]
    assert table.oldest_held is None and not table.rows


def test_a_half_whose_other_half_will_not_come_goes_at_once() -> None:
    table = _table()
    outside = DAYS.end + timedelta(days=1)
    table.add(MatomoDay(1, D1, 1, 1))  # gsc gave up site 1
    table.add(MatomoDay(2, outside, 1, 1))  # the day is outside site 2's gsc window
    table.add(MatomoDay(9, D1, 1, 1))  # site 9 is not in gsc's plan
    table.add(_gsc(3, D1))  # matomo has ended
    table.gave_up("gsc", 1)
    table.ended("matomo")

    assert set(table.take(1.0).rows) == {(1, D1), (2, outside), (9, D1), (3, D1)}
    assert table.oldest_held is None


def test_no_half_waits_longer_than_the_flush_interval_from_before_it_arrived() -> None:
    table = _table()
    table.take(10.0)  # an earlier flush: rows added after it arrived after 10.0
    table.add(MatomoDay(1, D1, 1, 1))
    assert not table.take(12.0).rows
    assert table.oldest_held == 10.0  # the Flusher wakes by 10.0 + S for it
    table.add(MatomoDay(2, D1, 1, 1))  # arrived after 12.0
    assert not table.take(10.0 + S - 0.001).rows
    assert list(table.take(10.0 + S).rows) == [(1, D1)]
    assert table.oldest_held == 12.0  # site 2's day, arrived after the take at 12.0
    assert list(table.take(12.0 + S).rows) == [(2, D1)]


def test_at_most_a_flushs_worth_of_rows_wait_the_oldest_first() -> None:
    table = _table(limit=3, sites=range(1, 10))
    for site in range(1, 6):
        table.add(MatomoDay(site, D1, 1, 1))
    assert list(table.take(1.0).rows) == [(4, D1), (5, D1)]
    assert list(table.rows) == [(1, D1), (2, D1), (3, D1)]


def test_fullness_counts_the_rows_that_arrived_since_the_last_flush() -> None:
    table = _table(limit=2)
    assert not table.add(MatomoDay(1, D1, 1, 1))
    assert table.add(MatomoDay(2, D1, 1, 1))
    table.take(1.0)  # both wait for their other halves
    assert len(table.rows) == 2 and not table.full
    assert not table.add(MatomoDay(3, D1, 1, 1))
    assert table.add(MatomoDay(1, D1 + timedelta(days=1), 1, 1))
    table.quiet_until_overfull()  # a flush is under way: say so again only when overfull
    assert not table.add(MatomoDay(2, D1 + timedelta(days=1), 1, 1))
    assert table.add(MatomoDay(3, D1 + timedelta(days=1), 1, 1)) and table.overfull


def test_the_last_flush_takes_everything() -> None:
    table = _table()
    table.add(MatomoDay(1, D1, 1, 1))
    table.add(SiteError("site2.example", "gsc", "boom"))
    assert list(table.take(1.0, hold=False).rows) == [(1, D1)]
    assert not table.rows and len(table.errors) == 1


def test_a_batch_given_back_keeps_newer_halves() -> None:
    table = _table()
    table.add(MatomoDay(1, D1, 1, 1))
    table.add(_gsc(1, D1))
    batch = table.take(1.0)
    table.add(MatomoDay(1, D1, 7, 8))  # a newer Matomo answer arrived meanwhile
    table.give_back(batch)
    assert table.daily_rows() == [DailyRow(1, D1, (7, 8), (3, 40, 0.075, 4.5, True))]


def test_an_eager_take_stores_only_whole_days_and_leaves_every_expected_half() -> None:
    """A flush for time or fullness leaves at most a flush's worth of halves waiting; the
    eager one stores only what is ready and leaves every expected half, however many, with
    fullness still counted from the last bounded take (memory stays bounded by that one)."""
    table = _table(limit=3, sites=range(1, 10))
    for site in range(1, 6):
        table.add(MatomoDay(site, D1, 1, 1))
    table.add(_gsc(1, D1))
    assert list(table.take(1.0, bounded=False).rows) == [(1, D1)]
    assert list(table.rows) == [(2, D1), (3, D1), (4, D1), (5, D1)]
    assert table.full, "4 rows since the start: the bounded flush for fullness is due"
    assert list(table.take(2.0).rows) == [(5, D1)]
