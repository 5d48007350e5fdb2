"""`aggregator status`: is the data fresh, and how did the last runs go?

The report is a pure function of what the database holds (`build_report`), so freshness rules
are tested without a clock or a server; the read-only SQL stays at the edge, in this module,
because nothing else needs it.

Exit status: 0 nothing is stale, 1 something is stale (cron or a monitor can alert on it),
2 configuration or database unusable (raised as ConfigError/StorageError for cli.main).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from aggregator import storage
from aggregator.config import Settings
from aggregator.dates import Window, today_in
from aggregator.text_table import table_lines

EXIT_FRESH, EXIT_STALE = 0, 1
WINDOW_DAYS = 30
RUNS_SHOWN = 10
# How many days behind today each source's newest day may be: Matomo has yesterday once the
# day is over; Search Console finalises a day about two to three days later.
FRESHNESS_LAG_DAYS = {"matomo": 1, "gsc": 3}


@dataclass(frozen=True, slots=True)
class SourceFacts:
    """What the database holds for one source of one monitored site (the query's answer).

    `days` are the days with data in the lookback (Matomo: visits stored; GSC: final numbers),
    `last_day` the newest such day ever, `provisional_until` GSC's newest provisional day.
    """

    site: str
    source: str
    deployed_on: date
    last_day: date | None
    days: frozenset[date]
    provisional_until: date | None = None


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """Freshness of one (site, source): stale when its newest day is older than `target`."""

    site: str
    source: str
    last_day: date | None
    target: date
    stale: bool
    expected_days: int
    missing: tuple[date, ...]
    provisional_until: date | None


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One row of aggregator_runs; `finished_at` is None while running (or if it died)."""

    started_at: datetime
    finished_at: datetime | None
    status: str
    rows_upserted: int
    errors: int
    first_error: str | None

    @property
    def seconds(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True, slots=True)
class StatusReport:
    today: date
    window_days: int
    sources: tuple[SourceStatus, ...]
    runs: tuple[RunSummary, ...]

    @property
    def stale(self) -> tuple[SourceStatus, ...]:
        return tuple(s for s in self.sources if s.stale)

    def completion(self, source: str | None = None) -> tuple[int, int]:
        """(present, expected) (site, day) cells over the window, for one source or all."""
        chosen = [s for s in self.sources if source is None or s.source == source]
        expected = sum(s.expected_days for s in chosen)
        return expected - sum(len(s.missing) for s in chosen), expected


def freshness_target(today: date, source: str) -> date:
    """The newest day `source` should have stored by `today`."""
    return today - timedelta(days=FRESHNESS_LAG_DAYS[source])


def lookback_start(today: date, window_days: int = WINDOW_DAYS) -> date:
    """The oldest day any source's window reaches, so one query can fetch every window."""
    return min(freshness_target(today, s) for s in FRESHNESS_LAG_DAYS) - timedelta(
        days=window_days - 1
    )


def source_status(facts: SourceFacts, today: date, window_days: int) -> SourceStatus:
    """Days before a site's deployment are not expected, so a new site is not reported as
    missing a month of data; its source turns stale only once its target day is expected."""
    target = freshness_target(today, facts.source)
    first = max(target - timedelta(days=window_days - 1), facts.deployed_on)
    # A site deployed after its target day expects nothing yet.
    expected = Window(first, target).days() if first <= target else []
    return SourceStatus(
        site=facts.site,
        source=facts.source,
        last_day=facts.last_day,
        target=target,
        stale=bool(expected) and (facts.last_day is None or facts.last_day < target),
        expected_days=len(expected),
        missing=tuple(day for day in expected if day not in facts.days),
        provisional_until=facts.provisional_until,
    )


def build_report(
    today: date,
    facts: Iterable[SourceFacts],
    runs: Sequence[RunSummary],
    window_days: int = WINDOW_DAYS,
) -> StatusReport:
    return StatusReport(
        today=today,
        window_days=window_days,
        sources=tuple(source_status(f, today, window_days) for f in facts),
        runs=tuple(runs),
    )


# --- rendering -------------------------------------------------------------------------------


def _iso(value: date | None) -> str | None:
    return value.isoformat() if value else None


def _day(value: date | None) -> str:
    return _iso(value) or "-"


def _percent(present: int, expected: int) -> str:
    return f"{100 * present / expected:.1f}%" if expected else "-"


def _freshness_lines(report: StatusReport) -> list[str]:
    if not report.sources:
        return ["no monitored site has Matomo or Search Console configured"]
    header = ("site", "source", "last day", "target", f"missing/{report.window_days}d")
    return table_lines(
        (*header, "provisional to", "state"),
        (
            (
                s.site,
                s.source,
                _day(s.last_day),
                s.target.isoformat(),
                str(len(s.missing)),
                _day(s.provisional_until),
                "STALE" if s.stale else "ok",
            )
            for s in report.sources
        ),
    )


def _completion_line(report: StatusReport) -> str:
    per_source = [
        f"{name} {_percent(*report.completion(name))}"
        for name in FRESHNESS_LAG_DAYS
        if report.completion(name)[1]
    ]
    present, expected = report.completion()
    detail = f"{present} of {expected} expected site-days present"
    if per_source:
        detail += "; " + ", ".join(per_source)
    return f"Completion over {report.window_days} days: {_percent(present, expected)} ({detail})"


def _run_lines(runs: Sequence[RunSummary], zone: ZoneInfo) -> list[str]:
    if not runs:
        return ["no runs recorded yet"]
    return table_lines(
        ("started", "status", "duration", "rows", "errors", "first error"),
        (
            (
                r.started_at.astimezone(zone).strftime("%Y-%m-%d %H:%M"),
                r.status,
                "-" if r.seconds is None else f"{r.seconds:.0f}s",
                str(r.rows_upserted),
                str(r.errors),
                r.first_error or "",
            )
            for r in runs
        ),
    )


def render(report: StatusReport, zone: ZoneInfo) -> str:
    """The human report: freshness table (stale rows marked), completion, recent runs."""
    due = ", ".join(
        f"{name} through {freshness_target(report.today, name)}" for name in FRESHNESS_LAG_DAYS
    )
    stale = report.stale
    verdict = (
        f"STALE: {len(stale)} of {len(report.sources)} site sources are behind their target"
        if stale
        else "all fresh"
    )
    lines = [
        f"Data freshness on {report.today} ({zone.key}); due: {due}",
        "",
        *_freshness_lines(report),
        "",
        _completion_line(report),
        "",
        f"Last {RUNS_SHOWN} runs (times in {zone.key})",
        *_run_lines(report.runs, zone),
        "",
        verdict,
    ]
    return "\n".join(lines) + "\n"


def as_json(report: StatusReport) -> dict[str, Any]:
    """The machine report: every number of the human one, with the missing days listed."""

    def completion(source: str | None) -> dict[str, Any]:
        present, expected = report.completion(source)
        return {
            "present": present,
            "expected": expected,
            "rate": round(present / expected, 4) if expected else None,
        }

    return {
        "today": report.today.isoformat(),
        "window_days": report.window_days,
        "targets": {s: freshness_target(report.today, s).isoformat() for s in FRESHNESS_LAG_DAYS},
        "stale": bool(report.stale),
        "completion": {
            **completion(None),
            "sources": {s: completion(s) for s in FRESHNESS_LAG_DAYS},
        },
        "freshness": [
            {
                "site": s.site,
                "source": s.source,
                "last_day": _iso(s.last_day),
                "target": s.target.isoformat(),
                "stale": s.stale,
                "expected_days": s.expected_days,
                "missing_days": [d.isoformat() for d in s.missing],
                "provisional_until": _iso(s.provisional_until),
            }
            for s in report.sources
        ],
        "runs": [
            {
                "started_at": r.started_at.isoformat(),
                "finished_at": r.finished_at.isoformat() if r.finished_at else None,
                "status": r.status,
                "seconds": r.seconds,
                "rows_upserted": r.rows_upserted,
                "errors": r.errors,
                "first_error": r.first_error,
            }
            for r in report.runs
        ],
    }


# --- database edge ---------------------------------------------------------------------------


_FACTS = """
select s.id, s.deployed_at,
       max(d.date) filter (where d.matomo_visits is not null) as matomo_last,
       max(d.date) filter (where d.gsc_final) as gsc_last,
       max(d.date) filter (where not d.gsc_final) as gsc_provisional,
       array_agg(d.date) filter (where d.matomo_visits is not null and d.date >= $2)
           as matomo_days,
       array_agg(d.date) filter (where d.gsc_final and d.date >= $2) as gsc_days
from sites s
left join daily_analytics d on d.site_id = s.id
where s.id = any($1)
group by s.id
"""

_RUNS = """
select started_at, finished_at, status, rows_upserted,
       jsonb_array_length(errors) as error_count,
       errors -> 0 ->> 'source' as first_source,
       errors -> 0 ->> 'site' as first_site,
       errors -> 0 ->> 'error' as first_error
from aggregator_runs
order by started_at desc, id desc
limit $1
"""


async def load_facts(
    conn: asyncpg.Connection, today: date, zone: ZoneInfo, window_days: int = WINDOW_DAYS
) -> list[SourceFacts]:
    """Facts for each configured source of each monitored site (storage decides "monitored")."""
    sites = sorted(await storage.load_sites(conn), key=lambda s: s.domain)
    rows = {
        row["id"]: row
        for row in await conn.fetch(
            _FACTS, [s.id for s in sites], lookback_start(today, window_days)
        )
    }
    facts = []
    for site in sites:
        row = rows[site.id]
        deployed_on = row["deployed_at"].astimezone(zone).date()
        if site.matomo_site_id is not None:
            days = frozenset(row["matomo_days"] or ())
            facts.append(SourceFacts(site.domain, "matomo", deployed_on, row["matomo_last"], days))
        if site.gsc_account_id is not None:
            days = frozenset(row["gsc_days"] or ())
            facts.append(
                SourceFacts(
                    site.domain, "gsc", deployed_on, row["gsc_last"], days, row["gsc_provisional"]
                )
            )
    return facts


async def load_runs(conn: asyncpg.Connection, limit: int = RUNS_SHOWN) -> list[RunSummary]:
    return [
        RunSummary(
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            status=row["status"],
            rows_upserted=row["rows_upserted"],
            errors=row["error_count"],
            first_error=_first_error(row),
        )
        for row in await conn.fetch(_RUNS, limit)
    ]


def _first_error(row: asyncpg.Record) -> str | None:
    """The run's first error on one line, as `source site: message`."""
    if row["first_error"] is None:
        return None
    return f"{row['first_source']} {row['first_site']}: {' '.join(row['first_error'].split())}"


async def collect(settings: Settings, today: date) -> StatusReport:
    async with storage.schema_connection(settings) as conn:
        facts = await load_facts(conn, today, settings.timezone)
        runs = await load_runs(conn)
    return build_report(today, facts, runs)


def command(args: argparse.Namespace, settings: Settings) -> int:
    report = asyncio.run(collect(settings, today_in(settings.timezone)))
    if args.json:
        print(json.dumps(as_json(report), indent=2))
    else:
        print(render(report, settings.timezone), end="")
    return EXIT_STALE if report.stale else EXIT_FRESH
