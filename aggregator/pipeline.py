"""The run: load sites, take the run lease, fan the sources out concurrently, join per
(site, day) and store while fetching; close the run row however the run ends.

Sources are plain async generators of records (aggregator.model); this module owns the window,
the deadline, interruption and the run record; joining lives in daily_table, storing in
flushing and the one-run-at-a-time lease in lease, so sources stay simple.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Literal

import aiohttp
import asyncpg
import structlog

from aggregator import storage
from aggregator.api_stats import SourceStats
from aggregator.config import ConfigError, Settings
from aggregator.daily_table import DailyTable
from aggregator.dates import (
    PACIFIC,
    SpansWindows,
    Window,
    heal_limit,
    search_console_window,
    today_in,
)
from aggregator.flushing import Flusher
from aggregator.lease import TRANSIENT_ERRORS, RunLease, keep_alive, take_lease
from aggregator.model import (
    GscAccount,
    GscDay,
    LearnedRate,
    MatomoDay,
    Site,
    SiteError,
    SiteId,
    SourceRecord,
)
from aggregator.planning import SourcePlan, plan_source, skipped_gsc_sites
from aggregator.progress import NoProgress, ProgressSink
from aggregator.usage import UsageError

log = structlog.get_logger(__name__)

SourceName = Literal["matomo", "gsc"]
ALL_SOURCES: tuple[SourceName, ...] = ("matomo", "gsc")
RunStatus = Literal["ok", "partial", "failed"]
# Once a run is stopping (a signal, a lost lease, a refused flush), its last statements get
# this long, so SIGTERM ends a blocked flush within seconds and the run row is still closed.
STOP_GRACE_SECONDS = 3.0
# After the deadline, the last flush (at most one flush of rows) gets this long.
FINAL_FLUSH_SECONDS = 30.0


_NO_SITE = object()  # no site seen yet


@dataclass(frozen=True, slots=True)
class SourceInput(SpansWindows):
    """What one source needs: its sites, each site's own window and shared resources.

    A source fetches each site over `windows[id]` only; `start`..`end` spans them all and is
    derived from them, so the two can never disagree. `pacific_today` is Search Console's
    today (injected, so nights can be simulated).
    """

    sites: Sequence[Site]
    accounts: Mapping[int, GscAccount]
    settings: Settings
    session: aiohttp.ClientSession
    final_only: bool
    windows: Mapping[SiteId, Window]
    pacific_today: date
    stats: SourceStats = field(default_factory=SourceStats)
    # Search Console's learned query rates, read before the run and stored after it.
    rates: dict[tuple[str, str], LearnedRate] = field(default_factory=dict)


Source = Callable[[SourceInput], AsyncIterator[SourceRecord]]


@dataclass(frozen=True, slots=True)
class RunRequest:
    window: Window
    sources: tuple[SourceName, ...] = ALL_SOURCES
    domains: tuple[str, ...] = ()
    dry_run: bool = False
    final_only: bool = False


@dataclass(slots=True)
class RunOutcome:
    status: RunStatus
    sites_total: int
    rows_upserted: int
    errors: list[SiteError]
    seconds: float
    windows: dict[str, tuple[date, date]]
    rows: list[storage.DailyRow]  # a dry run's rows (a real run's are stored as it goes)
    sites: dict[SiteId, str]
    interrupted: str | None = None
    fatal: str | None = None  # the store refused a flush or the lease was lost: one line
    stats: dict[str, SourceStats] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "ok" else 1


def default_source(name: SourceName) -> Source:
    """The real client for `name`, imported only when a run needs it."""
    if name == "matomo":
        from aggregator.matomo import fetch_matomo_visits

        def matomo(given: SourceInput) -> AsyncIterator[SourceRecord]:
            return fetch_matomo_visits(
                given.sites,
                given.start,
                given.end,
                given.settings,
                given.session,
                stats=given.stats,
                windows=given.windows,
            )

        return matomo
    from aggregator.search_console.client import fetch_gsc_performance

    def gsc(given: SourceInput) -> AsyncIterator[SourceRecord]:
        return fetch_gsc_performance(
            given.sites,
            given.accounts,
            given.start,
            given.end,
            given.settings,
            given.session,
            final_only=given.final_only,
            stats=given.stats,
            windows=given.windows,
            pacific_today=given.pacific_today,
            rates=given.rates,
        )

    return gsc


def _sites_for(
    source: SourceName, sites: Sequence[Site], accounts: Mapping[int, GscAccount]
) -> list[Site]:
    """The sites this source serves: a Matomo id, or an active Google account."""
    if source == "matomo":
        return [s for s in sites if s.matomo_site_id is not None]
    return [s for s in sites if s.gsc_account_id in accounts]


def _require_configured(source: SourceName, settings: Settings, count: int) -> None:
    if source == "matomo" and not settings.matomo_configured:
        raise ConfigError(
            f"MATOMO_URL and MATOMO_TOKEN must be set: {count} monitored sites have a "
            "matomo_site_id (or run with --source gsc)"
        )
    if source == "gsc" and not settings.gsc_configured:
        raise ConfigError(
            f"GOOGLE_CLIENT_ID and GOOGLE_CLIENT_SECRET must be set: {count} monitored sites "
            "have a Google account (or run with --source matomo)"
        )


def final_status(rows_written: int, errors: Sequence[SiteError], interrupted: bool) -> RunStatus:
    if not errors and not interrupted:
        return "ok"
    return "partial" if rows_written else "failed"


async def run_job(
    settings: Settings,
    request: RunRequest,
    *,
    sources: Mapping[SourceName, Source] | None = None,
    stop: asyncio.Event | None = None,
    progress: ProgressSink | None = None,
    now: datetime | None = None,
) -> RunOutcome:
    """Fetch the window from every enabled source and store it; see RunOutcome for the result.

    `now` (default: the clock) fixes Search Console's today, so tests run simulated nights.

    Raises ConfigError, UsageError or storage.StorageError before anything is fetched when the
    run cannot start (the CLI maps those to exit 2); storage.RunLocked when another run kept
    the lease for AGGREGATOR_LOCK_WAIT_SECONDS.
    """
    started = time.monotonic()
    stop = stop or asyncio.Event()
    settings.require_database()
    pool = await storage.connect(settings.database_url)
    try:
        async with pool.acquire() as conn:
            await storage.require_schema(conn)
            await storage.require_time_zone(conn, settings.timezone)
            sites = await storage.load_sites(conn, request.domains)
            _check_requested_domains(request.domains, sites)
            accounts = (
                await storage.load_active_accounts(conn, settings.gsc_refresh_tokens)
                if "gsc" in request.sources
                else {}
            )
            planning = time.monotonic()
            plan = await _plan(conn, settings, request, sites, accounts)
            planned = functools.partial(_planned, plan, len(sites), time.monotonic() - planning)
            rates = await storage.load_learned_rates(conn) if "gsc" in plan else {}
        skipped = skipped_gsc_sites(sites, accounts) if "gsc" in request.sources else []
        run = _Run(
            settings,
            request,
            plan,
            accounts,
            sources,
            stop,
            progress or NoProgress(),
            skipped=skipped,
            pacific_today=today_in(PACIFIC, now),
            rates=rates,
        )
        # A dry run writes nothing, so it takes no lease: it never waits for (or blocks) a run.
        if request.dry_run:
            planned()
            table = DailyTable()
            await run.collect(table, _nothing)  # a dry run's table is never full
            run.rows = table.daily_rows()
            run.settle(table, len(run.rows))
        else:
            await run.store_while_fetching(pool, len(sites), planned)
    finally:
        await pool.close()
    outcome = RunOutcome(
        status=run.status,
        sites_total=len(sites),
        rows_upserted=run.written,
        errors=run.errors,
        seconds=time.monotonic() - started,
        windows={name: (share.start, share.end) for name, share in plan.items()},
        rows=run.rows,
        sites={s.id: s.domain for s in sites},
        interrupted=run.interrupted,
        fatal=run.fatal,
        stats=run.stats,
    )
    log.info(
        "run.finished",
        status=outcome.status,
        sites=len(sites),
        rows=run.written if not request.dry_run else len(run.rows),
        errors=len(run.errors),
        seconds=round(outcome.seconds, 2),
        dry_run=request.dry_run,
    )
    return outcome


async def _nothing() -> None:
    """A dry run keeps every row, to print them."""


class _Run:
    """One run's fetching, storing and closing; its results are read off when it is over."""

    def __init__(
        self,
        settings: Settings,
        request: RunRequest,
        plan: Mapping[SourceName, SourcePlan],
        accounts: Mapping[int, GscAccount],
        sources: Mapping[SourceName, Source] | None,
        stop: asyncio.Event,
        progress: ProgressSink,
        *,
        skipped: Sequence[SiteError],
        pacific_today: date,
        rates: dict[tuple[str, str], LearnedRate],
    ) -> None:
        self._settings = settings
        self._rates = rates
        self._skipped = skipped
        self._pacific_today = pacific_today
        self._request = request
        self._plan = plan
        self._accounts = accounts
        self._sources = sources
        self._stop = stop
        self._progress = progress
        self._deadline = time.monotonic() + settings.run_deadline
        self._halt = asyncio.Event()  # a signal, a lost lease or a refused flush
        self.status: RunStatus = "failed"
        self.written = 0
        self.errors: list[SiteError] = []
        self.rows: list[storage.DailyRow] = []
        self.interrupted: str | None = None
        self.fatal: str | None = None
        self.stats: dict[str, SourceStats] = {}

    async def collect(self, table: DailyTable, make_room: Callable[[], Awaitable[None]]) -> None:
        """Fetch into `table` until done, the deadline or a halt (noting which cut it). Sites
        skipped by the plan are errors of the run from the start."""
        table.errors.extend(self._skipped)
        if self._skipped:
            table.stats["gsc"] = SourceStats(sites_skipped=len(self._skipped))
        began = time.monotonic()
        watch = asyncio.create_task(self._relay_stop())
        try:
            cut = await _collect(
                self._settings,
                self._request,
                self._plan,
                self._accounts,
                self._sources,
                table,
                make_room,
                self._halt,
                self._progress,
                self._pacific_today,
                self._rates,
            )
        finally:
            watch.cancel()
        if cut == "deadline":
            self.interrupted = (
                f"run deadline of {self._settings.run_deadline:.0f}s "
                "(AGGREGATOR_DEADLINE_SECONDS) reached; fetched data was stored"
            )
        elif cut == "halt" and self._stop.is_set():
            self.interrupted = (
                f"interrupted by a signal after {time.monotonic() - began:.0f}s; "
                "fetched data was stored"
            )

    async def _relay_stop(self) -> None:
        await self._stop.wait()
        self._halt.set()

    def settle(self, table: DailyTable, rows_written: int) -> None:
        """The verdict: the sources' errors, then why the run was cut short, if it was."""
        self.stats = table.stats
        errors = list(table.errors)
        if self.interrupted:
            errors.append(SiteError(site="(run)", source="pipeline", error=self.interrupted))
        if self.fatal:
            errors.append(SiteError(site="(run)", source="store", error=self.fatal))
        self.errors = errors
        self.status = final_status(rows_written, errors, self.interrupted is not None)

    def _statement_seconds(self) -> float:
        """How long a statement may take now: the rest of the deadline while the run goes on
        (never under the stop grace), the stop grace once it is stopping, and
        FINAL_FLUSH_SECONDS for the last flush after the deadline cut the fetching short.
        storage.bound_statements caps it."""
        if self._halt.is_set():
            return STOP_GRACE_SECONDS
        if self.interrupted is not None:
            return FINAL_FLUSH_SECONDS
        return max(STOP_GRACE_SECONDS, self._deadline - time.monotonic())

    async def store_while_fetching(
        self, pool: asyncpg.Pool, sites_total: int, planned: Callable[[], None]
    ) -> None:
        """Take the lease, fetch while flushing, and close the run row however this ends;
        `planned` logs the plan once the lease is held."""
        # The run's range spans every site's own window (healing widens some).
        first = min((share.start for share in self._plan.values()), default=None)
        try:
            lease = await take_lease(
                pool,
                first or self._request.window.start,
                self._request.window.end,
                sites_total,
                lease_seconds=self._settings.lease_seconds,
                wait_seconds=self._settings.lock_wait,
                stop=self._stop,
            )
        except (*TRANSIENT_ERRORS, asyncpg.PostgresError) as exc:
            raise storage.StorageError(f"could not start the run: {type(exc).__name__}") from None
        planned()
        table = DailyTable(
            self._settings.flush_rows,
            hold_seconds=self._settings.flush_seconds,
            started=time.monotonic(),
        )
        flusher = Flusher(
            pool,
            lease,
            table,
            bound=self._statement_seconds,
            on_failure=self._halt.set,
        )
        heartbeat = asyncio.create_task(keep_alive(pool, lease, self._lost(flusher)))
        periodic = asyncio.create_task(flusher.flush_every(self._settings.flush_seconds))
        crashed: str | None = None
        try:
            await self.collect(table, flusher.make_room)
            # A flush cut by a signal went back to the table: the last flush stores it all.
            await _cancelled(periodic)
            if self._halt.is_set():
                await flusher.stop_background()
            await flusher.flush(last=True)
        except BaseException as exc:
            crashed = f"the run stopped unexpectedly: {type(exc).__name__}"
            raise
        finally:
            await _cancelled(periodic)
            await flusher.stop_background()
            await _cancelled(heartbeat)
            self.fatal = flusher.failure or crashed
            self.written = flusher.rows_sent
            self.settle(table, self.written)
            await self._close(pool, lease)

    def _lost(self, flusher: Flusher) -> Callable[[str], None]:
        def lost(why: str) -> None:
            flusher.failure = flusher.failure or why
            self._halt.set()

        return lost

    async def _close(self, pool: asyncpg.Pool, lease: RunLease) -> None:
        """Close the run row with the true verdict; if the database cannot be reached, the
        row's lease runs out and the next run closes it as failed."""
        try:
            async with asyncio.timeout(STOP_GRACE_SECONDS + 2):
                async with pool.acquire() as conn, conn.transaction():
                    await storage.bound_statements(conn, STOP_GRACE_SECONDS)
                    await storage.finish_run(
                        conn,
                        lease.run_id,
                        status=self.status,
                        rows_upserted=self.written,
                        errors=self.errors,
                        stats={name: figures.as_json() for name, figures in self.stats.items()},
                    )
                    await storage.save_learned_rates(conn, self._rates)
        except (*TRANSIENT_ERRORS, asyncpg.PostgresError) as exc:
            log.error("run.close_failed", run=lease.run_id, error=type(exc).__name__)


async def _cancelled(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _check_requested_domains(domains: Sequence[str], sites: Sequence[Site]) -> None:
    found = {storage.domain_key(s.domain) for s in sites}
    unknown = [d for d in domains if storage.domain_key(d) not in found]
    if unknown:
        raise UsageError(
            f"--site {unknown[0]} is not a monitored site (active, deployed) in table sites"
        )


async def _plan(
    conn: asyncpg.Connection,
    settings: Settings,
    request: RunRequest,
    sites: Sequence[Site],
    accounts: Mapping[int, GscAccount],
) -> dict[SourceName, SourcePlan]:
    """Per source: its sites, each over its own window (see aggregator.planning), planned from
    one set-based read of the stored history, whatever the number of sites."""
    window = request.window
    histories = await storage.site_histories(
        conn,
        [s.id for s in sites],
        heal_limit=heal_limit(window, settings.heal_days),
        lookback_start=window.start,
        zone=settings.timezone.key,
    )
    plan: dict[SourceName, SourcePlan] = {}
    for name in request.sources:
        asked = search_console_window(window) if name == "gsc" else window
        share = plan_source(name, _sites_for(name, sites, accounts), histories, asked)
        if share is None:
            continue
        _require_configured(name, settings, len(share.sites))
        plan[name] = share
    return plan


def _planned(plan: Mapping[SourceName, SourcePlan], sites: int, seconds: float) -> None:
    """Log the plan once the run may go on (a dry run, or a run holding the lease): a run that
    gives up waiting for another's lease then says nothing on stderr but its one error line."""
    log.info(
        "run.planned",
        sites=sites,
        seconds=round(seconds, 3),
        site_days={name: sum(map(len, share.windows.values())) for name, share in plan.items()},
    )


async def _collect(
    settings: Settings,
    request: RunRequest,
    plan: Mapping[SourceName, SourcePlan],
    accounts: Mapping[int, GscAccount],
    sources: Mapping[SourceName, Source] | None,
    table: DailyTable,
    make_room: Callable[[], Awaitable[None]],
    halt: asyncio.Event,
    progress: ProgressSink,
    pacific_today: date,
    rates: dict[tuple[str, str], LearnedRate],
) -> str | None:
    """Drain every source into `table` until done, the deadline, or `halt`; return "halt" or
    "deadline" when cut short (None when complete). `make_room` runs when the table is full
    (a flush, which may make the source wait)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.http_connect_timeout)
    # No pool-wide cap: Search Console's in-flight queries follow its learned rates (rate x
    # latency) and Matomo has its own small limit (MATOMO_CONCURRENCY), so neither can starve
    # the other of connections.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        def open_source(name: SourceName, share: SourcePlan) -> AsyncIterator[SourceRecord]:
            source = sources[name] if sources else default_source(name)
            table.stats.setdefault(name, SourceStats())
            table.expect(name, share.windows)
            return source(
                SourceInput(
                    sites=share.sites,
                    accounts=accounts,
                    settings=settings,
                    session=session,
                    final_only=request.final_only,
                    windows=share.windows,
                    pacific_today=pacific_today,
                    rates=rates,
                    stats=table.stats[name],
                )
            )

        tasks = [
            asyncio.create_task(
                _drain(name, open_source(name, share), share.sites, table, make_room, progress),
                name=f"source-{name}",
            )
            for name, share in plan.items()
        ]
        if not tasks:
            return None
        everything = asyncio.gather(*tasks)
        stopped = asyncio.create_task(halt.wait())
        await asyncio.wait(
            {everything, stopped},
            timeout=settings.run_deadline,
            return_when=asyncio.FIRST_COMPLETED,
        )
        stopped.cancel()
        if everything.done():
            everything.result()
            return None
        everything.cancel()
        await asyncio.gather(everything, return_exceptions=True)
        return "halt" if halt.is_set() else "deadline"


async def _drain(
    name: SourceName,
    stream: AsyncIterator[SourceRecord],
    sites: Sequence[Site],
    table: DailyTable,
    make_room: Callable[[], Awaitable[None]],
    progress: ProgressSink,
) -> None:
    """Feed one source into the table. A bug in a source fails that source, not the run.

    How its sites ended goes into the source's stats, however the source ends."""
    ids = {site.domain: site.id for site in sites}
    seen: set[SiteId | None] = set()
    failed: set[SiteId | None] = set()
    skipped: set[SiteId | None] = set()
    stats = table.stats[name]
    began = time.monotonic()
    # A site with nothing to store (no day Google has yet) yields no record: when the source
    # ends on its own, such sites are ok; when it is cut short or crashes, or reports one error
    # for sites it does not name (a broken OAuth client), the unaccounted sites failed.
    whole = False
    progress.start(name, len(sites))
    add = table.add
    last: object = _NO_SITE
    try:
        # The hot path of a backfill (millions of records): per record one table.add, and
        # the bookkeeping only when the site changes (sources yield a site's days together).
        async for record in stream:
            if add(record):
                await make_room()
            kind = type(record)
            if kind is MatomoDay or kind is GscDay:
                if record.site_id == last:
                    continue
                last = record.site_id
                if last in seen:
                    continue
                seen.add(last)
            elif isinstance(record, SiteError):
                site_id = ids.get(record.site)
                (skipped if record.skipped else failed).add(site_id)
                seen.add(site_id)
                if site_id is not None:
                    table.gave_up(name, site_id)
            else:
                continue
            progress.update(name, len(seen), len(failed | skipped))
        whole = None not in failed
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("source.crashed", source=name)
        table.errors.append(
            SiteError(
                site=f"({len(sites)} sites)",
                source=name,
                error=f"{name} source failed unexpectedly: {type(exc).__name__}",
            )
        )
    finally:
        table.ended(name)
        named_failed = len(failed - {None})
        stats.sites_skipped += len(skipped - failed - {None})
        unaccounted = len(sites) - len(seen - {None})
        stats.sites_ok = len(seen - failed - skipped - {None}) + (unaccounted if whole else 0)
        stats.sites_failed = named_failed + (0 if whole else unaccounted)
        stats.seconds = time.monotonic() - began
