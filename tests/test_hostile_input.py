"""Hostile answers and odd stored domains: parse into valid records or a clear per-site error.

Property tests feed the Matomo and Search Console parsers arbitrary JSON (and near-valid
shapes, which reach deeper); anything but a valid record or the module's own error class is a
bug. The end-to-end tests run the real pipeline against servers that answer badly, and check
that only the affected site fails, with a message saying why.
"""

from __future__ import annotations

import contextlib
import json
import math
from datetime import date, timedelta
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator import matomo
from aggregator.dates import Window
from aggregator.demo import simulated_settings
from aggregator.matomo import (
    MatomoError,
    MatomoTransientError,
    bulk_results,
    decode_answer,
    parse_visits_summary,
)
from aggregator.model import GscDay
from aggregator.pipeline import RunRequest, run_job
from aggregator.search_console import client as gsc
from aggregator.search_console.answers import (
    GscDataError,
    ReadableProperties,
    candidate_properties,
    days_from_search_analytics,
    normalize_domain,
)
from aggregator.search_console.errors import ErrorKind, classify_google_error
from aggregator.simulators import GoogleSimulator, SimServer
from aggregator.simulators import portfolio as world
from tests.factories import google_like, seed, stored_rows

MAX_INT = 2**31 - 1
MAX_BIGINT = 2**63 - 1
START = date(2025, 6, 1)
TODAY = date(2025, 6, 10)
WINDOW = Window(START, date(2025, 6, 5))
DAYS = [START + timedelta(days=n) for n in range(5)]
LATER = START + timedelta(days=30)  # Search Console's today: every day above is settled

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**31 - 3, max_value=2**64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["12", "-3", "1e400", "nan", "3.0", "0x10", "1_000", " 7 ", ""])
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
day_keys = st.sampled_from([d.isoformat() for d in DAYS] + ["2025-13-01", "2025-06-1", "x"])
PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _valid_count(value: object, limit: int) -> bool:
    return type(value) is int and 0 <= value <= limit


# --- Matomo -----------------------------------------------------------------------------------

metrics = st.dictionaries(
    st.sampled_from(["nb_visits", "nb_actions", "bounce_rate", "x"]), json_values, max_size=4
)
matomo_payloads = (
    json_values
    | metrics
    | st.dictionaries(day_keys, st.just([]) | metrics | json_values, max_size=6)
)


def _check_matomo(payload: Any, days: list[date]) -> None:
    try:
        counts = parse_visits_summary(payload, days)
    except MatomoError as exc:
        assert str(exc)
        return
    assert list(counts) == days  # every requested day, nothing else
    for visits, actions in counts.values():
        assert _valid_count(visits, MAX_INT) and _valid_count(actions, MAX_INT)


@PROPERTY_SETTINGS
@given(payload=matomo_payloads, n_days=st.integers(1, 5))
def test_matomo_day_parser_valid_records_or_matomo_error(payload: Any, n_days: int) -> None:
    _check_matomo(payload, DAYS[:n_days])


@PROPERTY_SETTINGS
@given(answer=json_values | st.lists(matomo_payloads, max_size=4), expected=st.integers(0, 4))
def test_matomo_bulk_answer_valid_list_or_matomo_error(answer: Any, expected: int) -> None:
    try:
        results = bulk_results(answer, expected)
    except MatomoError:
        return
    assert isinstance(results, list) and len(results) == expected


@PROPERTY_SETTINGS
@given(
    status=st.sampled_from([200, 200, 400, 401, 403, 404, 429, 500, 502]),
    content_type=st.sampled_from(["application/json", "text/html", "text/plain"]),
    body=st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()),
)
def test_matomo_decoding_never_raises_anything_else(status, content_type, body) -> None:
    with contextlib.suppress(MatomoError, MatomoTransientError):
        decode_answer(status, content_type, body)


def test_matomo_nesting_beyond_the_json_parser_is_a_matomo_error() -> None:
    with pytest.raises(MatomoError, match="nested too deeply"):
        decode_answer(200, "application/json", b"[" * 200_000 + b"]" * 200_000)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("12", 12),  # Matomo sometimes sends numbers as strings
        ("3.0", 3),
        (4.0, 4),
        (MAX_INT, MAX_INT),
        (None, None),
        (-1, None),
        ("-1", None),
        (2**31, None),  # would not fit daily_analytics.matomo_visits (integer)
        (1e300, None),
        (1.5, None),
        (float("nan"), None),
        ("NaN", None),
        ("1e400", None),
        (True, None),
        ({"value": 3}, None),
        ([3], None),
        ("9" * 5000, None),  # beyond Python's int-from-string digit limit
    ],
)
def test_matomo_numbers(value: object, expected: int | None) -> None:
    payload = {START.isoformat(): {"nb_visits": value, "nb_actions": 0}}
    if expected is None:
        with pytest.raises(MatomoError, match="nb_visits"):
            parse_visits_summary(payload, [START])
    else:
        assert parse_visits_summary(payload, [START]) == {START: (expected, 0)}


# --- Search Console ---------------------------------------------------------------------------

numbers = (
    st.integers(-5, 10**6)
    | st.integers(min_value=2**31 - 2, max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | json_values
)
gsc_rows = st.fixed_dictionaries(
    {"keys": st.lists(day_keys | json_values, max_size=2)},
    optional={
        "clicks": numbers,
        "impressions": numbers,
        "ctr": numbers | st.floats(0, 1),
        "position": numbers | st.floats(1, 100),
    },
)
gsc_bodies = st.dictionaries(st.text(max_size=10), json_values, max_size=3) | st.fixed_dictionaries(
    {},
    optional={
        "rows": st.lists(gsc_rows | json_values, max_size=6) | json_values,
        "metadata": st.fixed_dictionaries(
            {}, optional={"first_incomplete_date": day_keys | json_values}
        )
        | json_values,
        "responseAggregationType": json_values,
    },
)


def _check_gsc_day(day: GscDay) -> None:
    assert day.site_id == 7 and START <= day.day <= DAYS[-1]
    assert _valid_count(day.clicks, MAX_INT) and _valid_count(day.impressions, MAX_BIGINT)
    assert day.ctr is None or (type(day.ctr) is float and 0 <= day.ctr <= 1)
    assert day.position is None or (
        type(day.position) is float and math.isfinite(day.position) and day.position >= 0
    )
    assert type(day.final) is bool


@PROPERTY_SETTINGS
@given(body=gsc_bodies, final_only=st.booleans())
def test_gsc_parser_valid_records_or_gsc_data_error(body: dict, final_only: bool) -> None:
    try:
        days = days_from_search_analytics(
            7, body, START, DAYS[-1], final_only=final_only, pacific_today=LATER
        )
    except GscDataError as exc:
        assert str(exc) and len(str(exc)) < 300
        return
    assert len({d.day for d in days}) == len(days)
    for day in days:
        _check_gsc_day(day)


@PROPERTY_SETTINGS
@given(status=st.integers(100, 599), body=json_values)
def test_google_errors_are_always_classified(status: int, body: Any) -> None:
    error = classify_google_error(status, body)
    assert isinstance(error.kind, ErrorKind)
    assert isinstance(error.message, str) and "\n" not in error.message
    assert len(error.message) <= 400
    assert error.reason is None or isinstance(error.reason, str)


@PROPERTY_SETTINGS
@given(
    status=st.sampled_from([400, 403, 429, 500]),
    message=json_values,
    reason=json_values,
    domain=json_values,
)
def test_google_error_envelopes_with_odd_fields(status, message, reason, domain) -> None:
    body = {"error": {"message": message, "errors": [{"reason": reason, "domain": domain}]}}
    error = classify_google_error(status, body)
    assert isinstance(error.kind, ErrorKind) and len(error.message) <= 400


def test_a_huge_google_error_message_is_cut_to_one_bounded_line() -> None:
    body = {"error": {"message": "quota\n" * 500_000, "errors": [{"reason": "badRequest"}]}}
    error = classify_google_error(400, body)
    assert error.kind is ErrorKind.REJECTED and len(error.message) <= 400


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("clicks", "12"),
        ("clicks", None),
        ("clicks", -1),
        ("clicks", 2**31),  # would not fit daily_analytics.gsc_clicks (integer)
        ("clicks", 10**400),
        ("impressions", 2**63),
        ("impressions", 1.5),
        ("impressions", [5]),
        ("ctr", 1.5),
        ("ctr", -0.1),
        ("ctr", "0.5"),
        ("ctr", 10**400),
        ("position", -1.0),
        ("position", float("inf")),
        ("position", {"avg": 3}),
    ],
)
def test_gsc_impossible_numbers_are_data_errors(field: str, value: object) -> None:
    row = {"keys": [START.isoformat()], "clicks": 1, "impressions": 10, "ctr": 0.1, "position": 2}
    row[field] = value
    with pytest.raises(GscDataError, match=field):
        days_from_search_analytics(7, {"rows": [row]}, START, START, pacific_today=LATER)


def test_gsc_large_but_valid_numbers_are_kept() -> None:
    row = {"keys": [START.isoformat()], "clicks": MAX_INT, "impressions": 2**40, "ctr": 1}
    (day,) = days_from_search_analytics(7, {"rows": [row]}, START, START, pacific_today=LATER)
    assert (day.clicks, day.impressions, day.ctr, day.position) == (MAX_INT, 2**40, 1.0, None)


def test_gsc_error_messages_do_not_carry_the_payload() -> None:
    row = {"keys": ["x" * 100_000]}
    with pytest.raises(GscDataError) as caught:
        days_from_search_analytics(7, {"rows": [row]}, START, START, pacific_today=LATER)
    assert len(str(caught.value)) < 200


# --- domains ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "host"),
    [
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example.", "xn--bcher-kva.example"),
        ("https://www.bücher.example/shop?x=1", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("http://user@example.com:8080/path", "example.com"),
        ("  WWW.Example.COM.  ", "example.com"),
        ("пример.рф", "xn--e1afmkfd.xn--p1ai"),
    ],
)
def test_domains_are_normalized_to_search_console_spelling(stored: str, host: str) -> None:
    assert normalize_domain(stored) == host
    assert candidate_properties(stored) == (
        f"sc-domain:{host}",
        f"https://{host}/",
        f"https://www.{host}/",
    )


def test_idn_properties_match_in_either_spelling() -> None:
    assert ReadableProperties({"sc-domain:xn--bcher-kva.example"}).pick("bücher.example") == (
        "sc-domain:xn--bcher-kva.example"
    )
    # Should sites.list ever spell it in Unicode, it is still found, and used as listed.
    assert ReadableProperties({"https://www.Bücher.example/"}).pick("bücher.example") == (
        "https://www.Bücher.example/"
    )


@PROPERTY_SETTINGS
@given(domain=st.text(max_size=80), listed=st.lists(st.text(max_size=40), max_size=4))
def test_any_stored_domain_yields_candidates_without_crashing(domain: str, listed) -> None:
    first, second, third = candidate_properties(domain)
    assert first.startswith("sc-domain:") and second.startswith("https://")
    assert third.startswith("https://www.")
    choice = ReadableProperties(listed).pick(domain)
    assert choice is None or choice in listed


# --- end to end: bad answers are per-site errors ----------------------------------------------


class ScriptedMatomo(SimServer):
    """A Matomo whose bulk answer is given per idSite by the test (default: one visit a day)."""

    def __init__(self, answers: dict[int, Any]) -> None:
        super().__init__()
        self.answers = answers

    def build_app(self) -> web.Application:
        app = self._new_app()
        app.router.add_post("/index.php", self._bulk)
        return app

    async def _bulk(self, request: web.Request) -> web.Response:
        form = await request.post()
        ids = [
            int(str(form[key]).split("idSite=")[1].split("&")[0])
            for key in sorted(k for k in form if k.startswith("urls["))
        ]
        normal = {d.isoformat(): {"nb_visits": 1, "nb_actions": 2} for d in DAYS}
        return web.json_response([self.answers.get(i, normal) for i in ids])


class ScriptedGoogle(GoogleSimulator):
    """The Google simulator, with some properties' answers replaced by the test."""

    def __init__(self, answers: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.answers = answers

    def _answer(self, site_url: str, query: Any) -> dict[str, Any]:
        if site_url in self.answers:
            return self.answers[site_url]
        return super()._answer(site_url, query)


def _portfolio(domains: list[str], properties: list[str]) -> world.Portfolio:
    account = world.SimGoogleAccount(1, "seo@hostile.example", "hostile-refresh-token")
    sites = tuple(
        world.SimSite(n, domain, n, 1, prop, None)
        for n, (domain, prop) in enumerate(zip(domains, properties, strict=True), start=1)
    )
    return world.Portfolio(sites=sites, accounts=(account,))


def _google(portfolio: world.Portfolio, answers: dict[str, Any] | None = None):
    return google_like(portfolio, ScriptedGoogle, answers or {}, today=TODAY)


async def test_odd_domains_all_resolve_to_their_properties(db, conn) -> None:
    """Duplicates differing in case or a trailing dot, a scheme, `www.` and an IDN: each site
    finds its property and gets its numbers; nothing fails."""
    portfolio = _portfolio(
        ["Example.com", "example.com.", "https://www.shop.example/", "bücher.example"],
        [
            "sc-domain:example.com",
            "sc-domain:example.com",
            "https://www.shop.example/",
            "sc-domain:xn--bcher-kva.example",
        ],
    )
    # Site 2 duplicates site 1's property; the simulator keys by property, so register once.
    await seed(db, portfolio)
    async with world.matomo_simulator(portfolio, today=TODAY) as matomo, _google(portfolio) as g:
        settings_ = simulated_settings(db, matomo.url, g.url, gsc_max_qps_per_client=100)
        outcome = await run_job(settings_, RunRequest(WINDOW))
    assert outcome.errors == [] and outcome.status == "ok"
    rows = await stored_rows(conn)
    for site in portfolio.sites:
        for day in WINDOW.days():
            row = rows[(site.id, day.isoformat())]
            assert row["matomo_visits"] is not None and row["gsc_final"] is not None


async def test_bad_records_become_per_site_errors_and_the_rest_is_stored(db, conn) -> None:
    domains = [f"s{n}.example" for n in range(1, 7)]
    portfolio = _portfolio(domains, [f"sc-domain:{d}" for d in domains])
    day = START.isoformat()
    matomo_answers = {
        2: {d.isoformat(): {"nb_visits": 2**40, "nb_actions": 1} for d in DAYS},  # overflow
        3: {"result": "error", "message": "x" * 10_000},
        4: {d.isoformat(): {"nb_visits": {"deep": [1]}, "nb_actions": 1} for d in DAYS},
    }
    google_answers = {
        "sc-domain:s2.example": {"rows": [{"keys": [day], "clicks": 2**40, "impressions": 1}]},
        "sc-domain:s3.example": {
            "rows": [{"keys": [day], "clicks": 1, "impressions": 2, "ctr": 9}]
        },
        "sc-domain:s4.example": {"rows": "not a list"},
        "sc-domain:s5.example": {"rows": [{"keys": [day], "clicks": "7", "impressions": 9}]},
    }
    await seed(db, portfolio)
    async with ScriptedMatomo(matomo_answers) as m, _google(portfolio, google_answers) as g:
        settings_ = simulated_settings(db, m.url, g.url, gsc_max_qps_per_client=100)
        outcome = await run_job(settings_, RunRequest(WINDOW))

    assert outcome.status == "partial"
    errors = {(e.source, e.site): e.error for e in outcome.errors}
    assert set(errors) == {
        ("matomo", "s2.example"),
        ("matomo", "s3.example"),
        ("matomo", "s4.example"),
        ("gsc", "s2.example"),
        ("gsc", "s3.example"),
        ("gsc", "s4.example"),
        ("gsc", "s5.example"),
    }
    assert all(len(message) <= 600 and "\n" not in message for message in errors.values())
    assert "nb_visits" in errors[("matomo", "s2.example")]
    assert "clicks" in errors[("gsc", "s2.example")] and "ctr" in errors[("gsc", "s3.example")]
    rows = await stored_rows(conn)
    assert {k[0] for k, r in rows.items() if r["matomo_visits"] is not None} == {1, 5, 6}
    assert {k[0] for k, r in rows.items() if r["gsc_final"] is not None} == {1, 6}


async def test_oversized_answers_fail_their_batch_or_site_only(db, conn, monkeypatch) -> None:
    """Multi-megabyte answers: under the cap they parse, over it the batch (Matomo) or the site
    (Search Console) fails with a clear error instead of exhausting memory."""
    monkeypatch.setattr(matomo, "MAX_RESPONSE_BYTES", 2 * 1024 * 1024)
    monkeypatch.setattr(gsc, "MAX_RESPONSE_BYTES", 2 * 1024 * 1024)
    domains = ["big.example", "fine.example"]
    portfolio = _portfolio(domains, [f"sc-domain:{d}" for d in domains])
    padding = {"rows": [], "responseAggregationType": "byProperty", "pad": "x" * 3_000_000}
    await seed(db, portfolio)
    async with ScriptedMatomo({}) as m, _google(portfolio, {"sc-domain:big.example": padding}) as g:
        settings_ = simulated_settings(db, m.url, g.url, gsc_max_qps_per_client=100)
        outcome = await run_job(settings_, RunRequest(WINDOW))
        assert outcome.status == "partial"
        assert [(e.source, e.site) for e in outcome.errors] == [("gsc", "big.example")]
        assert "exceeds 2 MiB" in outcome.errors[0].error

        # A Matomo batch answer of ~3 MB: fine under a 4 MiB cap; under 1 MiB the batch is
        # split and only the site whose answer is too big fails.
        big_day = {"nb_visits": 1, "nb_actions": 2, "padding": "y" * 300_000}
        m.answers = {1: {d.isoformat(): big_day for d in DAYS}}
        monkeypatch.setattr(matomo, "MAX_RESPONSE_BYTES", 4 * 1024 * 1024)
        ok = await run_job(settings_, RunRequest(WINDOW, sources=("matomo",)))
        assert ok.status == "ok"
        monkeypatch.setattr(matomo, "MAX_RESPONSE_BYTES", 1024 * 1024)
        capped = await run_job(settings_, RunRequest(WINDOW, sources=("matomo",)))
    assert capped.status == "partial"
    assert {e.site for e in capped.errors} == {"big.example"}
    assert all("exceeds 1 MiB" in e.error and "MATOMO_BATCH_SIZE" in e.error for e in capped.errors)
    rows = await stored_rows(conn)
    assert all(r["matomo_visits"] == 1 for r in rows.values())  # the capped run erased nothing
