"""Thirty simulated nights with faults on some: afterwards, is the table right?

The real pipeline, the real clients and real Postgres run each night against the Matomo and
Google simulators over 127.0.0.1; time is the simulators' clock (each night's `today`, the
run's injected `now`), never the wall clock. Faults: one Google account's token is dead for
eight nights, Matomo is down for a weekend, one site loses its Search Console property for
good, one site is deployed mid-month and one is quiet (no Search Console rows in its fresh days,
so Google's answers carry no firstIncompleteDate for it).

At the end every reachable site-day holds exactly the simulators' numbers, no day before a
deployment exists, and every night cost one Search Console query per reachable site and one
Matomo bulk request (10 sites: ceil(10/100)).
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, date, datetime, time, timedelta

import pytest

from aggregator import matomo as matomo_client
from aggregator.dates import resolve_window
from aggregator.demo import simulated_settings
from aggregator.pipeline import RunRequest, run_job
from aggregator.simulators import portfolio as world
from tests.factories import seed, stored_rows

FIRST_NIGHT = date(2025, 5, 1)  # `today` of night 0
NIGHTS = 30
DEAD_TOKEN_NIGHTS = range(5, 13)  # account 2's token is revoked, then reconnected
MATOMO_DOWN_NIGHTS = (9, 10)  # a weekend
PROPERTY_LOST_NIGHT = 15  # site 3's property is removed from its account for good
LOST, QUIET, LATE = 3, 5, 7  # site ids (make_portfolio numbers sites 1..10)
LATE_DEPLOYED_ON = FIRST_NIGHT + timedelta(days=11)
HEAL_DAYS = 30


def today_of(night: int) -> date:
    return FIRST_NIGHT + timedelta(days=night)


@pytest.fixture
async def portfolio(db, conn) -> world.Portfolio:
    seeded = await seed(db, world.make_portfolio(10, 2))
    # Deployed mid-month: in the table from the start, with a deployment date still ahead.
    deployed_at = datetime.combine(LATE_DEPLOYED_ON, time(10), UTC)
    await conn.execute("update sites set deployed_at = $1 where id = $2", deployed_at, LATE)
    return seeded


@pytest.fixture
def quick_matomo_retries(monkeypatch) -> None:
    monkeypatch.setattr(matomo_client, "BACKOFF_INITIAL_SECONDS", 0.001)
    monkeypatch.setattr(matomo_client, "BACKOFF_MAX_SECONDS", 0.002)


async def test_a_month_of_nights_with_faults_ends_with_every_reachable_day_exact(
    db, conn, portfolio, quick_matomo_retries
) -> None:
    sites = {site.id: site for site in portfolio.sites}
    dead_account = portfolio.accounts[1]
    matomo_sites = [s for s in portfolio.sites if s.matomo_site_id is not None]
    async with (
        world.matomo_simulator(portfolio, today=FIRST_NIGHT) as matomo,
        world.google_simulator(
            portfolio,
            today=FIRST_NIGHT,
            metadata_only_when_incomplete=True,
            quiet_properties={sites[QUIET].registered_property},
        ) as google,
    ):
        settings = simulated_settings(
            db,
            matomo.url,
            google.url,
            gsc_max_qps_per_account=200,
            gsc_max_qps_per_client=400,
            http_max_attempts=2,
            heal_days=HEAL_DAYS,
        )
        lost_horizon = None
        for night in range(NIGHTS):
            today = today_of(night)
            matomo.today = google.today = today
            matomo.reset_counters()
            google.reset_counters()
            google.queried.clear()
            if night == DEAD_TOKEN_NIGHTS[0]:
                google.revoke(dead_account.refresh_token)
            if night == DEAD_TOKEN_NIGHTS[-1] + 1:
                google.reinstate(dead_account.refresh_token)
            matomo.fail_next = 10**6 if night in MATOMO_DOWN_NIGHTS else 0
            if night == PROPERTY_LOST_NIGHT:
                # Its last answer came the night before: days from that night's horizon on
                # were still provisional, and stay so.
                lost_horizon = google.first_incomplete_date() - timedelta(days=1)
                account = next(
                    a for a in google.accounts.values() if a.email.endswith("-1@demo.example")
                )
                del account.properties[sites[LOST].registered_property]

            now = datetime.combine(today, time(12), UTC)  # 04:00 or 05:00 in Pacific time
            outcome = await run_job(settings, RunRequest(resolve_window(today)), now=now)

            # One query per reachable site, whatever its window; one Matomo bulk request.
            reachable = reachable_gsc_sites(portfolio, night)
            asked = Counter(prop for prop, _, _ in google.queried)
            assert set(asked) == {sites[n].registered_property for n in reachable}, night
            assert set(asked.values()) <= {1}, night
            if night == DEAD_TOKEN_NIGHTS[-1] + 1:
                # Reconnected: its sites' windows reach back to their oldest day still
                # provisional (the last night before the token died left it so); the other
                # account's sites keep the plain lookback.
                starts = {prop: start for prop, start, _ in google.queried}
                healed_from = today_of(DEAD_TOKEN_NIGHTS[0] - 1) - timedelta(days=2)
                for number in reachable:
                    dead = sites[number].gsc_account_id == 2
                    want = healed_from if dead else today - timedelta(days=4)
                    if number == LATE:
                        want = max(want, LATE_DEPLOYED_ON)
                    assert starts[sites[number].registered_property] == want, number
            if night not in MATOMO_DOWN_NIGHTS:
                assert matomo.requests == math.ceil(len(matomo_sites) / 100) == 1, night
            expect_ok = not (
                night in DEAD_TOKEN_NIGHTS
                or night in MATOMO_DOWN_NIGHTS
                or night >= PROPERTY_LOST_NIGHT
            )
            assert (outcome.status == "ok") is expect_ok, (night, outcome.errors)
            # A quiet site's fresh days are never claimed final (no firstIncompleteDate).
            assert not await conn.fetchval(
                "select count(*) from daily_analytics where site_id = $1 and date >= $2"
                " and gsc_final",
                QUIET,
                today - timedelta(days=3),
            ), night

        last_today = today_of(NIGHTS - 1)
        yesterday = last_today - timedelta(days=1)
        # One site's endless gaps (its lost property) never widened the others' windows.
        lookback_start = yesterday - timedelta(days=3)
        assert {start for _, start, _ in google.queried} == {lookback_start}
        rows = await stored_rows(conn)

    first_day = today_of(0) - timedelta(days=1 + HEAL_DAYS)
    days = [first_day + timedelta(days=n) for n in range((yesterday - first_day).days + 1)]
    assert not [key for key in rows if key[0] == LATE and key[1] < LATE_DEPLOYED_ON.isoformat()]

    for site in portfolio.sites:
        deployed_on = LATE_DEPLOYED_ON if site.id == LATE else date(2024, 1, 1)
        for day in (d for d in days if d >= deployed_on):
            row = rows.get((site.id, day.isoformat()))
            assert row is not None, (site.id, day)
            truth = matomo.visits(site.matomo_site_id, day) or (0, 0)
            assert (row["matomo_visits"], row["matomo_actions"]) == truth, (site.id, day)
            check_gsc(google, site, day, row, last_today, lost_horizon)


def reachable_gsc_sites(portfolio: world.Portfolio, night: int) -> set[int]:
    yesterday = today_of(night) - timedelta(days=1)
    reachable = set()
    for site in portfolio.sites:
        if site.gsc_account_id == 2 and night in DEAD_TOKEN_NIGHTS:
            continue
        if site.id == LOST and night >= PROPERTY_LOST_NIGHT:
            continue
        if site.id == LATE and yesterday < LATE_DEPLOYED_ON:
            continue
        reachable.add(site.id)
    return reachable


def check_gsc(google, site, day: date, row: dict, today: date, lost_horizon: date) -> None:
    """The contract's rules against the simulator's truth on the last night."""
    got = (row["gsc_clicks"], row["gsc_impressions"], row["gsc_final"])
    horizon = google.first_incomplete_date()
    prop = site.registered_property
    if site.id == LOST and day >= lost_horizon:
        return  # Google stopped answering for it before these days were final
    if site.id == QUIET and day >= today - timedelta(days=3):
        # No firstIncompleteDate in its answers: from today - 3 on, days stay provisional.
        numbers = google.performance(prop, day, provisional=True)
        want = None if numbers is None else (numbers[0], numbers[1], False)
        assert (got if got[2] is not None else None) == want, (site.id, day)
        return
    final = day < horizon
    numbers = google.performance(prop, day, provisional=not final)
    if numbers is None and not final:
        assert row["gsc_final"] is None, (site.id, day)
        return
    clicks, impressions, ctr, position = numbers or (0, 0, None, None)
    assert got == (clicks, impressions, final), (site.id, day)
    assert row["gsc_ctr"] == pytest.approx(ctr) and row["gsc_position"] == pytest.approx(position)
