"""Matomo source: request shape, recorded answers, per-site and per-batch failures, retries."""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses
from structlog.testing import capture_logs

from aggregator.config import ConfigError, Secret, Settings
from aggregator.matomo import (
    TOKEN_REFUSED,
    MatomoError,
    decode_answer,
    fetch_matomo_visits,
    parse_visits_summary,
)
from aggregator.model import MatomoDay, Site, SiteError
from aggregator.simulators.matomo import MatomoSimulator
from aggregator.text_table import error_lines

FIXTURES = Path(__file__).parent / "fixtures" / "matomo"
TOKEN = "tok-SECRET-123"
ENDPOINT = "http://matomo.test/index.php"
NO_ACCESS = "You can't access this resource as it requires 'view' access for the website id = 9."
PROXY_502 = (
    "<html><head><title>502 Bad Gateway</title></head>"
    "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)
MAY_1, MAY_2 = date(2024, 5, 1), date(2024, 5, 2)


def fixture_json(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def xml_metrics(element: ET.Element) -> dict[str, Any]:
    """Metrics of an XML result element as Matomo's JSON renderer types them."""
    return {m.tag: int(m.text) if m.text.isdigit() else m.text for m in element}


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "matomo_url": "http://matomo.test",
        "matomo_token": Secret(TOKEN),
        "http_max_attempts": 3,
    }
    return Settings(**{**values, **overrides})


def site(matomo_id: int | None, site_id: int | None = None) -> Site:
    return Site(
        id=site_id or 1000 + (matomo_id or 0),
        domain=f"s{matomo_id}.example",
        matomo_site_id=matomo_id,
    )


def day_range(day: date, visits: int = 1, actions: int = 2) -> dict[str, Any]:
    return {day.isoformat(): {"nb_visits": visits, "nb_actions": actions, "bounce_rate": 0.5}}


def requested_ids(data: dict[str, str]) -> list[int]:
    """The idSite of each sub-request in a bulk form body, in order."""
    urls = [data[f"urls[{i}]"] for i in range(len(data)) if f"urls[{i}]" in data]
    return [int(parse_qs(url)["idSite"][0]) for url in urls]


def answer_per_site(day: date) -> Callable[..., CallbackResult]:
    """A Matomo stand-in answering any batch: visits = idSite, actions = 2 * idSite."""

    def respond(url: Any, **kwargs: Any) -> CallbackResult:
        ids = requested_ids(kwargs["data"])
        return CallbackResult(payload=[day_range(day, n, 2 * n) for n in ids])

    return respond


def posts(mocked: aioresponses) -> list[Any]:
    return [
        call for (method, _), calls in mocked.requests.items() if method == "POST" for call in calls
    ]


async def collect(
    sites: list[Site], start: date, end: date, session: aiohttp.ClientSession, **overrides: Any
) -> list[MatomoDay | SiteError]:
    settings = make_settings(**overrides)
    return [record async for record in fetch_matomo_visits(sites, start, end, settings, session)]


def errors_by_site(records: list[MatomoDay | SiteError]) -> dict[str, str]:
    return {r.site: r.error for r in records if isinstance(r, SiteError)}


pytestmark = pytest.mark.usefixtures("fast_matomo_backoff")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


# --- recorded shapes ---------------------------------------------------------------------------


async def test_recorded_bulk_range_yields_each_day_and_empty_day_is_zero(session, mocked):
    recorded = fixture_json("test_OneVisitorTwoVisits_bulk_json__API.getBulkRequest.json")
    mocked.post(ENDPOINT, payload=recorded[:1])

    records = await collect([site(1, site_id=10)], date(2010, 3, 6), date(2010, 3, 7), session)

    assert records == [
        MatomoDay(site_id=10, day=date(2010, 3, 6), visits=2, actions=8),
        MatomoDay(site_id=10, day=date(2010, 3, 7), visits=0, actions=0),
    ]


async def test_several_sites_in_one_bulk(session, mocked):
    # Sites 1 and 2 of Matomo's TwoVisitors test, 2010-01-03..09, as one bulk answer.
    mocked.post(
        ENDPOINT, payload=fixture_json("derived__bulk_TwoVisitors_twoWebsites_differentDays.json")
    )

    records = await collect([site(1), site(2)], date(2010, 1, 3), date(2010, 1, 9), session)

    assert len(posts(mocked)) == 1
    by_key = {(r.site_id, r.day.day): (r.visits, r.actions) for r in records}
    assert len(by_key) == 14
    assert by_key[(1001, 3)] == (2, 2)
    assert by_key[(1001, 5)] == (1, 5)
    assert by_key[(1002, 4)] == (1, 3)
    assert [by_key[(1002, d)] for d in (3, 5, 6, 7, 8, 9)] == [(0, 0)] * 6


def test_derived_bulk_fixture_matches_recorded_xml():
    root = ET.parse(
        FIXTURES / "test_TwoVisitors_twoWebsites_differentDays__VisitsSummary.get_day.xml"
    )
    from_xml = [{d.get("date"): xml_metrics(d) or [] for d in s} for s in root.getroot()]
    assert fixture_json("derived__bulk_TwoVisitors_twoWebsites_differentDays.json") == from_xml


async def test_single_day_object_of_zeros_is_a_zero_day(session, mocked):
    zeros = xml_metrics(ET.parse(FIXTURES / "test_noVisit__VisitsSummary.get_day.xml").getroot())
    assert zeros["bounce_rate"] == "0%"
    day = date(2009, 1, 4)
    mocked.post(ENDPOINT, payload=[{day.isoformat(): zeros}, zeros])

    records = await collect([site(1), site(2)], day, day, session)

    assert records == [MatomoDay(1001, day, 0, 0), MatomoDay(1002, day, 0, 0)]


def test_parse_accepts_flat_metrics_or_empty_list_for_one_day_only():
    assert parse_visits_summary({"nb_visits": 3, "nb_actions": 9}, [MAY_1]) == {MAY_1: (3, 9)}
    assert parse_visits_summary([], [MAY_1]) == {MAY_1: (0, 0)}
    with pytest.raises(MatomoError, match="one set of metrics for 2 days"):
        parse_visits_summary({"nb_visits": 3, "nb_actions": 9}, [MAY_1, MAY_2])
    with pytest.raises(MatomoError, match="is an empty list"):
        parse_visits_summary([], [MAY_1, MAY_2])


def test_parse_ignores_unknown_keys_and_extra_days():
    payload = {**day_range(MAY_1, 4, 5), "2024-04-30": [], "note": "x"}
    assert parse_visits_summary(payload, [MAY_1]) == {MAY_1: (4, 5)}


@pytest.mark.parametrize(
    ("value", "expected"), [(12, 12), ("12", 12), (12.0, 12), (" 7 ", 7), ("3.0", 3), (0, 0)]
)
def test_parse_accepts_numeric_counts(value: Any, expected: int):
    payload = {MAY_1.isoformat(): {"nb_visits": value, "nb_actions": value}}
    assert parse_visits_summary(payload, [MAY_1]) == {MAY_1: (expected, expected)}


# --- per-site and per-batch failures -----------------------------------------------------------


async def test_missing_day_fails_that_site_instead_of_inventing_zeros(session, mocked):
    mocked.post(ENDPOINT, payload=[day_range(MAY_1), {**day_range(MAY_1), "2024-05-02": []}])

    records = await collect([site(1), site(2)], MAY_1, MAY_2, session)

    assert errors_by_site(records) == {
        "s1.example": "Matomo answer lacks 2024-05-02 (Matomo site id 1)"
    }
    assert [r.day for r in records if isinstance(r, MatomoDay)] == [MAY_1, MAY_2]


@pytest.mark.parametrize(
    ("bad", "shown"),
    [("abc", '"abc"'), (-3, "-3"), (None, "null"), (True, "true"), (1.5, "1.5"), ({}, "{}")],
)
async def test_wrong_metric_value_fails_only_that_site(session, mocked, bad: Any, shown: str):
    broken = {MAY_1.isoformat(): {"nb_visits": bad, "nb_actions": 1}}
    mocked.post(ENDPOINT, payload=[day_range(MAY_1, 5, 6), broken])

    records = await collect([site(1), site(2)], MAY_1, MAY_1, session)

    assert records[0] == MatomoDay(1001, MAY_1, 5, 6)
    assert errors_by_site(records) == {
        "s2.example": f"Matomo answer for 2024-05-01 has nb_visits={shown}, expected a count >= 0"
        " (Matomo site id 2)"
    }


async def test_element_error_fails_only_that_site(session, mocked):
    other_error = fixture_json("extracted__JsonRendererTest__error.json")
    mocked.post(
        ENDPOINT,
        payload=[
            day_range(MAY_1),
            {"result": "error", "message": NO_ACCESS},
            other_error,
        ],
    )

    records = await collect([site(1), site(9), site(4)], MAY_1, MAY_1, session)

    assert records[0] == MatomoDay(1001, MAY_1, 1, 2)
    assert errors_by_site(records) == {
        "s9.example": f"Matomo refused token or access for site id 9 (s9.example): {NO_ACCESS}",
        "s4.example": "Matomo site id 4 (s4.example): The error message",
    }


async def test_whole_answer_error_fails_every_site_of_the_batch_without_retry(session, mocked):
    mocked.post(ENDPOINT, payload=fixture_json("extracted__JsonRendererTest__error.json"))

    records = await collect([site(1), site(2)], MAY_1, MAY_1, session)

    assert errors_by_site(records) == {
        "s1.example": "Matomo rejected the bulk request: The error message",
        "s2.example": "Matomo rejected the bulk request: The error message",
    }
    assert len(posts(mocked)) == 1


async def test_http_401_fails_the_batch_without_retry(session, mocked):
    mocked.post(ENDPOINT, status=401, payload={"result": "error", "message": NO_ACCESS})

    records = await collect([site(9)], MAY_1, MAY_1, session)

    assert records == [
        SiteError("s9.example", "matomo", f"Matomo rejected MATOMO_TOKEN (HTTP 401): {NO_ACCESS}")
    ]
    assert len(posts(mocked)) == 1


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, "Matomo rejected MATOMO_TOKEN (HTTP 401)"),
        (
            404,
            "Matomo answered HTTP 404: no Matomo API there; set MATOMO_URL to the address "
            "Matomo's index.php is in (e.g. https://matomo.example.com)",
        ),
    ],
)
def test_other_http_errors_are_not_retried(status: int, error: str):
    with pytest.raises(MatomoError) as raised:
        decode_answer(status, "text/html", PROXY_502.encode())
    assert str(raised.value) == error


@pytest.mark.parametrize("suffix", ["", "/", "/index.php", "/index.php/"])
async def test_matomo_url_may_be_the_base_or_the_api_address(session, suffix: str):
    """Against the simulator over a real socket: `https://host` and `https://host/index.php`
    (how Matomo's documentation writes the API's address) both reach the API."""
    async with MatomoSimulator(token=TOKEN, sites={1: "UTC"}) as matomo:
        records = await collect([site(1)], MAY_1, MAY_2, session, matomo_url=matomo.url + suffix)
        assert matomo.bulk_requests == 1
    assert [(r.day, r.visits) for r in records] == [
        (day, matomo.visits(1, day)[0]) for day in (MAY_1, MAY_2)
    ]


async def test_a_matomo_url_with_no_api_says_what_to_set(session):
    async with MatomoSimulator(token=TOKEN, sites={1: "UTC"}) as matomo:
        records = await collect([site(1)], MAY_1, MAY_1, session, matomo_url=matomo.url + "/x")
    assert (
        "set MATOMO_URL to the address Matomo's index.php is in"
        in errors_by_site(records)["s1.example"]
    )


async def test_a_token_refused_for_every_site_is_one_error_naming_matomo_token(session):
    """Matomo answers a wrong token by refusing each site (the call runs as anonymous): the
    run says so once for the batch, not once per site id; a site the right token cannot view
    is still named alone. Against the simulator over a real socket."""
    sites = [site(1), site(2), site(3)]
    async with MatomoSimulator(token=TOKEN, sites={1: "UTC", 2: "UTC"}) as matomo:
        wrong = await collect(
            sites,
            MAY_1,
            MAY_1,
            session,
            matomo_url=matomo.url,
            matomo_token=Secret("not-the-token"),
        )
        right = await collect(sites, MAY_1, MAY_1, session, matomo_url=matomo.url)
    shared = TOKEN_REFUSED + NO_ACCESS.replace("= 9", "= 1")
    assert errors_by_site(wrong) == dict.fromkeys(
        ["s1.example", "s2.example", "s3.example"], shared
    )
    assert error_lines([r for r in wrong if isinstance(r, SiteError)]) == [
        f"matomo   s1.example, s2.example, s3.example: {shared}"
    ]
    assert list(errors_by_site(right)) == ["s3.example"]
    assert "site id 3 (s3.example)" in errors_by_site(right)["s3.example"]


async def test_unconfigured_matomo_fails_before_any_request(session, mocked):
    with pytest.raises(ConfigError, match="MATOMO_TOKEN"):
        await collect([site(1)], MAY_1, MAY_1, session, matomo_token=None)
    assert posts(mocked) == []


async def test_unmatchable_bulk_answer_fails_each_site_alone_after_splitting(session, mocked):
    mocked.post(ENDPOINT, payload={"result": "success", "message": "ok"}, repeat=True)

    records = await collect([site(1), site(2)], MAY_1, MAY_1, session)

    assert errors_by_site(records) == {
        f"s{n}.example": f"Matomo fails on site id {n} alone (Matomo bulk answer is an object, "
        "expected a list): check that site's reports in Matomo; the other sites of its batch "
        "were fetched"
        for n in (1, 2)
    }
    assert len(posts(mocked)) == 1 + 2, "the batch once, then each half once"


async def test_a_bulk_answer_of_the_wrong_length_is_asked_again_in_halves(session, mocked):
    def respond(url: Any, **kwargs: Any) -> CallbackResult:
        return CallbackResult(payload=[day_range(MAY_1, 7, 7)])  # always one result

    mocked.post(ENDPOINT, callback=respond, repeat=True)

    records = await collect([site(1), site(2)], MAY_1, MAY_1, session)

    assert errors_by_site(records) == {}
    assert sorted(r.site_id for r in records if isinstance(r, MatomoDay)) == [1001, 1002]


async def test_token_echoed_by_matomo_never_reaches_errors_or_logs(session, mocked):
    echo = {"result": "error", "message": f"Invalid token_auth={TOKEN}\nfor this request"}
    mocked.post(ENDPOINT, payload=[day_range(MAY_1), echo])
    mocked.post(ENDPOINT, payload=echo)
    mocked.post(ENDPOINT, status=401, payload=echo)
    mocked.post(ENDPOINT, status=502, body=f"upstream said {TOKEN}", repeat=True)
    sites = [site(n) for n in range(1, 8)]

    with capture_logs() as logs:
        records = await collect(sites, MAY_1, MAY_1, session, matomo_batch_size=2)

    errors = errors_by_site(records)
    assert sorted(errors) == [f"s{n}.example" for n in range(2, 8)]
    assert sum("Invalid token_auth=*** for this request" in e for e in errors.values()) == 5
    assert all(TOKEN not in text and "SECRET" not in text for text in errors.values())
    assert any(entry["event"] == "matomo.retry" for entry in logs)
    assert all(TOKEN not in repr(entry) for entry in logs)


# --- request shape ------------------------------------------------------------------------------


async def test_250_sites_cost_three_posts_with_the_token_only_in_the_body(session, mocked):
    mocked.post(ENDPOINT, callback=answer_per_site(MAY_1), repeat=True)
    sites = [site(n) for n in range(1, 251)]

    records = await collect(sites, MAY_1, MAY_1, session)

    assert sorted((r.site_id, r.visits) for r in records) == [(1000 + n, n) for n in range(1, 251)]
    assert [str(url) for _, url in mocked.requests] == [ENDPOINT]
    calls = posts(mocked)
    assert sorted(len(requested_ids(call.kwargs["data"])) for call in calls) == [50, 100, 100]
    assert sorted(n for c in calls for n in requested_ids(c.kwargs["data"])) == list(range(1, 251))
    for call in calls:
        data = call.kwargs["data"]
        assert data["token_auth"] == TOKEN
        assert (data["module"], data["method"], data["format"]) == (
            "API",
            "API.getBulkRequest",
            "json",
        )
        assert TOKEN not in str(call.kwargs.get("params"))


async def test_sub_request_asks_a_date_range_even_for_one_day(session, mocked):
    mocked.post(ENDPOINT, payload=[day_range(MAY_1)])

    await collect([site(7)], MAY_1, MAY_1, session, matomo_timeout=99.0, http_connect_timeout=4.0)

    (call,) = posts(mocked)
    data = call.kwargs["data"]
    assert data["urls[0]"] == (
        "method=VisitsSummary.get&idSite=7&period=day&date=2024-05-01,2024-05-01&format_metrics=0"
    )
    assert call.kwargs["timeout"] == aiohttp.ClientTimeout(total=99.0, sock_connect=4.0)
    encoded = aiohttp.FormData(data)()
    assert encoded.content_type == "application/x-www-form-urlencoded"
    assert parse_qs(encoded.decode())["urls[0]"] == [data["urls[0]"]]


async def test_sites_without_matomo_id_are_ignored(session, mocked):
    mocked.post(ENDPOINT, callback=answer_per_site(MAY_1), repeat=True)

    assert await collect([site(None, site_id=5)], MAY_1, MAY_1, session) == []
    assert posts(mocked) == []
    records = await collect([site(None, site_id=5), site(3)], MAY_1, MAY_1, session)
    assert records == [MatomoDay(1003, MAY_1, 3, 6)]


# --- transient faults ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        {"body": '[{"2024-05-01": {"nb_vis', "content_type": "application/json"},
        {"body": PROXY_502, "content_type": "text/html"},
        {"status": 429, "payload": {"result": "error", "message": "slow down"}},
        {"status": 503, "body": PROXY_502, "content_type": "text/html"},
        {"exception": aiohttp.ClientConnectionError("Connection reset by peer")},
        {"exception": aiohttp.ServerDisconnectedError()},
        {"exception": TimeoutError()},
    ],
    ids=["malformed-json", "html-200", "429", "503", "reset", "disconnected", "timeout"],
)
async def test_transient_fault_then_success_is_retried(session, mocked, fault: dict[str, Any]):
    mocked.post(ENDPOINT, **fault)
    mocked.post(ENDPOINT, payload=[day_range(MAY_1)])

    records = await collect([site(1)], MAY_1, MAY_1, session)

    assert records == [MatomoDay(1001, MAY_1, 1, 2)]
    assert len(posts(mocked)) == 2


async def test_a_site_that_breaks_its_batch_fails_alone(session, mocked):
    def respond(url: Any, **kwargs: Any) -> CallbackResult:
        ids = requested_ids(kwargs["data"])
        if 1 in ids:
            return CallbackResult(status=502, body=PROXY_502, content_type="text/html")
        return CallbackResult(payload=[day_range(MAY_1, n, n) for n in ids])

    mocked.post(ENDPOINT, callback=respond, repeat=True)

    records = await collect([site(1), site(2), site(3)], MAY_1, MAY_1, session, matomo_batch_size=2)

    assert errors_by_site(records) == {
        "s1.example": "Matomo fails on site id 1 alone (Matomo gave no usable answer in 5 "
        "attempts: HTTP 502): check that site's reports in Matomo; the other sites of its batch "
        "were fetched"
    }
    stored = sorted(r.site_id for r in records if isinstance(r, MatomoDay))
    assert stored == [1002, 1003]
    # [1, 2]: its 3 attempts; then [1] twice (SPLIT_ATTEMPTS) and [2] once; [3] once.
    assert len(posts(mocked)) == 3 + 2 + 1 + 1


async def test_a_server_that_answers_nothing_is_split_only_once(session, mocked):
    mocked.post(ENDPOINT, status=502, body=PROXY_502, content_type="text/html", repeat=True)

    records = await collect([site(n) for n in range(1, 9)], MAY_1, MAY_1, session)

    # The batch's 3 attempts, then each half twice; with no usable answer anywhere, the halves
    # are not split again (halving a dead server only multiplies the waiting).
    assert len(posts(mocked)) == 3 + 2 * 2
    errors = errors_by_site(records)
    assert len(errors) == 8
    # Each site was asked for 3 + 2 times, and its error counts them all.
    assert all(e == "Matomo gave no usable answer in 5 attempts: HTTP 502" for e in errors.values())


async def test_a_dead_matomo_port_counts_every_attempt_made_for_each_site(session):
    """A closed port (nothing listens): the batch's 5 attempts, then each half's 2; each
    site's error counts the 7 requests that asked for it, not only its half's 2."""
    sites = [site(n) for n in range(1, 5)]

    records = await collect(
        sites, MAY_1, MAY_1, session, matomo_url="http://127.0.0.1:1", http_max_attempts=5
    )

    errors = errors_by_site(records)
    assert set(errors) == {s.domain for s in sites}
    assert all(e.startswith("Matomo unreachable after 7 attempts: ") for e in errors.values()), (
        errors
    )


async def test_connection_errors_until_give_up_name_the_cause(session, mocked):
    mocked.post(
        ENDPOINT, exception=aiohttp.ClientConnectionError("Connection refused"), repeat=True
    )

    records = await collect([site(1)], MAY_1, MAY_1, session, http_max_attempts=2)

    assert records == [
        SiteError(
            "s1.example",
            "matomo",
            "Matomo unreachable after 2 attempts: "
            "connection error: ClientConnectionError: Connection refused",
        )
    ]
    assert len(posts(mocked)) == 2


# --- streaming, concurrency, cancellation -------------------------------------------------------


async def test_each_batch_is_yielded_before_the_others_finish(session, mocked):
    release = asyncio.Event()

    async def respond(url: Any, **kwargs: Any) -> CallbackResult:
        ids = requested_ids(kwargs["data"])
        if ids == [2]:
            await release.wait()
        return CallbackResult(payload=[day_range(MAY_1, n, n) for n in ids])

    mocked.post(ENDPOINT, callback=respond, repeat=True)
    records = fetch_matomo_visits(
        [site(1), site(2)], MAY_1, MAY_1, make_settings(matomo_batch_size=1), session
    )

    first = await asyncio.wait_for(anext(records), timeout=2)
    release.set()
    rest = [record async for record in records]

    assert first == MatomoDay(1001, MAY_1, 1, 1)
    assert rest == [MatomoDay(1002, MAY_1, 2, 2)]


async def test_at_most_matomo_concurrency_posts_in_flight(session, mocked):
    in_flight, peak = 0, 0

    async def respond(url: Any, **kwargs: Any) -> CallbackResult:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return CallbackResult(payload=[day_range(MAY_1) for _ in requested_ids(kwargs["data"])])

    mocked.post(ENDPOINT, callback=respond, repeat=True)

    records = await collect(
        [site(n) for n in range(1, 13)],
        MAY_1,
        MAY_1,
        session,
        matomo_batch_size=2,
        matomo_concurrency=2,
    )

    assert len(records) == 12
    assert peak == 2


async def test_cancellation_propagates_and_stops_running_batches(session, mocked):
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hang(url: Any, **kwargs: Any) -> CallbackResult:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    mocked.post(ENDPOINT, callback=hang, repeat=True)
    records = fetch_matomo_visits([site(1)], MAY_1, MAY_1, make_settings(), session)
    consumer = asyncio.create_task(anext(records))
    await asyncio.wait_for(started.wait(), timeout=2)

    consumer.cancel()

    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert cancelled.is_set()
