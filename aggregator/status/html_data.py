"""What the HTML report shows, gathered from the database: one character per (site, source, day).

The state of a cell is a pure function (`cell_state`) of what is stored for that day, the
site's deployment day, the source's due day and whether the last run failed that source for
that site, so the picture and `aggregator status` agree by construction. The SQL is at the
bottom; everything above it is tested without a database.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg

from aggregator import storage
from aggregator.config import Settings
from aggregator.dates import SOURCES, due_day, today_in
from aggregator.status import queries
from aggregator.status.verdict import WINDOW_DAYS, StatusReport, window_start
from aggregator.token_health import AccountHealth, load_accounts

# One character per cell keeps 10,000 sites x 2 sources x 30 days near 600 kB of data.
FINAL, PROVISIONAL, ZERO, MISSING, FAILED, BEFORE, NOT_DUE = "FPZMXBN"
CELL_STATES: Mapping[str, str] = {
    FINAL: "final",
    PROVISIONAL: "provisional",
    ZERO: "zero",
    MISSING: "missing",
    FAILED: "failed",
    BEFORE: "before deployment",
    NOT_DUE: "not due yet",
}
GAPS = frozenset({MISSING, FAILED})


@dataclass(frozen=True, slots=True)
class Stored:
    """What daily_analytics holds for one site and day (None: no row)."""

    matomo_visits: int | None = None
    gsc_final: bool | None = None
    gsc_impressions: int | None = None


def cell_state(
    source: str, day: date, stored: Stored | None, deployed_on: date, due: date, failing: bool
) -> str:
    """The state of one cell. A stored number wins; an empty day is "before deployment",
    "failed" (the last run reported this site's source failing), "not due yet" (after the
    source's due day: Search Console's recent days of a quiet site) or "missing"."""
    if day < deployed_on:
        return BEFORE
    stored = stored or Stored()
    if source == "matomo" and stored.matomo_visits is not None:
        return FINAL if stored.matomo_visits > 0 else ZERO
    if source == "gsc" and stored.gsc_final is not None:
        if not stored.gsc_final:
            return PROVISIONAL
        return FINAL if (stored.gsc_impressions or 0) > 0 else ZERO
    if failing:
        return FAILED
    return NOT_DUE if day > due else MISSING


@dataclass(frozen=True, slots=True)
class SiteRow:
    """One site: its Search Console account (None: none) and a cell string per source it
    uses, oldest day first; a source the site does not use has no entry."""

    site: str
    account: str | None
    cells: Mapping[str, str]

    @property
    def needs_attention(self) -> bool:
        return any(state in GAPS for cells in self.cells.values() for state in cells)


@dataclass(frozen=True, slots=True)
class ReportData:
    generated_at: datetime
    zone: ZoneInfo
    days: tuple[date, ...]
    sites: tuple[SiteRow, ...]
    accounts: tuple[AccountHealth, ...]
    status: StatusReport

    def counts(self, source: str) -> dict[str, int]:
        """Cells per state for one source, every state present (zero when absent)."""
        totals = dict.fromkeys(CELL_STATES, 0)
        for row in self.sites:
            for state in row.cells.get(source, ""):
                totals[state] += 1
        return totals

    def groups(self) -> list[tuple[str, list[SiteRow]]]:
        """Sites by Search Console account (sites without one last), each group sorted."""
        by_account: dict[str, list[SiteRow]] = {}
        for row in sorted(self.sites, key=lambda r: r.site):
            by_account.setdefault(row.account or "", []).append(row)
        return sorted(by_account.items(), key=lambda item: (item[0] == "", item[0]))


def grid_days(today: date, days: int = WINDOW_DAYS) -> tuple[date, ...]:
    """The `days` days ending yesterday, oldest first: the window of status's figures."""
    start = window_start(today, days)
    return tuple(start + timedelta(days=n) for n in range(days))


def site_cells(
    source: str,
    days: Sequence[date],
    stored: Mapping[date, Stored],
    deployed_on: date,
    today: date,
    failing: bool,
) -> str:
    due = due_day(source, today)
    return "".join(
        cell_state(source, day, stored.get(day), deployed_on, due, failing) for day in days
    )


# --- database edge ---------------------------------------------------------------------------

_SITES = f"""
select s.id, {storage.site_name_sql("s")} as domain, a.email as account,
       s.matomo_site_id is not null as has_matomo, s.gsc_account_id is not null as has_gsc,
       (s.deployed_at at time zone $1)::date as deployed_on
from sites s
left join gsc_accounts a on a.id = s.gsc_account_id
where s.is_active and s.deployed_at is not null
"""

_DAYS = """
select d.site_id, d.date, d.matomo_visits, d.gsc_final, d.gsc_impressions
from daily_analytics d
join sites s on s.id = d.site_id
where s.is_active and s.deployed_at is not null and d.date between $1 and $2
"""


def build_rows(
    sites: Iterable[asyncpg.Record],
    stored: Mapping[object, Mapping[date, Stored]],
    days: Sequence[date],
    today: date,
    report: StatusReport,
) -> tuple[SiteRow, ...]:
    failing = {(s.site, s.source) for s in report.sources if s.state == "failing"}
    rows = []
    for site in sites:
        mine = stored.get(site["id"], {})
        cells = {
            source: site_cells(
                source, days, mine, site["deployed_on"], today, (site["domain"], source) in failing
            )
            for source in SOURCES
            if site[f"has_{source}"]
        }
        rows.append(SiteRow(site["domain"], site["account"], cells))
    return tuple(rows)


async def gather(
    conn: asyncpg.Connection, today: date, zone: ZoneInfo, now: datetime
) -> ReportData:
    report = await queries.gather(conn, today, zone, now)
    days = grid_days(today)
    sites = await conn.fetch(_SITES, zone.key)
    stored: dict[object, dict[date, Stored]] = {}
    for row in await conn.fetch(_DAYS, days[0], days[-1]):
        stored.setdefault(row["site_id"], {})[row["date"]] = Stored(
            row["matomo_visits"], row["gsc_final"], row["gsc_impressions"]
        )
    return ReportData(
        generated_at=now,
        zone=zone,
        days=days,
        sites=build_rows(sites, stored, days, today, report),
        accounts=tuple(await load_accounts(conn)),
        status=report,
    )


async def collect(settings: Settings, now: datetime) -> ReportData:
    async with storage.schema_connection(settings) as conn:
        return await gather(conn, today_in(settings.timezone, now), settings.timezone, now)
