"""Every Google error class of the contract, end to end: the real pipeline and client against
the Google simulator over 127.0.0.1, with the number of requests Google received asserted (a
misread error class shows up as a storm of retries or as per-site noise).

Waits never really happen: the client's backoff sleep is replaced by one that records the wait
and, where the test says so, lets simulated time pass in the simulator (a rate window empties,
a load quota recovers).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import date

import pytest

from aggregator.check import run_check
from aggregator.dates import Window
from aggregator.demo import simulated_settings
from aggregator.pipeline import RunOutcome, RunRequest, run_job
from aggregator.search_console import client as gsc
from aggregator.simulators import portfolio as world
from aggregator.simulators.google import RATE_LIMIT_ANSWERS, GoogleSimulator
from tests.factories import seed

TODAY = date(2025, 6, 10)
WINDOW = Window(date(2025, 6, 1), date(2025, 6, 9))
FIRST = "seo-team-1@demo.example"


class SimulatedSleep:
    """Records each wait; `then` runs what the simulated time would have brought."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.then: Callable[[float], None] = lambda _seconds: None

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.then(seconds)


@pytest.fixture
def sleep(monkeypatch: pytest.MonkeyPatch) -> SimulatedSleep:
    recorded = SimulatedSleep()
    monkeypatch.setattr(gsc, "_backoff_sleep", recorded)
    return recorded


@pytest.fixture
async def load_quota_refused(db: str) -> AsyncIterator[GoogleSimulator]:
    """Eight sites over two accounts (four each), and a Search Console whose load quota
    refuses the first account until a test clears `quota_exhausted_accounts`."""
    portfolio = await seed(db, world.make_portfolio(8, 2))
    async with world.google_simulator(
        portfolio, today=TODAY, quota_exhausted_accounts={FIRST}
    ) as google:
        yield google


async def run_gsc(db: str, google: GoogleSimulator, **tuning: float | None) -> RunOutcome:
    tuning = {"gsc_max_qps_per_account": 20.0, "gsc_max_qps_per_client": 100.0, **tuning}
    settings = simulated_settings(db, "http://unused.invalid", google.url, **tuning)
    return await run_job(settings, RunRequest(WINDOW, sources=("gsc",)))


def errors_by_site(outcome: RunOutcome) -> dict[str, str]:
    return {e.site: e.error for e in outcome.errors}


@pytest.mark.parametrize("answer", list(RATE_LIMIT_ANSWERS))
async def test_rate_limits_slow_down_and_retry_until_every_site_is_stored(
    db, sleep: SimulatedSleep, answer: str
) -> None:
    portfolio = await seed(db, world.make_portfolio(60, 1))
    async with world.google_simulator(
        portfolio, today=TODAY, qps_per_account=40, rate_limit_answer=answer
    ) as google:
        sleep.then = lambda _seconds: google.forget_recent_queries()
        outcome = await run_gsc(db, google, gsc_max_qps_per_account=None)

    assert outcome.status == "ok", outcome.errors
    figures = outcome.stats["gsc"]
    sites = sum(1 for site in portfolio.sites if site.gsc_account_id is not None)
    refused = google.query_requests - sites
    assert refused > 0, "the simulator's limit was reached"
    assert figures.rate_limited == figures.failed_requests == refused
    assert figures.requests == google.token_requests + google.query_requests + google.sites_requests
    assert refused < sites / 4, "it slowed down: no retry storm"


async def test_load_quota_rests_the_account_then_fetches_its_sites(
    db, sleep: SimulatedSleep, load_quota_refused: GoogleSimulator
) -> None:
    google = load_quota_refused
    refused_before_rest: list[int] = []

    def quota_back(_seconds: float) -> None:
        refused_before_rest.append(google.query_requests_by_account[FIRST])
        google.quota_exhausted_accounts.clear()

    sleep.then = quota_back
    outcome = await run_gsc(db, google, gsc_load_quota_pause=900.0)

    assert outcome.status == "ok", outcome.errors
    assert sleep.waits == [900.0], "one rest of GSC_LOAD_QUOTA_PAUSE_SECONDS for the account"
    first_sites = 4
    assert refused_before_rest[0] >= 1
    assert google.query_requests_by_account[FIRST] == refused_before_rest[0] + first_sites
    assert outcome.stats["gsc"].sites_ok == 8


async def test_a_load_quota_that_outlasts_the_rest_stops_the_account(
    db, sleep: SimulatedSleep, load_quota_refused: GoogleSimulator
) -> None:
    google = load_quota_refused
    at_rest: list[int] = []
    sleep.then = lambda _seconds: at_rest.append(google.query_requests_by_account[FIRST])
    outcome = await run_gsc(db, google)

    assert sleep.waits == [900.0]
    assert google.query_requests_by_account[FIRST] == at_rest[0] + 1, "tried once more, once"
    errors = errors_by_site(outcome)
    assert len(errors) == 4  # the first account's sites; the second account's are stored
    assert all(
        f"load quota still refuses account {FIRST} after a rest of 900s" in error
        for error in errors.values()
    )
    assert outcome.stats["gsc"].sites_ok == 4


async def test_no_rest_when_it_would_pass_the_deadline(
    db, sleep: SimulatedSleep, load_quota_refused: GoogleSimulator
) -> None:
    google = load_quota_refused
    outcome = await run_gsc(db, google, run_deadline=600.0)

    assert sleep.waits == []
    assert google.query_requests_by_account[FIRST] == 1
    errors = errors_by_site(outcome)
    assert len(errors) == 4  # the first account's sites; the second account's are stored
    assert all("would pass the run's deadline" in e for e in errors.values())


async def test_daily_limit_stops_that_account_for_the_run(db, sleep: SimulatedSleep) -> None:
    portfolio = await seed(db, world.make_portfolio(8, 2))
    async with world.google_simulator(
        portfolio, today=TODAY, daily_limit_accounts={FIRST}
    ) as google:
        outcome = await run_gsc(db, google)

    # 20 queries/s per account: the refusal is back long before the account's next query.
    assert google.query_requests_by_account[FIRST] == 1
    assert sleep.waits == []
    errors = errors_by_site(outcome)
    assert len(errors) == 4
    assert all(f"daily limit for account {FIRST} is spent" in e for e in errors.values())
    assert outcome.stats["gsc"].sites_ok == 4


async def test_api_disabled_is_one_error_for_the_client_after_one_request(
    db, sleep: SimulatedSleep
) -> None:
    portfolio = await seed(db, world.make_portfolio(9, 3))
    async with world.google_simulator(portfolio, today=TODAY, api_disabled=True) as google:
        outcome = await run_gsc(db, google)

    assert google.sites_requests + google.query_requests == 1, "no per-account requests"
    assert sleep.waits == []
    assert len(outcome.errors) == 1
    error = outcome.errors[0]
    assert error.site == "(OAuth client: 9 sites)"
    assert "not enabled in the Google Cloud project of OAuth client" in error.error
    assert "APIs & Services > Library" in error.error
    assert outcome.stats["gsc"].failed_requests == 1
    assert outcome.stats["gsc"].sites_failed == 9


async def test_a_deleted_client_is_one_error_after_one_token_request(
    db, conn, sleep: SimulatedSleep
) -> None:
    portfolio = await seed(db, world.make_portfolio(9, 3))
    async with world.google_simulator(portfolio, today=TODAY, client_deleted=True) as google:
        outcome = await run_gsc(db, google)
        report = await run_check(simulated_settings(db, "http://unused.invalid", google.url))

    assert google.token_requests == 1 + 1, "one for the run, one for the check"
    assert google.sites_requests + google.query_requests == 0
    assert [e.site for e in outcome.errors] == ["(OAuth client: 9 sites)"]
    assert "Deleted credentials" in outcome.errors[0].error
    # check says the same once, and does not advise reconnecting the accounts.
    client_rows = [row for row in report.rows if row.check == "oauth client"]
    assert len(client_rows) == 1 and "Deleted credentials" in client_rows[0].problem
    assert not [row for row in report.rows if row.check == "gsc token"]
    assert "reconnect" in client_rows[0].fix and "does not help" in client_rows[0].fix


async def test_permission_errors_name_what_the_account_has_for_the_host(
    db, conn, sleep: SimulatedSleep
) -> None:
    # Site 7's property is listed only as unverified; site 5 stores a property the account
    # does not have (it has https://www.site00005.example/).
    portfolio = await seed(db, world.make_portfolio(8, 1, unreachable_every=7))
    await conn.execute("update sites set gsc_property = 'https://site00005.example/' where id = 5")
    async with world.google_simulator(portfolio, today=TODAY) as google:
        outcome = await run_gsc(db, google)

    errors = errors_by_site(outcome)
    assert set(errors) == {"site00005.example", "site00007.example"}
    assert "unverified" in errors["site00007.example"]
    assert "https://site00007.example/ (unverified)" in errors["site00007.example"]
    assert errors["site00005.example"].startswith(
        f"Google account {FIRST} cannot access https://site00005.example/ (HTTP 403 forbidden"
    )
    assert (
        "for site00005.example it has https://www.site00005.example/ (owner)"
        in (errors["site00005.example"])
    )
    assert google.sites_requests == 1
    assert google.query_requests == 7, "no retries of a permission error"
    figures = outcome.stats["gsc"]
    assert (figures.sites_ok, figures.sites_failed, figures.sites_skipped) == (6, 1, 1)
