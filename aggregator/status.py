"""`aggregator status`: is the data fresh, and how did the last runs go? The verdict first.

Each monitored site's source is in one state: fresh (its numbers reach the source's due day,
`dates.due_day`), behind (they do not), failing (the last finished run reported an error for
it) or new (deployed after the due day: nothing is expected yet). The summary counts the states
per source next to the product's figures over 30 days (completion, run durations, API error
rate); then only what needs attention follows, one line per cause. `--all` lists every site.

The report is a pure function of what the database holds (`build_report`), so every rule is
tested without a clock or a server; the read-only SQL stays at the edge of this module.

Exit status: 0 nothing behind or failing, 1 something is, 2 configuration or database
unusable (raised as ConfigError/StorageError for cli.main).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import asyncpg

from aggregator import storage
from aggregator.config import Settings
from aggregator.dates import SOURCES, due_day, today_in
from aggregator.text_table import table_lines

EXIT_FRESH, EXIT_ATTENTION = 0, 1
WINDOW_DAYS = 30
RUNS_SHOWN = 10
EXAMPLES_SHOWN = 3
CAUSES_SHOWN = 15
CAUSE_WIDTH = 100  # a cause longer than this is cut in the terminal (JSON and --all keep it)
JSON_SCHEMA_VERSION = 1
SITE_PLACEHOLDER = "<site>"

State = Literal["fresh", "behind", "failing", "new"]
STATES: tuple[State, ...] = ("fresh", "behind", "failing", "new")


@dataclass(frozen=True, slots=True)
class SourceFacts:
    """What the database holds for one source of one monitored site.

    `last_day` is the newest day with numbers ever stored (Search Console: final or
    provisional), `present_days` how many days of the completion window have numbers,
    `provisional_until` Search Console's newest provisional day.
    """

    site: str
    source: str
    deployed_on: date
    last_day: date | None
    present_days: int = 0
    provisional_until: date | None = None
    account: str | None = None


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """One (site, source) judged against its due day; `error` is the last run's, if any."""

    facts: SourceFacts
    due: date
    state: State
    expected_days: int
    error: str | None = None

    @property
    def site(self) -> str:
        return self.facts.site

    @property
    def source(self) -> str:
        return self.facts.source

    @property
    def missing_days(self) -> int:
        return self.expected_days - min(self.facts.present_days, self.expected_days)

    @property
    def needs_attention(self) -> bool:
        return self.state in ("behind", "failing")

    @property
    def cause(self) -> str:
        """What the sites sharing this line have in common; the site's own name is replaced so
        that one error repeated for a thousand sites is one cause."""
        if self.state == "failing":
            return " ".join((self.error or "").replace(self.site, SITE_PLACEHOLDER).split())
        if self.state == "behind":
            if self.facts.last_day is None:
                return "nothing stored yet"
            return f"newest day {self.facts.last_day.isoformat()}"
        return ""


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One row of aggregator_runs; `finished_at` is None while running (or if it died).
    `api` maps a source to (requests, failed_requests) when the run recorded stats."""

    started_at: datetime
    finished_at: datetime | None
    status: str
    rows_upserted: int
    errors: int
    first_error: str | None
    api: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def seconds(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True, slots=True)
class Cause:
    """Sites of one source in one state for the same reason: one line of the report."""

    source: str
    state: State
    cause: str
    sites: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RunFigures:
    """The PRD's run figures over the window: completion, durations, API error rate."""

    runs: int
    ok: int
    median_seconds: float | None
    api: Mapping[str, tuple[int, int]]  # source -> (requests, failed_requests), stats runs only

    @property
    def completion_rate(self) -> float | None:
        return self.ok / self.runs if self.runs else None

    def error_rate(self, source: str) -> float | None:
        requests, failed = self.api.get(source, (0, 0))
        return failed / requests if requests else None


@dataclass(frozen=True, slots=True)
class StatusReport:
    today: date
    window_days: int
    sources: tuple[SourceStatus, ...]
    runs: tuple[RunSummary, ...]  # newest first, the last `window_days` days
    run_errors: tuple[str, ...] = ()  # last run's errors that name no monitored site

    def due(self, source: str) -> date:
        return due_day(source, self.today)

    def of(self, source: str) -> list[SourceStatus]:
        return [s for s in self.sources if s.source == source]

    def count(self, source: str, state: State) -> int:
        return sum(1 for s in self.sources if s.source == source and s.state == state)

    @property
    def attention(self) -> tuple[SourceStatus, ...]:
        return tuple(s for s in self.sources if s.needs_attention)

    @property
    def ok(self) -> bool:
        return not self.attention and not self.run_errors

    def completion(self, source: str | None = None) -> tuple[int, int]:
        """(present, expected) (site, day) cells over each source's window ending at its due
        day, for one source or all."""
        chosen = [s for s in self.sources if source is None or s.source == source]
        expected = sum(s.expected_days for s in chosen)
        return expected - sum(s.missing_days for s in chosen), expected

    @property
    def last_run(self) -> RunSummary | None:
        return self.runs[0] if self.runs else None

    def figures(self) -> RunFigures:
        finished = [r for r in self.runs if r.finished_at is not None]
        durations = [r.seconds for r in finished if r.seconds is not None]
        api: dict[str, tuple[int, int]] = {}
        for run in self.runs:
            for source, (requests, failed) in run.api.items():
                total, failures = api.get(source, (0, 0))
                api[source] = (total + requests, failures + failed)
        return RunFigures(
            runs=len(finished),
            ok=sum(1 for r in finished if r.status == "ok"),
            median_seconds=statistics.median(durations) if durations else None,
            api=api,
        )

    def causes(self) -> list[Cause]:
        """Sites needing attention grouped by (source, state, cause), largest group first."""
        grouped: dict[tuple[str, State, str], list[str]] = defaultdict(list)
        for s in self.attention:
            grouped[s.source, s.state, s.cause].append(s.site)
        return sorted(
            (
                Cause(src, state, cause, tuple(sorted(sites)))
                for (src, state, cause), sites in grouped.items()
            ),
            key=lambda c: (-len(c.sites), c.source, c.state, c.cause),
        )


def window_start(today: date, window_days: int = WINDOW_DAYS) -> date:
    """The first day of the figures' window: the `window_days` days ending yesterday, the days
    a nightly run heals by default and the HTML report draws. A source's expected days in it
    end at its due day."""
    return today - timedelta(days=window_days)


def judge(facts: SourceFacts, today: date, error: str | None, window_days: int) -> SourceStatus:
    """The state of one (site, source). Days before a site's deployment are not expected, so a
    new site is neither behind nor missing a month; a source the last run failed is failing
    even when its numbers are still recent enough, so a broken source is reported the next
    morning, not when its data has aged past the due day."""
    due = due_day(facts.source, today)
    first = max(window_start(today, window_days), facts.deployed_on)
    expected = (due - first).days + 1 if first <= due else 0
    state: State
    if error is not None:
        state = "failing"
    elif not expected:
        state = "new"
    elif facts.last_day is None or facts.last_day < due:
        state = "behind"
    else:
        state = "fresh"
    return SourceStatus(facts, due, state, expected, error)


def build_report(
    today: date,
    facts: Iterable[SourceFacts],
    runs: Sequence[RunSummary],
    last_errors: Mapping[tuple[str, str], str] | None = None,
    window_days: int = WINDOW_DAYS,
) -> StatusReport:
    """`last_errors` are the last finished run's errors by (site, source); those that name no
    monitored site's source (a run-level failure) are reported on their own."""
    last_errors = dict(last_errors or {})
    sources = tuple(
        judge(f, today, last_errors.pop((f.site, f.source), None), window_days) for f in facts
    )
    run_errors = tuple(f"{source} {site}: {error}" for (site, source), error in last_errors.items())
    return StatusReport(today, window_days, sources, tuple(runs), run_errors)


# --- rendering -------------------------------------------------------------------------------


def _iso(value: date | None) -> str | None:
    return value.isoformat() if value else None


def _percent(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f}%"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}s"


def _examples(sites: Sequence[str]) -> str:
    shown = ", ".join(sites[:EXAMPLES_SHOWN])
    return shown if len(sites) <= EXAMPLES_SHOWN else f"{shown}, …"


def _clip(text: str, width: int = CAUSE_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _rate(present: int, expected: int) -> float | None:
    return present / expected if expected else None


def summary_lines(report: StatusReport, zone: ZoneInfo) -> list[str]:
    """The verdict, one row per source, the run figures."""
    attention = len(report.attention) + len(report.run_errors)
    verdict = "all fresh" if report.ok else f"ATTENTION: {attention} behind or failing"
    figures = report.figures()
    rows = []
    for source in SOURCES:
        mine = report.of(source)
        if not mine:
            continue
        api = figures.api.get(source)
        api_text = "n/a" if api is None else f"{_percent(figures.error_rate(source))} of {api[0]}"
        rows.append(
            (
                source,
                str(len(mine)),
                *(str(report.count(source, state)) for state in STATES),
                report.due(source).isoformat(),
                _percent(_rate(*report.completion(source))),
                api_text,
            )
        )
    lines = [f"aggregator status {report.today} ({zone.key}): {verdict}"]
    if rows:
        header = ("source", "sites", *STATES, "due day", "completion", "API errors")
        lines += table_lines(header, rows)
    else:
        lines.append("no monitored site has Matomo or Search Console configured")
    last = report.last_run
    if last is None:
        lines.append(f"runs: none in the last {report.window_days} days")
    else:
        started = last.started_at.astimezone(zone).strftime("%Y-%m-%d %H:%M")
        lines.append(
            f"last run {started}: {last.status}, {_seconds(last.seconds)}, "
            f"{last.rows_upserted} rows, {last.errors} errors; {report.window_days} days: "
            f"{figures.ok} of {figures.runs} runs ok ({_percent(figures.completion_rate)}), "
            f"median {_seconds(figures.median_seconds)}"
        )
    return lines


def attention_lines(report: StatusReport, limit: int = CAUSES_SHOWN) -> list[str]:
    causes = report.causes()
    if not causes and not report.run_errors:
        return []
    lines = [
        "",
        "needs attention (one line per cause; `aggregator status --all` lists every site):",
    ]
    lines += [f"  run     failing: {' '.join(e.split())}" for e in report.run_errors[:limit]]
    rows = [
        (c.source, c.state, str(len(c.sites)), _clip(c.cause), f"e.g. {_examples(c.sites)}")
        for c in causes[: max(limit - len(report.run_errors), 0)]
    ]
    lines += [f"  {line}" for line in table_lines(("", "", "sites", "cause", ""), rows)[1:]]
    hidden = len(causes) - len(rows)
    if hidden > 0:
        lines.append(f"  … {hidden} more causes (`aggregator status --all`)")
    return lines


def site_lines(report: StatusReport) -> list[str]:
    """Every site source, for `--all`."""
    return [
        "",
        *table_lines(
            ("site", "source", "state", "last day", "due", "missing", "provisional to", "cause"),
            (
                (
                    s.site,
                    s.source,
                    s.state,
                    _iso(s.facts.last_day) or "-",
                    s.due.isoformat(),
                    f"{s.missing_days}/{s.expected_days}",
                    _iso(s.facts.provisional_until) or "-",
                    s.cause,
                )
                for s in sorted(report.sources, key=lambda s: (s.site, s.source))
            ),
        ),
    ]


def render(report: StatusReport, zone: ZoneInfo, *, every_site: bool = False) -> str:
    lines = summary_lines(report, zone) + attention_lines(report)
    if every_site:
        lines += site_lines(report)
    return "\n".join(lines) + "\n"


def as_json(report: StatusReport, *, every_site: bool = False) -> dict[str, Any]:
    """The machine report (schema in docs/status.md): the same numbers as the text, with the
    sites needing attention (every site with `every_site`)."""
    figures = report.figures()

    def source_entry(source: str) -> dict[str, Any]:
        present, expected = report.completion(source)
        requests, failed = figures.api.get(source, (0, 0))
        return {
            "due_day": report.due(source).isoformat(),
            "sites": len(report.of(source)),
            **{state: report.count(source, state) for state in STATES},
            "completion": {
                "present": present,
                "expected": expected,
                "rate": _rate(present, expected),
            },
            "api": {
                "requests": requests,
                "failed_requests": failed,
                "error_rate": figures.error_rate(source),
            },
        }

    listed = report.sources if every_site else report.attention
    return {
        "schema": JSON_SCHEMA_VERSION,
        "today": report.today.isoformat(),
        "window_days": report.window_days,
        "ok": report.ok,
        "sources": {source: source_entry(source) for source in SOURCES},
        "runs": {
            "count": figures.runs,
            "ok": figures.ok,
            "completion_rate": figures.completion_rate,
            "median_seconds": figures.median_seconds,
            "recent": [_run_entry(r) for r in report.runs[:RUNS_SHOWN]],
        },
        "run_errors": list(report.run_errors),
        "attention": [
            {
                "source": c.source,
                "state": c.state,
                "cause": c.cause,
                "count": len(c.sites),
                "sites": list(c.sites),
            }
            for c in report.causes()
        ],
        "sites": [
            {
                "site": s.site,
                "source": s.source,
                "account": s.facts.account,
                "state": s.state,
                "last_day": _iso(s.facts.last_day),
                "due_day": s.due.isoformat(),
                "expected_days": s.expected_days,
                "missing_days": s.missing_days,
                "provisional_until": _iso(s.facts.provisional_until),
                "error": s.error,
            }
            for s in sorted(listed, key=lambda s: (s.site, s.source))
        ],
    }


def _run_entry(run: RunSummary) -> dict[str, Any]:
    return {
        "started_at": run.started_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "status": run.status,
        "seconds": run.seconds,
        "rows_upserted": run.rows_upserted,
        "errors": run.errors,
        "first_error": run.first_error,
        "api": {s: {"requests": r, "failed_requests": f} for s, (r, f) in run.api.items()},
    }


# --- database edge ---------------------------------------------------------------------------

# Per monitored site (the filter of storage.load_sites): its sources' newest days ever and how
# many days of each source's window ($2..$3 Matomo, $4..$5 Search Console) hold numbers.
_FACTS = """
select s.domain, a.email as account,
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
order by s.domain
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
        """
        select e ->> 'site' as site, e ->> 'source' as source, e ->> 'error' as error
        from (select errors from aggregator_runs where finished_at is not null
              order by started_at desc, id desc limit 1) r,
             jsonb_array_elements(r.errors) e
        where not exists (select 1 from sites s
                          where s.domain = e ->> 'site'
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
    facts = await load_facts(conn, today, zone)
    runs = await load_runs(conn, now - timedelta(days=WINDOW_DAYS))
    return build_report(today, facts, runs, await load_last_errors(conn))


async def collect(settings: Settings, now: datetime) -> StatusReport:
    async with storage.schema_connection(settings) as conn:
        return await gather(conn, today_in(settings.timezone, now), settings.timezone, now)


def command(args: argparse.Namespace, settings: Settings) -> int:
    return show(args, asyncio.run(collect(settings, datetime.now(tz=settings.timezone))), settings)


def show(args: argparse.Namespace, report: StatusReport, settings: Settings) -> int:
    """Print the report as asked (`--json`, `--all`); return the exit status."""
    if args.json:
        print(json.dumps(as_json(report, every_site=args.all), indent=2))
    else:
        print(render(report, settings.timezone, every_site=args.all), end="")
    return EXIT_FRESH if report.ok else EXIT_ATTENTION
