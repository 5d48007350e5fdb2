"""One run at a time, provably: `aggregator run` as real processes against the simulators,
straight to Postgres and through a real PgBouncer in transaction mode, while the database
does what production databases do to long jobs: idle-in-transaction timeouts,
`pg_terminate_backend`, a pooler restart. The first run keeps its lease and stores
everything; a second run meanwhile waits, then exits 2 with one line. A run whose lease was
taken over stops writing and exits 1 with one line. SIGTERM ends a flush blocked on a table
lock within seconds and still closes the run row. A non-superuser owner is enough.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import date
from urllib.parse import urlsplit

import asyncpg
import pytest

from aggregator import migrations, storage
from aggregator.lease import seconds_text
from aggregator.pipeline import RunRequest, run_job
from aggregator.simulators import portfolio as world
from tests.factories import seed
from tests.test_pgbouncer import Bouncer
from tests.test_pipeline import SOURCES, WINDOW, settings_for
from tests.test_signals import (
    _google,
    finish,
    job_environment,
    run_job_process,
    start_job,
    wait_for,
    wait_for_log_event,
)

FROM, TO = date(2025, 6, 1), date(2025, 6, 9)
DAYS = (TO - FROM).days + 1
Fault = Callable[[], Awaitable[None]]


def _slow_run(database_url: str, matomo_url: str, google_url: str, **extra: str) -> dict:
    """A run of about eight seconds that flushes every 0.2 s."""
    settings = {
        "MATOMO_BATCH_SIZE": "3",
        "MATOMO_CONCURRENCY": "1",
        "GSC_MAX_QPS_PER_CLIENT": "4",
        "AGGREGATOR_FLUSH_SECONDS": "0.2",
        "AGGREGATOR_LEASE_SECONDS": "6",
    }
    return job_environment(database_url, matomo_url, google_url, **{**settings, **extra})


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("aggregator: error:")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


async def _hold_the_lease_through(
    job_dsn: str, check: asyncpg.Connection, faults: list[Fault], tmp_path
) -> None:
    """Run A; after each fault a run B must find A's lease held, wait 0.3 s and exit 2. Then A
    finishes as if nothing happened: every row stored, one run row, `ok`."""
    portfolio = await seed(job_dsn, world.make_portfolio(30, 2))
    async with (
        world.matomo_simulator(portfolio, today=TO, latency=0.1) as matomo,
        _google(portfolio) as google,
    ):
        env = _slow_run(job_dsn, matomo.url, google.url)
        first = await start_job(env, tmp_path, "--from", f"{FROM}", "--to", f"{TO}")

        async def flushed() -> bool:
            return bool(await check.fetchval("select count(*) from daily_analytics"))

        await wait_for(flushed, "the first flush", first)
        for fault in faults:
            await fault()
            second = await run_job_process(
                {**env, "AGGREGATOR_LOCK_WAIT_SECONDS": "0.3"},
                tmp_path,
                "--from",
                f"{FROM}",
                "--to",
                f"{TO}",
            )
            assert first.returncode is None, "the first run ended before the second one did"
            assert second.returncode == 2, second.stderr[-2000:]
            assert "another aggregator run" in _one_error_line(second.stderr)
        result = await finish(first, seconds=30)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = await check.fetch("select status, rows_upserted from aggregator_runs")
    assert [r["status"] for r in runs] == ["ok"]
    matomo_sites = sum(1 for s in portfolio.sites if s.matomo_site_id is not None)
    assert (
        await check.fetchval("select count(*) from daily_analytics where matomo_visits is not null")
        == matomo_sites * DAYS
    )
    gsc_sites = {s.id for s in portfolio.sites if s.gsc_account_id is not None}
    assert (
        set(
            await check.fetchval(
                "select array_agg(distinct site_id) from daily_analytics where gsc_final"
            )
        )
        == gsc_sites
    )


async def test_the_lease_survives_idle_timeouts_and_killed_connections(db, conn, tmp_path):
    name = f"lease-{uuid.uuid4().hex[:8]}"
    # Postgres ends any session idle in a transaction for 300 ms (a common DBA setting).
    job_dsn = f"{db}&idle_in_transaction_session_timeout=300&application_name={name}"

    async def idle_timeout_passes() -> None:
        await asyncio.sleep(0.6)  # the fault: longer than the idle-in-transaction timeout

    async def terminate_the_jobs_connections() -> None:
        killed = await conn.fetchval(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity"
            " where application_name = $1",
            name,
        )
        assert killed >= 1

    await _hold_the_lease_through(
        job_dsn, conn, [idle_timeout_passes, terminate_the_jobs_connections], tmp_path
    )


async def test_the_lease_survives_through_pgbouncer_and_its_restart(pgbouncer: Bouncer, tmp_path):
    check = await asyncpg.connect(pgbouncer.direct)
    try:
        await migrations.apply_migrations(check)
        await check.execute(
            f"alter database {pgbouncer.database} set idle_in_transaction_session_timeout = 300"
        )

        async def idle_timeout_passes() -> None:
            await asyncio.sleep(0.6)  # the fault: longer than the idle-in-transaction timeout

        async def terminate_the_server_connections() -> None:
            await check.fetchval(
                "select count(pg_terminate_backend(pid)) from pg_stat_activity"
                " where datname = current_database() and pid <> pg_backend_pid()"
            )

        async def restart_the_pooler() -> None:
            await asyncio.to_thread(pgbouncer.restart)

        await _hold_the_lease_through(
            pgbouncer.dsn(),
            check,
            [idle_timeout_passes, terminate_the_server_connections, restart_the_pooler],
            tmp_path,
        )
    finally:
        await check.execute(
            f"alter database {pgbouncer.database} reset idle_in_transaction_session_timeout"
        )
        await check.close()


async def test_a_run_whose_lease_was_taken_over_stops_writing_and_exits_1(
    db, conn, seeded_small, tmp_path
):
    portfolio = seeded_small
    async with (
        world.matomo_simulator(portfolio, today=TO, latency=0.1) as matomo,
        _google(portfolio) as google,
    ):
        env = _slow_run(db, matomo.url, google.url, AGGREGATOR_LEASE_SECONDS="30")
        first = await start_job(env, tmp_path, "--from", f"{FROM}", "--to", f"{TO}")

        async def flushed() -> bool:
            return bool(await conn.fetchval("select count(*) from daily_analytics"))

        await wait_for(flushed, "the first flush", first)
        # What another run does once this run's lease has run out (its heartbeats lost):
        # close its row and take the lease.
        await conn.execute(
            "update aggregator_runs set status = 'failed', finished_at = now(), lease_until = null"
        )
        await conn.execute(
            "insert into aggregator_runs (status, lease_until, lease_owner)"
            " values ('running', now() + interval '1 hour', 'the other run')"
        )
        taken_over_at = await conn.fetchval("select now()")
        result = await finish(first, seconds=15)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "lost its lease" in _one_error_line(result.stderr)
    assert (
        await conn.fetchval(
            "select count(*) from daily_analytics"
            " where greatest(matomo_updated_at, gsc_updated_at) > $1",
            taken_over_at,
        )
        == 0
    )
    statuses = await conn.fetch("select status, lease_owner from aggregator_runs order by id")
    assert [tuple(r) for r in statuses][1] == ("running", "the other run")
    assert statuses[0]["status"] == "failed"


async def test_a_run_whose_heartbeat_is_refused_stops_with_that_error_and_exits_1(
    db, conn, seeded_small, tmp_path
):
    """A renewal the database refuses (not a dropped connection) stops the run like a lost
    lease, instead of killing the heartbeat unseen while the run goes on unrenewed."""
    portfolio = seeded_small
    async with (
        world.matomo_simulator(portfolio, today=TO, latency=0.1) as matomo,
        _google(portfolio) as google,
    ):
        # No flush before the end: only the heartbeat renews the lease meanwhile.
        env = _slow_run(
            db,
            matomo.url,
            google.url,
            AGGREGATOR_LEASE_SECONDS="1.5",
            AGGREGATOR_FLUSH_SECONDS="600",
        )
        process = await start_job(env, tmp_path, "--from", f"{FROM}", "--to", f"{TO}")

        async def leased() -> bool:
            return bool(await conn.fetchval("select count(*) from aggregator_runs"))

        await wait_for(leased, "the lease", process)
        # Renewing a running row is refused as a revoked privilege would be; closing it is not.
        await conn.execute(
            """
            create function refuse_renewal() returns trigger language plpgsql as $$
            begin raise exception 'renewal refused' using errcode = 'insufficient_privilege';
            end $$;
            create trigger refuse_renewal before update on aggregator_runs
            for each row when (new.status = 'running') execute function refuse_renewal();
            """
        )
        result = await finish(process, seconds=15)
    assert result.returncode == 1, result.stderr[-2000:]
    line = _one_error_line(result.stderr)
    assert "lease heartbeat failed (InsufficientPrivilegeError)" in line, line
    run = await conn.fetchrow("select status, finished_at, errors from aggregator_runs")
    assert run["status"] != "running" and run["finished_at"] is not None
    assert any(
        "lease heartbeat failed (InsufficientPrivilegeError)" in e["error"]
        for e in json.loads(run["errors"])
    )


async def test_sigterm_ends_a_flush_blocked_on_a_table_lock_and_closes_the_run(
    db, conn, seeded_small, tmp_path
):
    portfolio = seeded_small
    name = f"blocked-{uuid.uuid4().hex[:8]}"
    locker = await asyncpg.connect(db)
    try:
        async with (
            world.matomo_simulator(portfolio, today=TO, latency=0.1) as matomo,
            _google(portfolio) as google,
        ):
            env = _slow_run(f"{db}&application_name={name}", matomo.url, google.url)
            process = await start_job(env, tmp_path, "--from", f"{FROM}", "--to", f"{TO}")

            async def flushed() -> bool:
                return bool(await conn.fetchval("select count(*) from daily_analytics"))

            await wait_for(flushed, "the first flush", process)
            transaction = locker.transaction()
            await transaction.start()
            await locker.execute("lock table daily_analytics in exclusive mode")

            async def blocked() -> bool:
                return bool(
                    await conn.fetchval(
                        "select count(*) from pg_stat_activity where application_name = $1"
                        " and wait_event_type = 'Lock'",
                        name,
                    )
                )

            await wait_for(blocked, "a flush waiting for the table lock", process)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            result = await finish(process, seconds=15)
            stopped_after = time.monotonic() - signalled
            # The run row is closed while the table is still locked.
            run = await conn.fetchrow("select status, finished_at, errors from aggregator_runs")
            await transaction.rollback()
    finally:
        await locker.close()
    assert stopped_after < 6, f"exited {stopped_after:.1f}s after SIGTERM"
    assert result.returncode == 1, result.stderr[-2000:]
    assert "could not store" in _one_error_line(result.stderr)
    assert run["status"] == "partial" and run["finished_at"] is not None
    assert any("signal" in e["error"] for e in json.loads(run["errors"]))


async def test_a_non_superuser_owner_runs_migrates_and_holds_the_lease(server_dsn, tmp_path):
    role = f"agg_owner_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"create role {role} login nosuperuser nocreatedb nocreaterole")
        await admin.execute(f"create schema {role} authorization {role}")
        owner_dsn = _as_user(server_dsn, role)
        owner = await asyncpg.connect(owner_dsn)
        try:
            await migrations.apply_migrations(owner)
            await owner.execute(
                "insert into sites (domain, deployed_at, matomo_site_id) values"
                " ('example.com', '2024-01-01', 1)"
            )
        finally:
            await owner.close()
        first = await run_job(settings_for(owner_dsn), RunRequest(WINDOW), sources=SOURCES)
        second = await run_job(settings_for(owner_dsn), RunRequest(WINDOW), sources=SOURCES)
        assert first.status == second.status == "ok" and first.rows_upserted > 0
    finally:
        await admin.execute(f"drop schema if exists {role} cascade")
        await admin.execute(f"drop role if exists {role}")
        await admin.close()


def _as_user(server_dsn: str, role: str) -> str:
    parts = urlsplit(server_dsn)
    host = parts.hostname or ""
    netloc = f"{role}@{host}" + (f":{parts.port}" if parts.port else "")
    query = f"{parts.query}&search_path={role}" if parts.query else f"search_path={role}"
    return parts._replace(netloc=netloc, query=query).geturl()


@pytest.fixture
async def seeded_small(db: str) -> world.Portfolio:
    return await seed(db, world.make_portfolio(30, 2))


async def test_sigterm_while_waiting_for_the_lease_exits_2_and_leaves_no_run_row(
    db, conn, seeded_small, tmp_path
):
    """A run that never got the lease did not run: a signal ends its wait at once, with one
    line and exit 2 (nothing could run), and no run row pretends otherwise."""
    holder = await storage.start_run(conn, FROM, TO, 4, lease_seconds=3600, owner="cron-box:41")
    before = await conn.fetchrow("select * from aggregator_runs where id = $1", holder)
    async with (
        world.matomo_simulator(seeded_small, today=TO) as matomo,
        _google(seeded_small) as google,
    ):
        # The default wait (60 s): only the signal can end it within the bound below.
        env = job_environment(db, matomo.url, google.url)
        process = await start_job(env, tmp_path, "-v", "--from", f"{FROM}", "--to", f"{TO}")
        await wait_for_log_event(process, "run.waiting_for_lease")
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        result = await finish(process, seconds=10)
        stopped_after = time.monotonic() - signalled
        requests = (matomo.requests, google.query_requests)
    assert stopped_after < 5, f"exited {stopped_after:.1f}s after SIGTERM"
    assert result.returncode == 2, result.stderr[-2000:]
    line = _one_error_line(result.stderr)
    assert "interrupted by a signal" in line and "nothing was fetched or written" in line
    assert requests == (0, 0)
    runs = await conn.fetch("select * from aggregator_runs")
    assert [dict(r) for r in runs] == [dict(before)]  # the holder's row only, untouched
    assert await conn.fetchval("select count(*) from daily_analytics") == 0


async def test_a_run_that_gives_up_waiting_says_one_line_and_nothing_else(
    db, conn, seeded_small, tmp_path
):
    """Exit 2 (nothing could run) leaves one line on stderr, the error naming the holder, even
    after planning and waiting: the plan is logged only once the lease is held."""
    await storage.start_run(conn, FROM, TO, 4, lease_seconds=3600, owner="cron-box:41")
    async with (
        world.matomo_simulator(seeded_small, today=TO) as matomo,
        _google(seeded_small) as google,
    ):
        env = job_environment(db, matomo.url, google.url)
        result = await run_job_process(
            {**env, "AGGREGATOR_LOCK_WAIT_SECONDS": "0.3"}, tmp_path, "--from", f"{FROM}"
        )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("aggregator: error: another aggregator run (run ")
    assert "cron-box:41" in result.stderr


async def test_the_lock_wait_is_shown_as_people_read_it(db, conn, seeded_small) -> None:
    await storage.start_run(conn, FROM, TO, 4, lease_seconds=3600)
    with pytest.raises(storage.RunLocked) as caught:
        await run_job(settings_for(db, lock_wait=9.99989e-321), RunRequest(WINDOW), sources=SOURCES)
    assert "(waited 0s)" in str(caught.value)
    assert [seconds_text(s) for s in (0.2, 60, 86_400, 1234.5678)] == [
        "0.2s",
        "60s",
        "86400s",
        "1234.57s",
    ]
