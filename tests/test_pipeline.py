"""The pipeline end to end on real Postgres, with fake in-process sources."""

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, date

import asyncpg
import pytest

from aggregator import storage
from aggregator.config import ConfigError, Secret, Settings
from aggregator.dates import Window
from aggregator.model import AccountRefresh, GscDay, MatomoDay, SiteError, SourceRecord
from aggregator.pipeline import RunRequest, SourceInput, UsageError, run_job
from tests.factories import add_account, add_site, stored_rows

START, END = date(2024, 12, 30), date(2025, 1, 2)
WINDOW = Window(START, END)


def settings_for(dsn: str, **overrides) -> Settings:
    values = {
        "database_url": Secret(dsn),
        "matomo_url": "http://matomo.invalid",
        "matomo_token": Secret("m-token"),
        "google_client_id": "client",
        "google_client_secret": Secret("c-secret"),
    }
    values.update(overrides)
    return Settings(**values)


async def fake_matomo(given: SourceInput) -> AsyncIterator[SourceRecord]:
    for site in given.sites:
        if site.domain == "broken.com":
            yield SiteError(site.domain, "matomo", "Matomo site id 9: no access")
            continue
        for day in given.windows[site.id].days():
            yield MatomoDay(site.id, day, visits=site.id * 10 + day.day, actions=day.day)


async def fake_gsc(given: SourceInput) -> AsyncIterator[SourceRecord]:
    for account_id in {s.gsc_account_id for s in given.sites}:
        yield AccountRefresh(account_id, at=_now())
    for site in given.sites:
        window = given.windows[site.id]
        yield GscDay(site.id, window.start, 1, 10, 0.1, 4.0, final=True)
        yield GscDay(site.id, window.end, 2, 20, 0.1, 3.0, final=False)


def _now():
    from datetime import datetime

    return datetime.now(UTC)


SOURCES = {"matomo": fake_matomo, "gsc": fake_gsc}


@pytest.fixture
async def portfolio(conn) -> dict[str, int]:
    account = await add_account(conn, "a@example.com", "rt")
    return {
        "example.com": await add_site(
            conn, "example.com", matomo_site_id=1, gsc_account_id=account
        ),
        "broken.com": await add_site(conn, "broken.com", matomo_site_id=9),
        "gsc-only.com": await add_site(conn, "gsc-only.com", gsc_account_id=account),
        "bare.com": await add_site(conn, "bare.com"),
    }


async def test_run_joins_sources_and_records_a_partial_run(db, conn, portfolio) -> None:
    outcome = await run_job(settings_for(db), RunRequest(WINDOW), sources=SOURCES)
    assert outcome.status == "partial" and outcome.exit_code == 1
    assert outcome.sites_total == 4
    rows = await stored_rows(conn)
    site = portfolio["example.com"]
    assert rows[(site, "2024-12-30")]["matomo_visits"] == site * 10 + 30
    assert rows[(site, "2024-12-30")]["gsc_final"] is True
    assert rows[(site, "2025-01-02")]["gsc_final"] is False
    assert rows[(site, "2024-12-31")]["gsc_clicks"] is None
    assert not any(key[0] == portfolio["broken.com"] for key in rows)
    assert not any(key[0] == portfolio["bare.com"] for key in rows)
    run = await conn.fetchrow("select * from aggregator_runs")
    assert run["status"] == "partial"
    assert run["rows_upserted"] == outcome.rows_upserted == len(rows)
    assert "broken.com" in run["errors"]
    assert await conn.fetchval("select count(last_refresh_at) from gsc_accounts") == 1


async def test_clean_run_is_ok_and_rerun_is_idempotent(db, conn, portfolio) -> None:
    await conn.execute("update sites set matomo_site_id = null where domain = 'broken.com'")
    first = await run_job(settings_for(db), RunRequest(WINDOW), sources=SOURCES)
    assert first.status == "ok" and first.exit_code == 0
    before = await stored_rows(conn)
    await run_job(settings_for(db), RunRequest(WINDOW), sources=SOURCES)
    assert await stored_rows(conn) == before


async def test_dry_run_writes_nothing(db, conn, portfolio) -> None:
    outcome = await run_job(settings_for(db), RunRequest(WINDOW, dry_run=True), sources=SOURCES)
    assert outcome.rows and outcome.rows_upserted == 0
    assert await conn.fetchval("select count(*) from daily_analytics") == 0
    assert await conn.fetchval("select count(*) from aggregator_runs") == 0
    assert await conn.fetchval("select count(last_refresh_at) from gsc_accounts") == 0


async def test_source_and_site_filters(db, conn, portfolio) -> None:
    request = RunRequest(WINDOW, sources=("gsc",), domains=("GSC-only.com",))
    outcome = await run_job(settings_for(db), request, sources=SOURCES)
    assert outcome.status == "ok"
    rows = await stored_rows(conn)
    assert {key[0] for key in rows} == {portfolio["gsc-only.com"]}
    assert all(row["matomo_visits"] is None for row in rows.values())


async def test_site_filter_ignores_case_a_trailing_dot_and_spaces(db, conn, portfolio) -> None:
    await conn.execute("update sites set domain = ' GSC-Only.COM. ' where domain = 'gsc-only.com'")
    request = RunRequest(WINDOW, sources=("gsc",), domains=(" gsc-only.com. ",), dry_run=True)
    outcome = await run_job(settings_for(db), request, sources=SOURCES)
    assert set(outcome.sites) == {portfolio["gsc-only.com"]}


async def test_unknown_site_is_a_usage_error(db, portfolio) -> None:
    with pytest.raises(UsageError, match=r"nope\.com is not a monitored site"):
        await run_job(settings_for(db), RunRequest(WINDOW, domains=("nope.com",)), sources=SOURCES)


async def test_an_unconfigured_source_that_sites_need_stops_the_run(db, portfolio) -> None:
    with pytest.raises(ConfigError, match="MATOMO_URL and MATOMO_TOKEN"):
        await run_job(settings_for(db, matomo_url=None), RunRequest(WINDOW), sources=SOURCES)


async def test_a_crashing_source_fails_alone(db, conn, portfolio) -> None:
    async def crashing(given: SourceInput):
        yield GscDay(given.sites[0].id, given.start, 1, 1, 1.0, 1.0, True)
        raise RuntimeError("token=very-secret in a bug")

    outcome = await run_job(
        settings_for(db), RunRequest(WINDOW), sources={"matomo": fake_matomo, "gsc": crashing}
    )
    assert outcome.status == "partial"
    crash = [e for e in outcome.errors if e.source == "gsc"]
    assert crash and "RuntimeError" in crash[0].error and "very-secret" not in crash[0].error
    rows = await stored_rows(conn)
    assert rows[(portfolio["example.com"], "2024-12-30")]["matomo_visits"] is not None
    assert rows[(portfolio["example.com"], "2024-12-30")]["gsc_clicks"] == 1


async def test_a_stop_signal_keeps_what_was_fetched(db, conn, portfolio) -> None:
    stop = asyncio.Event()

    async def slow(given: SourceInput):
        yield MatomoDay(given.sites[0].id, given.start, 5, 6)
        stop.set()  # the operator's SIGTERM arrives mid-run
        await asyncio.Event().wait()

    outcome = await run_job(
        settings_for(db),
        RunRequest(WINDOW, sources=("matomo",)),
        sources={"matomo": slow},
        stop=stop,
    )
    assert outcome.interrupted and "signal" in outcome.interrupted
    assert outcome.status == "partial" and outcome.exit_code == 1
    rows = await stored_rows(conn)
    assert rows[(portfolio["example.com"], "2024-12-30")]["matomo_visits"] == 5
    assert await conn.fetchval("select status from aggregator_runs") == "partial"


async def test_the_run_deadline_cuts_a_hanging_source(db, conn, portfolio) -> None:
    async def hanging(given: SourceInput):
        await asyncio.Event().wait()
        yield  # pragma: no cover - makes this an async generator

    outcome = await run_job(
        settings_for(db, run_deadline=0.2),
        RunRequest(WINDOW, sources=("matomo",)),
        sources={"matomo": hanging},
    )
    assert outcome.status == "failed" and "AGGREGATOR_DEADLINE_SECONDS" in outcome.interrupted
    assert await conn.fetchval("select status from aggregator_runs") == "failed"


async def test_a_second_run_waits_for_the_lease_then_gives_up(db, conn, portfolio) -> None:
    # A live run elsewhere: its lease is renewed (here: far in the future).
    holder = await storage.start_run(conn, START, END, 4, lease_seconds=3600, owner="cron-box:41")
    with pytest.raises(storage.RunLocked, match="AGGREGATOR_LOCK_WAIT_SECONDS") as caught:
        await run_job(settings_for(db, lock_wait=0.2), RunRequest(WINDOW), sources=SOURCES)
    assert f"run {holder} on cron-box:41" in str(caught.value)
    assert "\n" not in str(caught.value)
    # A dry run writes nothing, so it does not queue behind a real run.
    dry = await run_job(
        settings_for(db, lock_wait=0.2), RunRequest(WINDOW, dry_run=True), sources=SOURCES
    )
    assert dry.rows
    assert await conn.fetchval("select count(*) from aggregator_runs") == 1
    assert await conn.fetchval("select count(*) from daily_analytics") == 0

    # Its process dies: the lease is no longer renewed and runs out; the next run closes the
    # row as failed, saying so, and goes ahead.
    await conn.execute(
        "update aggregator_runs set lease_until = now() - interval '1 second' where id = $1",
        holder,
    )
    outcome = await run_job(settings_for(db), RunRequest(WINDOW), sources=SOURCES)
    assert outcome.rows_upserted > 0
    dead = await conn.fetchrow("select * from aggregator_runs where id = $1", holder)
    assert dead["status"] == "failed" and dead["finished_at"] is not None
    assert "stopped renewing its lease" in json.loads(dead["errors"])[-1]["error"]
    assert await conn.fetchval("select count(*) from aggregator_runs where status = 'running'") == 0


async def test_a_holder_busy_in_a_long_flush_is_waited_for_not_an_error(
    db, conn, portfolio
) -> None:
    """A live run's row is locked while its flush commits (and its lease may look expired
    meanwhile): a second run waits on, then says another run holds the lease."""
    holder = await storage.start_run(conn, START, END, 4, lease_seconds=0.001)
    busy = await asyncpg.connect(db)
    try:
        async with busy.transaction():
            await busy.execute("select 1 from aggregator_runs where id = $1 for update", holder)
            with pytest.raises(storage.RunLocked, match="another aggregator run"):
                await run_job(settings_for(db, lock_wait=0.2), RunRequest(WINDOW), sources=SOURCES)
    finally:
        await busy.close()
    assert await conn.fetchval("select status from aggregator_runs where id = $1", holder) == (
        "running"
    )


class RecordingProgress:
    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.last: dict[str, tuple[int, int]] = {}

    def start(self, source: str, total: int) -> None:
        self.totals[source] = total

    def update(self, source: str, done: int, errors: int) -> None:
        self.last[source] = (done, errors)


async def test_progress_counts_sites_done_and_failed_per_source(db, portfolio) -> None:
    progress = RecordingProgress()
    await run_job(settings_for(db), RunRequest(WINDOW), sources=SOURCES, progress=progress)
    assert progress.totals == {"matomo": 2, "gsc": 2}
    assert progress.last == {"matomo": (2, 1), "gsc": (2, 0)}
