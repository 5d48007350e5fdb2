"""The in-memory table that sources fill and flushes empty: one row per (site, day), kept as
the staging table's record (storage.STAGE_COLUMNS), so a flush hands its rows to COPY as they
are.

It is the join point of the sources: a site's Matomo and Search Console halves of one day meet
here. A row that has one half while the other source is still to deliver that site-day (the
source is running, has the site in its plan with the day in the site's window, and has not
failed the site) is held back by a flush for a later one, so the day is written once rather
than inserted and then updated. The hold is bounded twice: a row waits at most
`hold_seconds` (AGGREGATOR_FLUSH_SECONDS, counted from before it arrived, and the Flusher
wakes for it: what a killed run loses stays within the flush interval), and at most `limit`
rows wait at a time (memory stays bounded). Halves that do not meet in time are stored by
separate flushes, which the upsert rules make safe: each source writes only its own columns.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date

from aggregator.api_stats import SourceStats
from aggregator.dates import Window
from aggregator.model import AccountRefresh, GscDay, MatomoDay, SiteError, SiteId, SourceRecord
from aggregator.storage import DailyRow, StagedRow, daily_row

Key = tuple[SiteId, date]
# Where each source's flag stands in a staged row (storage.STAGE_COLUMNS); its values follow.
MATOMO_FLAG, GSC_FLAG = 2, 5


@dataclass(slots=True)
class Batch:
    """What one flush takes out of the table."""

    rows: dict[Key, StagedRow]
    refreshes: list[AccountRefresh]

    def __bool__(self) -> bool:
        return bool(self.rows or self.refreshes)


class DailyTable:
    """Rows and refresh outcomes not yet stored; every error and source figure of the run.

    `limit` is how many rows may arrive between flushes before the sources must make room (a
    dry run's table has none); `hold_seconds` how long a half row may wait for its other half
    (0: never). Times are the caller's monotonic clock, `started` the first."""

    __slots__ = (
        "_alarm",
        "_expected",
        "_held_since",
        "_hold_seconds",
        "_last_take",
        "_room",
        "errors",
        "limit",
        "oldest_held",
        "refreshes",
        "rows",
        "stats",
    )

    def __init__(
        self, limit: int = sys.maxsize, *, hold_seconds: float = 0.0, started: float = 0.0
    ) -> None:
        self.limit = limit
        self.rows: dict[Key, StagedRow] = {}
        self.errors: list[SiteError] = []
        self.refreshes: list[AccountRefresh] = []
        self.stats: dict[str, SourceStats] = {}
        # When the longest-held row started waiting, by the caller's clock (None: none held).
        self.oldest_held: float | None = None
        self._hold_seconds = hold_seconds
        self._expected: dict[str, dict[SiteId, Window]] = {}
        self._held_since: dict[Key, float] = {}
        self._last_take = started
        self._room = limit
        self._alarm = limit  # the size at which `add` reports the table full

    @property
    def full(self) -> bool:
        """`limit` rows arrived since the last flush: time to start one."""
        return len(self.rows) >= self._room

    @property
    def overfull(self) -> bool:
        """Twice that: the sources wait for the flush under way."""
        return len(self.rows) >= self._room + self.limit

    def add(self, record: SourceRecord) -> bool:
        """Take one record in; True when the table is full (see `full`)."""
        # The hot path of a backfill (millions of calls): one dict lookup per day record,
        # each half written into the staged row where it stands.
        kind = type(record)
        if kind is MatomoDay:
            key = (record.site_id, record.day)
            row = self.rows.get(key)
            if row is None:
                self.rows[key] = [
                    record.site_id,
                    record.day,
                    True,
                    record.visits,
                    record.actions,
                    False,
                    None,
                    None,
                    None,
                    None,
                    None,
                ]
            else:
                row[2], row[3], row[4] = True, record.visits, record.actions
        elif kind is GscDay:
            key = (record.site_id, record.day)
            row = self.rows.get(key)
            if row is None:
                self.rows[key] = [
                    record.site_id,
                    record.day,
                    False,
                    None,
                    None,
                    True,
                    record.clicks,
                    record.impressions,
                    record.ctr,
                    record.position,
                    record.final,
                ]
            else:
                row[5:] = (
                    True,
                    record.clicks,
                    record.impressions,
                    record.ctr,
                    record.position,
                    record.final,
                )
        elif isinstance(record, SiteError):
            self.errors.append(record)
        elif isinstance(record, AccountRefresh):
            self.refreshes.append(record)
        else:
            raise TypeError(f"unknown record {type(record).__name__}")
        return len(self.rows) >= self._alarm

    def quiet_until_overfull(self) -> None:
        """A flush is under way and will take these rows: until it has, `add` reports the
        table full only once it is overfull (no call per record in between)."""
        self._alarm = self._room + self.limit

    def expect(self, source: str, windows: Mapping[SiteId, Window]) -> None:
        """`source` is about to deliver each of these sites over its window."""
        self._expected[source] = dict(windows)

    def gave_up(self, source: str, site_id: SiteId) -> None:
        """`source` failed or skipped this site: nothing more will come for it."""
        self._expected.get(source, {}).pop(site_id, None)

    def ended(self, source: str) -> None:
        """`source` delivers nothing more (done, failed or cut short)."""
        self._expected.pop(source, None)

    def take(self, now: float, *, hold: bool = True, bounded: bool = True) -> Batch:
        """Empty the table of what is to be stored now (errors stay: the run row holds them
        all). With `hold`, half rows still expected to be completed stay, within the bounds
        above; without, everything goes (the run's last flush). Not `bounded` (an eager
        flush, see flushing): every half still expected stays, however many, and fullness
        still counts from the last bounded take, which is what keeps memory bounded; storing
        the excess halves early would only write their days twice."""
        rows, held, held_since = self.rows, {}, {}
        if hold and self._expected and self._hold_seconds > 0:
            batch: dict[Key, StagedRow] = {}
            matomo = self._expected.get("matomo")
            gsc = self._expected.get("gsc")
            previous = self._held_since
            # A row first held now arrived after the last take: waiting since then is an
            # upper bound of its wait, so no row waits longer than hold_seconds.
            arrived = self._last_take
            too_old = now - self._hold_seconds
            room = self.limit if bounded else len(rows)
            for key, row in rows.items():
                if row[MATOMO_FLAG] is not row[GSC_FLAG] and room:
                    windows = gsc if row[MATOMO_FLAG] else matomo
                    window = windows.get(key[0]) if windows is not None else None
                    if window is not None and window.start <= key[1] <= window.end:
                        since = previous.get(key, arrived)
                        if since > too_old:
                            held[key] = row
                            held_since[key] = since
                            room -= 1
                            continue
                batch[key] = row
        else:
            batch = rows
        self.rows, self._held_since = held, held_since
        self.oldest_held = min(held_since.values(), default=None)
        if bounded:
            self._room = self._alarm = len(held) + self.limit
        self._last_take = now
        taken = Batch(batch, self.refreshes)
        self.refreshes = []
        return taken

    def give_back(self, batch: Batch) -> None:
        """Return an unstored batch; halves that arrived since it was taken are newer and win."""
        for key, old in batch.rows.items():
            row = self.rows.get(key)
            if row is None:
                self.rows[key] = old
                continue
            if not row[MATOMO_FLAG] and old[MATOMO_FLAG]:
                row[MATOMO_FLAG:GSC_FLAG] = old[MATOMO_FLAG:GSC_FLAG]
            if not row[GSC_FLAG] and old[GSC_FLAG]:
                row[GSC_FLAG:] = old[GSC_FLAG:]
        self.refreshes[:0] = batch.refreshes

    def daily_rows(self) -> list[DailyRow]:
        """The rows held, as DailyRows (a dry run prints them)."""
        return [daily_row(row) for row in self.rows.values()]
