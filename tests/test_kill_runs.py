"""SIGKILL at random moments, twenty times, then one normal run: `aggregator run` as a real
process against the simulators and a real Postgres, flushing every 0.1 s.

Each flush is made to last at least 20 ms (a statement trigger sleeps), so random kills land
both while fetching and in the middle of a flush transaction; the test checks it saw both.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import uuid
from datetime import date, datetime

import asyncpg

from aggregator import migrations
from aggregator.simulators import portfolio as world
from tests.conftest import fresh_schema
from tests.factories import seed
from tests.test_signals import _google, finish, job_environment, run_job_process, start_job

FROM, TO = date(2025, 5, 27), date(2025, 6, 9)
KILLS = 20
SOURCE_COLUMNS = (
    "site_id, date, matomo_visits, matomo_actions, gsc_clicks, gsc_impressions, gsc_ctr,"
    " gsc_position, gsc_final"
)
SLOW_FLUSHES = """
create function slow_flush() returns trigger language plpgsql as
$$ begin perform pg_sleep(0.02); return null; end $$;
create trigger slow_flush before insert on daily_analytics
for each statement execute function slow_flush();
"""


async def _values(conn: asyncpg.Connection) -> dict[tuple, tuple]:
    rows = await conn.fetch(f"select {SOURCE_COLUMNS} from daily_analytics")
    return {(r[0], r[1]): tuple(r)[2:] for r in rows}


def _flushes(stderr: str) -> list[dict]:
    events = []
    for line in stderr.splitlines():
        if '"store.flushed"' in line:
            events.append(json.loads(line))
    return events


async def test_twenty_random_kills_then_a_run_store_exactly_a_clean_runs_rows(
    server_dsn, db, conn, tmp_path
):
    portfolio = await seed(db, world.make_portfolio(30, 2))
    await conn.execute(SLOW_FLUSHES)
    name = f"kill-{uuid.uuid4().hex[:8]}"
    dsn = f"{db}&application_name={name}"
    window = ("--from", f"{FROM}", "--to", f"{TO}")
    chance = random.Random()
    seen_mid_flush = seen_fetching = 0
    async with (
        world.matomo_simulator(portfolio, today=TO, latency=0.08) as matomo,
        _google(portfolio, latency=0.01) as google,
    ):

        def environment(database_url: str, **extra: str) -> dict[str, str]:
            return job_environment(
                database_url,
                matomo.url,
                google.url,
                # About 2 s of fetching: 10 Matomo batches one at a time, 30 paced queries.
                MATOMO_BATCH_SIZE="3",
                MATOMO_CONCURRENCY="1",
                GSC_MAX_QPS_PER_CLIENT="20",
                AGGREGATOR_FLUSH_SECONDS="0.1",
                AGGREGATOR_FLUSH_ROWS="60",
                **extra,
            )

        # The reference: one clean run into a schema of its own.
        async with fresh_schema(server_dsn) as clean_dsn:
            clean = await asyncpg.connect(clean_dsn)
            try:
                await migrations.apply_migrations(clean)
                await seed(clean_dsn, portfolio)
                result = await run_job_process(environment(clean_dsn), tmp_path, *window)
                assert result.returncode == 0, result.stderr
                reference = await _values(clean)
            finally:
                await clean.close()

        killed_env = environment(dsn, AGGREGATOR_LEASE_SECONDS="0.6")
        for kill in range(KILLS):
            if kill % 2 == 0:  # every other run starts from an empty table
                await conn.execute("delete from daily_analytics")
            process = await start_job(killed_env, tmp_path, *window)
            if kill % 4 == 1:
                # Every fourth kill lands inside a flush for sure: catching one at a random
                # moment is a race that a loaded machine loses.
                mid_flush = await _flush_under_way(conn, name)
            else:
                await asyncio.sleep(chance.uniform(0.4, 1.6))  # the kill's random moment
                mid_flush = await _flushing(conn, name)
            assert process.returncode is None, "the run ended before its kill"
            process.send_signal(signal.SIGKILL)
            seen_mid_flush += bool(mid_flush)
            result = await finish(process, seconds=10)
            assert result.returncode == -signal.SIGKILL
            flushes = _flushes(result.stderr)
            seen_fetching += not mid_flush
            # Every flush that reported its commit is there, exactly; nothing else is wrong.
            for flushed in flushes:
                at = datetime.fromisoformat(flushed["at"])
                counts = await conn.fetchrow(
                    "select count(*) filter (where matomo_updated_at = $1) as matomo,"
                    " count(*) filter (where gsc_updated_at = $1) as gsc from daily_analytics",
                    at,
                )
                assert (counts["matomo"], counts["gsc"]) == (flushed["matomo"], flushed["gsc"])
            stored = await _values(conn)
            for key, values in stored.items():
                expected = reference[key]
                assert values[:2] in (expected[:2], (None, None)), key
                assert values[2:] in (expected[2:], (None,) * 5), key

        result = await run_job_process(environment(dsn), tmp_path, *window)
    assert result.returncode == 0, result.stderr
    assert await _values(conn) == reference
    runs = await conn.fetch("select status, finished_at, errors from aggregator_runs order by id")
    assert all(r["finished_at"] is not None for r in runs)
    assert runs[-1]["status"] == "ok"
    killed = runs[:-1]
    assert killed and all(r["status"] == "failed" for r in killed)
    assert all("stopped renewing its lease" in json.loads(r["errors"])[-1]["error"] for r in killed)
    assert seen_mid_flush >= KILLS // 4 and seen_fetching >= 2, (seen_mid_flush, seen_fetching)


async def _flushing(conn: asyncpg.Connection, name: str) -> bool:
    """Whether the job's connection is inside the upsert statement right now."""
    return bool(
        await conn.fetchval(
            "select count(*) from pg_stat_activity where application_name = $1"
            " and state = 'active' and query ilike '%insert into daily_analytics%'",
            name,
        )
    )


async def _flush_under_way(conn: asyncpg.Connection, name: str) -> bool:
    """Poll (bounded, 10 s) until the job is inside a flush's upsert."""
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:
        if await _flushing(conn, name):
            return True
        await asyncio.sleep(0.002)
    return False
