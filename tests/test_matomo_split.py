"""One Matomo site that breaks every bulk request it is in (a PHP fatal error answers the whole
request 500) costs only itself: the real pipeline against the Matomo simulator."""

from __future__ import annotations

from datetime import date

import pytest

from aggregator.dates import Window
from aggregator.demo import simulated_settings
from aggregator.pipeline import RunRequest, run_job
from aggregator.simulators import portfolio as world
from tests.factories import seed, stored_rows

TODAY = date(2025, 6, 10)
WINDOW = Window(date(2025, 6, 7), date(2025, 6, 9))
BROKEN = 57


pytestmark = pytest.mark.usefixtures("fast_matomo_backoff")


async def test_a_site_that_crashes_its_bulk_request_fails_alone(db, conn) -> None:
    portfolio = await seed(db, world.make_portfolio(250, 0))
    async with world.matomo_simulator(portfolio, today=TODAY, fatal_sites={BROKEN}) as sim:
        settings = simulated_settings(db, sim.url, "http://unused.invalid")
        outcome = await run_job(settings, RunRequest(WINDOW, sources=("matomo",)))

    assert [(e.site, e.source) for e in outcome.errors] == [("site00057.example", "matomo")]
    assert "Matomo fails on site id 57 alone" in outcome.errors[0].error
    tracked = [s for s in portfolio.sites if s.matomo_site_id is not None]
    stored = {site_id for site_id, _day in await stored_rows(conn)}
    assert stored == {s.id for s in tracked} - {BROKEN}

    figures = outcome.stats["matomo"]
    assert figures.requests == sim.requests
    # 3 batches of 100/100/40; the broken one: 5 attempts, then at each of 7 halvings one
    # request for the healthy half and at most 2 for the broken one.
    assert sim.requests <= 3 + (5 - 1) + 7 * 3
    # Answered: the two healthy batches and, at each of the 7 halvings, the healthy half.
    assert figures.requests - figures.failed_requests == 2 + 7
    assert figures.retries == figures.requests - 3
    assert (figures.sites_ok, figures.sites_failed) == (len(tracked) - 1, 1)
