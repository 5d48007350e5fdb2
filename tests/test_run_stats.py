"""aggregator_runs.stats: each source's API figures per run, checked against the simulators'
own counts (requests they received, faults they injected)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import date

import pytest

from aggregator.api_stats import SourceStats
from aggregator.dates import Window
from aggregator.demo import simulated_settings
from aggregator.model import MatomoDay, SourceRecord
from aggregator.pipeline import RunRequest, Source, SourceInput, run_job
from aggregator.search_console import client as gsc
from aggregator.simulators import portfolio as world
from tests.factories import add_account, add_site, seed
from tests.test_pipeline import settings_for
from tests.test_signals import finish, job_environment, run_job_process, start_job, wait_for

TODAY = date(2025, 6, 10)
WINDOW = Window(date(2025, 6, 1), date(2025, 6, 9))


async def no_sleep(_seconds: float) -> None:
    return None


async def test_each_run_stores_its_api_figures_per_source(db, conn, monkeypatch):
    monkeypatch.setattr(gsc, "_backoff_sleep", no_sleep)
    # 30 sites over 3 accounts: the 3rd account is revoked (its 9 GSC sites fail), every 7th
    # site's property is unverified (7, 14, 28 on live accounts: skipped), site 30 has no GSC.
    portfolio = await seed(
        db, world.make_portfolio(30, 3, revoked_account=True, unreachable_every=7)
    )
    async with (
        world.matomo_simulator(portfolio, today=TODAY, fail_sites={3}) as matomo,
        world.google_simulator(portfolio, today=TODAY, fail_next=2) as google,
    ):
        settings = simulated_settings(
            db, matomo.url, google.url, gsc_max_qps_per_account=50, gsc_max_qps_per_client=100
        )
        outcome = await run_job(settings, RunRequest(WINDOW))

    stored = json.loads(await conn.fetchval("select stats from aggregator_runs"))
    assert stored == {name: figures.as_json() for name, figures in outcome.stats.items()}
    google_figures = stored["gsc"]
    # Token requests are the gsc source's too: a dead token endpoint is its error rate.
    assert google.token_requests == 3
    assert google_figures["requests"] == (
        google.token_requests + google.sites_requests + google.query_requests
    )
    # The two injected 503s and the revoked account's refused token refresh.
    assert google_figures["failed_requests"] == 3
    assert google_figures["retries"] == 2
    assert google_figures["rate_limited"] == 0
    assert (google_figures["sites_ok"], google_figures["sites_failed"]) == (17, 9)
    assert google_figures["sites_skipped"] == 3
    assert google_figures["seconds"] > 0

    matomo_figures = stored["matomo"]
    assert matomo_figures["requests"] == matomo.requests == 1
    # Its one bulk request answered site 3 with an error: a failed request, not retried.
    assert (matomo_figures["failed_requests"], matomo_figures["retries"]) == (1, 0)
    assert (matomo_figures["sites_ok"], matomo_figures["sites_failed"]) == (28, 1)


async def test_a_site_failing_inside_a_good_bulk_answer_fails_its_request(db, conn):
    """Matomo answers a bulk request HTTP 200 with an error object for some of its sites: that
    request was answered with an error, so it is a failed request, once however many of its
    sites failed (the error rate, failed_requests / requests, stays a share of requests)."""
    portfolio = await seed(db, world.make_portfolio(24, 0))
    # Three bulk requests of 8 sites: two sites fail in the first, one in the last.
    async with world.matomo_simulator(portfolio, today=TODAY, fail_sites={2, 5, 20}) as matomo:
        settings = simulated_settings(db, matomo.url, "http://unused.invalid", matomo_batch_size=8)
        outcome = await run_job(settings, RunRequest(WINDOW, sources=("matomo",)))

    assert sorted(e.site for e in outcome.errors) == [
        "site00002.example",
        "site00005.example",
        "site00020.example",
    ]
    stored = json.loads(await conn.fetchval("select stats from aggregator_runs"))["matomo"]
    assert matomo.requests == 3
    assert {name: stored[name] for name in ("requests", "failed_requests", "retries")} == {
        "requests": 3,
        "failed_requests": 2,
        "retries": 0,
    }
    assert (stored["rate_limited"], stored["sites_ok"], stored["sites_failed"]) == (0, 21, 3)


async def test_a_rate_limited_answer_counts_as_failed_and_rate_limited(db, monkeypatch):
    monkeypatch.setattr(gsc, "_backoff_sleep", no_sleep)
    portfolio = await seed(db, world.make_portfolio(60, 1))
    async with world.google_simulator(portfolio, today=TODAY, qps_per_account=30) as google:
        settings = simulated_settings(
            db,
            "http://unused.invalid",
            google.url,
            gsc_max_qps_per_account=100,
            gsc_max_qps_per_client=100,
        )
        outcome = await run_job(settings, RunRequest(WINDOW, sources=("gsc",)))
    figures = outcome.stats["gsc"]
    assert figures.requests == google.token_requests + google.sites_requests + google.query_requests
    assert figures.rate_limited == figures.failed_requests > 0
    assert figures.sites_ok + figures.sites_failed == 58


def test_figures_serialise_with_the_contracts_names() -> None:
    figures = SourceStats()
    figures.sent(retry=False)
    figures.sent(retry=True)
    figures.failed(rate_limited=True)
    assert figures.as_json() == {
        "requests": 2,
        "retries": 1,
        "failed_requests": 1,
        "rate_limited": 1,
        "sites_ok": 0,
        "sites_failed": 0,
        "sites_skipped": 0,
        "seconds": 0.0,
    }


def _counting_matomo(reached: asyncio.Event) -> Source:
    """Two requests (one failed), every site's days, then it hangs until the run is cut."""

    async def matomo(given: SourceInput) -> AsyncIterator[SourceRecord]:
        given.stats.sent(retry=False)
        for site in given.sites:
            for day in WINDOW.days():
                yield MatomoDay(site.id, day, 1, 2)
        given.stats.sent(retry=True)
        given.stats.failed()
        reached.set()
        await asyncio.Event().wait()
        yield  # pragma: no cover - makes this an async generator

    return matomo


REFUSE = """
create function refuse() returns trigger language plpgsql as
$$ begin raise exception 'daily_analytics is read-only during maintenance'; end $$;
create trigger refuse before insert or update on daily_analytics
for each row execute function refuse();
"""


@pytest.mark.parametrize("cut", ["signal", "deadline", "refused flush"])
async def test_a_run_cut_short_closes_its_row_with_its_stats(db, conn, cut) -> None:
    account = await add_account(conn, "a@example.com", "rt")
    for n in range(1, 5):
        await add_site(conn, f"site{n}.com", matomo_site_id=n, gsc_account_id=account)
    if cut == "refused flush":
        await conn.execute(REFUSE)
    reached, stop = asyncio.Event(), asyncio.Event()

    async def signal_once_fetched() -> None:
        await reached.wait()
        stop.set()

    signaller = asyncio.create_task(signal_once_fetched()) if cut == "signal" else None
    outcome = await run_job(
        settings_for(db, flush_rows=4, run_deadline=1.0 if cut == "deadline" else 600),
        RunRequest(WINDOW, sources=("matomo",)),
        sources={"matomo": _counting_matomo(reached)},
        stop=stop,
    )
    if signaller:
        await signaller
    run = await conn.fetchrow("select status, finished_at, stats from aggregator_runs")
    assert run["status"] in ("partial", "failed") and run["finished_at"] is not None
    assert outcome.status == run["status"]
    stored = json.loads(run["stats"])
    assert stored == {"matomo": outcome.stats["matomo"].as_json()}
    figures = stored["matomo"]
    if cut == "refused flush":  # the first flush fails while the source is still fetching
        assert figures["requests"] >= 1
    else:
        assert (figures["requests"], figures["retries"], figures["failed_requests"]) == (2, 1, 1)
    assert figures["sites_ok"] + figures["sites_failed"] == 4
    assert figures["seconds"] > 0


async def test_a_killed_runs_row_keeps_the_stats_of_its_last_flush(db, conn, tmp_path) -> None:
    """SIGKILL leaves no chance to close the row; the next run closes it as failed, and its
    stats are those its last flush recorded (requests so far; a source's site counts and
    seconds only once that source had ended)."""
    portfolio = await seed(db, world.make_portfolio(12, 2))
    window = ("--from", "2025-06-01", "--to", "2025-06-09")
    async with (
        world.matomo_simulator(portfolio, today=TODAY, latency=0.1) as matomo,
        world.google_simulator(portfolio, today=TODAY) as google,
    ):
        env = job_environment(
            db,
            matomo.url,
            google.url,
            MATOMO_BATCH_SIZE="3",
            MATOMO_CONCURRENCY="1",
            GSC_MAX_QPS_PER_CLIENT="4",
            AGGREGATOR_FLUSH_SECONDS="0.2",
        )
        process = await start_job(env, tmp_path, *window)

        async def recorded() -> bool:
            stats = await conn.fetchval("select stats from aggregator_runs")
            return bool(stats and json.loads(stats).get("matomo", {}).get("requests"))

        await wait_for(recorded, "a flush recording the run's figures", process)
        process.kill()
        await finish(process, seconds=10)
        killed = await conn.fetchval("select id from aggregator_runs")
        # Its lease runs out (as it would AGGREGATOR_LEASE_SECONDS later); the next run goes.
        await conn.execute("update aggregator_runs set lease_until = now() - interval '1 second'")
        after = await run_job_process(env, tmp_path, *window)
        sent = matomo.requests
    assert after.returncode == 0, after.stderr[-2000:]
    row = await conn.fetchrow("select status, stats from aggregator_runs where id = $1", killed)
    assert row["status"] == "failed"
    figures = json.loads(row["stats"])
    assert 1 <= figures["matomo"]["requests"] < sent
    assert set(figures["matomo"]) == set(SourceStats().as_json())
