"""The freshness rules of `aggregator status`, as pure functions of what the database holds.

Each monitored site's source is in one state: fresh (its numbers reach the source's due day,
`dates.due_day`), behind (they do not), failing (the last finished run reported an error for
it) or new (deployed after the due day: nothing is expected yet). The report counts the states
per source next to the product's figures over 30 days (completion, run durations, API error
rate) and groups what needs attention by cause. Nothing here reads a clock or a database, so
every rule is tested with plain values.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Literal

from aggregator.dates import due_day

WINDOW_DAYS = 30
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
    def stale(self) -> bool:
        """Its numbers do not reach the due day though some are expected: behind, or failing
        with data that has aged too. A source that failed last night with numbers still recent
        enough needs attention but is not stale."""
        last = self.facts.last_day
        return self.expected_days > 0 and (last is None or last < self.due)

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
        """Nothing needs attention: nothing behind or failing, no run-level error."""
        return not self.attention and not self.run_errors

    @property
    def fresh(self) -> bool:
        """Nothing is stale, whatever failed: what status's exit code says."""
        return not any(s.stale for s in self.sources)

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
