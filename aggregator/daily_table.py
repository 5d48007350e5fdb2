"""The in-memory table that sources fill and flushes empty: one DailyRow per (site, day).

It is the join point of the sources: a site's Matomo and Search Console halves of one day meet
here when they arrive close together, and are stored by separate flushes when they do not
(each source writes only its own columns, so the order of flushes does not matter).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import date

from aggregator.api_stats import SourceStats
from aggregator.model import AccountRefresh, GscDay, MatomoDay, SiteError, SiteId, SourceRecord
from aggregator.storage import DailyRow


@dataclass(slots=True)
class Batch:
    """What one flush takes out of the table."""

    rows: dict[tuple[SiteId, date], DailyRow]
    refreshes: list[AccountRefresh]

    def __bool__(self) -> bool:
        return bool(self.rows or self.refreshes)


@dataclass(slots=True)
class DailyTable:
    """Rows and refresh outcomes not yet stored; every error and source figure of the run.

    `limit` is how many rows it holds before its sources must make room (a flush); a dry
    run's table has none."""

    limit: int = sys.maxsize
    rows: dict[tuple[SiteId, date], DailyRow] = field(default_factory=dict)
    errors: list[SiteError] = field(default_factory=list)
    refreshes: list[AccountRefresh] = field(default_factory=list)
    stats: dict[str, SourceStats] = field(default_factory=dict)

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.limit

    def add(self, record: SourceRecord) -> None:
        # The hot path of a backfill (millions of calls): one dict lookup per record.
        if isinstance(record, MatomoDay):
            key = (record.site_id, record.day)
            row = self.rows.get(key) or self._new_row(key)
            row.matomo = (record.visits, record.actions)
        elif isinstance(record, GscDay):
            key = (record.site_id, record.day)
            row = self.rows.get(key) or self._new_row(key)
            row.gsc = (
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

    def take(self) -> Batch:
        """Empty the table of what is to be stored (errors stay: the run row holds them all)."""
        batch = Batch(self.rows, self.refreshes)
        self.rows, self.refreshes = {}, []
        return batch

    def give_back(self, batch: Batch) -> None:
        """Return an unstored batch; halves that arrived since it was taken are newer and win."""
        for key, old in batch.rows.items():
            row = self.rows.get(key)
            if row is None:
                self.rows[key] = old
                continue
            row.matomo = row.matomo or old.matomo
            row.gsc = row.gsc or old.gsc
        self.refreshes[:0] = batch.refreshes

    def _new_row(self, key: tuple[SiteId, date]) -> DailyRow:
        row = self.rows[key] = DailyRow(*key)
        return row
