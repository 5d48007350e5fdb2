"""Interruption and servers that never answer: `aggregator run` as a real process, as cron runs it.

The simulators run in the test's event loop; the job is a subprocess pointed at them through
its environment, so signals, exit codes and timeouts are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest
from aiohttp import web

from aggregator.simulators import GoogleSimulator
from aggregator.simulators import portfolio as world
from tests.factories import google_like, seed

FROM, TO = date(2025, 6, 1), date(2025, 6, 9)
TODAY = date(2025, 6, 10)
DAYS = (TO - FROM).days + 1


def job_environment(
    database_url: str,
    matomo_url: str,
    google_url: str,
    *,
    matomo_token: str = world.MATOMO_TOKEN,
    client_secret: str = world.CLIENT_SECRET,
    **extra: str,
) -> dict[str, str]:
    """The process environment of a run against the simulators (nothing inherited that could
    point the job elsewhere)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MATOMO_", "GOOGLE_", "GSC_", "AGGREGATOR_", "HTTP_"))
        and k != "DATABASE_URL"
    }
    env.update(
        DATABASE_URL=database_url,
        MATOMO_URL=matomo_url,
        MATOMO_TOKEN=matomo_token,
        GOOGLE_CLIENT_ID=world.CLIENT_ID,
        GOOGLE_CLIENT_SECRET=client_secret,
        GOOGLE_TOKEN_URL=f"{google_url}/token",
        GSC_API_URL=google_url,
        GSC_MAX_QPS_PER_CLIENT="100",
        GSC_MAX_QPS_PER_ACCOUNT="20",
    )
    env.update(extra)
    return env


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


async def start_job(env: Mapping[str, str], cwd: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aggregator",
        "run",
        *args,
        env=dict(env),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process, seconds: float) -> Finished:
    began = time.monotonic()
    try:
        out, err = await asyncio.wait_for(process.communicate(), seconds)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        pytest.fail(
            f"the job did not exit within {seconds}s\nstdout:\n{out.decode()}\n"
            f"stderr:\n{err.decode()[-3000:]}"
        )
    return Finished(process.returncode, out.decode(), err.decode(), time.monotonic() - began)


async def run_job_process(env: Mapping[str, str], cwd: Path, *args: str, seconds: float = 60):
    return await finish(await start_job(env, cwd, *args), seconds)


async def wait_for(
    condition: Callable[[], Awaitable[bool]], what: str, process, seconds: float = 20.0
) -> None:
    """Poll `condition` (bounded); fail early if the job already exited."""
    deadline = time.monotonic() + seconds
    while not await condition():
        if process.returncode is not None:
            result = await finish(process, 5)
            pytest.fail(f"the job exited ({result.returncode}) before {what}:\n{result.stderr}")
        if time.monotonic() > deadline:
            process.kill()
            _, err = await process.communicate()
            pytest.fail(f"timed out waiting for {what}; the job's stderr:\n{err.decode()[-3000:]}")
        await asyncio.sleep(0.05)


async def wait_for_log_event(
    process: asyncio.subprocess.Process, event: str, seconds: float = 20.0
) -> None:
    """Read the job's JSON log lines until one names `event` (bounded)."""

    async def scan() -> None:
        while line := await process.stderr.readline():
            if f'"event": "{event}"' in line.decode():
                return
        pytest.fail(f"the job exited without logging {event}")

    try:
        await asyncio.wait_for(scan(), seconds)
    except TimeoutError:
        process.kill()
        pytest.fail(f"timed out waiting for the job to log {event}")


@pytest.fixture
async def seeded(db: str) -> world.Portfolio:
    return await seed(db, world.make_portfolio(12, 2))


class QueriesHang(GoogleSimulator):
    """Tokens and sites.list answer (slowly); every searchAnalytics.query hangs forever."""

    async def _query(self, request: web.Request) -> web.StreamResponse:
        self.query_requests += 1
        return await self._hang_forever(request)


def _google(portfolio, cls=GoogleSimulator, **options) -> GoogleSimulator:
    return google_like(portfolio, cls, today=TODAY, **options)


# SIGHUP: the terminal of a run started by hand closed (a dropped SSH session).
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
async def test_sigterm_stores_what_was_fetched_and_closes_the_run(
    db, conn, seeded, tmp_path, stop_signal
):
    portfolio = seeded
    # Google's token endpoint and sites.list take 0.5s each, so by the time the first query
    # arrives (and hangs) Matomo's one bulk answer has long been taken in.
    async with (
        world.matomo_simulator(portfolio, today=TODAY) as matomo,
        _google(portfolio, QueriesHang, latency=0.5) as google,
    ):
        env = job_environment(db, matomo.url, google.url)
        process = await start_job(env, tmp_path, "--from", f"{FROM}", "--to", f"{TO}")

        async def running() -> bool:
            return (
                await conn.fetchval("select count(*) from aggregator_runs where status = 'running'")
                == 1
            )

        await wait_for(running, "the run to be recorded as running", process)

        async def fetching() -> bool:
            return matomo.requests >= 1 and matomo.in_flight == 0 and google.query_requests >= 1

        await wait_for(fetching, "Matomo answered and GSC queries hang", process)
        process.send_signal(stop_signal)
        result = await finish(process, seconds=10)

    assert result.returncode == 1, result.stderr
    assert result.seconds < 5, f"took {result.seconds:.1f}s to stop after SIGTERM"
    assert "Traceback" not in result.stderr
    assert "interrupted by a signal" in result.stdout

    matomo_sites = [s for s in portfolio.sites if s.matomo_site_id is not None]
    assert (
        await conn.fetchval("select count(*) from daily_analytics where matomo_visits is not null")
        == len(matomo_sites) * DAYS
    )
    assert (
        await conn.fetchval("select count(*) from daily_analytics where gsc_final is not null") == 0
    )
    run = await conn.fetchrow("select * from aggregator_runs")
    assert run["status"] == "partial" and run["finished_at"] is not None
    errors = json.loads(run["errors"])
    assert any(e["source"] == "pipeline" and "signal" in e["error"] for e in errors)


async def test_sigterm_before_anything_is_fetched_marks_the_run_failed(db, conn, seeded, tmp_path):
    async with (
        world.matomo_simulator(seeded, today=TODAY, hang=True) as matomo,
        _google(seeded, QueriesHang) as google,
    ):
        env = job_environment(db, matomo.url, google.url, GSC_MAX_QPS_PER_CLIENT="100")
        process = await start_job(env, tmp_path, "--from", f"{FROM}", "--to", f"{TO}")

        async def hanging() -> bool:
            return matomo.requests >= 1 and google.query_requests >= 1

        await wait_for(hanging, "both sources waiting on their servers", process)
        process.send_signal(signal.SIGINT)  # Ctrl-C behaves the same
        result = await finish(process, seconds=10)

    assert result.returncode == 1, result.stderr
    assert result.seconds < 5
    assert await conn.fetchval("select count(*) from daily_analytics") == 0
    run = await conn.fetchrow("select status, finished_at from aggregator_runs")
    assert run["status"] == "failed" and run["finished_at"] is not None


async def test_servers_that_never_answer_cannot_hang_the_run(db, conn, seeded, tmp_path):
    """Every server accepts the connection and never answers: the timeouts end each request,
    every site gets its error, and the job exits 1 on its own."""
    async with (
        world.matomo_simulator(seeded, today=TODAY, hang=True) as matomo,
        _google(seeded, hang=True) as google,
    ):
        env = job_environment(
            db,
            matomo.url,
            google.url,
            MATOMO_TIMEOUT_SECONDS="1",
            GSC_TIMEOUT_SECONDS="1",
            HTTP_MAX_ATTEMPTS="2",
        )
        result = await run_job_process(env, tmp_path, "--from", f"{FROM}", "--to", f"{TO}")
        # Matomo: the batch's 2 attempts, then each half's 2 (a dead server is split once only).
        assert matomo.requests == 2 + 2 * 2
        assert google.token_requests == 2 * len(seeded.accounts)

    assert result.returncode == 1, result.stderr
    assert result.seconds < 20
    run = await conn.fetchrow("select status, finished_at, errors from aggregator_runs")
    assert run["status"] == "failed" and run["finished_at"] is not None
    errors = json.loads(run["errors"])
    matomo_sites = {s.domain for s in seeded.sites if s.matomo_site_id is not None}
    gsc_sites = {s.domain for s in seeded.sites if s.gsc_account_id is not None}
    assert {e["site"] for e in errors if e["source"] == "matomo"} == matomo_sites
    assert {e["site"] for e in errors if e["source"] == "gsc"} == gsc_sites
    assert all("timed out" in e["error"] for e in errors if e["source"] == "matomo")
    assert all("unreachable" in e["error"] for e in errors if e["source"] == "gsc")


async def test_sigterm_during_a_hung_token_refresh_closes_the_run_at_once(
    db, conn, seeded, tmp_path
):
    """The token refresh runs in a thread that a signal cannot cancel; it is a daemon thread, so
    neither closing the run nor the process exit waits for the hung endpoint's timeout."""
    async with (
        world.matomo_simulator(seeded, today=TODAY) as matomo,
        _google(seeded, hang=True) as google,
    ):
        env = job_environment(db, matomo.url, google.url, GSC_TIMEOUT_SECONDS="60")
        process = await start_job(env, tmp_path, "--from", f"{FROM}", "--to", f"{TO}")

        async def refreshing() -> bool:
            # The first refresh alone until it ends (a deleted client costs one request).
            return google.token_requests >= 1 and matomo.requests >= 1

        await wait_for(refreshing, "token refreshes hanging", process)

        await wait_for_log_event(process, "matomo.batch")
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)

        async def closed() -> bool:
            return bool(
                await conn.fetchval(
                    "select count(*) from aggregator_runs where finished_at is not null"
                )
            )

        await wait_for(closed, "the run to be closed", process, seconds=3)
        closed_after = time.monotonic() - signalled
        result = await finish(process, seconds=15)

    assert closed_after < 2, f"run closed {closed_after:.1f}s after SIGTERM"
    assert result.returncode == 1, result.stderr
    assert result.seconds < 3, f"exited {result.seconds:.1f}s after the run was closed"
    run = await conn.fetchrow("select status from aggregator_runs")
    assert run["status"] == "partial"
    assert (
        await conn.fetchval("select count(*) from daily_analytics where matomo_visits is not null")
        == sum(1 for s in seeded.sites if s.matomo_site_id is not None) * DAYS
    )


async def test_a_dry_run_whose_reader_went_away_stops_fetching_at_once(db, seeded, tmp_path):
    """`run --dry-run | head` closed before the rows came: its output has nowhere to go, so the
    run stops fetching now (not when Search Console answers, here never) and ends quietly."""
    read_end, write_end = os.pipe()
    async with (
        world.matomo_simulator(seeded, today=TODAY) as matomo,
        _google(seeded, QueriesHang) as google,
    ):
        env = job_environment(db, matomo.url, google.url)
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "aggregator", "run", "--dry-run", "--from", f"{FROM}"),
            *("--to", f"{TO}"),
            env=env,
            cwd=tmp_path,
            stdout=write_end,
            stderr=asyncio.subprocess.PIPE,
        )
        os.close(write_end)

        async def fetching() -> bool:
            return google.query_requests >= 1

        await wait_for(fetching, "Search Console queries hang", process)
        os.close(read_end)  # the reader goes away; nothing was written to it yet
        began = time.monotonic()
        _, err = await asyncio.wait_for(process.communicate(), 30)
        seconds = time.monotonic() - began

    assert process.returncode == 128 + signal.SIGPIPE, err.decode()
    assert seconds < 5, f"took {seconds:.1f}s to stop after its reader went away"
    assert "Traceback" not in err.decode()
    assert "aggregator: error" not in err.decode()


@pytest.mark.parametrize(
    ("stdout", "fail_sites", "status", "code"),
    [("reader gone", (), "ok", 0), ("closed", (3,), "partial", 1)],
    ids=["pipe-reader-gone-ok", "stdout-closed-partial"],
)
async def test_a_real_run_whose_stdout_goes_nowhere_stores_and_exits_with_its_status(
    db, conn, seeded, tmp_path, stdout, fail_sites, status, code
):
    """`aggregator run | head -0` (the reader gone before the summary) or `aggregator run >&-`:
    the rows are the job, the summary only its report, so the run stores everything and exits
    with its own status (not 141), quietly."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # `head -0` is gone before the summary is written
    async with (
        world.matomo_simulator(seeded, today=TODAY, fail_sites=set(fail_sites)) as matomo,
        _google(seeded) as google,
    ):
        env = job_environment(db, matomo.url, google.url)
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "aggregator", "run", "--from", f"{FROM}", "--to", f"{TO}"),
            env=env,
            cwd=tmp_path,
            stdout=write_end if stdout == "reader gone" else None,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=(lambda: os.close(1)) if stdout == "closed" else None,
        )
        os.close(write_end)
        _, err = await asyncio.wait_for(process.communicate(), 60)

    assert process.returncode == code, err.decode()[-3000:]
    assert "Traceback" not in err.decode() and "Exception ignored" not in err.decode()
    assert "aggregator: error" not in err.decode()
    run = await conn.fetchrow("select status, finished_at, rows_upserted from aggregator_runs")
    assert run["status"] == status and run["finished_at"] is not None
    matomo_sites = [
        s for s in seeded.sites if s.matomo_site_id is not None and s.id not in fail_sites
    ]
    assert (
        await conn.fetchval("select count(*) from daily_analytics where matomo_visits is not null")
        == len(matomo_sites) * DAYS
    )
