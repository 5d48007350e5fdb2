"""The records that flow from sources to the pipeline and into storage.

Sources are plain async generators that yield these records; the pipeline owns joining them per
(site, day), retries at the run level, and loading. Keeping them as small immutable values lets
every source be tested without a database. The day records are NamedTuples: a backfill makes
millions of them, and a tuple is built in a third of the time of a frozen dataclass.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime
from typing import NamedTuple

SiteId = int | str | uuid.UUID
"""A `sites.id` exactly as asyncpg returns it: the project's table decides whether it is a
bigint, an integer, a uuid or text. Opaque: compared and passed back to Postgres, never computed
with, so the same code serves every type."""


@dataclass(frozen=True, slots=True)
class Site:
    """A monitored site as read from `sites` (already filtered to active and deployed)."""

    id: SiteId
    domain: str
    matomo_site_id: int | None = None
    gsc_account_id: int | None = None
    gsc_property: str | None = None


@dataclass(frozen=True, slots=True)
class GscAccount:
    """A Google account from `gsc_accounts`; `refresh_token` already resolved from env or table."""

    id: int
    email: str
    refresh_token: str | None


class LearnedRate(NamedTuple):
    """A Search Console query rate a run learned for one quota scope (an account, the OAuth
    client): where the next run starts. `limit_shown`: Google refused faster queries, so the
    rate sits just under its limit; else nothing was refused and the rate is only a floor."""

    queries_per_second: float
    limit_shown: bool


class MatomoDay(NamedTuple):
    """One site's Matomo numbers for one day (site timezone). An empty day is 0 and 0."""

    site_id: SiteId
    day: date
    visits: int
    actions: int


class GscDay(NamedTuple):
    """One site's Search Console numbers for one Pacific-time day.

    `final` is False for days on or after the answer's firstIncompleteDate. A final day without
    a row in Google's answer is yielded with clicks=impressions=0 and ctr/position None.
    """

    site_id: SiteId
    day: date
    clicks: int
    impressions: int
    ctr: float | None
    position: float | None
    final: bool


@dataclass(frozen=True, slots=True)
class SiteError:
    """A per-site failure of one source. `error` must be safe to store: no secret, no token.

    `skipped`: the source did not try the site because of how it is set up (no property the
    account can reach), as opposed to trying and failing; counted apart in the run's stats.
    """

    site: str
    source: str
    error: str
    skipped: bool = False


@dataclass(frozen=True, slots=True)
class AccountRefresh:
    """Outcome of refreshing one Google account's token, written to gsc_accounts."""

    account_id: int
    at: datetime
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SiteHistory:
    """What the nightly window of one site needs to know of its stored rows.

    `*_heal_from`: its oldest day, from the heal limit up to the day before the lookback, that
    the source has no value for (for Search Console also: still provisional); None when there
    is none. `*_served_at`: when the source's numbers of its recent days were last stored
    (None: never), so the least recently served sites go first.
    """

    site_id: SiteId
    deployed_on: date
    matomo_heal_from: date | None
    gsc_heal_from: date | None
    matomo_served_at: datetime | None
    gsc_served_at: datetime | None


SourceRecord = MatomoDay | GscDay | SiteError | AccountRefresh
