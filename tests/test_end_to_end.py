"""The real pipeline, real clients and real Postgres against the simulators over 127.0.0.1."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta

import pytest

from aggregator.dates import PACIFIC, Window
from aggregator.demo import simulated_settings
from aggregator.pipeline import RunRequest, run_job
from aggregator.search_console.answers import UNPROVEN_FRESH_DAYS
from aggregator.simulators import portfolio as world
from tests.factories import seed, stored_rows

TODAY = date(2025, 6, 10)
WINDOW = Window(date(2025, 6, 1), date(2025, 6, 9))


@pytest.fixture
async def seeded(db: str) -> world.Portfolio:
    return await seed(db, world.make_portfolio(30, 3, revoked_account=True, unreachable_every=7))


def expected_matomo(matomo, portfolio, window: Window):
    expected = {}
    for site in portfolio.sites:
        if site.matomo_site_id is None or site.matomo_site_id in matomo.fail_sites:
            continue
        for day in window.days():
            expected[(site.id, day.isoformat())] = matomo.visits(site.matomo_site_id, day) or (0, 0)
    return expected


def expected_gsc(google, portfolio, window: Window):
    """The contract's rules, computed from the simulator's own data."""
    horizon = google.first_incomplete_date()
    revoked = {a.id for a in portfolio.accounts if a.revoked}
    expected = {}
    for site in portfolio.sites:
        prop = site.registered_property
        if site.gsc_account_id is None or site.gsc_account_id in revoked:
            continue
        if prop is None or prop.startswith("unverified:"):
            continue
        for day in window.days():
            final = day < horizon
            numbers = google.performance(prop, day, provisional=not final)
            if numbers is None and not final:
                continue
            clicks, impressions, ctr, position = numbers or (0, 0, None, None)
            expected[(site.id, day.isoformat())] = (clicks, impressions, ctr, position, final)
    return expected


async def test_run_stores_exactly_the_served_numbers_and_isolates_failures(db, conn, seeded):
    portfolio = seeded
    async with (
        world.matomo_simulator(portfolio, today=TODAY, fail_sites={3}) as matomo,
        world.google_simulator(portfolio, today=TODAY, qps_per_account=50) as google,
    ):
        settings = simulated_settings(
            db, matomo.url, google.url, gsc_max_qps_per_account=20, gsc_max_qps_per_client=100
        )
        outcome = await run_job(settings, RunRequest(WINDOW))
        rows = await stored_rows(conn)

        want_matomo = expected_matomo(matomo, portfolio, WINDOW)
        got_matomo = {
            key: (row["matomo_visits"], row["matomo_actions"])
            for key, row in rows.items()
            if row["matomo_visits"] is not None
        }
        assert got_matomo == want_matomo

        want_gsc = expected_gsc(google, portfolio, WINDOW)
        got_gsc = {
            key: (
                row["gsc_clicks"],
                row["gsc_impressions"],
                row["gsc_ctr"],
                row["gsc_position"],
                row["gsc_final"],
            )
            for key, row in rows.items()
            if row["gsc_final"] is not None
        }
        assert got_gsc.keys() == want_gsc.keys()
        for key, want in want_gsc.items():
            assert got_gsc[key][:2] == want[:2] and got_gsc[key][4] == want[4], key
            assert got_gsc[key][2] == pytest.approx(want[2])
            assert got_gsc[key][3] == pytest.approx(want[3])

        # One bulk request for 30 sites; one query per reachable site; a token per account.
        assert matomo.requests == 1
        reachable_sites = {key[0] for key in want_gsc}
        assert google.query_requests == len(reachable_sites)
        assert google.sites_requests <= 2  # live accounts only

    assert outcome.status == "partial" and outcome.exit_code == 1
    errors = {(e.source, e.site) for e in outcome.errors}
    assert ("matomo", "site00003.example") in errors
    revoked = [e for e in outcome.errors if "seo-team-3@demo.example" in e.error]
    assert revoked and all("reconnect" in e.error.lower() for e in revoked)
    unreachable = [e for e in outcome.errors if e.site == "site00007.example"]
    assert unreachable and "sc-domain:site00007.example" in unreachable[0].error
    accounts = {r["email"]: r for r in await conn.fetch("select * from gsc_accounts")}
    assert accounts["seo-team-3@demo.example"]["last_error"]
    assert accounts["seo-team-1@demo.example"]["last_refresh_at"] is not None
    assert accounts["seo-team-1@demo.example"]["last_error"] is None


async def test_final_only_stores_the_final_days_a_normal_run_stores(db, conn, seeded):
    """`--gsc-final-only`: Google omits days without traffic from final data too, so a final
    day with no row is stored as 0 clicks and 0 impressions (CTR and position NULL), exactly as
    a normal run stores it; before the fix such days stayed NULL after the newest row."""
    portfolio = seeded
    pacific_today = TODAY  # the simulator's today, Search Console's own (Pacific) day
    now = datetime.combine(pacific_today, time(12), tzinfo=PACIFIC)
    # Half the days without traffic: many sites end the window on days Google has no row for.
    quiet = world.google_simulator(portfolio, today=pacific_today, zero_day_share=0.5)
    async with quiet as google:
        settings = simulated_settings(
            db, "http://unused.invalid", google.url, gsc_max_qps_per_client=100
        )
        request = RunRequest(WINDOW, sources=("gsc",), final_only=True)
        await run_job(settings, request, now=now)
        normal = expected_gsc(google, portfolio, WINDOW)
    stored = {
        key: (row["gsc_clicks"], row["gsc_impressions"], row["gsc_ctr"], row["gsc_position"])
        for key, row in (await stored_rows(conn)).items()
        if row["gsc_final"] is not None
    }
    assert all(row["gsc_final"] for row in (await stored_rows(conn)).values())
    unproven = pacific_today - timedelta(days=UNPROVEN_FRESH_DAYS)
    settled = {k: w for k, w in normal.items() if w[4] and date.fromisoformat(k[1]) < unproven}
    newest_row: dict[int, str] = {}
    for (site, day), want in normal.items():
        if want[4] and want[:2] != (0, 0):
            newest_row[site] = max(day, newest_row.get(site, day))
    trailing = [
        k for k, w in settled.items() if w[:2] == (0, 0) and k[1] > newest_row.get(k[0], "")
    ]
    assert trailing  # zero days after a site's newest final row: the case the fix is about
    for key, want in settled.items():
        assert stored.get(key) == pytest.approx(want[:4]), key
    # After that, only days Google served final rows for; nothing provisional.
    for key in stored.keys() - settled.keys():
        assert normal[key][4] and normal[key][:2] != (0, 0), key


async def test_provisional_days_become_final_on_a_later_run(db, conn, seeded):
    portfolio = seeded
    async with world.google_simulator(portfolio, today=TODAY) as google:
        settings = simulated_settings(
            db, "http://unused.invalid", google.url, gsc_max_qps_per_client=100
        )
        request = RunRequest(
            Window(TODAY - timedelta(days=4), TODAY - timedelta(days=1), False), sources=("gsc",)
        )
        await run_job(settings, request)
        site = portfolio.sites[0]
        day = (TODAY - timedelta(days=1)).isoformat()
        before = (await stored_rows(conn)).get((site.id, day))
        assert before is None or before["gsc_final"] is False

        # Three days later the same day is final and the default window reaches back to it.
        google.today = TODAY + timedelta(days=3)
        later = Window(TODAY, TODAY + timedelta(days=2), explicit=False)
        outcome = await run_job(settings, RunRequest(later, sources=("gsc",)))
        assert outcome.windows["gsc"][0] <= TODAY - timedelta(days=2)
        after = (await stored_rows(conn))[(site.id, day)]
        assert after["gsc_final"] is True
        final = google.performance(site.registered_property, TODAY - timedelta(days=1)) or (0, 0)
        assert (after["gsc_clicks"], after["gsc_impressions"]) == final[:2]
