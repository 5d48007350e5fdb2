"""Search Console rates need no tuning: with no GSC_MAX_QPS_* set, runs against simulators that
answer 429 beyond a per-account and a per-project quota find the rates Google allows, store
them, and start the next run from them. Asserted from the simulator's own counts and the stored
rates, never from wall time.

Rates are scaled up (quotas of 40-100 queries/s, and the safe start with them) so a run takes a
second or two of real loop time; the controller only sees ratios and seconds, so the scaling
keeps its behaviour.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import date

import asyncpg
import pytest
from structlog.testing import capture_logs

from aggregator import migrations, storage
from aggregator.dates import Window
from aggregator.demo import simulated_settings
from aggregator.model import GscDay, LearnedRate, SourceRecord
from aggregator.pipeline import (
    RunOutcome,
    RunRequest,
    Source,
    SourceInput,
    default_source,
    run_job,
)
from aggregator.search_console import client as gsc
from aggregator.search_console import rates
from aggregator.search_console.rates import Throttle
from aggregator.simulators import portfolio as world
from aggregator.simulators.google import GoogleSimulator
from tests.factories import migrated_before, seed

TODAY = date(2025, 6, 10)
WINDOW = Window(date(2025, 6, 8), date(2025, 6, 9))


# Rates here are ~20-60 times Google's; waits shrink by as much, so the simulated night keeps
# its proportions (a Retry-After of 1 s is 50 ms of loop time).
TIME_SCALE = 20.0


async def scaled_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds / TIME_SCALE)


@pytest.fixture(autouse=True)
def scaled_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gsc, "_backoff_sleep", scaled_sleep)


async def night(db: str, google: GoogleSimulator) -> RunOutcome:
    settings = simulated_settings(db, "http://unused.invalid", google.url)
    assert settings.gsc_max_qps_per_account is None and settings.gsc_max_qps_per_client is None
    return await run_job(settings, RunRequest(WINDOW, sources=("gsc",)))


async def learned(conn: asyncpg.Connection) -> dict[tuple[str, str], float]:
    rows = await conn.fetch("select scope, key, queries_per_second from gsc_learned_rates")
    return {(r["scope"], r["key"]): r["queries_per_second"] for r in rows}


async def limits_shown(conn: asyncpg.Connection) -> dict[tuple[str, str], bool]:
    rows = await conn.fetch("select scope, key, limit_shown from gsc_learned_rates")
    return {(r["scope"], r["key"]): r["limit_shown"] for r in rows}


def gsc_sites(portfolio: world.Portfolio) -> int:
    return sum(1 for site in portfolio.sites if site.gsc_account_id is not None)


async def test_standard_quota_second_night_starts_within_ten_percent_under_it(
    db, conn, monkeypatch
) -> None:
    """Per account 40/s, per project 1,333/s (Google's 1,200/min and 40,000/min, scaled): the
    accounts' quota binds, and after two nights each account's learned rate sits within 10%
    under it; the client's never exceeds the project's."""
    monkeypatch.setattr(rates, "START_RATE", 2.0)  # 1/s against 20/s, scaled
    portfolio = await seed(db, world.make_portfolio(300, 3))
    async with world.google_simulator(
        portfolio, today=TODAY, qps_per_account=40, qps_per_project=1333, quota_wording=True
    ) as google:
        first = await night(db, google)
        after_first = await learned(conn)
        google.reset_counters()
        second = await night(db, google)
        after_second = await learned(conn)
        kinds = await limits_shown(conn)

    assert first.status == second.status == "ok"
    for account in portfolio.accounts:
        assert after_first[("account", str(account.id))] <= 40
        assert 0.9 * 40 <= after_second[("account", str(account.id))] <= 40
    assert after_second[("client", world.CLIENT_ID)] <= 1333
    # The accounts were refused, the client never was: its rate is a floor, not a limit.
    assert all(kinds[("account", str(account.id))] for account in portfolio.accounts)
    assert kinds[("client", world.CLIENT_ID)] is False
    # The second night starts at the learned rate: hardly any refusal.
    assert google.rate_limited <= len(portfolio.accounts) * 3
    assert second.stats["gsc"].rate_limited == google.rate_limited


async def test_a_new_projects_60_per_minute_fails_no_site(db, conn, monkeypatch) -> None:
    """A new Cloud project's 60 queries/min (scaled to 60/s, with the safe start scaled alike):
    every site is stored and fewer than 1 query in 10 is refused."""
    monkeypatch.setattr(rates, "START_RATE", 60.0)
    portfolio = await seed(db, world.make_portfolio(124, 4))
    async with world.google_simulator(
        portfolio, today=TODAY, qps_per_account=1200, qps_per_project=60, quota_wording=True
    ) as google:
        outcome = await night(db, google)

    assert outcome.status == "ok", outcome.errors[:3]
    assert google.rate_limited < google.query_requests / 10
    assert 0 < (await learned(conn))[("client", world.CLIENT_ID)] <= 60


async def test_a_quota_shared_with_another_client_fails_no_site(db, conn, monkeypatch) -> None:
    """Another tool eats half of the project's quota (50 of 100/s): the job finds the half
    that is left and every site is stored."""
    monkeypatch.setattr(rates, "START_RATE", 10.0)
    portfolio = await seed(db, world.make_portfolio(93, 3))
    async with world.google_simulator(
        portfolio,
        today=TODAY,
        qps_per_account=40,
        qps_per_project=100,
        foreign_qps=50,
        quota_wording=True,
    ) as google:
        outcome = await night(db, google)

    assert outcome.status == "ok", [e.error for e in outcome.errors[:3]]
    assert outcome.stats["gsc"].sites_ok == gsc_sites(portfolio)
    assert (await learned(conn))[("client", world.CLIENT_ID)] <= 50


def cut_after(sites: int, stop: asyncio.Event) -> Source:
    """The real Search Console source, interrupted (as by a signal) once `sites` sites have
    numbers: the accounts are cut mid-night."""
    real = default_source("gsc")

    async def gsc_source(given: SourceInput) -> AsyncIterator[SourceRecord]:
        served: set[object] = set()
        async for record in real(given):
            yield record
            if isinstance(record, GscDay):
                served.add(record.site_id)
            if len(served) >= sites:
                stop.set()

    return gsc_source


async def test_a_run_cut_short_stores_and_logs_what_every_account_learned(
    db, conn, monkeypatch
) -> None:
    """Interrupted mid-night, every account that began (and the OAuth client) keeps the rate
    it learned so far for the next run, and each is logged once with that rate."""
    monkeypatch.setattr(rates, "START_RATE", 2.0)  # 1/s against 20/s, scaled
    portfolio = await seed(db, world.make_portfolio(300, 3))
    stop = asyncio.Event()
    async with world.google_simulator(
        portfolio, today=TODAY, qps_per_account=40, qps_per_project=1333, quota_wording=True
    ) as google:
        settings = simulated_settings(db, "http://unused.invalid", google.url)
        with capture_logs() as logs:
            outcome = await run_job(
                settings,
                RunRequest(WINDOW, sources=("gsc",)),
                sources={"gsc": cut_after(30, stop)},
                stop=stop,
            )

    assert outcome.interrupted is not None and outcome.stats["gsc"].sites_ok < gsc_sites(portfolio)
    stored = await learned(conn)
    cut = [entry for entry in logs if entry["event"] == "gsc.account_cut"]
    assert sorted(entry["account"] for entry in cut) == sorted(a.email for a in portfolio.accounts)
    assert not any(entry["event"] == "gsc.account_done" for entry in logs)
    ids = {account.email: str(account.id) for account in portfolio.accounts}
    for entry in cut:
        rate = stored[("account", ids[entry["account"]])]
        # It grew from the safe start while Google answered, and the log says what was stored.
        assert rate > rates.START_RATE
        assert entry["learned_qps"] == round(rate, 2)
    client = [entry for entry in logs if entry["event"] == "gsc.client_rate"]
    assert len(client) == 1
    assert client[0]["learned_qps"] == round(stored[("client", world.CLIENT_ID)], 2)


async def test_each_accounts_learned_rate_is_logged_once_per_run(db, conn) -> None:
    portfolio = await seed(db, world.make_portfolio(40, 4))
    async with world.google_simulator(portfolio, today=TODAY, qps_per_account=40) as google:
        with capture_logs() as logs:
            outcome = await night(db, google)

    assert outcome.status == "ok"
    stored = await learned(conn)
    done = [entry for entry in logs if entry["event"] == "gsc.account_done"]
    assert sorted(entry["account"] for entry in done) == sorted(
        account.email for account in portfolio.accounts
    )
    for account in portfolio.accounts:
        (entry,) = [e for e in done if e["account"] == account.email]
        assert entry["learned_qps"] == round(stored[("account", str(account.id))], 2)


def serve(throttle: Throttle, now: float, seconds: float, limit: float | None = None) -> float:
    """Queries at the throttle's pace for `seconds`, each answered unless `limit` (queries
    in the trailing second) is reached; returns the clock."""
    accepted: list[float] = []
    end = now + seconds
    while now < end:
        now += 1 / throttle.rate
        throttle.sent(now)
        recent = [at for at in accepted if at > now - 1.0]
        if limit is not None and len(recent) >= limit:
            throttle.refused(now, now)
        else:
            accepted.append(now)
            throttle.answered(now, now)
    return now


def test_a_refusal_sets_the_limit_and_the_rate_settles_just_under_it(monkeypatch) -> None:
    monkeypatch.setattr(rates, "START_RATE", 2.0)
    throttle = Throttle(start=None, ceiling=None)
    now = serve(throttle, 0.0, 3.0)
    assert throttle.rate > 30, "it grows while Google answers"
    now = serve(throttle, now, 20.0, limit=40)
    assert throttle.held_limit is not None and throttle.held_limit >= 0.9 * 40
    assert 0.9 * 40 <= throttle.rate <= 40, "close under the limit, not far below"
    assert throttle.learned().limit_shown
    assert 0.9 * 40 <= throttle.learned().queries_per_second <= 40


def test_a_ceiling_is_never_exceeded_and_the_rate_never_drops_below_the_floor() -> None:
    throttle = Throttle(start=None, ceiling=5.0)
    now = serve(throttle, 0.0, 10.0)
    assert throttle.rate == 5.0
    for step in range(20):
        throttle.refused(now + 2 * step, now + 2 * step)
    assert throttle.rate >= rates.MIN_RATE


def test_a_learned_rate_is_where_the_next_run_stays_until_it_probes_above_it() -> None:
    throttle = Throttle(start=LearnedRate(38.0, limit_shown=True), ceiling=None)
    now = serve(throttle, 1000.0, rates.PROBE_AFTER - 1, limit=40)
    assert throttle.refusals == 0 and throttle.rate == pytest.approx(38.0)
    serve(throttle, now, 5.0, limit=40)
    assert throttle.rate <= 40, "a probe above the limit is cut back under it"


def test_a_rate_held_by_the_operators_ceiling_is_not_learned() -> None:
    """A ceiling is the operator's choice for a run, not Google's limit: a run held under it
    learns nothing, and one that started from an earlier rate keeps that rate for the next."""
    fresh = Throttle(start=None, ceiling=0.5)
    serve(fresh, 0.0, 30.0)
    assert fresh.rate == 0.5 and fresh.learned() is None
    earlier = Throttle(start=LearnedRate(38.0, limit_shown=True), ceiling=0.5)
    serve(earlier, 0.0, 30.0)
    assert earlier.rate == 0.5 and earlier.learned() == (pytest.approx(38.0), True)


def test_a_rate_learned_without_a_refusal_is_a_floor_the_next_run_grows_from() -> None:
    """A small portfolio never nears the quota: its run stores the fastest rate it used,
    marked as no limit. A later, bigger run starts there and speeds up while Google answers,
    instead of creeping up 5% per PROBE_AFTER as it does from a limit Google showed."""
    small = Throttle(start=LearnedRate(4.0, limit_shown=False), ceiling=None)
    serve(small, 0.0, 1.0)
    assert small.learned() == (pytest.approx(small.peak), False) and small.peak >= 4.0
    bigger = Throttle(start=small.learned(), ceiling=None)
    serve(bigger, 0.0, 3.0, limit=40)
    assert bigger.refusals > 0 and 0.9 * 40 <= bigger.learned().queries_per_second <= 40
    as_limit = Throttle(start=LearnedRate(4.0, limit_shown=True), ceiling=None)
    serve(as_limit, 0.0, 3.0, limit=40)
    assert as_limit.rate < 5, "from a limit shown, the same 3 s would barely move"


async def test_a_night_under_a_ceiling_does_not_slow_the_nights_after_it(db, conn) -> None:
    """GSC_MAX_QPS_PER_ACCOUNT set for one night leaves the rates learned without it as they
    were, so the next night (no ceiling) starts from Google's limit, not from the ceiling."""
    portfolio = await seed(db, world.make_portfolio(40, 2))
    async with world.google_simulator(portfolio, today=TODAY, qps_per_account=40) as google:
        assert (await night(db, google)).status == "ok"
        before = await learned(conn)
        settings = simulated_settings(db, "http://unused.invalid", google.url)
        capped = dataclasses.replace(settings, gsc_max_qps_per_account=5.0)
        outcome = await run_job(capped, RunRequest(WINDOW, sources=("gsc",)))
        after = await learned(conn)

    assert outcome.status == "ok"
    accounts = [("account", str(account.id)) for account in portfolio.accounts]
    assert all(before[key] > 5.0 for key in accounts), before
    assert {key: after[key] for key in accounts} == {key: before[key] for key in accounts}


def test_growth_starts_with_the_first_answer(monkeypatch) -> None:
    """At one query a second the first answer already counts the rate as in use: growth does
    not wait for three queries' worth of a 3-second window."""
    monkeypatch.setattr(rates, "START_RATE", rates.START_RATE_DEFAULT)
    throttle = Throttle(start=None, ceiling=None)
    throttle.sent(0.0)
    throttle.answered(0.1, 0.0)
    assert throttle.rate > rates.START_RATE


def test_a_refusal_holds_the_scope_until_googles_window_has_drained() -> None:
    """Google counts what it accepted over the trailing second: the cut scope sends nothing
    until the oldest of those leaves that second, so the overshoot is refused once, not again
    for every query the cut rate sends into a full window."""
    throttle = Throttle(start=LearnedRate(19.0, limit_shown=False), ceiling=None)
    accepted = [1.5 + n / 40 for n in range(20)]  # a slow start reaching 40/s; the limit 20
    for at in accepted:
        throttle.sent(at)
        throttle.answered(at + 0.1, at)
    refused_at = accepted[-1] + 1 / 40
    throttle.sent(refused_at)
    throttle.refused(refused_at + 0.1, refused_at)
    oldest_counted = min(at for at in accepted if at > refused_at - rates.QUOTA_WINDOW)
    assert throttle.resume_at == pytest.approx(oldest_counted + rates.QUOTA_WINDOW)
    assert throttle.resume_at > refused_at + 0.1


def test_a_probed_limit_is_learned_only_once_it_held() -> None:
    """Starting from a limit shown, the rate probes above it after PROBE_AFTER calm seconds at
    its target; what the next run starts from is a limit that then held PROBE_AFTER more, so a
    probe the night ended on is not stored, and a probe Google refused is cut back."""
    roomy = Throttle(start=LearnedRate(19.0, limit_shown=True), ceiling=None)
    serve(roomy, 0.0, 3 * rates.PROBE_AFTER + 1)
    assert roomy.limit > roomy.held_limit > 20.0, "it probed, and all but the last probe held"
    assert roomy.learned() == (pytest.approx(rates.SETTLE * roomy.held_limit), True)
    tight = Throttle(start=LearnedRate(19.0, limit_shown=True), ceiling=None)
    serve(tight, 0.0, 10 * rates.PROBE_AFTER, limit=20)
    assert tight.refusals > 0 and tight.learned().queries_per_second <= 20


async def test_rates_stored_before_007_are_floors_and_applying_it_again_changes_nothing(
    empty_db, tmp_path
) -> None:
    """A rate stored before limit_shown existed is of unknown kind: it starts as a floor, so
    one run re-finds the limit instead of taking a floor for one."""
    async with migrated_before(empty_db, "007", tmp_path) as conn:
        await conn.execute(
            "insert into gsc_learned_rates (scope, key, queries_per_second) values ('account', '1', 4)"
        )
        assert await migrations.apply_migrations(conn) == ["007_learned_rate_kind"]
        assert await storage.load_learned_rates(conn) == {
            ("account", "1"): LearnedRate(4.0, limit_shown=False)
        }
        assert await migrations.apply_migrations(conn) == []


def test_a_limit_learned_on_a_bad_night_is_outgrown_within_a_minute() -> None:
    """A night when Google allowed 0.6 queries a second stored that limit; the quota is back
    to 20. Probes that hold grow their step, so the rate is close to 20 within a minute, and
    the first refusal brings the step back to its smallest."""
    throttle = Throttle(start=LearnedRate(0.6, limit_shown=True), ceiling=None)
    serve(throttle, 0.0, 60.0, limit=20)
    assert throttle.refusals > 0
    assert 0.8 * 20 <= throttle.rate <= 20


def test_a_lone_refusal_at_the_operators_ceiling_holds_and_keeps_the_rate() -> None:
    """At the operator's ceiling, one refusal is jitter (arrivals bunched on the way): the
    scope waits for Google's window to drain and goes on at the ceiling. A second refusal
    within PROBE_AFTER is a quota under the ceiling: it cuts."""
    throttle = Throttle(start=None, ceiling=20.0)
    now = serve(throttle, 0.0, 1.0)
    assert throttle.rate == 20.0
    throttle.sent(now)
    throttle.refused(now + 0.1, now)
    assert throttle.rate == 20.0 and throttle.limit is None
    assert now - 1.0 < throttle.resume_at <= now + 0.1, "held until the window drained"
    now = serve(throttle, now + 0.1, rates.PROBE_AFTER / 2)
    throttle.refused(now, now)
    assert throttle.rate < 20.0 and throttle.limit is not None


def test_a_quota_under_the_ceiling_costs_one_refusal_more_than_without_one() -> None:
    """A ceiling set above Google's limit: the first refusal only holds, the next one cuts,
    and the rate settles under the limit as it does with no ceiling."""
    capped = Throttle(start=None, ceiling=40.0)
    serve(capped, 0.0, 20.0, limit=20)
    assert 0.9 * 20 <= capped.rate <= 20
    free = Throttle(start=LearnedRate(40.0, limit_shown=False), ceiling=None)
    serve(free, 0.0, 20.0, limit=20)
    assert capped.refusals <= free.refusals + 1
