"""Store while fetching, in-process: flushes split anywhere store the same rows, a deleted
site loses only its own rows, and a store that refuses a flush still leaves a closed run row."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from aggregator import flushing, pipeline, storage
from aggregator.demo import simulated_settings
from aggregator.model import AccountRefresh, GscDay, MatomoDay, SiteError, SourceRecord
from aggregator.pipeline import RunRequest, SourceInput, run_job
from aggregator.simulators import portfolio as world
from tests.factories import add_account, add_site, seed
from tests.test_pipeline import SOURCES, WINDOW, _now, settings_for

SOURCE_COLUMNS = (
    "site_id, date, matomo_visits, matomo_actions, gsc_clicks, gsc_impressions, gsc_ctr,"
    " gsc_position, gsc_final"
)


async def _values(conn: asyncpg.Connection) -> list[tuple]:
    rows = await conn.fetch(f"select {SOURCE_COLUMNS} from daily_analytics order by 1, 2")
    return [tuple(r) for r in rows]


async def _portfolio(conn: asyncpg.Connection) -> list[int]:
    account = await add_account(conn, "a@example.com", "rt")
    return [
        await add_site(conn, f"site{n}.com", matomo_site_id=n, gsc_account_id=account)
        for n in range(1, 5)
    ]


async def test_halves_of_a_day_in_different_flushes_store_the_same_rows(db, conn) -> None:
    await _portfolio(conn)
    # One row per flush: every site-day's Matomo and GSC halves land in different flushes.
    split = await run_job(settings_for(db, flush_rows=1), RunRequest(WINDOW), sources=SOURCES)
    assert split.status == "ok"
    in_pieces = await _values(conn)
    await conn.execute("delete from daily_analytics")
    whole = await run_job(settings_for(db), RunRequest(WINDOW), sources=SOURCES)
    assert whole.status == "ok"
    assert await _values(conn) == in_pieces
    # Matomo's and GSC's halves met in one row for the days both sources served.
    assert any(r[2] is not None and r[8] is not None for r in in_pieces)
    runs = await conn.fetch("select status, rows_upserted from aggregator_runs order by id")
    assert [r["status"] for r in runs] == ["ok", "ok"]
    assert runs[0]["rows_upserted"] == split.rows_upserted > runs[1]["rows_upserted"]


async def test_a_site_deleted_mid_run_loses_only_its_own_rows(db, conn) -> None:
    doomed, *kept = await _portfolio(conn)
    deleted = asyncio.Event()

    async def matomo_then_delete(given: SourceInput) -> AsyncIterator[SourceRecord]:
        days = WINDOW.days()
        for site in given.sites:
            yield MatomoDay(site.id, days[0], 1, 2)
        # The dashboard deletes a site while the run goes on; later rows of it still arrive.
        await conn.execute("delete from sites where id = $1", doomed)
        deleted.set()
        for site in given.sites:
            for day in days[1:]:
                yield MatomoDay(site.id, day, 3, 4)

    async def gsc_after_delete(given: SourceInput) -> AsyncIterator[SourceRecord]:
        await deleted.wait()
        account = given.sites[0].gsc_account_id
        yield AccountRefresh(account, at=_now(), error="invalid_grant: token revoked")
        yield SiteError(given.sites[0].domain, "gsc", "token revoked")

    outcome = await run_job(
        settings_for(db, flush_rows=2),
        RunRequest(WINDOW),
        sources={"matomo": matomo_then_delete, "gsc": gsc_after_delete},
    )
    assert outcome.status == "partial" and outcome.fatal is None
    stored = await conn.fetch("select site_id, count(*) from daily_analytics group by 1")
    assert dict(stored) == {site: len(WINDOW.days()) for site in kept}
    assert await conn.fetchval("select last_error from gsc_accounts") == (
        "invalid_grant: token revoked"
    )
    run = await conn.fetchrow("select status, finished_at from aggregator_runs")
    assert run["status"] == "partial" and run["finished_at"] is not None


async def test_a_trigger_refusing_a_flush_closes_the_run_as_failed(db, conn) -> None:
    await _portfolio(conn)
    await conn.execute(
        """
        create function refuse() returns trigger language plpgsql as
        $$ begin raise exception 'daily_analytics is read-only during maintenance'; end $$;
        create trigger refuse before insert or update on daily_analytics
        for each row execute function refuse();
        """
    )
    outcome = await run_job(settings_for(db), RunRequest(WINDOW), sources=SOURCES)
    assert outcome.status == "failed" and outcome.exit_code == 1
    assert "read-only during maintenance" in outcome.fatal and "\n" not in outcome.fatal
    run = await conn.fetchrow("select status, finished_at, errors from aggregator_runs")
    assert run["status"] == "failed" and run["finished_at"] is not None
    assert any(
        e["source"] == "store" and "read-only" in e["error"] for e in json.loads(run["errors"])
    )


async def test_statement_timeout_in_a_later_flush_closes_the_run_as_partial(db, conn) -> None:
    """The first flushes commit; then a table lock makes the next one wait past its bound."""
    sites = await _portfolio(conn)
    stored_first = asyncio.Event()
    release = asyncio.Event()

    async def slow_matomo(given: SourceInput) -> AsyncIterator[SourceRecord]:
        for day in WINDOW.days():
            yield MatomoDay(sites[0], day, 1, 1)
        stored_first.set()
        await release.wait()
        yield MatomoDay(sites[1], WINDOW.start, 1, 1)

    async def blocker() -> None:
        await stored_first.wait()
        for _ in range(500):  # the full table's flush, started in the background, commits
            if await conn.fetchval("select count(*) from daily_analytics") == len(WINDOW.days()):
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the first flush was never stored")
        locker = await asyncpg.connect(db)
        async with locker.transaction():
            await locker.execute("lock table daily_analytics in exclusive mode")
            release.set()
            # Held past the job's statement bound (the stop grace: the deadline is near).
            await asyncio.sleep(pipeline.STOP_GRACE_SECONDS + 1)
        await locker.close()

    blocking = asyncio.create_task(blocker())
    outcome = await run_job(
        settings_for(db, flush_rows=len(WINDOW.days()), run_deadline=1.0),
        RunRequest(WINDOW, sources=("matomo",)),
        sources={"matomo": slow_matomo},
    )
    await blocking
    assert outcome.status == "partial", outcome.errors
    assert "timeout" in outcome.fatal.lower() or "canceling" in outcome.fatal.lower()
    run = await conn.fetchrow("select status, finished_at, rows_upserted from aggregator_runs")
    assert run["status"] == "partial" and run["finished_at"] is not None
    assert run["rows_upserted"] == len(WINDOW.days())


async def test_a_flush_failing_with_a_bug_stops_the_run_like_a_refused_one(
    db, conn, monkeypatch
) -> None:
    """Not the database but our own code fails in a background flush (a ValueError from the
    staging, say): the run stops, keeps what earlier flushes stored and closes its row with
    the error, instead of the task dying unseen while the run goes on."""
    portfolio = await seed(db, world.make_portfolio(60, 2))
    upsert = storage.stage_and_upsert
    flushes = 0
    failing_task: list[str] = []

    async def fails_after_the_first(conn: asyncpg.Connection, records) -> storage.Flushed:
        nonlocal flushes
        flushes += 1
        if flushes > 1:
            failing_task.append(asyncio.current_task().get_name())
            raise ValueError("a staged row the upsert cannot take")
        return await upsert(conn, records)

    monkeypatch.setattr(storage, "stage_and_upsert", fails_after_the_first)
    today = WINDOW.end + timedelta(days=1)
    async with (
        world.matomo_simulator(portfolio, today=today) as matomo,
        world.google_simulator(portfolio, today=today) as google,
    ):
        # 60 sites x 4 days: Matomo's one answer alone fills the table many times over, so
        # flushes start in the background while Search Console still fetches.
        settings = simulated_settings(db, matomo.url, google.url, flush_rows=20)
        outcome = await run_job(settings, RunRequest(WINDOW))

    # The flush that failed ran in the background (started for a full table); it stopped
    # the run: no flush was tried after it.
    assert failing_task == ["flush"] and flushes == 2
    assert outcome.status == "partial" and outcome.exit_code == 1
    assert re.fullmatch(
        r"could not store \d+ fetched rows: ValueError: a staged row the upsert cannot take",
        outcome.fatal,
    )
    run = await conn.fetchrow(
        "select status, finished_at, rows_upserted, errors from aggregator_runs"
    )
    assert run["status"] == "partial" and run["finished_at"] is not None
    assert {"site": "(run)", "source": "store", "error": outcome.fatal} in json.loads(run["errors"])
    # The first flush's rows stay stored, exactly those the run row counts.
    stored = await conn.fetchval("select count(*) from daily_analytics")
    assert 0 < stored == run["rows_upserted"] == outcome.rows_upserted


async def _stored_while_running(
    conn: asyncpg.Connection, run: asyncio.Task, condition: str, wanted: int
) -> tuple[int, bool]:
    """Poll (bounded: 10 s) until `wanted` rows meeting `condition` are stored or the run
    ends: how many were stored, and whether the run was still going then."""
    for _ in range(1000):
        stored = await conn.fetchval(f"select count(*) from daily_analytics where {condition}")
        if stored == wanted or run.done():
            break
        await asyncio.sleep(0.01)
    return stored, not run.done()


def _one_source_then_the_other(hang: bool = False) -> dict:
    """Matomo delivers every site-day first; Search Console then completes them (or, with
    `hang`, never answers while it is still expected to)."""
    gsc_waiting, matomo_done = asyncio.Event(), asyncio.Event()

    async def matomo(given: SourceInput) -> AsyncIterator[SourceRecord]:
        # Search Console is under way (its wake-up comes after the flush that Matomo's last
        # half starts, so that flush finds every half still expected).
        await gsc_waiting.wait()
        for site in given.sites:
            for day in WINDOW.days():
                yield MatomoDay(site.id, day, site.id, 2 * site.id)
        matomo_done.set()

    async def gsc(given: SourceInput) -> AsyncIterator[SourceRecord]:
        gsc_waiting.set()
        await matomo_done.wait()
        if hang:
            await asyncio.Event().wait()
        for site in given.sites:
            for day in WINDOW.days():
                yield GscDay(site.id, day, 1, 10, 0.1, 2.0, True)

    return {"matomo": matomo, "gsc": gsc}


async def test_a_day_whose_halves_arrive_a_flush_apart_is_written_once(db, conn) -> None:
    sites = await _portfolio(conn)
    days = len(sites) * len(WINDOW.days())
    # The table is full (a flush starts) exactly when Matomo has delivered every half.
    held = await run_job(
        settings_for(db, flush_rows=days), RunRequest(WINDOW), sources=_one_source_then_the_other()
    )
    assert held.status == "ok"
    assert held.rows_upserted == days  # each day sent once, not once per half
    stored = await _values(conn)
    assert len(stored) == days and all(r[2] is not None and r[8] is True for r in stored)
    await conn.execute("delete from daily_analytics")
    whole = await run_job(
        settings_for(db), RunRequest(WINDOW), sources=_one_source_then_the_other()
    )
    assert whole.rows_upserted == days
    assert await _values(conn) == stored


async def test_a_half_waiting_for_its_other_half_is_stored_within_the_flush_interval(
    db, conn
) -> None:
    """Search Console never answers while the run goes on: Matomo's halves, held for it, are
    stored anyway once they have waited AGGREGATOR_FLUSH_SECONDS, before the run ends."""
    sites = await _portfolio(conn)
    days = len(sites) * len(WINDOW.days())
    stop = asyncio.Event()
    run = asyncio.create_task(
        run_job(
            settings_for(db, flush_rows=10, flush_seconds=0.3),
            RunRequest(WINDOW),
            sources=_one_source_then_the_other(hang=True),
            stop=stop,
        )
    )
    stored, still_running = await _stored_while_running(
        conn, run, "matomo_visits is not null", days
    )
    stop.set()
    outcome = await run
    assert still_running, outcome.errors
    assert stored == days
    assert outcome.status == "partial" and "signal" in outcome.interrupted


async def test_rows_ready_to_store_are_stored_within_a_second_not_the_flush_interval(
    db, conn, monkeypatch
) -> None:
    """Both halves of every day are in while the sources are still open: they are stored by
    an eager flush, long before AGGREGATOR_FLUSH_SECONDS (an hour here), not after the run."""
    monkeypatch.setattr(flushing, "EAGER_SECONDS", 0.05)
    sites = await _portfolio(conn)
    days = len(sites) * len(WINDOW.days())
    release = asyncio.Event()

    async def matomo(given: SourceInput) -> AsyncIterator[SourceRecord]:
        for site in given.sites:
            for day in WINDOW.days():
                yield MatomoDay(site.id, day, site.id, 2 * site.id)
        await release.wait()

    async def gsc(given: SourceInput) -> AsyncIterator[SourceRecord]:
        for site in given.sites:
            for day in WINDOW.days():
                yield GscDay(site.id, day, 1, 10, 0.1, 2.0, True)
        await release.wait()

    run = asyncio.create_task(
        run_job(
            settings_for(db, flush_seconds=3600),
            RunRequest(WINDOW),
            sources={"matomo": matomo, "gsc": gsc},
        )
    )
    stored, still_running = await _stored_while_running(
        conn, run, "matomo_visits is not null and gsc_clicks is not null", days
    )
    release.set()
    outcome = await run
    assert still_running and stored == days
    assert outcome.status == "ok" and outcome.rows_upserted == days  # each day written once
