"""aggregator_runs.stats: each source's API figures per run, checked against the simulators'
own counts (requests they received, faults they injected)."""

from __future__ import annotations

import json
from datetime import date

from aggregator.api_stats import SourceStats
from aggregator.dates import Window
from aggregator.demo import simulated_settings
from aggregator.pipeline import RunRequest, run_job
from aggregator.search_console import client as gsc
from aggregator.simulators import portfolio as world
from tests.factories import seed

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
    assert matomo_figures["failed_requests"] == matomo_figures["retries"] == 0
    assert (matomo_figures["sites_ok"], matomo_figures["sites_failed"]) == (28, 1)


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
