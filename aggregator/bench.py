"""`make bench`: the real pipeline against the simulators, and the upsert on real Postgres.

Pipeline: for each size, a portfolio is seeded into a dedicated `aggregator_bench` schema, the
Matomo and Google simulators serve it on 127.0.0.1 from this process (100 ms per call, Google's
default quota of 20 queries/s per account, enforced per second), and `aggregator run` itself
(run_job with the real clients, a 4-day window, INFO logs as JSON lines to a file, as under
cron) runs in a child process, so its wall time and peak memory are its own. The floor is what
no client could beat: the slowest account's paced requests at its allowed rate plus the token
refresh and the last answer, or the OAuth client's share, or Matomo's rounds of bulk requests,
whichever is longest.

Nightly: a 10,000-site run with a realistic history already stored (30 days of both sources,
a few hundred missing site-days, a few dozen provisional rows left behind), so each site's
window heals its own gaps: planning time (the run's `run.planned` log line), rows written
against what the gaps and the lookback require, requests and peak memory.

Upsert: storage.upsert_daily_rows with 5,000 sites x 200 days = 1,000,000 rows, once into an
empty table and once more with every value changed, each pass in its own child process.

Postgres: DATABASE_URL, else postgresql://postgres@127.0.0.1:5432/test, else the embedded
server; the schema is dropped at the end. `python -m aggregator.bench --help` for the flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import asyncpg

from aggregator import migrations, storage
from aggregator.collector import tune_for_a_long_run
from aggregator.config import default_of
from aggregator.local_postgres import any_postgres, dsn_with_search_path
from aggregator.simulators import portfolio as world
from aggregator.simulators.google import GoogleSimulator
from aggregator.simulators.matomo import MatomoSimulator

SCHEMA = "aggregator_bench"
LATENCY = 0.100  # seconds per API call, Matomo and Google alike
ACCOUNT_QPS = 20.0  # Google's default per-user quota (1,200/min), enforced per second
CLIENT_QPS = 40_000 / 60  # Google's standard per-project quota (40,000/min)
LOOKBACK_DAYS = 4  # the job's default window
MATOMO_BATCH_SIZE = 100  # the defaults of Settings
MATOMO_CONCURRENCY = 4
DEFAULT_SIZES = (200, 2_000, 10_000)
DEFAULT_ACCOUNTS = {200: 4, 2_000: 10, 10_000: 20}
SITES_PER_ACCOUNT = 500  # for other sizes: 500 sites at 20/s is a 25 s floor
UPSERT_SITES, UPSERT_DAYS = 5_000, 200
NIGHTLY_SITES, NIGHTLY_ACCOUNTS = 10_000, 20
HISTORY_DAYS = 30  # stored before the night, ending the day before yesterday
HEAL_DAYS = 30  # the job's default AGGREGATOR_HEAL_DAYS
GAP_RUN_SITES, GAP_RUN = 30, (12, 6)  # Matomo's archiver broken for them, days Y-12..Y-6
SINGLE_GAPS = 100  # one source missing one day at one site (a failed fetch)
STALE_PROVISIONAL = 40  # provisional rows left behind (a property lost for a while)
QUICK_UPSERT_SITES = 500
FLUSHING_SITES = 10_000  # x UPSERT_DAYS: a 2,000,000-row backfill through the flushing path
SLOW_LATENCY, SLOW_SITES, SLOW_ACCOUNTS = 0.500, 5_000, 20  # real queries take 0.3-0.5 s
PIPELINE_ROWS = frozenset({"tuned", "500ms", "untuned"})  # `--rows`


def accounts_for(sites: int) -> int:
    return DEFAULT_ACCOUNTS.get(sites) or max(1, math.ceil(sites / SITES_PER_ACCOUNT))


@dataclass(frozen=True, slots=True)
class Floor:
    seconds: float
    bound: str  # what sets it: "account", "client" or "matomo"


def pipeline_floor(
    portfolio: world.Portfolio,
    *,
    latency: float = LATENCY,
    account_qps: float = ACCOUNT_QPS,
    client_qps: float = CLIENT_QPS,
    batch_size: int = MATOMO_BATCH_SIZE,
    concurrency: int = MATOMO_CONCURRENCY,
) -> Floor:
    """The fastest any client could fetch `portfolio` under these quotas and latencies.

    Search Console: per account one token refresh, then sites.list (when some site has no
    stored property) and one query per site, all paced; the last answer takes `latency` more.
    A site whose property is derived cannot be asked before sites.list has answered (the
    contract derives it from what the account can access), so an account whose sites are
    mostly such waits one latency before they can fill its pace. The OAuth client's quota
    bounds all accounts' paced requests together. Matomo: bulk requests of `batch_size`
    sites, `concurrency` at a time, `latency` each. The sources run concurrently, so the floor
    is the longest of the three.
    """
    paced: dict[int, int] = {}
    derived: dict[int, int] = {}
    for site in portfolio.sites:
        if site.gsc_account_id is None:
            continue
        paced[site.gsc_account_id] = paced.get(site.gsc_account_id, 0) + 1
        if site.stored_property is None:
            derived[site.gsc_account_id] = derived.get(site.gsc_account_id, 0) + 1
    for account_id in derived:
        paced[account_id] += 1  # sites.list
    slowest = max(
        (
            max(count / account_qps, latency + derived.get(account, 0) / account_qps)
            if account in derived
            else count / account_qps
            for account, count in paced.items()
        ),
        default=0.0,
    )
    candidates = [Floor(0.0, "matomo")]
    if paced:
        candidates.append(Floor(2 * latency + slowest, "account"))
        candidates.append(Floor(2 * latency + sum(paced.values()) / client_qps, "client"))
    matomo_sites = sum(1 for site in portfolio.sites if site.matomo_site_id is not None)
    rounds = math.ceil(math.ceil(matomo_sites / batch_size) / concurrency)
    candidates[0] = Floor(rounds * latency, "matomo")
    return max(candidates, key=lambda floor: floor.seconds)


def expected_queries(portfolio: world.Portfolio) -> int:
    """searchAnalytics queries a run needs: one per site with a Google account."""
    return sum(1 for site in portfolio.sites if site.gsc_account_id is not None)


# --- measurements in a child process -----------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _child_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    from aggregator import matomo  # noqa: F401  (imported before the baseline is taken)
    from aggregator.dates import resolve_window, today_in
    from aggregator.demo import simulated_settings
    from aggregator.pipeline import RunRequest, run_job
    from aggregator.search_console import client  # noqa: F401

    baseline = peak_rss_mb()
    settings = simulated_settings(
        spec["dsn"],
        spec["matomo_url"],
        spec["google_url"],
        gsc_max_qps_per_account=spec["account_qps"],
        gsc_max_qps_per_client=spec["client_qps"],
        run_deadline=spec["deadline"],
        heal_days=spec["heal_days"],
    )
    window = resolve_window(today_in(settings.timezone), lookback=spec["lookback"])
    began = time.perf_counter()
    tune_for_a_long_run()  # as `aggregator run` does
    outcome = await run_job(settings, RunRequest(window))
    seconds = time.perf_counter() - began
    return {
        "seconds": seconds,
        "rows": outcome.rows_upserted,
        "status": outcome.status,
        "errors": [f"{e.source} {e.site}: {e.error}" for e in outcome.errors],
        "baseline_mb": baseline,
        "peak_mb": peak_rss_mb(),
    }


def synthetic_rows(
    sites: int | Iterable[int], days: int, *, variant: int
) -> Iterator[storage.DailyRow]:
    """Rows with both sources for `sites` (ids, or a count: ids 1..N) x `days`, generated
    lazily; another `variant` changes every value, so a second pass updates every row."""
    for site_id in range(1, sites + 1) if isinstance(sites, int) else sites:
        for day, matomo, gsc in _synthetic_days(site_id, days, variant):
            yield storage.DailyRow(site_id, day, matomo=matomo, gsc=gsc)


def _synthetic_days(
    site_id: int, days: int, variant: int
) -> Iterator[tuple[date, tuple[int, int], tuple[int, int, float, float, bool]]]:
    first = date(2024, 1, 1)
    for n in range(days):
        visits = (site_id * 7 + n * 13 + variant) % 5_000
        impressions = (site_id * 31 + n * 17 + variant) % 100_000 + 1
        clicks = impressions // (3 + variant)
        gsc = (clicks, impressions, clicks / impressions, 1.0 + n % 50, n < days - 3)
        yield first + timedelta(days=n), (visits, visits * 3), gsc


async def _child_upsert(spec: dict[str, Any]) -> dict[str, Any]:
    conn = await asyncpg.connect(spec["dsn"])
    try:
        baseline = peak_rss_mb()
        rows = synthetic_rows(spec["sites"], spec["days"], variant=spec["variant"])
        began = time.perf_counter()
        count = await storage.upsert_daily_rows(conn, rows)
        seconds = time.perf_counter() - began
    finally:
        await conn.close()
    return {"rows": count, "seconds": seconds, "baseline_mb": baseline, "peak_mb": peak_rss_mb()}


def _synthetic_sources(days: int) -> dict[str, Any]:
    """Matomo and Search Console stand-ins that yield every site's `days` days as fast as the
    pipeline takes them, taking turns site by site (as two real sources at the same pace).
    They serve different sites (every 25th has no Matomo, every 30th no Search Console), so
    they drift apart: by the end Matomo is about 67 sites (13,400 rows) ahead, and a day's
    halves meet in one flush only because the table holds a half whose other half is still
    to come (daily_table)."""
    from aggregator.model import GscDay, MatomoDay

    # The values of _synthetic_days (variant 0), each source computing only its own half, as
    # a real source parses only its own answer (tests/test_bench.py keeps them equal).
    first = date(2024, 1, 1)

    async def matomo(given: Any) -> AsyncIterator[Any]:
        for site in given.sites:
            site_id = site.id
            for n in range(days):
                visits = (site_id * 7 + n * 13) % 5_000
                yield MatomoDay(site_id, first + timedelta(days=n), visits, visits * 3)
            await asyncio.sleep(0)  # one site done: the other source takes its turn

    async def gsc(given: Any) -> AsyncIterator[Any]:
        for site in given.sites:
            site_id = site.id
            for n in range(days):
                impressions = (site_id * 31 + n * 17) % 100_000 + 1
                clicks = impressions // 3
                yield GscDay(
                    site_id,
                    first + timedelta(days=n),
                    clicks,
                    impressions,
                    clicks / impressions,
                    1.0 + n % 50,
                    n < days - 3,
                )
            await asyncio.sleep(0)

    return {"matomo": matomo, "gsc": gsc}


async def _child_flushing(spec: dict[str, Any]) -> dict[str, Any]:
    """A backfill through run_job's store-while-fetching path: the lease, the DailyTable,
    flushes of AGGREGATOR_FLUSH_ROWS rows and the heartbeat, all real."""
    from aggregator.dates import Window
    from aggregator.demo import simulated_settings
    from aggregator.pipeline import RunRequest, run_job

    baseline = peak_rss_mb()
    unused = "http://127.0.0.1:9"  # the synthetic sources call no server
    settings = simulated_settings(spec["dsn"], unused, unused, flush_rows=spec["flush_rows"])
    first = date(2024, 1, 1)
    window = Window(first, first + timedelta(days=spec["days"] - 1))
    began = time.perf_counter()
    tune_for_a_long_run()  # as `aggregator run` does
    outcome = await run_job(settings, RunRequest(window), sources=_synthetic_sources(spec["days"]))
    seconds = time.perf_counter() - began
    return {
        "sent": outcome.rows_upserted,
        "seconds": seconds,
        "status": outcome.status,
        "baseline_mb": baseline,
        "peak_mb": peak_rss_mb(),
    }


async def _in_child(kind: str, spec: dict[str, Any], limit: float) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its stdout is one JSON object."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aggregator.bench",
        "--child",
        kind,
        json.dumps(spec),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), limit)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"the {kind} child did not finish within {limit:.0f}s") from None
    if process.returncode != 0:
        raise RuntimeError(f"the {kind} child failed with exit status {process.returncode}")
    return json.loads(stdout.decode().strip().splitlines()[-1])


# --- scenarios (parent process) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PipelineResult:
    label: str  # "tuned" (ceilings set to the quotas), "500 ms", "no tuning, night 1/2"
    sites: int
    accounts: int
    seconds: float
    floor: Floor
    matomo_requests: int
    token_requests: int
    sites_requests: int
    query_requests: int
    refused: int  # queries beyond one per site: 429s (and other retries)
    max_account_qps: int
    rows: int
    status: str
    errors: list[str]
    baseline_mb: float
    peak_mb: float

    @property
    def ratio(self) -> float:
        return self.seconds / self.floor.seconds

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds


async def _seed(dsn: str, portfolio: world.Portfolio) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await world.seed_portfolio(conn, portfolio)
        await conn.execute("truncate gsc_learned_rates")
        await conn.execute("analyze")
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def on_own_thread(server: MatomoSimulator) -> AsyncIterator[MatomoSimulator]:
    """Serve `server` from a thread with its own event loop. The Google simulator stamps each
    query's arrival against the quota; building a 100-site Matomo answer on the same loop
    held those stamps back and let them through in a bunch, drawing 429s that a separate
    Matomo server never causes. With a thread of its own, Matomo waits at most Python's
    switch interval (5 ms) to hand over, not a whole answer."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="matomo-simulator", daemon=True)
    thread.start()

    async def on_its_loop(step: Coroutine[Any, Any, Any]) -> None:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(step, loop))

    try:
        await on_its_loop(server.start())
        try:
            yield server
        finally:
            await on_its_loop(server.close())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)
        loop.close()


async def _run_in_child(
    dsn: str,
    portfolio: world.Portfolio,
    floor: Floor,
    *,
    heal_days: int,
    log: Path,
    latency: float = LATENCY,
    tuned: bool = True,
) -> tuple[dict[str, Any], MatomoSimulator, GoogleSimulator]:
    """`aggregator run` in a child process against simulators serving `portfolio`: the child's
    figures, and the simulators, whose counters say what they received. `tuned`: the
    GSC_MAX_QPS_* ceilings are set to the quotas; else unset, and the rates are learned."""
    async with (
        on_own_thread(world.matomo_simulator(portfolio, latency=latency)) as matomo,
        world.google_simulator(
            portfolio,
            latency=latency,
            qps_per_account=ACCOUNT_QPS,
            qps_per_project=CLIENT_QPS,
            quota_wording=True,
        ) as google,
    ):
        spec = {
            "dsn": dsn,
            "matomo_url": matomo.url,
            "google_url": google.url,
            "account_qps": ACCOUNT_QPS if tuned else None,
            "client_qps": CLIENT_QPS if tuned else None,
            "lookback": LOOKBACK_DAYS,
            "heal_days": heal_days,
            "deadline": 20 * floor.seconds + 60,
            "log": str(log),
        }
        child = await _in_child("pipeline", spec, limit=spec["deadline"] + 60)
    return child, matomo, google


async def pipeline_scenario(
    dsn: str,
    sites: int,
    workdir: Path,
    *,
    accounts: int | None = None,
    latency: float = LATENCY,
    tuned: bool = True,
    label: str = "tuned",
) -> PipelineResult:
    """One `aggregator run`. With `tuned` False the rates are learned: the first night of a
    size starts from nothing (learned rates are cleared when the portfolio is seeded), the next
    one from what the first stored."""
    accounts = accounts or accounts_for(sites)
    portfolio = world.make_portfolio(sites, accounts)
    if label != "no tuning, night 2":
        await _seed(dsn, portfolio)
    floor = pipeline_floor(portfolio, latency=latency)
    # An empty table: with healing on, its first night would backfill every missing day; 0
    # keeps this the plain 4-day window (the nightly scenario heals).
    child, matomo, google = await _run_in_child(
        dsn,
        portfolio,
        floor,
        heal_days=0,
        log=workdir / f"run-{sites}-{label.replace(' ', '-')}.jsonl",
        latency=latency,
        tuned=tuned,
    )
    return PipelineResult(
        label=label,
        sites=sites,
        accounts=accounts,
        seconds=child["seconds"],
        floor=floor,
        matomo_requests=matomo.requests,
        token_requests=google.token_requests,
        sites_requests=google.sites_requests,
        query_requests=google.query_requests,
        refused=google.query_requests - expected_queries(portfolio),
        max_account_qps=max(google.max_queries_per_second.values(), default=0),
        rows=child["rows"],
        status=child["status"],
        errors=child["errors"],
        baseline_mb=child["baseline_mb"],
        peak_mb=child["peak_mb"],
    )


_HISTORY_COLUMNS = (
    "site_id",
    "date",
    "matomo_visits",
    "matomo_actions",
    "matomo_updated_at",
    "gsc_clicks",
    "gsc_impressions",
    "gsc_ctr",
    "gsc_position",
    "gsc_final",
    "gsc_updated_at",
)


@dataclass(frozen=True, slots=True)
class History:
    """The rows stored before the benchmarked night, and the (site, day) rows that night must
    write: every site's lookback plus each day some source lacks or holds only provisionally."""

    records: list[tuple]
    required: int
    gaps: int
    stale: int


def nightly_history(portfolio: world.Portfolio, today: date, *, seed: int = 7) -> History:
    """HISTORY_DAYS of both sources for every site up to the day before yesterday, the newest
    two GSC days provisional (as last night left them), with GAP_RUN_SITES runs of missing
    Matomo days, SINGLE_GAPS single missing days and STALE_PROVISIONAL old provisional rows."""
    rng = random.Random(seed)
    # The counts describe NIGHTLY_SITES sites; a smaller portfolio (--quick) gets its share.
    share = len(portfolio.sites) / NIGHTLY_SITES
    run_sites, singles, stale_rows = (
        max(1, round(count * share)) for count in (GAP_RUN_SITES, SINGLE_GAPS, STALE_PROVISIONAL)
    )
    yesterday = today - timedelta(days=1)
    days = [yesterday - timedelta(days=n) for n in range(HISTORY_DAYS, 0, -1)]
    stored_at = datetime.combine(yesterday, datetime.min.time(), UTC)
    heal_from, lookback_start = days[0], yesterday - timedelta(days=LOOKBACK_DAYS - 1)
    old = [d for d in days if heal_from <= d < lookback_start]
    missing: set[tuple[int, date, str]] = set()
    matomo_sites = [s for s in portfolio.sites if s.matomo_site_id is not None]
    gsc_sites = [s for s in portfolio.sites if s.gsc_account_id is not None]
    for site in rng.sample(matomo_sites, run_sites):
        first, last = GAP_RUN
        for n in range(last, first + 1):
            missing.add((site.id, yesterday - timedelta(days=n), "matomo"))
    while len(missing) < run_sites * (GAP_RUN[0] - GAP_RUN[1] + 1) + singles:
        source = rng.choice(("matomo", "gsc"))
        site = rng.choice(matomo_sites if source == "matomo" else gsc_sites)
        missing.add((site.id, rng.choice(old), source))
    stale: set[tuple[int, date]] = set()
    while len(stale) < stale_rows:
        key = (rng.choice(gsc_sites).id, rng.choice(old))
        if (*key, "gsc") not in missing:
            stale.add(key)
    records = []
    for site in portfolio.sites:
        for n, day in enumerate(days):
            matomo = site.matomo_site_id is not None and (site.id, day, "matomo") not in missing
            gsc = site.gsc_account_id is not None and (site.id, day, "gsc") not in missing
            if not (matomo or gsc):
                continue
            final = n < HISTORY_DAYS - 2 and (site.id, day) not in stale
            records.append(
                (site.id, day)
                + ((n % 90, n % 90 * 3, stored_at) if matomo else (None, None, None))
                + (
                    (n % 7, 10 + n, (n % 7) / (10 + n), 3.5, final, stored_at)
                    if gsc
                    else (None,) * 6
                )
            )
    needed = {(site, day) for site, day, _ in missing} | stale
    required = len(portfolio.sites) * LOOKBACK_DAYS + len(needed)
    return History(records, required, len(missing), len(stale))


@dataclass(frozen=True, slots=True)
class NightlyResult:
    sites: int
    history_rows: int
    gaps: int
    stale: int
    plan_seconds: float
    seconds: float
    rows: int
    required: int
    matomo_requests: int
    query_requests: int
    status: str
    errors: list[str]
    baseline_mb: float
    peak_mb: float


async def nightly_scenario(dsn: str, sites: int, workdir: Path) -> NightlyResult:
    """One night of `aggregator run` over a portfolio with HISTORY_DAYS already stored."""
    portfolio = world.make_portfolio(sites, accounts_for(sites))
    await _seed(dsn, portfolio)
    today = datetime.now(UTC).date()  # the run's AGGREGATOR_TIMEZONE (UTC) decides its days
    history = nightly_history(portfolio, today)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "daily_analytics", records=history.records, columns=_HISTORY_COLUMNS
        )
        await conn.execute("analyze")
    finally:
        await conn.close()
    log = workdir / f"nightly-{sites}.jsonl"
    child, matomo, google = await _run_in_child(
        dsn, portfolio, pipeline_floor(portfolio), heal_days=HEAL_DAYS, log=log
    )
    planned = [line for line in log.read_text().splitlines() if '"run.planned"' in line]
    return NightlyResult(
        sites=sites,
        history_rows=len(history.records),
        gaps=history.gaps,
        stale=history.stale,
        plan_seconds=json.loads(planned[-1])["seconds"] if planned else math.nan,
        seconds=child["seconds"],
        rows=child["rows"],
        required=history.required,
        matomo_requests=matomo.requests,
        query_requests=google.query_requests,
        status=child["status"],
        errors=child["errors"],
        baseline_mb=child["baseline_mb"],
        peak_mb=child["peak_mb"],
    )


@dataclass(frozen=True, slots=True)
class UpsertResult:
    label: str
    rows: int
    seconds: float
    baseline_mb: float
    peak_mb: float
    stored: int


async def upsert_scenario(dsn: str, sites: int, days: int) -> list[UpsertResult]:
    await _seed(dsn, world.make_portfolio(sites, 1))
    results = []
    for label, variant in (("insert", 0), ("update all", 1)):
        spec = {"dsn": dsn, "sites": sites, "days": days, "variant": variant}
        child = await _in_child("upsert", spec, limit=600)
        conn = await asyncpg.connect(dsn)
        try:
            # Check what the pass did: every row there, carrying this pass's values.
            expected = next(iter(synthetic_rows(sites, days, variant=variant)))
            stored = await conn.fetchval("select count(*) from daily_analytics")
            first = await conn.fetchrow(
                "select matomo_visits, gsc_impressions from daily_analytics"
                " where site_id = $1 and date = $2",
                expected.site_id,
                expected.day,
            )
        finally:
            await conn.close()
        assert expected.matomo and expected.gsc
        if tuple(first) != (expected.matomo[0], expected.gsc[1]):
            raise RuntimeError(f"upsert pass {label!r} stored {tuple(first)}, not this pass's data")
        results.append(
            UpsertResult(
                label,
                child["rows"],
                child["seconds"],
                child["baseline_mb"],
                child["peak_mb"],
                stored,
            )
        )
    return results


@dataclass(frozen=True, slots=True)
class FlushingResult:
    sites: int
    days: int
    rows: int  # distinct (site, day) rows stored
    sent: int  # rows sent over all flushes (a row whose halves met in two flushes counts twice)
    seconds: float
    status: str
    baseline_mb: float
    peak_mb: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds


async def flushing_scenario(
    dsn: str, sites: int, days: int, flush_rows: int = default_of("AGGREGATOR_FLUSH_ROWS")
) -> FlushingResult:
    portfolio = world.make_portfolio(sites, 1)
    await _seed(dsn, portfolio)
    spec = {"dsn": dsn, "sites": sites, "days": days, "flush_rows": flush_rows}
    child = await _in_child("flushing", spec, limit=900)
    served = sum(1 for s in portfolio.sites if s.matomo_site_id or s.gsc_account_id) * days
    conn = await asyncpg.connect(dsn)
    try:
        stored = await conn.fetchval("select count(*) from daily_analytics")
    finally:
        await conn.close()
    if stored != served:
        raise RuntimeError(f"the flushing backfill stored {stored} rows, not {served}")
    return FlushingResult(
        sites,
        days,
        stored,
        child["sent"],
        child["seconds"],
        child["status"],
        child["baseline_mb"],
        child["peak_mb"],
    )


# --- report -------------------------------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(v) for v in header], *[[str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def pipeline_table(results: Sequence[PipelineResult]) -> str:
    return table(
        (
            "run",
            "sites",
            "accounts",
            "wall s",
            "floor s",
            "ratio",
            "Matomo",
            "tokens",
            "sites.list",
            "queries",
            "refused",
            "max q/s",
            "rows",
            "rows/s",
            "peak RSS MB",
            "status",
        ),
        [
            (
                r.label,
                f"{r.sites:,}",
                r.accounts,
                f"{r.seconds:.2f}",
                f"{r.floor.seconds:.2f} ({r.floor.bound})",
                f"{r.ratio:.2f}",
                r.matomo_requests,
                r.token_requests,
                r.sites_requests,
                f"{r.query_requests:,}",
                r.refused,
                r.max_account_qps,
                f"{r.rows:,}",
                f"{r.rows_per_second:,.0f}",
                f"{r.peak_mb:.0f} (+{r.peak_mb - r.baseline_mb:.0f})",
                r.status if not r.errors else f"{r.status}, {len(r.errors)} errors",
            )
            for r in results
        ],
    )


def nightly_table(results: Sequence[NightlyResult]) -> str:
    return table(
        (
            "sites",
            "stored rows",
            "gaps",
            "stale prov.",
            "planning s",
            "wall s",
            "rows written",
            "required",
            "excess",
            "Matomo",
            "queries",
            "peak RSS MB",
            "status",
        ),
        [
            (
                f"{r.sites:,}",
                f"{r.history_rows:,}",
                r.gaps,
                r.stale,
                f"{r.plan_seconds:.3f}",
                f"{r.seconds:.2f}",
                f"{r.rows:,}",
                f"{r.required:,}",
                f"{(r.rows - r.required) / r.required:+.1%}",
                r.matomo_requests,
                f"{r.query_requests:,}",
                f"{r.peak_mb:.0f} (+{r.peak_mb - r.baseline_mb:.0f})",
                r.status if not r.errors else f"{r.status}, {len(r.errors)} errors",
            )
            for r in results
        ],
    )


def upsert_table(results: Sequence[UpsertResult]) -> str:
    return table(
        ("pass", "rows", "seconds", "rows/s", "peak RSS MB", "rows stored"),
        [
            (
                r.label,
                f"{r.rows:,}",
                f"{r.seconds:.2f}",
                f"{r.rows / r.seconds:,.0f}",
                f"{r.peak_mb:.0f} (+{r.peak_mb - r.baseline_mb:.0f})",
                f"{r.stored:,}",
            )
            for r in results
        ],
    )


# Issue 11's targets for the flushing backfill: throughput within 20% of the single upsert
# measured alongside, peak RSS under 150 MB.
FLUSHING_MIN_SHARE, FLUSHING_MAX_RSS_MB = 0.80, 150.0


def flushing_targets(result: FlushingResult, single: Sequence[UpsertResult]) -> str:
    """Whether the flushing backfill met both targets, saying which it missed."""
    inserts = [r for r in single if r.label == "insert"]
    missed = []
    if inserts:
        share = result.rows_per_second / (inserts[0].rows / inserts[0].seconds)
        if share < FLUSHING_MIN_SHARE:
            missed.append(f"{share:.0%} < {FLUSHING_MIN_SHARE:.0%} of one upsert")
    if result.peak_mb >= FLUSHING_MAX_RSS_MB:
        missed.append(f"peak RSS {result.peak_mb:.0f} >= {FLUSHING_MAX_RSS_MB:.0f} MB")
    return "missed: " + ", ".join(missed) if missed else "met"


def flushing_table(result: FlushingResult, single: Sequence[UpsertResult]) -> str:
    inserts = [r for r in single if r.label == "insert"]
    versus = (
        f"{result.rows_per_second / (inserts[0].rows / inserts[0].seconds):.0%}" if inserts else "-"
    )
    return table(
        (
            "backfill",
            "rows",
            "sent",
            "seconds",
            "rows/s",
            "vs one upsert",
            "peak RSS MB",
            "targets",
            "status",
        ),
        [
            (
                f"{result.sites:,} sites x {result.days} days",
                f"{result.rows:,}",
                f"{result.sent:,}",
                f"{result.seconds:.2f}",
                f"{result.rows_per_second:,.0f}",
                versus,
                f"{result.peak_mb:.0f} (+{result.peak_mb - result.baseline_mb:.0f})",
                flushing_targets(result, single),
                result.status,
            )
        ],
    )


# --- entry points ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchOptions:
    sizes: tuple[int, ...] = DEFAULT_SIZES
    tuned: bool = True  # one tuned row per size
    slow_row: bool = True  # the 500 ms-latency row
    untuned: bool = True  # the "no tuning" rows, two nights per size
    upsert_sites: int | None = UPSERT_SITES  # None: skip the upsert benchmark
    nightly_sites: int | None = NIGHTLY_SITES  # None: skip the nightly benchmark
    upsert_days: int = UPSERT_DAYS
    flushing_sites: int | None = FLUSHING_SITES  # None: skip the flushing backfill
    logs: Path | None = None  # keep each run's JSON log here; None: a temporary directory


async def run_bench(server_dsn: str, options: BenchOptions, out: TextIO) -> int:
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"drop schema if exists {SCHEMA} cascade")
        await admin.execute(f"create schema {SCHEMA}")
    finally:
        await admin.close()
    dsn = dsn_with_search_path(server_dsn, SCHEMA)
    failed = False
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await migrations.apply_migrations(conn)
        finally:
            await conn.close()
        if options.sizes and (options.tuned or options.slow_row or options.untuned):
            print(
                f"\nPipeline (`aggregator run`, {LOOKBACK_DAYS}-day window) against the "
                f"simulators on 127.0.0.1: {LATENCY * 1000:.0f} ms per call, "
                f"{ACCOUNT_QPS:.0f} queries/s per account enforced per second and paced at "
                f"{ACCOUNT_QPS:.0f}, OAuth client {CLIENT_QPS:.0f}/s; "
                f"Matomo {MATOMO_BATCH_SIZE} sites per request, {MATOMO_CONCURRENCY} at a time",
                file=out,
                flush=True,
            )
            results = []
            with _workdir(options.logs) as workdir:
                for sites in options.sizes if options.tuned else ():
                    results.append(await pipeline_scenario(dsn, sites, Path(workdir)))
                    print(f"  {sites:,} sites done", file=out, flush=True)
                if options.slow_row:
                    results.append(
                        await pipeline_scenario(
                            dsn,
                            SLOW_SITES,
                            Path(workdir),
                            accounts=SLOW_ACCOUNTS,
                            latency=SLOW_LATENCY,
                            label=f"{SLOW_LATENCY * 1000:.0f} ms",
                        )
                    )
                    print(f"  {SLOW_SITES:,} sites at 500 ms done", file=out, flush=True)
                for sites in options.sizes if options.untuned else ():
                    for night in (1, 2):
                        label = f"no tuning, night {night}"
                        results.append(
                            await pipeline_scenario(
                                dsn, sites, Path(workdir), tuned=False, label=label
                            )
                        )
                    print(f"  {sites:,} sites, no tuning, done", file=out, flush=True)
            print("\n" + pipeline_table(results), file=out)
            print(
                "\nfloor: max(slowest account's paced requests / its rate (its sites with a "
                "derived property only after sites.list has answered), all paced requests "
                "/ client rate) + token refresh + last answer, or Matomo's rounds x latency "
                "(bound named). ratio = wall / floor. refused = queries beyond one per site "
                "(429s). max q/s = most queries one account had in any 1-s window. rows/s = "
                "rows upserted / wall. peak RSS = the run's process (+ growth over its "
                "start, after imports). tuned: GSC_MAX_QPS_* set to the quotas; 500 ms: "
                "every API call takes 500 ms (tuned); no tuning: no GSC_MAX_QPS_*, night 1 "
                "learns from nothing (one query a second), night 2 starts where it left off.",
                file=out,
            )
            for r in results:
                failed = failed or r.status != "ok"
                for error in r.errors[:5]:
                    print(f"  {r.sites} sites: {error[:160]}", file=out)
        if options.nightly_sites:
            print(
                f"\nNightly run with history: {HISTORY_DAYS} days stored, "
                f"AGGREGATOR_HEAL_DAYS={HEAL_DAYS}, {LOOKBACK_DAYS}-day lookback, same simulators",
                file=out,
                flush=True,
            )
            with _workdir(options.logs) as workdir:
                nightly = await nightly_scenario(dsn, options.nightly_sites, Path(workdir))
            print("\n" + nightly_table([nightly]), file=out)
            print(
                "\ngaps = missing (site, day, source) values; stale prov. = old provisional "
                "rows; planning = the run's own planning (set-based reads + per-site windows); "
                "required = each site's lookback days plus every (site, day) with a gap or a "
                "stale provisional value; excess = rows written beyond that (days re-fetched "
                "between a site's oldest gap and its lookback).",
                file=out,
            )
            failed = failed or nightly.status != "ok"
            for error in nightly.errors[:5]:
                print(f"  nightly: {error[:160]}", file=out)
        if options.upsert_sites:
            total = options.upsert_sites * options.upsert_days
            print(
                f"\nUpsert: storage.upsert_daily_rows, {total:,} rows ({options.upsert_sites:,} "
                f"sites x {options.upsert_days} days, both sources), each pass in its own process",
                file=out,
                flush=True,
            )
            upserts = await upsert_scenario(dsn, options.upsert_sites, options.upsert_days)
            print("\n" + upsert_table(upserts), file=out)
        if options.flushing_sites:
            total = options.flushing_sites * options.upsert_days
            print(
                f"\nBackfill while fetching: `run` with sources yielding {total:,} rows "
                f"({options.flushing_sites:,} sites x {options.upsert_days} days, both sources), "
                f"flushed every {default_of('AGGREGATOR_FLUSH_ROWS'):,} rows, under the lease",
                file=out,
                flush=True,
            )
            flushing = await flushing_scenario(dsn, options.flushing_sites, options.upsert_days)
            print(
                "\n" + flushing_table(flushing, upserts if options.upsert_sites else []), file=out
            )
            print(
                "\nsent = rows over all flushes (a day whose two sources' halves were stored "
                "by different flushes is sent twice); vs one upsert = rows/s against the single "
                "1,000,000-row insert above; peak RSS = the run's process; targets (issue 11): "
                f"at least {FLUSHING_MIN_SHARE:.0%} of one upsert's rows/s, peak RSS under "
                f"{FLUSHING_MAX_RSS_MB:.0f} MB.",
                file=out,
            )
            failed = failed or flushing.status != "ok"
    finally:
        admin = await asyncpg.connect(server_dsn)
        try:
            await admin.execute(f"drop schema if exists {SCHEMA} cascade")
        finally:
            await admin.close()
    return 1 if failed else 0


@contextlib.contextmanager
def _workdir(logs: Path | None) -> Iterator[str]:
    """Where the runs write their logs: `logs` (kept, to see where a run spent its time), else
    a temporary directory."""
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        yield str(logs)
        return
    with tempfile.TemporaryDirectory(prefix="aggregator-bench-") as workdir:
        yield workdir


@contextlib.contextmanager
def postgres_server(out: TextIO) -> Iterator[str]:
    with any_postgres() as (dsn, where):
        print(f"database: {storage.describe_dsn(dsn)} ({where})", file=out)
        yield dsn


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"machine: {os.cpu_count()} CPUs ({model}), {memory:.1f} GiB RAM, "
        f"Python {sys.version.split()[0]}"
    )


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 200,2000, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return sizes


def _rows(text: str) -> frozenset[str]:
    rows = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = rows - PIPELINE_ROWS
    if not rows or unknown:
        raise argparse.ArgumentTypeError(
            f"expected some of {','.join(sorted(PIPELINE_ROWS))}, got {text!r}"
        )
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aggregator.bench",
        description="Benchmark the pipeline against the simulators and the Postgres upsert.",
    )
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=DEFAULT_SIZES,
        metavar="N,N,...",
        help="portfolio sizes for the pipeline benchmark (default 200,2000,10000)",
    )
    parser.add_argument(
        "--rows",
        type=_rows,
        default=PIPELINE_ROWS,
        metavar="KIND,...",
        help=(
            "which pipeline rows to run: tuned (one per size), 500ms (the slow-latency row), "
            "untuned (two 'no tuning' nights per size); default all three"
        ),
    )
    parser.add_argument("--skip-upsert", action="store_true", help="skip the upsert benchmark")
    parser.add_argument(
        "--nightly",
        type=int,
        default=NIGHTLY_SITES,
        metavar="N",
        help=f"sites of the nightly run with history (default {NIGHTLY_SITES:,}; 0 skips it)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: 200 sites and a {QUICK_UPSERT_SITES * UPSERT_DAYS:,}-row upsert",
    )
    parser.add_argument(
        "--logs",
        type=Path,
        metavar="DIR",
        help="keep each pipeline run's JSON log in DIR (default: discarded)",
    )
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    return parser


def _child_main(kind: str, text: str) -> int:
    spec = json.loads(text)
    if kind == "pipeline":
        from aggregator.logs import configure_logging

        with open(spec["log"], "w", encoding="utf-8") as log:
            # As under cron: INFO and up, JSON lines, secrets masked, into a file.
            configure_logging(secrets=[world.MATOMO_TOKEN, world.CLIENT_SECRET], stream=log)
            result = asyncio.run(_child_pipeline(spec))
    elif kind == "flushing":
        result = asyncio.run(_child_flushing(spec))
    else:
        result = asyncio.run(_child_upsert(spec))
    print(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return _child_main(*args.child)
    options = BenchOptions(
        sizes=(200,) if args.quick else args.sizes,
        tuned="tuned" in args.rows,
        slow_row="500ms" in args.rows and not args.quick,
        untuned="untuned" in args.rows,
        upsert_sites=None
        if args.skip_upsert
        else QUICK_UPSERT_SITES
        if args.quick
        else UPSERT_SITES,
        nightly_sites=(200 if args.quick else args.nightly) or None,
        flushing_sites=None
        if args.skip_upsert
        else QUICK_UPSERT_SITES
        if args.quick
        else FLUSHING_SITES,
        logs=args.logs,
    )
    out = sys.stdout
    print(machine(), file=out)
    # This process runs the simulators, which stamp each query's arrival against the quota:
    # a garbage collection pausing them stamps a bunch at once and draws 429s that measure
    # the collector, not the job.
    tune_for_a_long_run()
    with postgres_server(out) as server:
        return asyncio.run(run_bench(server, options, out))


if __name__ == "__main__":
    sys.exit(main())
