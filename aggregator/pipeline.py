"""The run: load sites, fan the sources out concurrently, join per (site, day), upsert once.

Sources are plain async generators of records (aggregator.model); this module owns the window,
the deadline, interruption, joining, loading and the run record, so sources stay simple.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Literal

import aiohttp
import asyncpg
import structlog

from aggregator import storage
from aggregator.api_stats import SourceStats
from aggregator.config import ConfigError, Settings
from aggregator.dates import Window
from aggregator.model import (
    AccountRefresh,
    GscAccount,
    GscDay,
    MatomoDay,
    Site,
    SiteError,
    SiteId,
    SourceRecord,
)
from aggregator.progress import NoProgress, ProgressSink

log = structlog.get_logger(__name__)

SourceName = Literal["matomo", "gsc"]
ALL_SOURCES: tuple[SourceName, ...] = ("matomo", "gsc")
RunStatus = Literal["ok", "partial", "failed"]


class UsageError(Exception):
    """The request cannot run as asked (exit 2); the message says what to change."""


@dataclass(frozen=True, slots=True)
class SourceInput:
    """What one source needs: its sites, its window and shared resources."""

    sites: Sequence[Site]
    accounts: Mapping[int, GscAccount]
    start: date
    end: date
    settings: Settings
    session: aiohttp.ClientSession
    final_only: bool
    stats: SourceStats = field(default_factory=SourceStats)


Source = Callable[[SourceInput], AsyncIterator[SourceRecord]]


@dataclass(frozen=True, slots=True)
class RunRequest:
    window: Window
    sources: tuple[SourceName, ...] = ALL_SOURCES
    domains: tuple[str, ...] = ()
    dry_run: bool = False
    final_only: bool = False


@dataclass(slots=True)
class DailyTable:
    """The in-memory table that sources fill; one DailyRow per (site, day)."""

    rows: dict[tuple[SiteId, date], storage.DailyRow] = field(default_factory=dict)
    errors: list[SiteError] = field(default_factory=list)
    refreshes: list[AccountRefresh] = field(default_factory=list)
    stats: dict[str, SourceStats] = field(default_factory=dict)

    def add(self, record: SourceRecord) -> None:
        if isinstance(record, MatomoDay):
            self._row(record.site_id, record.day).matomo = (record.visits, record.actions)
        elif isinstance(record, GscDay):
            self._row(record.site_id, record.day).gsc = (
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

    def _row(self, site_id: SiteId, day: date) -> storage.DailyRow:
        key = (site_id, day)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = storage.DailyRow(site_id, day)
        return row


@dataclass(slots=True)
class RunOutcome:
    status: RunStatus
    sites_total: int
    rows_upserted: int
    errors: list[SiteError]
    seconds: float
    windows: dict[str, tuple[date, date]]
    rows: list[storage.DailyRow]
    sites: dict[SiteId, str]
    interrupted: str | None = None
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
) -> RunOutcome:
    """Fetch the window from every enabled source and store it; see RunOutcome for the result.

    Raises ConfigError, UsageError or storage.StorageError before anything is fetched when the
    run cannot start (the CLI maps those to exit 2).
    """
    started = time.monotonic()
    stop = stop or asyncio.Event()
    settings.require_database()
    pool = await storage.connect(settings.database_url)
    try:
        async with pool.acquire() as conn:
            await storage.require_schema(conn)
            sites = await storage.load_sites(conn, request.domains)
            _check_requested_domains(request.domains, sites)
            accounts = (
                await storage.load_active_accounts(conn, settings.gsc_refresh_tokens)
                if "gsc" in request.sources
                else {}
            )
            plan = await _plan(conn, settings, request, sites, accounts)
        # A dry run writes nothing, so it need not wait for (or block) a real run.
        lock = (
            contextlib.nullcontext()
            if request.dry_run
            else storage.run_lock(pool, settings.lock_wait)
        )
        async with lock:
            run_id = None
            if not request.dry_run:
                async with pool.acquire() as conn:
                    run_id = await storage.start_run(
                        conn, request.window.start, request.window.end, len(sites)
                    )
            table = DailyTable()
            interrupted = await _collect(
                settings, request, plan, accounts, sources, table, stop, progress or NoProgress()
            )
            rows = list(table.rows.values())
            errors = list(table.errors)
            if interrupted:
                errors.append(SiteError(site="(run)", source="pipeline", error=interrupted))
            status = final_status(len(rows), errors, interrupted is not None)
            written = 0
            if run_id is not None:
                written = await _store(
                    pool, run_id, status, rows, table.refreshes, errors, table.stats
                )
    finally:
        await pool.close()
    outcome = RunOutcome(
        status=status,
        sites_total=len(sites),
        rows_upserted=written,
        errors=errors,
        seconds=time.monotonic() - started,
        windows={name: (share.start, share.end) for name, share in plan.items()},
        rows=rows,
        sites={s.id: s.domain for s in sites},
        interrupted=interrupted,
        stats=table.stats,
    )
    log.info(
        "run.finished",
        status=status,
        sites=len(sites),
        rows=written if not request.dry_run else len(rows),
        errors=len(errors),
        seconds=round(outcome.seconds, 2),
        dry_run=request.dry_run,
    )
    return outcome


async def _store(
    pool: asyncpg.Pool,
    run_id: int,
    status: RunStatus,
    rows: Sequence[storage.DailyRow],
    refreshes: Sequence[AccountRefresh],
    errors: Sequence[SiteError],
    stats: Mapping[str, SourceStats],
) -> int:
    """Write everything fetched in one go; a database failure here is one clear StorageError."""
    try:
        async with pool.acquire() as conn:
            written = await storage.upsert_daily_rows(conn, rows)
            await storage.record_account_refreshes(conn, refreshes)
            await storage.finish_run(
                conn,
                run_id,
                status=status,
                rows_upserted=written,
                errors=errors,
                stats={name: figures.as_json() for name, figures in stats.items()},
            )
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise storage.StorageError(
            f"could not store {len(rows)} fetched rows: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    return written


def _check_requested_domains(domains: Sequence[str], sites: Sequence[Site]) -> None:
    found = {storage.domain_key(s.domain) for s in sites}
    unknown = [d for d in domains if storage.domain_key(d) not in found]
    if unknown:
        raise UsageError(
            f"--site {unknown[0]} is not a monitored site (active, deployed) in table sites"
        )


@dataclass(frozen=True, slots=True)
class SourcePlan:
    """One source's share of a run: its sites and its own window."""

    sites: list[Site]
    start: date
    end: date
    skipped: int = 0  # sites left out before the source starts (an inactive Google account)


async def _plan(
    conn: asyncpg.Connection,
    settings: Settings,
    request: RunRequest,
    sites: Sequence[Site],
    accounts: Mapping[int, GscAccount],
) -> dict[SourceName, SourcePlan]:
    """Per source: its sites and its window. GSC's default window reaches back over every day
    still stored as provisional, so provisional numbers become final without an operator."""
    plan: dict[SourceName, SourcePlan] = {}
    skipped = [s.domain for s in sites if s.gsc_account_id and s.gsc_account_id not in accounts]
    for name in request.sources:
        chosen = _sites_for(name, sites, accounts)
        if not chosen:
            continue
        _require_configured(name, settings, len(chosen))
        start, end = request.window.start, request.window.end
        if name == "gsc" and not request.window.explicit and not request.final_only:
            oldest = await storage.oldest_provisional_gsc_day(conn, [s.id for s in chosen])
            if oldest is not None and oldest < start:
                start = oldest
        plan[name] = SourcePlan(chosen, start, end, len(skipped) if name == "gsc" else 0)
    if skipped and "gsc" in request.sources:
        log.warning("gsc.account_inactive", sites=len(skipped), example=skipped[0])
    return plan


async def _collect(
    settings: Settings,
    request: RunRequest,
    plan: Mapping[SourceName, SourcePlan],
    accounts: Mapping[int, GscAccount],
    sources: Mapping[SourceName, Source] | None,
    table: DailyTable,
    stop: asyncio.Event,
    progress: ProgressSink,
) -> str | None:
    """Drain every source into `table` until done, the deadline, or `stop`; return why it was
    cut short (None when complete). Whatever arrived before a cut is kept and stored."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.http_connect_timeout)
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        def open_source(name: SourceName, share: SourcePlan) -> AsyncIterator[SourceRecord]:
            source = sources[name] if sources else default_source(name)
            table.stats[name] = SourceStats(sites_skipped=share.skipped)
            return source(
                SourceInput(
                    sites=share.sites,
                    accounts=accounts,
                    start=share.start,
                    end=share.end,
                    settings=settings,
                    session=session,
                    final_only=request.final_only,
                    stats=table.stats[name],
                )
            )

        tasks = [
            asyncio.create_task(
                _drain(name, open_source(name, share), share.sites, table, progress),
                name=f"source-{name}",
            )
            for name, share in plan.items()
        ]
        if not tasks:
            return None
        everything = asyncio.gather(*tasks)
        stopped = asyncio.create_task(stop.wait())
        began = time.monotonic()
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
        elapsed = time.monotonic() - began
        if stop.is_set():
            return f"interrupted by a signal after {elapsed:.0f}s; fetched data was stored"
        return (
            f"run deadline of {settings.run_deadline:.0f}s (AGGREGATOR_DEADLINE_SECONDS) "
            "reached; fetched data was stored"
        )


async def _drain(
    name: SourceName,
    stream: AsyncIterator[SourceRecord],
    sites: Sequence[Site],
    table: DailyTable,
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
    progress.start(name, len(sites))
    try:
        async for record in stream:
            table.add(record)
            if isinstance(record, SiteError):
                (skipped if record.skipped else failed).add(ids.get(record.site))
                seen.add(ids.get(record.site))
            elif isinstance(record, MatomoDay | GscDay):
                seen.add(record.site_id)
            else:
                continue
            progress.update(name, len(seen), len(failed | skipped))
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
        stats.sites_failed = len(failed)
        stats.sites_skipped += len(skipped - failed)
        stats.sites_ok = len(seen - failed - skipped)
        stats.seconds = time.monotonic() - began
