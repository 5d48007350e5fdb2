"""The benchmark's pure helpers: the theoretical floor, account counts, rows and the table."""

from __future__ import annotations

from datetime import date, timedelta
from types import SimpleNamespace

import pytest

from aggregator import bench
from aggregator.simulators import portfolio as world


def test_floor_is_the_slowest_accounts_paced_requests_plus_two_latencies() -> None:
    portfolio = world.make_portfolio(200, 4)
    # 200 sites, every 30th without Search Console: 194 queries over 4 accounts; every account
    # has sites without a stored property, so each also needs one sites.list.
    queries = {a.id: 0 for a in portfolio.accounts}
    derived = {a.id: 0 for a in portfolio.accounts}
    for site in portfolio.sites:
        if site.gsc_account_id is not None:
            queries[site.gsc_account_id] += 1
            derived[site.gsc_account_id] += site.stored_property is None
    # Each account's requests (+ sites.list), or the listing's answer and its derived sites.
    slowest = max(max((queries[a] + 1) / 20, 0.1 + derived[a] / 20) for a in queries)

    floor = bench.pipeline_floor(portfolio, latency=0.1, account_qps=20, client_qps=1000)

    assert bench.expected_queries(portfolio) == 194
    assert floor.bound == "account"
    assert floor.seconds == pytest.approx(0.2 + slowest)


def test_floor_names_the_client_or_matomo_when_they_are_slower() -> None:
    portfolio = world.make_portfolio(200, 4)

    client = bench.pipeline_floor(portfolio, latency=0.1, account_qps=20, client_qps=10)
    assert client.bound == "client"
    assert client.seconds == pytest.approx(0.2 + (194 + 4) / 10)

    matomo = bench.pipeline_floor(portfolio, latency=10, batch_size=10, concurrency=1)
    assert matomo.bound == "matomo"
    assert matomo.seconds == pytest.approx(20 * 10)  # 192 Matomo sites: 20 rounds of 10 s


def test_an_account_whose_properties_are_all_stored_needs_no_sites_list() -> None:
    portfolio = world.make_portfolio(20, 10)  # account 10 owns sites 10 and 20: both stored
    floor = bench.pipeline_floor(portfolio, latency=0, account_qps=1, client_qps=1000)
    assert floor.seconds == pytest.approx(3)  # the others: 2 queries + sites.list


def test_accounts_for_sizes() -> None:
    assert [bench.accounts_for(n) for n in (200, 2_000, 10_000)] == [4, 10, 20]
    assert bench.accounts_for(50) == 1
    assert bench.accounts_for(5_001) == 11


def test_synthetic_rows_are_unique_and_a_second_variant_changes_every_row() -> None:
    first = list(bench.synthetic_rows(7, 5, variant=0))
    second = list(bench.synthetic_rows(7, 5, variant=1))

    assert len({(r.site_id, r.day) for r in first}) == 35
    assert all(a.matomo != b.matomo and a.gsc != b.gsc for a, b in zip(first, second, strict=True))


def test_table_aligns_columns() -> None:
    text = bench.table(("name", "n"), [("a", 1), ("longer", 1000)])
    assert text.splitlines() == ["name       n", "------  ----", "a          1", "longer  1000"]


def test_nightly_history_holds_the_promised_gaps_and_counts_what_the_night_needs() -> None:
    portfolio = world.make_portfolio(2_000, 4)  # a fifth of the 10,000-site counts
    today = date(2025, 6, 10)

    history = bench.nightly_history(portfolio, today)

    keys = [(r[0], r[1]) for r in history.records]
    assert len(keys) == len(set(keys))
    assert (history.gaps, history.stale) == (6 * 7 + 20, 8)
    yesterday = today - timedelta(days=1)
    assert {day for _, day in keys} == {
        yesterday - timedelta(days=n) for n in range(1, bench.HISTORY_DAYS + 1)
    }
    values = sum((r[2] is not None) + (r[5] is not None) for r in history.records)
    sources = sum(
        (s.matomo_site_id is not None) + (s.gsc_account_id is not None) for s in portfolio.sites
    )
    assert values == sources * bench.HISTORY_DAYS - history.gaps
    # The stale rows, and the two newest days of every Search Console site (as last night
    # left them; gaps are older than the lookback).
    gsc_sites = sum(1 for s in portfolio.sites if s.gsc_account_id is not None)
    assert sum(1 for r in history.records if r[9] is False) == 8 + 2 * gsc_sites
    assert len(portfolio.sites) * bench.LOOKBACK_DAYS < history.required
    assert history.required <= len(portfolio.sites) * bench.LOOKBACK_DAYS + history.gaps + 8


def test_flushing_targets_name_what_was_missed() -> None:
    single = [bench.UpsertResult("insert", 1_000_000, 10.0, 40, 50, 1_000_000)]  # 100,000/s

    def backfill(seconds: float, peak_mb: float) -> bench.FlushingResult:
        return bench.FlushingResult(10_000, 200, 2_000_000, 2_000_000, seconds, "ok", 40, peak_mb)

    assert bench.flushing_targets(backfill(25.0, 149), single) == "met"  # 80%
    assert bench.flushing_targets(backfill(26.0, 149), single) == "missed: 77% < 80% of one upsert"
    assert bench.flushing_targets(backfill(20.0, 150), single) == "missed: peak RSS 150 >= 150 MB"
    assert "met" in bench.flushing_table(backfill(20.0, 90), single)


async def test_the_flushing_stand_ins_yield_the_halves_of_the_synthetic_rows() -> None:
    sources = bench._synthetic_sources(days=7)
    given = SimpleNamespace(sites=[SimpleNamespace(id=site) for site in (1, 29, 30)])
    matomo = [record async for record in sources["matomo"](given)]
    gsc = [record async for record in sources["gsc"](given)]
    rows = list(bench.synthetic_rows((1, 29, 30), 7, variant=0))
    assert [(r.site_id, r.day, (r.visits, r.actions)) for r in matomo] == [
        (r.site_id, r.day, r.matomo) for r in rows
    ]
    assert [(r.site_id, r.day, tuple(r)[2:]) for r in gsc] == [
        (r.site_id, r.day, r.gsc) for r in rows
    ]


def test_sites_with_a_derived_property_wait_for_the_listing_in_the_floor() -> None:
    """At 500 ms a call, an account whose every property is derived asks nothing for its
    sites before sites.list has answered: half a second more than its paced requests."""
    portfolio = world.make_portfolio(20, 10)  # accounts 1-9 own 2 derived sites each
    floor = bench.pipeline_floor(portfolio, latency=0.5, account_qps=1, client_qps=1000)
    assert floor.seconds == pytest.approx(2 * 0.5 + max(3 / 1, 0.5 + 2 / 1))
    at_100_ms = bench.pipeline_floor(portfolio, latency=0.1, account_qps=20, client_qps=1000)
    assert at_100_ms.seconds == pytest.approx(2 * 0.1 + 0.1 + 2 / 20)
