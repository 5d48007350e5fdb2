"""The HTML report's pure parts: cell states, the compact grid, escaping, the run chart."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from aggregator.status import html
from aggregator.status.html_data import (
    BEFORE,
    FAILED,
    FINAL,
    MISSING,
    NOT_DUE,
    PROVISIONAL,
    ZERO,
    ReportData,
    SiteRow,
    Stored,
    cell_state,
    grid_days,
)
from aggregator.status.verdict import RunSummary, build_report
from aggregator.token_health import AccountHealth, TokenHealth

TODAY = date(2024, 5, 10)
DEPLOYED = date(2024, 5, 1)
DUE = date(2024, 5, 5)


@pytest.mark.parametrize(
    ("source", "day", "stored", "failing", "state"),
    [
        ("matomo", date(2024, 4, 30), Stored(matomo_visits=3), False, BEFORE),
        ("matomo", date(2024, 5, 2), Stored(matomo_visits=3), True, FINAL),
        ("matomo", date(2024, 5, 2), Stored(matomo_visits=0), False, ZERO),
        ("matomo", date(2024, 5, 2), None, False, MISSING),
        ("matomo", date(2024, 5, 2), Stored(gsc_final=True, gsc_impressions=5), True, FAILED),
        ("gsc", date(2024, 5, 2), Stored(gsc_final=True, gsc_impressions=5), False, FINAL),
        ("gsc", date(2024, 5, 2), Stored(gsc_final=True, gsc_impressions=0), False, ZERO),
        ("gsc", date(2024, 5, 8), Stored(gsc_final=False, gsc_impressions=5), False, PROVISIONAL),
        ("gsc", date(2024, 5, 8), None, False, NOT_DUE),
        ("gsc", date(2024, 5, 5), None, False, MISSING),
        ("gsc", date(2024, 5, 8), None, True, FAILED),
    ],
)
def test_cell_state(source, day, stored, failing, state) -> None:
    assert cell_state(source, day, stored, DEPLOYED, DUE, failing) == state


def test_grid_is_the_thirty_days_ending_yesterday() -> None:
    days = grid_days(TODAY)
    assert len(days) == 30 and days[-1] == date(2024, 5, 9) and days[0] == date(2024, 4, 10)


def data(sites: tuple[SiteRow, ...], runs=()) -> ReportData:
    now = datetime(2024, 5, 10, 8, tzinfo=UTC)
    health = TokenHealth(now - timedelta(days=8), now - timedelta(days=1), now, "invalid_grant")
    return ReportData(
        generated_at=now,
        zone=ZoneInfo("UTC"),
        days=grid_days(TODAY),
        sites=sites,
        accounts=(AccountHealth(1, "a@example.com", True, 2, health),),
        status=build_report(TODAY, [], list(runs)),
    )


def test_groups_by_account_and_opens_only_those_with_gaps() -> None:
    healthy = SiteRow("b.com", "a@example.com", {"matomo": FINAL * 30})
    gappy = SiteRow("c.com", "z@example.com", {"gsc": FINAL * 29 + MISSING})
    alone = SiteRow("d.com", None, {"matomo": ZERO * 30})
    grid = html.grid_data(data((gappy, alone, healthy)))
    assert [(g["name"], g["gaps"]) for g in grid["groups"]] == [
        ("a@example.com", 0),
        ("z@example.com", 1),
        (html.NO_GROUP, 0),
    ]
    assert grid["groups"][1]["rows"] == [["c.com", "", FINAL * 29 + MISSING]]


def test_page_is_self_contained_and_escapes_what_it_shows() -> None:
    hostile = SiteRow('</script><img src="http://evil.example/x">', None, {"matomo": MISSING})
    page = html.render(data((hostile,)))
    assert "<img" not in page  # the domain stays data: "<" is escaped inside the JSON
    plain = html.render(data((SiteRow("b.com", None, {"matomo": FINAL}),)))
    assert "http://" not in plain and "https://" not in plain  # nothing to fetch
    assert "<link" not in plain and " src=" not in plain
    # The token's likely cause is spelled out next to its error.
    assert "invalid_grant (it died about 7 days after it was connected" in page


def test_run_chart_draws_each_series_and_leaves_gaps_for_runs_without_stats() -> None:
    start = datetime(2024, 5, 1, 2, tzinfo=UTC)
    runs = [
        RunSummary(start + timedelta(days=k), start + timedelta(days=k, seconds=60 + k), "ok",
                   100 * k, 0, None, {"gsc": (10, k % 2)} if k != 2 else {})
        for k in range(5)
    ]  # fmt: skip
    page = html.render(data((), list(reversed(runs))))
    assert page.count("<svg") == 3
    assert "duration: max 64 s, last 64 s" in page
    assert "API error rate: max 10.0%, last 0.0%" in page
    # The run without stats splits the error-rate line in two.
    chart = page[page.index("API error rate") - 900 : page.index("API error rate")]
    assert chart.count("<polyline") == 2


def test_sizes_read_as_an_operator_expects() -> None:
    assert html.size_text(26_938) == "26 kB"
    assert html.size_text(872_191) == "872 kB"
    assert html.size_text(1_250_000) == "1.2 MB"
    assert html.size_text(12) == "1 kB"
