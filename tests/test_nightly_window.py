"""The nightly window heals itself, site by site: planning rules (pure), the set-based read of
the stored history (real Postgres) and the run that uses them (real Postgres, fake sources)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import aiohttp
import pytest

from aggregator import storage
from aggregator.config import ConfigError, Secret, Settings, load_settings
from aggregator.dates import Window, heal_limit, search_console_window, site_window
from aggregator.matomo import fetch_matomo_visits
from aggregator.model import GscDay, MatomoDay, Site, SiteHistory, SourceRecord
from aggregator.pipeline import RunRequest, SourceInput, run_job
from aggregator.planning import plan_source, skipped_gsc_sites
from aggregator.run_command import print_summary
from aggregator.simulators.matomo import MatomoSimulator
from tests.factories import add_account, add_site, stored_rows

YESTERDAY = date(2025, 3, 30)
LOOKBACK = Window(YESTERDAY - timedelta(days=3), YESTERDAY, explicit=False)
LIMIT = heal_limit(LOOKBACK, 30)
LONG_AGO = date(2000, 1, 1)


def day(n: int) -> date:
    """n days before yesterday."""
    return YESTERDAY - timedelta(days=n)


def history(site_id: int, **fields) -> SiteHistory:
    values = dict(
        deployed_on=LONG_AGO,
        matomo_heal_from=None,
        gsc_heal_from=None,
        matomo_served_at=None,
        gsc_served_at=None,
    )
    values.update(fields)
    return SiteHistory(site_id=site_id, **values)


# --- pure rules ---------------------------------------------------------------------------------


def test_a_site_window_widens_over_its_own_gaps_and_is_clipped_to_its_deployment() -> None:
    assert site_window(LOOKBACK, LONG_AGO) == LOOKBACK
    assert site_window(LOOKBACK, LONG_AGO, day(20)) == Window(day(20), YESTERDAY, False)
    assert site_window(LOOKBACK, LONG_AGO, day(1)) == LOOKBACK  # inside the lookback anyway
    assert site_window(LOOKBACK, day(10), day(20)) == Window(day(10), YESTERDAY, False)
    assert site_window(LOOKBACK, day(1)) == Window(day(1), YESTERDAY, False)
    assert site_window(LOOKBACK, YESTERDAY + timedelta(days=1)) is None
    assert heal_limit(LOOKBACK, 30) == day(30)


def test_one_sites_gaps_never_widen_another_sites_window() -> None:
    sites = [Site(1, "gappy.com", matomo_site_id=1), Site(2, "clean.com", matomo_site_id=2)]
    histories = {1: history(1, matomo_heal_from=day(25)), 2: history(2)}

    plan = plan_source("matomo", sites, histories, LOOKBACK)

    assert plan.windows == {1: Window(day(25), YESTERDAY, False), 2: LOOKBACK}
    assert (plan.start, plan.end) == (day(25), YESTERDAY)


def test_search_console_heals_its_own_days_not_matomos() -> None:
    sites = [Site(1, "a.com", matomo_site_id=1, gsc_account_id=1)]
    histories = {1: history(1, matomo_heal_from=day(9), gsc_heal_from=day(17))}

    assert plan_source("matomo", sites, histories, LOOKBACK).windows[1].start == day(9)
    assert plan_source("gsc", sites, histories, LOOKBACK).windows[1].start == day(17)


def test_an_explicit_range_is_not_widened_but_is_clipped_to_the_deployment() -> None:
    explicit = Window(day(40), YESTERDAY)
    sites = [Site(1, "old.com"), Site(2, "new.com"), Site(3, "future.com")]
    histories = {
        1: history(1, matomo_heal_from=day(29)),
        2: history(2, deployed_on=day(5)),
        3: history(3, deployed_on=YESTERDAY + timedelta(days=1)),
    }

    plan = plan_source("matomo", sites, histories, explicit)

    assert plan.windows == {1: explicit, 2: Window(day(5), YESTERDAY)}
    assert plan_source("matomo", sites[2:], histories, explicit) is None


def test_the_least_recently_served_sites_go_first() -> None:
    at = datetime(2025, 3, 30, 3, tzinfo=UTC)
    sites = [Site(n, f"s{n}.com") for n in range(1, 5)]
    histories = {
        1: history(1, matomo_served_at=at),
        2: history(2, matomo_served_at=at - timedelta(days=2)),
        3: history(3),  # never served
        4: history(4, matomo_served_at=at - timedelta(days=1)),
    }

    plan = plan_source("matomo", sites, histories, LOOKBACK)

    assert [s.id for s in plan.sites] == [3, 2, 4, 1]


def test_sites_of_inactive_accounts_are_named_as_skipped() -> None:
    sites = [Site(1, "on.com", gsc_account_id=1), Site(2, "off.com", gsc_account_id=2)]
    errors = skipped_gsc_sites(sites, {1: object()})  # type: ignore[dict-item]
    assert [(e.site, e.source) for e in errors] == [("off.com", "gsc")]
    assert "not active" in errors[0].error


@pytest.mark.parametrize("value", ["-1", "481", "thirty", "2.5"])
def test_heal_days_out_of_range_is_refused_in_one_line(value: str) -> None:
    with pytest.raises(ConfigError, match="AGGREGATOR_HEAL_DAYS") as caught:
        load_settings({"AGGREGATOR_HEAL_DAYS": value})
    assert "\n" not in str(caught.value) and "0 to 480" in str(caught.value)


def test_heal_days_defaults_to_thirty_and_accepts_zero() -> None:
    assert load_settings({}).heal_days == 30
    assert load_settings({"AGGREGATOR_HEAL_DAYS": "0"}).heal_days == 0


# --- the stored history, read in one statement --------------------------------------------------


async def store(conn, site: int, days, *, matomo=True, gsc_final: bool | None = True) -> None:
    gsc = None if gsc_final is None else (1, 10, 0.1, 2.0, gsc_final)
    rows = [storage.DailyRow(site, d, matomo=(1, 1) if matomo else None, gsc=gsc) for d in days]
    await storage.upsert_daily_rows(conn, rows)


def days_between(first: date, last: date) -> list[date]:
    return Window(first, last).days()


async def histories(conn, ids, zone: str = "UTC") -> dict[int, SiteHistory]:
    return await storage.site_histories(
        conn, ids, heal_limit=LIMIT, lookback_start=LOOKBACK.start, zone=zone
    )


async def tracked_site(conn, domain: str, **options) -> int:
    """A site on both sources (a site without a source has nothing of it to heal)."""
    account = await conn.fetchval("select id from gsc_accounts limit 1") or await add_account(
        conn, "a@example.com", "rt"
    )
    number = await conn.fetchval("select count(*) + 1 from sites")
    return await add_site(conn, domain, matomo_site_id=number, gsc_account_id=account, **options)


async def test_history_finds_each_sites_oldest_gap_per_source(conn) -> None:
    full = await tracked_site(conn, "full.com")
    holes = await tracked_site(conn, "holes.com")
    empty = await tracked_site(conn, "empty.com")
    untracked = await add_site(conn, "untracked.com")  # no source: nothing to heal
    await store(conn, full, days_between(day(40), YESTERDAY))
    await store(conn, holes, days_between(day(40), YESTERDAY))
    await store(conn, holes, [day(12)], matomo=False, gsc_final=False)  # gsc provisional
    await conn.execute(
        "update daily_analytics set matomo_visits = null, matomo_updated_at = null "
        "where site_id = $1 and date = $2",
        holes,
        day(7),
    )
    await conn.execute(
        "delete from daily_analytics where site_id = $1 and date = $2", holes, day(20)
    )
    # Older than the heal limit: never looked at.
    await conn.execute(
        "delete from daily_analytics where site_id = $1 and date = $2", holes, day(35)
    )

    found = await histories(conn, [full, holes, empty, untracked])

    assert (found[full].matomo_heal_from, found[full].gsc_heal_from) == (None, None)
    assert found[holes].matomo_heal_from == day(20)
    assert found[holes].gsc_heal_from == day(20)
    assert (found[empty].matomo_heal_from, found[empty].gsc_heal_from) == (LIMIT, LIMIT)
    assert found[empty].matomo_served_at is None
    assert (found[untracked].matomo_heal_from, found[untracked].gsc_heal_from) == (None, None)
    assert found[full].matomo_served_at is not None and found[full].gsc_served_at is not None


async def test_a_day_whose_numbers_were_cleared_is_healed_despite_its_timestamp(conn) -> None:
    """Missing means no value stored, as `status` counts it: numbers cleared by hand (or by
    another tool) leave the row and its *_updated_at behind, and are a gap all the same."""
    site = await tracked_site(conn, "cleared.com")
    await store(conn, site, days_between(day(40), YESTERDAY))
    await conn.execute(
        "update daily_analytics set matomo_visits = null, matomo_actions = null"
        " where site_id = $1 and date = $2",
        site,
        day(11),
    )
    await conn.execute(
        "update daily_analytics set gsc_clicks = null, gsc_impressions = null, gsc_ctr = null,"
        " gsc_position = null, gsc_final = null where site_id = $1 and date = $2",
        site,
        day(17),
    )
    assert await conn.fetchval(
        "select bool_and(matomo_updated_at is not null and gsc_updated_at is not null)"
        " from daily_analytics where site_id = $1",
        site,
    )

    found = (await histories(conn, [site]))[site]

    assert (found.matomo_heal_from, found.gsc_heal_from) == (day(11), day(17))


async def test_history_sees_provisional_days_and_the_local_deployment_day(conn) -> None:
    # 23:30 UTC on day(15) is already the next calendar day, day(14), in Auckland.
    deployed = datetime.combine(day(15), datetime.min.time(), UTC) + timedelta(hours=23.5)
    site = await tracked_site(conn, "nz.example", deployed_at=deployed)
    await store(conn, site, [d for d in days_between(day(15), YESTERDAY) if d != day(9)])
    await store(conn, site, [day(9)], gsc_final=False)

    in_utc = (await histories(conn, [site]))[site]
    in_auckland = (await histories(conn, [site], "Pacific/Auckland"))[site]

    assert in_utc.deployed_on == day(15)
    assert in_auckland.deployed_on == day(14)
    assert in_utc.matomo_heal_from is None  # nothing missing since the deployment
    assert in_utc.gsc_heal_from == day(9)


# --- runs that use the plan (fake sources, real Postgres) ---------------------------------------


def settings_for(dsn: str) -> Settings:
    return Settings(
        database_url=Secret(dsn),
        matomo_url="http://matomo.invalid",
        matomo_token=Secret("m-token"),
        google_client_id="client",
        google_client_secret=Secret("c-secret"),
    )


class Recorder:
    """Fake sources that serve every site over its own window and remember what they were
    asked; `serve_only` cuts a run after that many sites, as a deadline would."""

    def __init__(self, serve_only: int | None = None, stop: asyncio.Event | None = None) -> None:
        self.windows: dict[str, dict[int, Window]] = {}
        self.order: dict[str, list[int]] = {}
        self.serve_only = serve_only
        self.stop = stop

    async def matomo(self, given: SourceInput) -> AsyncIterator[SourceRecord]:
        self._remember("matomo", given)
        for n, site in enumerate(given.sites):
            if self.serve_only is not None and n == self.serve_only:
                self.stop.set()
                await asyncio.Event().wait()  # cut here, as a deadline would
            for d in given.windows[site.id].days():
                yield MatomoDay(site.id, d, 5, 7)

    async def gsc(self, given: SourceInput) -> AsyncIterator[SourceRecord]:
        self._remember("gsc", given)
        for site in given.sites:
            for d in given.windows[site.id].days():
                yield GscDay(site.id, d, 1, 10, 0.1, 2.0, final=True)

    def _remember(self, name: str, given: SourceInput) -> None:
        self.windows[name] = dict(given.windows)
        self.order[name] = [s.id for s in given.sites]

    @property
    def sources(self):
        return {"matomo": self.matomo, "gsc": self.gsc}


def nightly(today: date) -> RunRequest:
    yesterday = today - timedelta(days=1)
    return RunRequest(Window(yesterday - timedelta(days=3), yesterday, explicit=False))


async def test_a_missed_fortnight_heals_in_one_night_without_widening_other_sites(db, conn) -> None:
    account = await add_account(conn, "a@example.com", "rt")
    gappy = await add_site(conn, "gappy.com", matomo_site_id=1, gsc_account_id=account)
    clean = await add_site(conn, "clean.com", matomo_site_id=2, gsc_account_id=account)
    await store(conn, clean, days_between(day(30), day(4)))
    await store(conn, gappy, days_between(day(30), day(19)))
    await store(conn, gappy, [day(6)], matomo=True, gsc_final=False)

    recorder = Recorder()
    outcome = await run_job(
        settings_for(db), nightly(YESTERDAY + timedelta(days=1)), sources=recorder.sources
    )

    assert outcome.status == "ok"
    assert recorder.windows["matomo"] == {gappy: Window(day(18), YESTERDAY, False), clean: LOOKBACK}
    assert recorder.windows["gsc"] == {gappy: Window(day(18), YESTERDAY, False), clean: LOOKBACK}
    rows = await stored_rows(conn)
    assert all((gappy, d.isoformat()) in rows for d in days_between(day(18), YESTERDAY))
    run = await conn.fetchrow("select date_from, date_to from aggregator_runs")
    assert (run["date_from"], run["date_to"]) == (day(18), YESTERDAY)

    # The next night everything is filled: each window is the lookback again.
    await run_job(
        settings_for(db), nightly(YESTERDAY + timedelta(days=2)), sources=recorder.sources
    )
    assert {w.start for w in recorder.windows["matomo"].values()} == {day(2)}
    assert {w.start for w in recorder.windows["gsc"].values()} == {day(2)}


async def test_no_day_before_a_deployment_is_fetched_or_written_even_when_asked(db, conn) -> None:
    deployed = datetime.combine(day(2), datetime.min.time(), UTC) + timedelta(hours=9)
    mid = await add_site(conn, "mid.com", matomo_site_id=1, deployed_at=deployed)
    later = await add_site(
        conn, "later.com", matomo_site_id=2, deployed_at=deployed + timedelta(days=5)
    )
    recorder = Recorder()

    explicit = RunRequest(Window(day(10), YESTERDAY), sources=("matomo",))
    outcome = await run_job(settings_for(db), explicit, sources=recorder.sources)

    assert outcome.status == "ok"
    assert recorder.windows["matomo"] == {mid: Window(day(2), YESTERDAY)}
    rows = await stored_rows(conn)
    assert sorted(d for s, d in rows if s == mid) == [
        d.isoformat() for d in days_between(day(2), YESTERDAY)
    ]
    assert not any(s == later for s, _ in rows)


async def test_a_run_that_skips_sites_names_them_and_is_not_ok(db, conn) -> None:
    live = await add_account(conn, "live@example.com", "rt")
    dormant = await add_account(conn, "dormant@example.com", "rt2", active=False)
    await add_site(conn, "served.com", gsc_account_id=live)
    await add_site(conn, "skipped.com", gsc_account_id=dormant)

    outcome = await run_job(
        settings_for(db), nightly(YESTERDAY + timedelta(days=1)), sources=Recorder().sources
    )

    assert outcome.status == "partial" and outcome.exit_code == 1
    assert [(e.site, e.source) for e in outcome.errors] == [("skipped.com", "gsc")]
    run = await conn.fetchrow("select status, errors from aggregator_runs")
    assert run["status"] == "partial" and "skipped.com" in run["errors"]


async def test_a_run_cut_short_every_night_still_serves_every_site_in_turn(db, conn) -> None:
    sites = [await add_site(conn, f"s{n}.com", matomo_site_id=n) for n in range(1, 7)]
    served: set[int] = set()
    for night in range(3):
        stop = asyncio.Event()
        recorder = Recorder(serve_only=2, stop=stop)
        today = YESTERDAY + timedelta(days=1 + night)
        request = RunRequest(nightly(today).window, sources=("matomo",))
        await run_job(settings_for(db), request, sources=recorder.sources, stop=stop)
        first = set(recorder.order["matomo"][:2])
        assert first.isdisjoint(served), "sites served on an earlier night wait their turn"
        served |= first
    assert served == set(sites), "no site starves when every night is cut at the same place"


async def test_one_bulk_request_carries_each_sites_own_dates_and_yields_only_those() -> None:
    windows = {10: Window(day(20), YESTERDAY, False), 20: LOOKBACK}
    sites = [Site(10, "healing.com", matomo_site_id=1), Site(20, "clean.com", matomo_site_id=2)]
    simulator = MatomoSimulator(token="m-token", sites={1: "UTC", 2: "UTC"}, today=YESTERDAY)
    async with simulator, aiohttp.ClientSession() as session:
        settings = Settings(matomo_url=simulator.url, matomo_token=Secret("m-token"))
        records = [
            record
            async for record in fetch_matomo_visits(
                sites, LOOKBACK.start, LOOKBACK.end, settings, session, windows=windows
            )
        ]

    assert simulator.requests == 1 and simulator.subrequests == 2
    assert {(r.site_id, r.day) for r in records} == {
        (site, d) for site, window in windows.items() for d in window.days()
    }
    ids = {10: 1, 20: 2}
    for r in records:
        assert (r.visits, r.actions) == (simulator.visits(ids[r.site_id], r.day) or (0, 0))


async def test_search_console_is_asked_and_shown_only_what_it_keeps(db, conn) -> None:
    """`run --lookback 3000`: Matomo is asked the whole window, Search Console only its 16
    months (and a week), and the summary shows each source's window as asked."""
    account = await add_account(conn, "a@example.com", "rt")
    site = await add_site(conn, "old.com", matomo_site_id=1, gsc_account_id=account)
    long = Window(YESTERDAY - timedelta(days=2999), YESTERDAY, explicit=False)
    recorder = Recorder()

    outcome = await run_job(settings_for(db), RunRequest(long), sources=recorder.sources, stop=None)

    kept = search_console_window(long)
    assert kept.start == date(2023, 11, 23)  # 2025-03-30 less 16 months and a week
    assert recorder.windows == {"matomo": {site: long}, "gsc": {site: kept}}
    assert outcome.windows == {"matomo": (long.start, YESTERDAY), "gsc": (kept.start, YESTERDAY)}
    shown = io.StringIO()
    print_summary(outcome, shown)
    assert f"gsc {kept.start}..{YESTERDAY}" in shown.getvalue()
