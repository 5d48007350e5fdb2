"""The read-only SQL of `aggregator status`: what the database holds, as `verdict` facts.

Each function reads one thing (per-site facts, recent runs, the last run's errors); `gather`
puts them together into a `verdict.StatusReport`. A schema before migration 004 (no
`aggregator_runs.stats`) still works: its runs have no API figures.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg

from aggregator import storage
from aggregator.config import Settings
from aggregator.dates import due_day, today_in
from aggregator.status.verdict import (
    WINDOW_DAYS,
    RunSummary,
    SourceFacts,
    StatusReport,
    build_report,
    window_start,
)

# Per monitored site (the filter of storage.load_sites): its sources' newest days ever and how
# many days of each source's window ($2..$3 Matomo, $4..$5 Search Console) hold numbers.
_FACTS = f"""
select {storage.site_name_sql("s")} as domain, a.email as account,
       s.matomo_site_id is not null as has_matomo, s.gsc_account_id is not null as has_gsc,
       (s.deployed_at at time zone $1)::date as deployed_on,
       max(d.date) filter (where d.matomo_visits is not null) as matomo_last,
       max(d.date) filter (where d.gsc_final is not null) as gsc_last,
       max(d.date) filter (where d.gsc_final = false) as gsc_provisional,
       count(d.date) filter (where d.matomo_visits is not null and d.date between $2 and $3
                             and d.date >= (s.deployed_at at time zone $1)::date)
           as matomo_present,
       count(d.date) filter (where d.gsc_final is not null and d.date between $4 and $5
                             and d.date >= (s.deployed_at at time zone $1)::date)
           as gsc_present
from sites s
left join gsc_accounts a on a.id = s.gsc_account_id
left join daily_analytics d on d.site_id = s.id
where s.is_active and s.deployed_at is not null
group by s.id, a.email
order by 1
"""


async def load_facts(
    conn: asyncpg.Connection, today: date, zone: ZoneInfo, window_days: int = WINDOW_DAYS
) -> list[SourceFacts]:
    """Facts for each configured source of each monitored site."""
    start = window_start(today, window_days)
    matomo_due, gsc_due = due_day("matomo", today), due_day("gsc", today)
    rows = await conn.fetch(_FACTS, zone.key, start, matomo_due, start, gsc_due)
    facts = []
    for row in rows:
        if row["has_matomo"]:
            facts.append(
                SourceFacts(
                    row["domain"],
                    "matomo",
                    row["deployed_on"],
                    row["matomo_last"],
                    row["matomo_present"],
                )
            )
        if row["has_gsc"]:
            facts.append(
                SourceFacts(
                    row["domain"],
                    "gsc",
                    row["deployed_on"],
                    row["gsc_last"],
                    row["gsc_present"],
                    row["gsc_provisional"],
                    row["account"],
                )
            )
    return facts


def api_counts(stats: object) -> dict[str, tuple[int, int]]:
    """(requests, failed_requests) per source from a run's `stats`; anything malformed or absent
    is left out, so such a run counts as "n/a" rather than as zero errors."""
    if isinstance(stats, str):
        try:
            stats = json.loads(stats)
        except ValueError:
            return {}
    if not isinstance(stats, dict):
        return {}
    counts = {}
    for source, entry in stats.items():
        if not isinstance(entry, dict):
            continue
        requests, failed = entry.get("requests"), entry.get("failed_requests")
        if all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (requests, failed)
        ):
            counts[str(source)] = (requests, failed)
    return counts


async def load_runs(
    conn: asyncpg.Connection, since: datetime, limit: int = 1000
) -> list[RunSummary]:
    """Runs started since `since`, newest first, with their API counts when recorded."""
    stats = "stats" if await storage.has_column(conn, "aggregator_runs", "stats") else "null::jsonb"
    rows = await conn.fetch(
        f"""
        select started_at, finished_at, status, rows_upserted,
               jsonb_array_length(errors) as error_count,
               errors -> 0 ->> 'source' as first_source,
               errors -> 0 ->> 'site' as first_site,
               errors -> 0 ->> 'error' as first_error,
               {stats} as stats
        from aggregator_runs
        where started_at >= $1
        order by started_at desc, id desc
        limit $2
        """,
        since,
        limit,
    )
    return [
        RunSummary(
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            status=row["status"],
            rows_upserted=row["rows_upserted"],
            errors=row["error_count"],
            first_error=_first_error(row),
            api=api_counts(row["stats"]),
        )
        for row in rows
    ]


async def load_last_errors(conn: asyncpg.Connection) -> dict[tuple[str, str], str]:
    """The errors of the newest finished run, by (site, source), leaving out sites no longer
    monitored (deactivated or undeployed since): their failure needs no attention."""
    rows = await conn.fetch(
        f"""
        select e ->> 'site' as site, e ->> 'source' as source, e ->> 'error' as error
        from (select errors from aggregator_runs where finished_at is not null
              order by started_at desc, id desc limit 1) r,
             jsonb_array_elements(r.errors) e
        where not exists (select 1 from sites s
                          where {storage.site_name_sql("s")} = e ->> 'site'
                            and not (s.is_active and s.deployed_at is not null))
        """
    )
    return {(row["site"], row["source"]): row["error"] or "" for row in rows}


def _first_error(row: asyncpg.Record) -> str | None:
    """The run's first error on one line, as `source site: message`."""
    if row["first_error"] is None:
        return None
    return f"{row['first_source']} {row['first_site']}: {' '.join(row['first_error'].split())}"


async def gather(
    conn: asyncpg.Connection, today: date, zone: ZoneInfo, now: datetime
) -> StatusReport:
    """The whole report from one connection (`today` in `zone`, runs since `now` - 30 days)."""
    await storage.require_time_zone(conn, zone)  # deployment days are counted in it
    facts = await load_facts(conn, today, zone)
    runs = await load_runs(conn, now - timedelta(days=WINDOW_DAYS))
    return build_report(today, facts, runs, await load_last_errors(conn))


async def collect(settings: Settings, now: datetime) -> StatusReport:
    """The report of DATABASE_URL's schema; ConfigError/StorageError when it is unusable."""
    async with storage.schema_connection(settings) as conn:
        return await gather(conn, today_in(settings.timezone, now), settings.timezone, now)
