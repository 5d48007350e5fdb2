"""The Search Console source: pure parsing/classification, then whole runs against mocks.

Search Console is mocked with aioresponses (recorded bodies from tests/fixtures/gsc); the token
endpoint is the real local server from test_google_oauth. Backoff never really sleeps.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import math
import re
from collections.abc import Awaitable, Callable, Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp
import pytest
import structlog
from aioresponses import aioresponses
from yarl import URL

from aggregator.demo import simulated_settings
from aggregator.model import AccountRefresh, GscAccount, GscDay, Site, SiteError
from aggregator.search_console import account_run
from aggregator.search_console import answers as search_console_data
from aggregator.search_console import client as gsc
from aggregator.search_console.answers import (
    RETENTION_DAYS,
    GscDataError,
    accessible_properties,
    candidate_properties,
    days_from_search_analytics,
    normalize_domain,
    search_analytics_request,
)
from aggregator.search_console.client import fetch_gsc_performance
from aggregator.search_console.errors import (
    ErrorKind,
    classify_google_error,
    parse_retry_after,
    rate_limit_delay,
)
from aggregator.search_console.pacing import CATCH_UP, PACING_HEADROOM, Pacer
from aggregator.simulators import portfolio as world
from tests.test_search_console_oauth import (
    CLIENT_SECRET,
    INVALID_CLIENT,
    INVALID_GRANT,
    RecordedSleep,
    TokenEndpoint,
    settings_for,
)

GSC_FIXTURES = Path(__file__).parent / "fixtures" / "gsc"
API = "https://gsc.test"
SITES_URL = URL(f"{API}/webmasters/v3/sites")
# What Google answers when nothing matched: no rows, but still its aggregation type.
EMPTY_ANSWER = {"responseAggregationType": "byProperty"}
START, END = date(2024, 5, 1), date(2024, 5, 3)
# Search Console's today in the parsing tests: weeks after their days, so all are settled.
LATER = date(2024, 6, 1)
ACCOUNT_A = GscAccount(1, "a@example.com", "1//refresh-token-a")
ACCOUNT_B = GscAccount(2, "b@example.com", "1//refresh-token-b")
ACCOUNTS = {1: ACCOUNT_A, 2: ACCOUNT_B}


def gsc_fixture(name: str) -> Any:
    return json.loads((GSC_FIXTURES / name).read_text())


def query_url(prop: str) -> URL:
    # Registered pre-encoded: a request whose path decoded %3A would not match.
    return URL(
        f"{API}/webmasters/v3/sites/{quote(prop, safe='')}/searchAnalytics/query", encoded=True
    )


def answer(rows: dict[str, tuple[float, float, float, float]], **metadata: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "rows": [
            {"keys": [day], "clicks": c, "impressions": i, "ctr": ctr, "position": pos}
            for day, (c, i, ctr, pos) in rows.items()
        ],
        "responseAggregationType": "byProperty",
    }
    if metadata:
        body["metadata"] = metadata
    return body


def day(n: int) -> date:
    return START + timedelta(days=n)


def hanging_request() -> tuple[asyncio.Event, Callable[..., Awaitable[None]]]:
    """An aioresponses callback for a request that never gets an answer, and its start signal.

    A plain coroutine function, since aioresponses only awaits what iscoroutinefunction accepts.
    """
    started = asyncio.Event()

    async def never_answer(url: URL, **kwargs: Any) -> None:
        started.set()
        await asyncio.Event().wait()

    return started, never_answer


@pytest.fixture
def token_endpoint() -> Iterator[TokenEndpoint]:
    with TokenEndpoint() as endpoint:
        yield endpoint


@pytest.fixture
def sleep(monkeypatch: pytest.MonkeyPatch) -> RecordedSleep:
    recorded = RecordedSleep()
    monkeypatch.setattr(gsc, "_backoff_sleep", recorded)
    return recorded


async def run(
    token_endpoint: TokenEndpoint,
    sites: list[Site],
    *,
    accounts: dict[int, GscAccount] | None = None,
    start: date = START,
    end: date = END,
    final_only: bool = False,
    pacific_today: date = LATER,
    **settings: object,
) -> list[GscDay | SiteError | AccountRefresh]:
    configured = settings_for(token_endpoint.url, **settings)
    async with aiohttp.ClientSession() as session:
        return [
            record
            async for record in fetch_gsc_performance(
                sites,
                ACCOUNTS if accounts is None else accounts,
                start,
                end,
                configured,
                session,
                final_only=final_only,
                pacific_today=pacific_today,
            )
        ]


def calls(mocked: aioresponses, method: str, url: URL) -> list[Any]:
    return mocked.requests.get((method, url), [])


def days_of(records: list[Any], site_id: int) -> list[GscDay]:
    return [r for r in records if isinstance(r, GscDay) and r.site_id == site_id]


def errors_of(records: list[Any]) -> dict[str, str]:
    return {r.site: r.error for r in records if isinstance(r, SiteError)}


def refreshes_of(records: list[Any]) -> dict[int, str | None]:
    refreshes = [r for r in records if isinstance(r, AccountRefresh)]
    assert len(refreshes) == len({r.account_id for r in refreshes}), "one per account"
    return {r.account_id: r.error for r in refreshes}


def texts(records: list[Any]) -> str:
    return " ".join(repr(r) for r in records)


# --- pure: parsing --------------------------------------------------------------------------


def test_airbyte_row_is_parsed_and_missing_final_days_are_zero() -> None:
    body = gsc_fixture("airbyte/search_analytics.json")

    days = days_from_search_analytics(
        9, body, date(2024, 1, 14), date(2024, 1, 16), pacific_today=LATER
    )

    assert days == [
        GscDay(9, date(2024, 1, 14), 0, 0, None, None, final=True),
        GscDay(9, date(2024, 1, 15), 100, 1000, 0.1, 5.5, final=True),
        GscDay(9, date(2024, 1, 16), 0, 0, None, None, final=True),
    ]
    assert all(isinstance(d.clicks, int) and isinstance(d.impressions, int) for d in days)


def test_airbyte_live_record_shapes_keep_float_ctr_and_missing_position() -> None:
    lines = (GSC_FIXTURES / "airbyte/expected_records.jsonl").read_text().splitlines()
    records = [data for line in lines if "date" in (data := json.loads(line)["data"])]
    with_floats = next(r for r in records if r.get("ctr") == 0.06666666666666667)
    by_date = next(r for r in records if "position" not in r and r["date"] != with_floats["date"])
    body = {
        "rows": [
            {k: v for k, v in record.items() if k in ("clicks", "impressions", "ctr", "position")}
            | {"keys": [record["date"]]}
            for record in (with_floats, by_date)
        ]
    }
    first, last = sorted(date.fromisoformat(r["date"]) for r in (with_floats, by_date))

    days = {d.day: d for d in days_from_search_analytics(1, body, first, last, pacific_today=LATER)}

    rich = days[date.fromisoformat(with_floats["date"])]
    assert (rich.clicks, rich.impressions) == (1, 15)
    assert rich.ctr == 0.06666666666666667 and rich.position == 64.46666666666667
    bare = days[date.fromisoformat(by_date["date"])]
    assert (bare.clicks, bare.impressions, bare.ctr, bare.position) == (0, 0, 0.0, None)


@pytest.mark.parametrize(
    "body",
    [{"responseAggregationType": "auto"}, gsc_fixture("airbyte/search_analytics_empty.json")],
    ids=["rows_absent", "rows_empty"],
)
def test_no_rows_without_metadata_means_zero_final_days(body: dict[str, Any]) -> None:
    days = days_from_search_analytics(1, body, START, END, pacific_today=LATER)

    assert [(d.day, d.clicks, d.impressions, d.final) for d in days] == [
        (day(n), 0, 0, True) for n in range(3)
    ]


def test_without_metadata_the_newest_days_stay_provisional() -> None:
    # Google omits firstIncompleteDate when it sees no incomplete data point, which a quiet
    # site's empty fresh days cannot prove: from (today in Pacific - 3) on, days are provisional.
    today = day(6)
    body = answer({"2024-05-04": (1, 9, 0.1, 3.0), "2024-05-06": (2, 8, 0.2, 4.0)})

    days = days_from_search_analytics(1, body, day(0), day(5), pacific_today=today)

    assert [(d.day, d.clicks, d.final) for d in days] == [
        (day(0), 0, True),
        (day(1), 0, True),
        (day(2), 0, True),
        (day(3), 1, False),  # today - 3: provisional, numbers kept
        (day(5), 2, False),  # day(4) has no row and is provisional: nothing claimed
    ]


@pytest.mark.parametrize("spelling", ["firstIncompleteDate", "first_incomplete_date"])
def test_first_incomplete_date_splits_final_from_provisional(spelling: str) -> None:
    # Days 0-1 final (day 1 missing -> zero); days 2-4 provisional (day 3 missing -> nothing).
    body = answer(
        {
            "2024-05-05": (2, 20, 0.1, 3.0),
            "2024-05-01": (5, 50, 0.1, 4.0),
            "2024-05-03": (1, 10, 0.1, 2.0),
        },
        **{spelling: "2024-05-03"},
    )

    days = days_from_search_analytics(1, body, day(0), day(4), pacific_today=LATER)

    assert days == [
        GscDay(1, day(0), 5, 50, 0.1, 4.0, final=True),
        GscDay(1, day(1), 0, 0, None, None, final=True),
        GscDay(1, day(2), 1, 10, 0.1, 2.0, final=False),
        GscDay(1, day(4), 2, 20, 0.1, 3.0, final=False),
    ]


def test_rows_outside_the_window_are_ignored() -> None:
    body = answer({"2024-04-30": (9, 9, 1.0, 1.0), "2024-05-02": (1, 2, 0.5, 1.0)})

    days = days_from_search_analytics(1, body, day(1), day(1), pacific_today=LATER)

    assert days == [GscDay(1, day(1), 1, 2, 0.5, 1.0, final=True)]


def test_final_only_answers_store_final_zeros_as_a_normal_run_does() -> None:
    """dataState=final answers carry no metadata: a day before Search Console's today minus 3
    with no row is a final zero (Google omits days without traffic), as in a normal run; later,
    every row is final and so is a gap before it, and nothing is claimed after the newest."""
    zero = functools.partial(GscDay, 1, clicks=0, impressions=0, ctr=None, position=None)
    body = answer({"2024-05-01": (3, 30, 0.1, 2.0)})

    settled = days_from_search_analytics(1, body, START, END, final_only=True, pacific_today=LATER)
    empty = days_from_search_analytics(
        1, EMPTY_ANSWER, START, END, final_only=True, pacific_today=LATER
    )

    assert settled == [
        GscDay(1, day(0), 3, 30, 0.1, 2.0, final=True),
        zero(day(1), final=True),
        zero(day(2), final=True),
    ]
    assert empty == [zero(day(n), final=True) for n in range(3)]
    # Search Console's today 2024-05-05: from 2024-05-02 on, a missing day may be one that is
    # not final yet.
    recent = date(2024, 5, 5)
    fresh_row = answer({"2024-05-02": (1, 10, 0.1, 2.0)})
    assert days_from_search_analytics(
        1, fresh_row, START, END, final_only=True, pacific_today=recent
    ) == [zero(day(0), final=True), GscDay(1, day(1), 1, 10, 0.1, 2.0, final=True)]
    assert days_from_search_analytics(
        1, EMPTY_ANSWER, START, END, final_only=True, pacific_today=recent
    ) == [zero(day(0), final=True)]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("clicks", -1),
        ("clicks", math.nan),
        ("impressions", "12"),
        ("impressions", 2.5),
        ("clicks", True),
        ("ctr", "0.1"),
        ("position", math.inf),
    ],
)
def test_impossible_numbers_are_rejected(field: str, value: object) -> None:
    row = {"keys": ["2024-05-01"], "clicks": 1, "impressions": 2, "ctr": 0.5, "position": 1.0}
    row[field] = value

    with pytest.raises(GscDataError, match=field):
        days_from_search_analytics(1, {"rows": [row]}, START, END, pacific_today=LATER)


def test_malformed_dates_are_rejected() -> None:
    with pytest.raises(GscDataError, match="not a YYYY-MM-DD"):
        days_from_search_analytics(
            1, {"metadata": {"firstIncompleteDate": "soon"}}, START, END, pacific_today=LATER
        )
    row = {"keys": ["2024-05-01"], "clicks": 1, "impressions": 1}
    with pytest.raises(GscDataError, match="two rows"):
        days_from_search_analytics(1, {"rows": [row, row]}, START, END, pacific_today=LATER)


def test_query_body_asks_for_daily_totals_of_web_search() -> None:
    assert search_analytics_request(START, END, final_only=False) == {
        "startDate": "2024-05-01",
        "endDate": "2024-05-03",
        "dimensions": ["date"],
        "type": "web",
        "dataState": "all",
        "rowLimit": 25000,
    }
    paged = search_analytics_request(START, END, final_only=True, start_row=25000)
    assert paged["dataState"] == "final" and paged["startRow"] == 25000


# --- pure: properties and errors --------------------------------------------------------------


@pytest.mark.parametrize(
    "stored",
    [
        "example.com",
        "Example.COM.",
        "www.example.com",
        "https://www.example.com/",
        "http://example.com",
    ],
)
def test_stored_domains_are_normalized(stored: str) -> None:
    assert normalize_domain(stored) == "example.com"
    assert candidate_properties(stored) == (
        "sc-domain:example.com",
        "https://example.com/",
        "https://www.example.com/",
    )


def test_property_choice_prefers_domain_properties_and_skips_unverified() -> None:
    listing = {
        "siteEntry": [
            {"siteUrl": "https://www.example.com/", "permissionLevel": "siteFullUser"},
            {"siteUrl": "sc-domain:example.com", "permissionLevel": "siteUnverifiedUser"},
            {"siteUrl": "https://example.com/", "permissionLevel": "siteRestrictedUser"},
            {"siteUrl": "sc-domain:other.org", "permissionLevel": "siteOwner"},
        ]
    }
    accessible = accessible_properties(listing)

    assert "sc-domain:example.com" not in accessible.names
    assert accessible.pick("example.com") == "https://example.com/"
    assert accessible.pick("other.org") == "sc-domain:other.org"
    assert accessible.pick("missing.net") is None
    assert accessible_properties({}).names == frozenset()


@pytest.mark.parametrize(
    ("status", "fixture", "kind", "reason"),
    [
        (429, "airbyte/429.json", ErrorKind.RATE_LIMITED, "rateLimitExceeded"),
        (
            429,
            "issue_google-api-php-client_1778__429_rate_limit_exceeded.json",
            ErrorKind.RATE_LIMITED,
            "rateLimitExceeded",
        ),
        (403, "singer_tap__403_quota_exceeded.json", ErrorKind.LOAD_QUOTA, "quotaExceeded"),
        (403, "airbyte/403.json", ErrorKind.NO_ACCESS, "forbidden"),
        (404, "singer_tap__404_not_a_verified_site.json", ErrorKind.NO_ACCESS, "notFound"),
        (400, "airbyte/400.json", ErrorKind.REJECTED, "badRequest"),
    ],
)
def test_recorded_google_errors_are_classified_by_reason(
    status: int, fixture: str, kind: ErrorKind, reason: str
) -> None:
    error = classify_google_error(status, gsc_fixture(fixture))

    assert (error.kind, error.reason, error.status) == (kind, reason, status)
    assert error.message == gsc_fixture(fixture)["error"]["message"]


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (403, {"error": {"errors": [{"reason": "rateLimitExceeded"}]}}, ErrorKind.RATE_LIMITED),
        (403, {"error": {"errors": [{"reason": "userRateLimitExceeded"}]}}, ErrorKind.RATE_LIMITED),
        (403, {"error": {"errors": [{"reason": "dailyLimitExceeded"}]}}, ErrorKind.DAILY_LIMIT),
        (
            403,
            {
                "error": {
                    "message": "Quota exceeded for quota metric 'Queries' and limit "
                    "'Queries per minute per user' of service 'searchconsole.googleapis.com'",
                    "errors": [{"reason": "quotaExceeded", "domain": "usageLimits"}],
                }
            },
            ErrorKind.RATE_LIMITED,
        ),
        (
            403,
            {
                "error": {
                    "message": "Search Analytics QPS quota exceeded.",
                    "errors": [{"reason": "quotaExceeded"}],
                }
            },
            ErrorKind.RATE_LIMITED,
        ),
        (403, {"error": {"errors": [{"reason": "quotaExceeded"}]}}, ErrorKind.LOAD_QUOTA),
        (
            403,
            {
                "error": {
                    "status": "PERMISSION_DENIED",
                    "errors": [{"reason": "accessNotConfigured", "domain": "usageLimits"}],
                }
            },
            ErrorKind.CLIENT_BROKEN,
        ),
        (403, {"error": {"status": "SERVICE_DISABLED", "message": "off"}}, ErrorKind.CLIENT_BROKEN),
        (
            403,
            {"error": {"errors": [{"domain": "usageLimits", "reason": "x"}]}},
            ErrorKind.RATE_LIMITED,
        ),
        (403, {"error": {"code": 403, "message": "denied"}}, ErrorKind.NO_ACCESS),
        (401, {"error": {"status": "UNAUTHENTICATED"}}, ErrorKind.UNAUTHENTICATED),
        (500, None, ErrorKind.TRANSIENT),
        (503, "<html>", ErrorKind.TRANSIENT),
        (408, {}, ErrorKind.TRANSIENT),
        (409, {}, ErrorKind.REJECTED),
    ],
)
def test_error_classification_edge_cases(status: int, body: object, kind: ErrorKind) -> None:
    assert classify_google_error(status, body).kind is kind


def test_retry_after_is_parsed_and_honoured() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after("-3") is None
    assert rate_limit_delay(1, 7.0, rand=lambda: 0.5) == pytest.approx(7.35)
    assert 0.5 <= rate_limit_delay(1, None) <= 1.0


# --- runs against mocked Search Console ------------------------------------------------------


async def test_two_accounts_fetch_their_sites_and_report_refreshes(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    mocked.post(query_url("sc-domain:a.com"), payload=answer({"2024-05-01": (4, 40, 0.1, 3.5)}))
    mocked.post(query_url("https://b.org/"), payload=answer({"2024-05-02": (1, 9, 0.11, 7.25)}))
    sites = [
        Site(10, "a.com", gsc_account_id=1, gsc_property="sc-domain:a.com"),
        Site(20, "b.org", gsc_account_id=2, gsc_property="https://b.org/"),
        Site(30, "matomo-only.net", matomo_site_id=3),
    ]

    records = await run(token_endpoint, sites)

    assert [(d.day, d.clicks, d.final) for d in days_of(records, 10)] == [
        (day(0), 4, True),
        (day(1), 0, True),
        (day(2), 0, True),
    ]
    assert days_of(records, 20)[1] == GscDay(20, day(1), 1, 9, 0.11, 7.25, final=True)
    assert refreshes_of(records) == {1: None, 2: None}
    assert errors_of(records) == {}
    assert not days_of(records, 30)
    request = calls(mocked, "POST", query_url("sc-domain:a.com"))[0]
    assert request.kwargs["headers"]["Authorization"].startswith("Bearer ya29.access-")
    assert request.kwargs["json"]["dataState"] == "all"
    assert {form["grant_type"] for form in token_endpoint.forms} == {"refresh_token"}
    for secret in (CLIENT_SECRET, ACCOUNT_A.refresh_token, ACCOUNT_B.refresh_token, "ya29."):
        assert secret not in texts(records)


async def test_domain_property_path_is_sent_percent_encoded(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    mocked.post(query_url("sc-domain:example.com"), payload=EMPTY_ANSWER)
    site = Site(1, "example.com", gsc_account_id=1, gsc_property="sc-domain:example.com")

    await run(token_endpoint, [site])

    ((method, url),) = mocked.requests
    assert method == "POST"
    assert url.raw_path == "/webmasters/v3/sites/sc-domain%3Aexample.com/searchAnalytics/query"


async def test_invalid_grant_fails_only_that_accounts_sites_once_each(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    token_endpoint.script(ACCOUNT_A.refresh_token, (400, INVALID_GRANT))
    mocked.post(query_url("sc-domain:b.org"), payload=answer({"2024-05-01": (1, 2, 0.5, 1.0)}))
    sites = [
        Site(1, "a1.com", gsc_account_id=1),
        Site(2, "a2.com", gsc_account_id=1, gsc_property="sc-domain:a2.com"),
        Site(3, "b.org", gsc_account_id=2, gsc_property="sc-domain:b.org"),
    ]

    records = await run(token_endpoint, sites)

    errors = errors_of(records)
    assert set(errors) == {"a1.com", "a2.com"}
    assert len([r for r in records if isinstance(r, SiteError)]) == 2
    message = errors["a1.com"]
    assert "a@example.com" in message and "reconnect" in message
    assert '"Testing"' in message and "7 days" in message
    assert refreshes_of(records) == {1: message, 2: None}
    assert len(days_of(records, 3)) == 3
    assert token_endpoint.calls_for(ACCOUNT_A.refresh_token) == 1
    assert not calls(mocked, "GET", SITES_URL), "no Search Console call for a dead account"


async def test_invalid_client_names_the_client_settings(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    token_endpoint.script(ACCOUNT_A.refresh_token, (401, INVALID_CLIENT))

    records = await run(token_endpoint, [Site(1, "a.com", gsc_account_id=1)])

    error = errors_of(records)["(OAuth client: 1 site)"]
    assert "GOOGLE_CLIENT_ID/GOOGLE_CLIENT_SECRET" in error and "Google Cloud console" in error
    assert "a.com" not in errors_of(records), "one error for the client, none per site"
    assert refreshes_of(records)[1] == error


async def test_account_without_refresh_token(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    accounts = {5: GscAccount(5, "lost@example.com", None)}

    records = await run(token_endpoint, [Site(1, "a.com", gsc_account_id=5)], accounts=accounts)

    expected = (
        "no refresh token for Google account lost@example.com: "
        "set gsc_accounts.refresh_token or GSC_REFRESH_TOKEN_5"
    )
    assert errors_of(records) == {"a.com": expected}
    assert refreshes_of(records) == {5: expected}
    assert token_endpoint.forms == []


async def test_site_of_an_unknown_account_is_reported(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    records = await run(token_endpoint, [Site(1, "a.com", gsc_account_id=99)])

    assert "Google account id 99" in errors_of(records)["a.com"]
    assert refreshes_of(records) == {}


async def test_properties_are_resolved_from_one_sites_list_per_account(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    listing = {
        "siteEntry": [
            {"siteUrl": "sc-domain:one.com", "permissionLevel": "siteOwner"},
            {"siteUrl": "https://one.com/", "permissionLevel": "siteOwner"},
            {"siteUrl": "sc-domain:two.com", "permissionLevel": "siteUnverifiedUser"},
            {"siteUrl": "https://two.com/", "permissionLevel": "siteFullUser"},
            {"siteUrl": "https://www.three.com/", "permissionLevel": "siteRestrictedUser"},
        ]
    }
    mocked.get(SITES_URL, payload=listing)
    for prop in ("sc-domain:one.com", "https://two.com/", "https://www.three.com/"):
        mocked.post(query_url(prop), payload=EMPTY_ANSWER)
    sites = [
        Site(1, "one.com", gsc_account_id=1),
        Site(2, "TWO.com.", gsc_account_id=1),
        Site(3, "www.three.com", gsc_account_id=1),
        Site(4, "four.com", gsc_account_id=1),
    ]

    records = await run(token_endpoint, sites)

    assert len(calls(mocked, "GET", SITES_URL)) == 1
    for prop in ("sc-domain:one.com", "https://two.com/", "https://www.three.com/"):
        assert len(calls(mocked, "POST", query_url(prop))) == 1
    assert errors_of(records) == {
        "four.com": "Google account a@example.com cannot access sc-domain:four.com, "
        "https://four.com/ or https://www.four.com/ (it has no Search Console property for "
        "four.com): add or verify the property in Search Console or set sites.gsc_property"
    }
    assert {d.site_id for d in records if isinstance(d, GscDay)} == {1, 2, 3}


async def test_final_only_asks_for_final_data(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    mocked.post(query_url("sc-domain:a.com"), payload=answer({"2024-05-02": (1, 1, 1.0, 1.0)}))
    site = Site(1, "a.com", gsc_account_id=1, gsc_property="sc-domain:a.com")

    records = await run(token_endpoint, [site], final_only=True)

    sent = calls(mocked, "POST", query_url("sc-domain:a.com"))[0].kwargs["json"]
    assert sent["dataState"] == "final"
    assert [(d.day, d.clicks, d.final) for d in days_of(records, 1)] == [
        (day(0), 0, True),
        (day(1), 1, True),
        (day(2), 0, True),  # weeks before Search Console's today: final, and without traffic
    ]


async def test_provisional_answer_from_the_api(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    body = answer({"2024-05-02": (3, 30, 0.1, 2.0)}, first_incomplete_date="2024-05-02")
    mocked.post(query_url("sc-domain:a.com"), payload=body)
    site = Site(1, "a.com", gsc_account_id=1, gsc_property="sc-domain:a.com")

    records = await run(token_endpoint, [site])

    assert [(d.day, d.clicks, d.final) for d in days_of(records, 1)] == [
        (day(0), 0, True),
        (day(1), 3, False),
    ]


async def test_one_query_covers_a_480_day_window(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    start = date(2023, 1, 1)
    end = start + timedelta(days=479)
    mocked.post(query_url("sc-domain:a.com"), payload=answer({"2023-06-01": (5, 50, 0.1, 2.0)}))
    site = Site(1, "a.com", gsc_account_id=1, gsc_property="sc-domain:a.com")

    # Search Console's today just after the window: all 480 days are within its retention.
    records = await run(
        token_endpoint, [site], start=start, end=end, pacific_today=end + timedelta(days=4)
    )

    requests = calls(mocked, "POST", query_url("sc-domain:a.com"))
    assert len(requests) == 1
    assert requests[0].kwargs["json"]["startDate"] == "2023-01-01"
    assert requests[0].kwargs["json"]["endDate"] == end.isoformat()
    assert len(days_of(records, 1)) == 480


async def test_a_full_page_is_followed_by_the_next_page(
    mocked: aioresponses,
    token_endpoint: TokenEndpoint,
    sleep: RecordedSleep,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 25,000-row page is too big for aioresponses' stream; the rule is the same at 2 rows.
    monkeypatch.setattr(search_console_data, "ROW_LIMIT", 2)
    url = query_url("sc-domain:a.com")
    mocked.post(
        url, payload=answer({"2024-05-01": (1, 1, 1.0, 1.0), "2024-05-02": (2, 2, 1.0, 1.0)})
    )
    mocked.post(url, payload=answer({"2024-05-03": (3, 3, 1.0, 1.0)}))
    site = Site(1, "a.com", gsc_account_id=1, gsc_property="sc-domain:a.com")

    records = await run(token_endpoint, [site])

    sent = [r.kwargs["json"] for r in calls(mocked, "POST", url)]
    assert [(body.get("startRow"), body["rowLimit"]) for body in sent] == [(None, 2), (2, 2)]
    assert [d.clicks for d in days_of(records, 1)] == [1, 2, 3]


async def test_429_waits_as_long_as_retry_after_says(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    url = query_url("sc-domain:a.com")
    mocked.post(
        url, status=429, payload=gsc_fixture("airbyte/429.json"), headers={"Retry-After": "7"}
    )
    mocked.post(url, payload=answer({"2024-05-01": (1, 1, 1.0, 1.0)}))
    site = Site(1, "a.com", gsc_account_id=1, gsc_property="sc-domain:a.com")

    records = await run(token_endpoint, [site])

    assert len(sleep.waits) == 1 and 7 <= sleep.waits[0] < 8
    assert len(calls(mocked, "POST", url)) == 2
    assert days_of(records, 1)[0].clicks == 1


async def test_429_without_retry_after_backs_off(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    url = query_url("sc-domain:a.com")
    php_body = gsc_fixture("issue_google-api-php-client_1778__429_rate_limit_exceeded.json")
    mocked.post(url, status=429, payload=php_body)
    mocked.post(url, status=429, payload=php_body)
    mocked.post(url, payload=EMPTY_ANSWER)
    site = Site(1, "a.com", gsc_account_id=1, gsc_property="sc-domain:a.com")

    records = await run(token_endpoint, [site])

    assert len(sleep.waits) == 2
    assert 0.5 <= sleep.waits[0] <= 1.0 and 1.0 <= sleep.waits[1] <= 2.0
    assert errors_of(records) == {}


async def test_rate_limit_gives_up_when_the_wait_budget_is_spent(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    url = query_url("sc-domain:a.com")
    mocked.post(
        url, status=429, payload=gsc_fixture("airbyte/429.json"), headers={"Retry-After": "100"}
    )
    site = Site(1, "a.com", gsc_account_id=1, gsc_property="sc-domain:a.com")

    records = await run(token_endpoint, [site], gsc_quota_max_wait=60.0)

    assert sleep.waits == []
    error = errors_of(records)["a.com"]
    assert "kept rate-limiting account a@example.com" in error
    # Retry-After: 100, plus up to a tenth of it as jitter.
    assert re.search(r"gave up after waiting 0s, as waiting 1(0\d|10)s more would pass ", error)
    assert "GSC_QUOTA_MAX_WAIT_SECONDS (60s); will retry next run" in error


async def test_403_rate_limit_exceeded_is_retried(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    url = query_url("sc-domain:a.com")
    body = {
        "error": {
            "code": 403,
            "message": "Rate Limit Exceeded",
            "errors": [
                {
                    "domain": "usageLimits",
                    "reason": "rateLimitExceeded",
                    "message": "Rate Limit Exceeded",
                }
            ],
        }
    }
    mocked.post(url, status=403, payload=body)
    mocked.post(url, payload=EMPTY_ANSWER)
    site = Site(1, "a.com", gsc_account_id=1, gsc_property="sc-domain:a.com")

    records = await run(token_endpoint, [site])

    assert len(calls(mocked, "POST", url)) == 2
    assert len(sleep.waits) == 1
    assert errors_of(records) == {}


async def test_load_quota_rests_the_account_then_tries_once_more(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    quota = gsc_fixture("singer_tap__403_quota_exceeded.json")
    mocked.post(query_url("sc-domain:a1.com"), status=403, payload=quota)
    mocked.post(query_url("sc-domain:a1.com"), status=403, payload=quota)
    mocked.post(query_url("sc-domain:b.org"), payload=EMPTY_ANSWER)
    sites = [
        Site(1, "a1.com", gsc_account_id=1, gsc_property="sc-domain:a1.com"),
        Site(4, "b.org", gsc_account_id=2, gsc_property="sc-domain:b.org"),
    ]

    records = await run(token_endpoint, sites, gsc_load_quota_pause=900.0)

    assert sleep.waits == [900.0], "one rest of GSC_LOAD_QUOTA_PAUSE_SECONDS, no backoff"
    assert len(calls(mocked, "POST", query_url("sc-domain:a1.com"))) == 2
    error = errors_of(records)["a1.com"]
    assert "load quota still refuses account a@example.com after a rest of 900s" in error
    assert len(days_of(records, 4)) == 3


@pytest.mark.parametrize(
    ("status", "fixture", "expected"),
    [
        (403, "airbyte/403.json", "User does not have sufficient permission for site"),
        (404, "singer_tap__404_not_a_verified_site.json", "is not a verified Search Console site"),
    ],
)
async def test_no_access_is_a_per_site_error_naming_the_property(
    mocked: aioresponses,
    token_endpoint: TokenEndpoint,
    sleep: RecordedSleep,
    status: int,
    fixture: str,
    expected: str,
) -> None:
    mocked.post(query_url("https://a.com/"), status=status, payload=gsc_fixture(fixture))
    mocked.post(query_url("sc-domain:ok.com"), payload=EMPTY_ANSWER)
    listing = {
        "siteEntry": [
            {"siteUrl": "https://www.a.com/", "permissionLevel": "siteOwner"},
            {"siteUrl": "sc-domain:a.com", "permissionLevel": "siteUnverifiedUser"},
            {"siteUrl": "sc-domain:ok.com", "permissionLevel": "siteOwner"},
        ]
    }
    mocked.get(SITES_URL, payload=listing)
    sites = [
        Site(1, "a.com", gsc_account_id=1, gsc_property="https://a.com/"),
        Site(2, "ok.com", gsc_account_id=1, gsc_property="sc-domain:ok.com"),
    ]

    records = await run(token_endpoint, sites)

    message = errors_of(records)["a.com"]
    assert message.startswith("Google account a@example.com cannot access https://a.com/ (")
    assert expected in message
    # What the account does have for the host, and why one of them returns nothing.
    assert "for a.com it has https://www.a.com/ (owner), sc-domain:a.com (unverified)" in message
    assert len(calls(mocked, "POST", query_url("https://a.com/"))) == 1
    assert len(calls(mocked, "GET", SITES_URL)) == 1
    assert len(days_of(records, 2)) == 3


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({"body": "Not Found", "content_type": "text/plain"}, "(HTTP 404)"),
        ({"payload": {}}, "(HTTP 404)"),
        ({"payload": {"error": {"code": 404, "message": "HTTP 404"}}}, "(HTTP 404)"),
        (
            {"payload": {"error": {"message": "notFound", "errors": [{"reason": "notFound"}]}}},
            "(HTTP 404 notFound)",
        ),
    ],
)
async def test_an_error_without_its_own_message_says_the_status_once(
    mocked: aioresponses,
    token_endpoint: TokenEndpoint,
    sleep: RecordedSleep,
    answer: dict,
    expected: str,
) -> None:
    mocked.post(query_url("https://a.com/"), status=404, **answer)
    mocked.get(SITES_URL, payload={"siteEntry": []})
    sites = [Site(1, "a.com", gsc_account_id=1, gsc_property="https://a.com/")]

    message = errors_of(await run(token_endpoint, sites))["a.com"]

    assert expected in message, message
    assert message.count("HTTP 404") == 1 and message.count("notFound") <= 1, message


async def test_a_property_the_account_is_unverified_for_says_so(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    mocked.post(query_url("https://a.com/"), status=403, payload=gsc_fixture("airbyte/403.json"))
    listing = {
        "siteEntry": [{"siteUrl": "https://a.com/", "permissionLevel": "siteUnverifiedUser"}]
    }
    mocked.get(SITES_URL, payload=listing)

    records = await run(
        token_endpoint, [Site(1, "a.com", gsc_account_id=1, gsc_property="https://a.com/")]
    )

    message = errors_of(records)["a.com"]
    assert message.startswith(
        "Google account a@example.com is an unverified user of https://a.com/"
    )
    assert "verify ownership of https://a.com/ in Search Console" in message
    assert sleep.waits == []


async def test_bad_request_reports_googles_message(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    mocked.post(query_url("sc-domain:a.com"), status=400, payload=gsc_fixture("airbyte/400.json"))
    site = Site(1, "a.com", gsc_account_id=1, gsc_property="sc-domain:a.com")

    records = await run(token_endpoint, [site])

    assert errors_of(records) == {
        "a.com": "Search Console rejected the request for sc-domain:a.com: "
        "HTTP 400 badRequest: Invalid request"
    }


async def test_401_refreshes_the_token_once_and_retries(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    url = query_url("sc-domain:a.com")
    mocked.post(url, status=401, payload={"error": {"code": 401, "status": "UNAUTHENTICATED"}})
    mocked.post(url, payload=answer({"2024-05-01": (2, 2, 1.0, 1.0)}))
    site = Site(1, "a.com", gsc_account_id=1, gsc_property="sc-domain:a.com")

    records = await run(token_endpoint, [site])

    assert token_endpoint.calls_for(ACCOUNT_A.refresh_token) == 2
    tokens = [r.kwargs["headers"]["Authorization"] for r in calls(mocked, "POST", url)]
    assert tokens == ["Bearer ya29.access-1", "Bearer ya29.access-2"]
    assert days_of(records, 1)[0].clicks == 2
    assert refreshes_of(records) == {1: None}


async def test_a_second_401_is_reported_not_looped(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    url = query_url("sc-domain:a.com")
    mocked.post(url, status=401, payload={}, repeat=True)
    site = Site(1, "a.com", gsc_account_id=1, gsc_property="sc-domain:a.com")

    records = await run(token_endpoint, [site])

    assert len(calls(mocked, "POST", url)) == 2
    assert (
        "rejected a freshly refreshed token of account a@example.com" in errors_of(records)["a.com"]
    )


async def test_server_errors_are_retried_then_given_up(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    url = query_url("sc-domain:a.com")
    mocked.post(url, status=503, body="<html>unavailable</html>", repeat=True)
    site = Site(1, "a.com", gsc_account_id=1, gsc_property="sc-domain:a.com")

    records = await run(token_endpoint, [site], http_max_attempts=4)

    assert len(calls(mocked, "POST", url)) == 4
    assert len(sleep.waits) == 3
    for attempt, wait in enumerate(sleep.waits, start=1):
        assert 2 ** (attempt - 2) <= wait <= 2 ** (attempt - 1), "exponential, with jitter"
    assert "failed 4 times for account a@example.com (HTTP 503" in errors_of(records)["a.com"]


async def test_network_errors_are_retried(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    url = query_url("sc-domain:a.com")
    mocked.post(url, exception=aiohttp.ClientConnectionError("reset"))
    mocked.post(url, exception=TimeoutError())
    mocked.post(url, payload=EMPTY_ANSWER)
    site = Site(1, "a.com", gsc_account_id=1, gsc_property="sc-domain:a.com")

    records = await run(token_endpoint, [site])

    assert len(sleep.waits) == 2
    assert errors_of(records) == {}
    assert len(days_of(records, 1)) == 3


async def test_unusable_numbers_fail_only_that_site(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    mocked.post(query_url("sc-domain:a.com"), payload=answer({"2024-05-01": (-1, 1, 1.0, 1.0)}))
    site = Site(1, "a.com", gsc_account_id=1, gsc_property="sc-domain:a.com")

    records = await run(token_endpoint, [site])

    assert "unusable data: clicks for 2024-05-01 is -1" in errors_of(records)["a.com"]
    assert not days_of(records, 1)


async def test_secrets_never_reach_yielded_records(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    leaky = {"error": {"code": 400, "message": f"bad token {CLIENT_SECRET} ya29.access-1"}}
    mocked.post(query_url("sc-domain:a.com"), status=400, payload=leaky)
    site = Site(1, "a.com", gsc_account_id=1, gsc_property="sc-domain:a.com")

    records = await run(token_endpoint, [site])

    assert CLIENT_SECRET not in texts(records)
    assert "ya29.access-1" not in texts(records)
    assert "bad token *** ***" in errors_of(records)["a.com"]


async def test_logs_carry_no_secret(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    url = query_url("sc-domain:a.com")
    mocked.post(url, status=401, payload={"error": {"code": 401, "status": "UNAUTHENTICATED"}})
    mocked.post(url, status=503, body=f"upstream saw {CLIENT_SECRET} and ya29.access-2")
    mocked.post(url, payload=EMPTY_ANSWER)
    site = Site(1, "a.com", gsc_account_id=1, gsc_property="sc-domain:a.com")

    with structlog.testing.capture_logs() as logs:
        await run(token_endpoint, [site])

    assert {"gsc.token_refreshed", "gsc.query", "gsc.retry"} <= {e["event"] for e in logs}
    logged = repr(logs)
    for secret in (CLIENT_SECRET, ACCOUNT_A.refresh_token, "ya29."):
        assert secret not in logged


class CountingPacer(Pacer):
    created: ClassVar[list[CountingPacer]] = []

    def __init__(self, per_second: float, *, headroom: float = PACING_HEADROOM) -> None:
        super().__init__(per_second, headroom=headroom)
        CountingPacer.created.append(self)


async def test_every_request_passes_its_account_pacer_and_the_shared_client_pacer(
    mocked: aioresponses,
    token_endpoint: TokenEndpoint,
    sleep: RecordedSleep,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(CountingPacer, "created", [])
    monkeypatch.setattr(account_run, "Pacer", CountingPacer)
    mocked.get(
        SITES_URL,
        payload={"siteEntry": [{"siteUrl": "sc-domain:a1.com", "permissionLevel": "siteOwner"}]},
    )
    for prop in ("sc-domain:a1.com", "sc-domain:a2.com", "sc-domain:b1.com", "sc-domain:b2.com"):
        mocked.post(query_url(prop), payload=EMPTY_ANSWER)
    sites = [
        Site(1, "a1.com", gsc_account_id=1),
        Site(2, "a2.com", gsc_account_id=1, gsc_property="sc-domain:a2.com"),
        Site(3, "b1.com", gsc_account_id=2, gsc_property="sc-domain:b1.com"),
        Site(4, "b2.com", gsc_account_id=2, gsc_property="sc-domain:b2.com"),
    ]

    records = await run(
        token_endpoint, sites, gsc_max_qps_per_client=500.0, gsc_max_qps_per_account=100.0
    )

    assert errors_of(records) == {}
    # A ceiling is kept with the pacing headroom; nothing refused, so the rates stay there.
    client_rate, account_rate = 500.0 / PACING_HEADROOM, 100.0 / PACING_HEADROOM
    client = [p for p in CountingPacer.created if p.per_second == pytest.approx(client_rate)]
    per_account = sorted(
        p.granted for p in CountingPacer.created if p.per_second == pytest.approx(account_rate)
    )
    assert len(client) == 1, "one pacer for the OAuth client, shared by both accounts"
    assert client[0].granted == 5  # sites.list + 4 queries
    assert per_account == [2, 3]


def test_rates_below_one_per_second_are_paced_too() -> None:
    slow = Pacer(0.5)

    assert slow.interval == pytest.approx(2 * PACING_HEADROOM)
    with pytest.raises(ValueError):
        Pacer(0)


def busiest_second(times: list[float]) -> int:
    """The most timestamps in any 1-second window (a)..(a+1), edges included."""
    times = sorted(times)
    return max(sum(1 for t in times[i:] if t - first <= 1.0) for i, first in enumerate(times))


def assert_spaced(times: list[float], interval: float) -> None:
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # A slot released a little late keeps the grid, so the next may follow up to CATCH_UP
    # sooner; asyncio may fire a timer up to its clock resolution (1 ns) early.
    assert min(gaps) >= interval - CATCH_UP - 1e-6, (min(gaps), interval)


async def test_pacer_spreads_requests_evenly_never_a_burst() -> None:
    """AsyncLimiter(20, 1) let 20 requests out at once and 20 more within the next second."""
    pacer = Pacer(20)
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def request() -> None:
        async with pacer.slot():
            times.append(loop.time())

    await asyncio.gather(*(request() for _ in range(22)))

    assert_spaced(times, PACING_HEADROOM / 20)
    assert busiest_second(times) <= 20
    assert pacer.granted == 22


async def test_waiting_for_the_client_pacer_never_bunches_an_account() -> None:
    """The client is the bottleneck here: each account's requests still leave evenly spaced."""
    client = Pacer(20)
    accounts = {"a": Pacer(15), "b": Pacer(15)}
    loop = asyncio.get_running_loop()
    sent: dict[str, list[float]] = {"a": [], "b": []}

    async def request(name: str) -> None:
        async with accounts[name].slot():
            await client.turn()
            sent[name].append(loop.time())

    await asyncio.gather(*(request(name) for _ in range(8) for name in "ab"))

    for times in sent.values():
        assert len(times) == 8
        assert_spaced(times, accounts["a"].interval)
    assert_spaced(sorted(sent["a"] + sent["b"]), client.interval)


async def test_paced_run_against_a_per_second_quota_gets_no_429(sleep: RecordedSleep) -> None:
    """The simulator counts queries per account in a sliding second and answers 429 above its
    limit: pacing at exactly that limit must never be refused (the old limiter burst into
    dozens of 429s)."""
    rate = 10
    portfolio = world.make_portfolio(28, 2)  # 14 sites per account: more than a second's worth
    sites = [
        Site(s.id, s.domain, gsc_account_id=s.gsc_account_id, gsc_property=s.stored_property)
        for s in portfolio.sites
    ]
    accounts = {a.id: GscAccount(a.id, a.email, a.refresh_token) for a in portfolio.accounts}
    async with world.google_simulator(portfolio, qps_per_account=rate) as google:
        settings = simulated_settings(
            "postgresql://unused",
            "http://unused.invalid",
            google.url,
            gsc_max_qps_per_account=float(rate),
            gsc_max_qps_per_client=1000.0,
        )
        async with aiohttp.ClientSession() as session:
            records = [
                record
                async for record in fetch_gsc_performance(
                    sites, accounts, START, END, settings, session
                )
            ]

    assert errors_of(records) == {}
    assert google.query_requests == len(sites), "no query was refused and retried"
    assert sleep.waits == []
    for account in portfolio.accounts:
        assert 0 < google.max_queries_per_second[account.email] <= rate


async def test_stopping_early_cancels_the_remaining_work(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    mocked.post(query_url("sc-domain:fast.com"), payload=EMPTY_ANSWER)
    started, never_answer = hanging_request()
    mocked.post(query_url("sc-domain:slow.com"), callback=never_answer)
    sites = [
        Site(1, "fast.com", gsc_account_id=1, gsc_property="sc-domain:fast.com"),
        Site(2, "slow.com", gsc_account_id=1, gsc_property="sc-domain:slow.com"),
    ]
    settings = settings_for(token_endpoint.url)

    async with aiohttp.ClientSession() as session:
        stream = fetch_gsc_performance(
            sites, ACCOUNTS, START, END, settings, session, pacific_today=LATER
        )
        first = await anext(stream)
        await started.wait()
        await stream.aclose()

    assert first == GscDay(1, START, 0, 0, None, None, final=True)
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_cancellation_propagates_and_leaves_no_tasks(
    mocked: aioresponses, token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    started, never_answer = hanging_request()
    mocked.post(query_url("sc-domain:slow.com"), callback=never_answer)
    site = Site(1, "slow.com", gsc_account_id=1, gsc_property="sc-domain:slow.com")

    consumer = asyncio.create_task(run(token_endpoint, [site]))
    await started.wait()
    consumer.cancel()

    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_an_inverted_window_is_refused(token_endpoint: TokenEndpoint) -> None:
    with pytest.raises(ValueError, match="after end"):
        await run(token_endpoint, [], start=END, end=START)


def test_days_beyond_search_console_retention_are_never_zero_filled() -> None:
    first_incomplete = date(2026, 11, 23)
    cutoff = first_incomplete - timedelta(days=RETENTION_DAYS)
    start, end = cutoff - timedelta(days=2), cutoff + timedelta(days=1)
    row = {"keys": [str(start)], "clicks": 3, "impressions": 9, "ctr": 0.33, "position": 2}
    body = {"rows": [row], "metadata": {"firstIncompleteDate": str(first_incomplete)}}
    days = days_from_search_analytics(7, body, start, end, pacific_today=LATER)
    assert [(d.day, d.clicks, d.final) for d in days] == [
        (start, 3, True),  # a row Google still has is stored
        (cutoff, 0, True),  # inside retention a missing final day is a real zero
        (cutoff + timedelta(days=1), 0, True),
    ]
    assert RETENTION_DAYS <= 16 * 31  # never claims more than Google keeps
