"""The protocol simulators over real sockets: Matomo Reporting API, Google OAuth, Search Console."""

from __future__ import annotations

import asyncio
from datetime import date, timedelta
from urllib.parse import quote

import aiohttp
import pytest
from yarl import URL

from aggregator.simulators import GoogleSimulator, MatomoSimulator, SimAccount

TODAY = date(2024, 5, 10)
TOKEN = "matomo-secret-token"
SITES = {1: "UTC", 2: "Europe/Paris", 3: "America/New_York"}
NO_ACCESS = "You can't access this resource as it requires 'view' access for the website id = {}."
METRICS = {
    "nb_uniq_visitors",
    "nb_visits",
    "nb_actions",
    "nb_visits_converted",
    "bounce_count",
    "sum_visit_length",
    "max_actions",
    "bounce_rate",
    "nb_actions_per_visit",
    "avg_time_on_site",
}


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def matomo():
    async with MatomoSimulator(token=TOKEN, sites=SITES, seed=7, today=TODAY) as sim:
        yield sim


async def api(session, sim, params, *, token=TOKEN, path="/index.php", query=None):
    """POST like the aggregator does: API params in the query string, token in the body."""
    base = {"module": "API", "format": "JSON", "format_metrics": "0", **params}
    url = URL(sim.url + path).with_query({**base, **(query or {})})
    form = {"token_auth": token} if token is not None else {}
    async with session.post(url, data=form) as response:
        return response.status, await response.json(content_type=None)


def find_days(sim, idsite, *, empty, start=TODAY, limit=400):
    """Days (newest first, up to `start`) whose data is empty / not empty per the pure function."""
    days = [start - timedelta(days=i) for i in range(limit)]
    return [d for d in days if (sim.visits(idsite, d) is None) == empty]


# ---- server helper ---------------------------------------------------------------------------


async def test_url_only_while_running_and_no_leaked_tasks(session):
    before = asyncio.all_tasks()
    sim = MatomoSimulator(token=TOKEN, sites=SITES, today=TODAY)
    with pytest.raises(RuntimeError):
        _ = sim.url
    async with sim:
        assert sim.url.startswith("http://127.0.0.1:")
        assert sim.port > 0
        status, _ = await api(session, sim, {"method": "API.getMatomoVersion"})
        assert status == 200
    with pytest.raises(RuntimeError):
        _ = sim.url
    assert asyncio.all_tasks() == before


# ---- Matomo shapes ---------------------------------------------------------------------------


async def test_matomo_single_site_range_keyed_by_date_with_empty_list_day(session, matomo):
    empty = find_days(matomo, 1, empty=True)[0]
    start, end = empty - timedelta(days=2), empty + timedelta(days=2)
    status, body = await api(
        session,
        matomo,
        {"method": "VisitsSummary.get", "idSite": "1", "period": "day", "date": f"{start},{end}"},
    )
    assert status == 200
    assert list(body) == [(start + timedelta(days=i)).isoformat() for i in range(5)]
    assert body[empty.isoformat()] == []
    for key, leaf in body.items():
        expected = matomo.visits(1, date.fromisoformat(key))
        if expected is None:
            assert leaf == []
        else:
            assert set(leaf) >= METRICS
            assert (leaf["nb_visits"], leaf["nb_actions"]) == expected
            assert isinstance(leaf["bounce_rate"], float | int)


async def test_matomo_range_with_equal_ends_is_still_keyed_by_date(session, matomo):
    day = find_days(matomo, 2, empty=False)[0]
    status, body = await api(
        session,
        matomo,
        {"method": "VisitsSummary.get", "idSite": "2", "period": "day", "date": f"{day},{day}"},
    )
    assert status == 200
    assert list(body) == [day.isoformat()]
    assert body[day.isoformat()]["nb_visits"] == matomo.visits(2, day)[0]


async def test_matomo_days_after_today_are_empty_lists(session, matomo):
    status, body = await api(
        session,
        matomo,
        {
            "method": "VisitsSummary.get",
            "idSite": "1",
            "period": "day",
            "date": f"{TODAY + timedelta(days=1)},{TODAY + timedelta(days=3)}",
        },
    )
    assert status == 200
    assert body == {(TODAY + timedelta(days=i)).isoformat(): [] for i in (1, 2, 3)}


async def test_matomo_several_sites_range_nested_site_then_date(session, matomo):
    start, end = TODAY - timedelta(days=3), TODAY - timedelta(days=1)
    status, body = await api(
        session,
        matomo,
        {
            "method": "VisitsSummary.get",
            "idSite": "3,1,3",
            "period": "day",
            "date": f"{start},{end}",
        },
    )
    assert status == 200
    assert set(body) == {"1", "3"}
    for site, per_day in body.items():
        assert list(per_day) == [(start + timedelta(days=i)).isoformat() for i in range(3)]
        for key, leaf in per_day.items():
            expected = matomo.visits(int(site), date.fromisoformat(key))
            assert (leaf == []) if expected is None else leaf["nb_visits"] == expected[0]
    status, everything = await api(
        session,
        matomo,
        {"method": "VisitsSummary.get", "idSite": "all", "period": "day", "date": f"{start},{end}"},
    )
    assert set(everything) == {"1", "2", "3"}
    assert everything["1"] == body["1"]


async def test_matomo_several_sites_single_day_keyed_by_site_empty_is_list(session, matomo):
    day = find_days(matomo, 2, empty=True)[0]
    status, body = await api(
        session,
        matomo,
        {"method": "VisitsSummary.get", "idSite": "1,2", "period": "day", "date": day.isoformat()},
    )
    assert status == 200
    assert set(body) == {"1", "2"}
    assert body["2"] == []
    one = matomo.visits(1, day)
    assert (body["1"] == []) if one is None else body["1"]["nb_visits"] == one[0]


async def test_matomo_single_site_single_day_flat_object_and_zeros(session, matomo):
    empty = find_days(matomo, 1, empty=True)[0]
    full = find_days(matomo, 1, empty=False)[0]
    params = {"method": "VisitsSummary.get", "idSite": "1", "period": "day"}
    status, zeros = await api(session, matomo, {**params, "date": empty.isoformat()})
    assert status == 200
    assert set(zeros) >= METRICS
    assert all(value == 0 for value in zeros.values())
    status, flat = await api(session, matomo, {**params, "date": full.isoformat()})
    assert (flat["nb_visits"], flat["nb_actions"]) == matomo.visits(1, full)
    assert flat["nb_uniq_visitors"] <= flat["nb_visits"]
    assert 0 <= flat["bounce_rate"] <= 1
    # Without format_metrics=0 Matomo's default "bc" formats the rate as a percent string.
    status, formatted = await api(
        session, matomo, {**params, "date": full.isoformat(), "format_metrics": "bc"}
    )
    assert formatted["bounce_rate"] == f"{round(flat['bounce_rate'] * 100)}%"


async def test_matomo_date_keywords(session, matomo):
    params = {"method": "VisitsSummary.get", "idSite": "1", "period": "day"}
    _, last3 = await api(session, matomo, {**params, "date": "last3"})
    assert list(last3) == [(TODAY - timedelta(days=i)).isoformat() for i in (2, 1, 0)]
    _, yesterday = await api(session, matomo, {**params, "date": "yesterday"})
    expected = matomo.visits(1, TODAY - timedelta(days=1))
    assert yesterday["nb_visits"] == (expected[0] if expected else 0)
    status, bad = await api(session, matomo, {**params, "date": "2024-13-45"})
    assert status == 200
    assert bad["result"] == "error"


async def test_matomo_bulk_order_inherits_token_and_isolates_errors(session):
    async with MatomoSimulator(
        token=TOKEN, sites=SITES, seed=7, today=TODAY, fail_sites={3}
    ) as sim:
        day = find_days(sim, 2, empty=False)[0]
        sub = "method=VisitsSummary.get&period=day&date={}&idSite={}"
        urls = [
            sub.format(day, 2),
            sub.format(day, 99),
            sub.format(f"{day - timedelta(days=1)},{day}", 1),
            sub.format(day, 3),
            "method=Nope.get&idSite=1&period=day&date=today",
            quote(sub.format(day, 1), safe=""),  # double-encoded form is accepted too
        ]
        form = {"token_auth": TOKEN, **{f"urls[{i}]": u for i, u in enumerate(urls)}}
        query = {
            "module": "API",
            "method": "API.getBulkRequest",
            "format": "json",
            "format_metrics": "0",
        }
        async with session.post(URL(sim.url + "/index.php").with_query(query), data=form) as r:
            assert r.status == 200
            assert r.content_type == "application/json"
            body = await r.json()
        assert isinstance(body, list) and len(body) == 6
        assert (body[0]["nb_visits"], body[0]["nb_actions"]) == sim.visits(2, day)
        assert body[1] == {"result": "error", "message": NO_ACCESS.format(99)}
        assert list(body[2]) == [(day - timedelta(days=1)).isoformat(), day.isoformat()]
        assert body[3]["result"] == "error"
        assert body[4]["result"] == "error" and "Nope" in body[4]["message"]
        one = sim.visits(1, day)
        assert (body[5]["nb_visits"] if one else 0) == (one[0] if one else 0)
        assert sim.requests == 1
        assert sim.subrequests == 6
        assert sim.bulk_requests == 1
        assert sim.calls["VisitsSummary.get"] == 5


async def test_matomo_bulk_with_wrong_token_fails_every_element_with_http_200(session, matomo):
    form = {
        "token_auth": "wrong",
        "urls[0]": "method=VisitsSummary.get&idSite=1&period=day&date=today",
        "urls[1]": "method=VisitsSummary.get&idSite=2&period=day&date=today",
    }
    query = {"module": "API", "method": "API.getBulkRequest", "format": "json"}
    async with session.post(URL(matomo.url + "/index.php").with_query(query), data=form) as r:
        assert r.status == 200
        body = await r.json()
    assert body == [
        {"result": "error", "message": NO_ACCESS.format(1)},
        {"result": "error", "message": NO_ACCESS.format(2)},
    ]


async def test_matomo_token_in_query_string_is_treated_as_absent(session, matomo):
    params = {"method": "VisitsSummary.get", "idSite": "1", "period": "day", "date": "today"}
    status, body = await api(session, matomo, params, token=None, query={"token_auth": TOKEN})
    assert status == 401
    assert body == {"result": "error", "message": NO_ACCESS.format(1)}
    # In both places also breaks a secure-only token.
    status, body = await api(session, matomo, params, query={"token_auth": TOKEN})
    assert status == 401
    # GET with the token in the URL: same.
    url = URL(matomo.url + "/").with_query(
        {"module": "API", "format": "json", "token_auth": TOKEN, **params}
    )
    async with session.get(url) as response:
        assert response.status == 401
    status, body = await api(session, matomo, params, path="/")
    assert status == 200
    assert "nb_visits" in body


async def test_matomo_bad_token_or_unknown_site_is_http_401(session, matomo):
    params = {"method": "VisitsSummary.get", "period": "day", "date": "today"}
    status, body = await api(session, matomo, {**params, "idSite": "2"}, token="wrong")
    assert (status, body) == (401, {"result": "error", "message": NO_ACCESS.format(2)})
    status, body = await api(session, matomo, {**params, "idSite": "1,99"})
    assert (status, body) == (401, {"result": "error", "message": NO_ACCESS.format(99)})


async def test_matomo_unknown_method_and_format_are_http_200_errors(session, matomo):
    status, body = await api(session, matomo, {"method": "VisitsSummary.getNothing"})
    assert status == 200
    assert body["result"] == "error"
    assert "getNothing" in body["message"]
    status, body = await api(session, matomo, {"method": "API.getMatomoVersion", "format": "xml"})
    assert status == 200 and body["result"] == "error"


async def test_matomo_request_without_module_api_gets_html(session, matomo):
    url = URL(matomo.url + "/index.php").with_query(
        {"method": "VisitsSummary.get", "format": "json"}
    )
    async with session.post(url, data={"token_auth": TOKEN}) as response:
        assert response.status == 200
        assert response.content_type == "text/html"


async def test_matomo_site_discovery_methods(session, matomo):
    _, ids = await api(session, matomo, {"method": "SitesManager.getSitesIdWithAtLeastViewAccess"})
    assert ids == [1, 2, 3]
    _, sites = await api(session, matomo, {"method": "SitesManager.getSitesWithAtLeastViewAccess"})
    assert {s["idsite"]: s["timezone"] for s in sites} == SITES
    _, anonymous = await api(
        session, matomo, {"method": "SitesManager.getSitesIdWithAtLeastViewAccess"}, token="x"
    )
    assert anonymous == []


async def test_matomo_fail_next_answers_html_502_then_recovers(session):
    async with MatomoSimulator(token=TOKEN, sites=SITES, today=TODAY, fail_next=2) as sim:
        for _ in range(2):
            async with session.post(sim.url + "/index.php", data={"token_auth": TOKEN}) as r:
                assert r.status == 502
                assert r.content_type == "text/html"
                assert "Bad Gateway" in await r.text()
        status, body = await api(session, sim, {"method": "API.getMatomoVersion"})
        assert status == 200 and "value" in body
        assert sim.requests == 3
        assert sim.fail_next == 0
        sim.reset_counters()
        assert sim.requests == 0


async def test_matomo_hang_accepts_and_never_answers(session):
    async with MatomoSimulator(token=TOKEN, sites=SITES, today=TODAY, hang=True) as sim:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(api(session, sim, {"method": "API.getMatomoVersion"}), 0.3)
        assert sim.requests == 1
        sim.hang = False
        status, _ = await api(session, sim, {"method": "API.getMatomoVersion"})
        assert status == 200


def test_matomo_data_is_deterministic_per_seed():
    a = MatomoSimulator(token=TOKEN, sites=SITES, seed=1, today=TODAY)
    b = MatomoSimulator(token=TOKEN, sites=SITES, seed=1, today=TODAY)
    c = MatomoSimulator(token=TOKEN, sites=SITES, seed=2, today=TODAY)
    days = [TODAY - timedelta(days=i) for i in range(1000)]
    series_a = [a.visits(1, d) for d in days]
    assert series_a == [b.visits(1, d) for d in days]
    assert series_a != [c.visits(1, d) for d in days]
    empty = sum(v is None for v in series_a)
    assert 10 <= empty <= 100  # ~5 % empty days
    assert all(v is None or v[1] >= v[0] > 0 for v in series_a)
    assert a.visits(1, TODAY + timedelta(days=1)) is None


# ---- Google OAuth ----------------------------------------------------------------------------

CLIENT_ID = "client-123.apps.googleusercontent.com"
CLIENT_SECRET = "client-secret"
ALICE = "alice@example.com"
BOB = "bob@example.com"
DOMAIN = "sc-domain:example.com"
PREFIX = "https://www.example.org/"
UNVERIFIED = "https://unverified.example/"
GTODAY = date(2024, 5, 10)


def accounts():
    return {
        "rt-alice": SimAccount(
            ALICE, {DOMAIN: "siteOwner", PREFIX: "siteFullUser", UNVERIFIED: "siteUnverifiedUser"}
        ),
        "rt-bob": SimAccount(BOB, {}),
        "rt-revoked": SimAccount("carol@example.com", {DOMAIN: "siteOwner"}, revoked=True),
    }


def google_sim(**kwargs):
    return GoogleSimulator(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        accounts=accounts(),
        seed=11,
        today=GTODAY,
        **kwargs,
    )


@pytest.fixture
async def google():
    async with google_sim() as sim:
        yield sim


async def refresh(session, sim, refresh_token, *, client_id=CLIENT_ID, secret=CLIENT_SECRET):
    form = {
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "client_id": client_id,
        "client_secret": secret,
    }
    async with session.post(sim.url + "/token", data=form) as response:
        return response.status, response.headers["Content-Type"], await response.json()


async def access_token(session, sim, refresh_token="rt-alice"):
    status, _, body = await refresh(session, sim, refresh_token)
    assert status == 200
    return body["access_token"]


def query_url(sim, site_url, *, encoded=True):
    if encoded:
        segment = quote(site_url, safe="")
        return URL(f"{sim.url}/webmasters/v3/sites/{segment}/searchAnalytics/query", encoded=True)
    # What aiohttp does with a str URL: %3A decoded back to ':', %2F kept.
    return f"{sim.url}/webmasters/v3/sites/{quote(site_url, safe='')}/searchAnalytics/query"


async def query(session, sim, token, site_url, body, *, encoded=True):
    headers = {"Authorization": f"Bearer {token}"}
    async with session.post(
        query_url(sim, site_url, encoded=encoded), json=body, headers=headers
    ) as response:
        return response.status, response.headers, await response.json()


def window(start, end, **extra):
    return {
        "startDate": start.isoformat(),
        "endDate": end.isoformat(),
        "dimensions": ["date"],
        "type": "web",
        "rowLimit": 25000,
        **extra,
    }


async def test_token_refresh_success_and_token_works(session, google):
    status, content_type, body = await refresh(session, google, "rt-alice")
    assert status == 200
    assert content_type == "application/json; charset=utf-8"
    assert set(body) == {"access_token", "expires_in", "scope", "token_type"}
    assert body["expires_in"] == 3599
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "https://www.googleapis.com/auth/webmasters.readonly"
    assert "refresh_token" not in body
    second = await access_token(session, google)
    assert second != body["access_token"]
    assert google.token_requests == 2
    assert google.token_requests_by_account[ALICE] == 2


async def test_token_invalid_grant_for_revoked_and_unknown(session, google):
    expected = {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}
    for refresh_token in ("rt-revoked", "rt-never-issued"):
        status, content_type, body = await refresh(session, google, refresh_token)
        assert (status, body) == (400, expected)
        assert content_type == "application/json; charset=utf-8"
    token = await access_token(session, google, "rt-bob")
    google.revoke("rt-bob")
    status, _, body = await refresh(session, google, "rt-bob")
    assert body["error"] == "invalid_grant"
    async with session.get(
        google.url + "/webmasters/v3/sites", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        assert response.status == 401


async def test_token_invalid_client(session, google):
    expected = {"error": "invalid_client", "error_description": "The OAuth client was not found."}
    status, _, body = await refresh(session, google, "rt-alice", secret="wrong")
    assert (status, body) == (401, expected)
    status, _, body = await refresh(session, google, "rt-alice", client_id="other")
    assert (status, body) == (401, expected)


# ---- Search Console --------------------------------------------------------------------------


async def test_sites_list(session, google):
    token = await access_token(session, google)
    headers = {"Authorization": f"Bearer {token}"}
    async with session.get(google.url + "/webmasters/v3/sites", headers=headers) as response:
        assert response.status == 200
        body = await response.json()
    assert body == {
        "siteEntry": [
            {"siteUrl": DOMAIN, "permissionLevel": "siteOwner"},
            {"siteUrl": PREFIX, "permissionLevel": "siteFullUser"},
            {"siteUrl": UNVERIFIED, "permissionLevel": "siteUnverifiedUser"},
        ]
    }
    bob = await access_token(session, google, "rt-bob")
    async with session.get(
        google.url + "/webmasters/v3/sites", headers={"Authorization": f"Bearer {bob}"}
    ) as response:
        assert await response.json() == {}
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        async with session.get(google.url + "/webmasters/v3/sites", headers=headers) as response:
            assert response.status == 401
            error = (await response.json())["error"]
            assert error["code"] == 401 and error["status"] == "UNAUTHENTICATED"
    assert google.sites_requests == 4
    assert google.sites_requests_by_account == {ALICE: 1, BOB: 1}


def zero_day(sim, site_url, end):
    return next(
        end - timedelta(days=i)
        for i in range(400)
        if sim.performance(site_url, end - timedelta(days=i)) is None
    )


@pytest.mark.parametrize("site_url", [DOMAIN, PREFIX])
@pytest.mark.parametrize("encoded", [True, False])
async def test_query_rows_match_data_zero_days_absent_sorted_by_clicks(
    session, google, site_url, encoded
):
    token = await access_token(session, google)
    last_final = google.first_incomplete_date() - timedelta(days=1)
    gap = zero_day(google, site_url, last_final)
    start, end = gap - timedelta(days=6), min(gap + timedelta(days=6), last_final)
    status, _, body = await query(
        session, google, token, site_url, window(start, end), encoded=encoded
    )
    assert status == 200
    assert body["responseAggregationType"] == "byProperty"
    assert "metadata" not in body
    keys = [row["keys"][0] for row in body["rows"]]
    assert gap.isoformat() not in keys
    clicks = [row["clicks"] for row in body["rows"]]
    assert clicks == sorted(clicks, reverse=True)
    expected = {}
    for i in range((end - start).days + 1):
        day = start + timedelta(days=i)
        if (numbers := google.performance(site_url, day)) is not None:
            expected[day.isoformat()] = numbers
    assert {
        row["keys"][0]: (row["clicks"], row["impressions"], row["ctr"], row["position"])
        for row in body["rows"]
    } == expected
    for row in body["rows"]:
        assert row["impressions"] > 0
        assert row["ctr"] == pytest.approx(row["clicks"] / row["impressions"])
    assert google.query_requests_by_account[ALICE] == 1


async def test_query_all_data_state_has_metadata_and_provisional_rows(session, google):
    token = await access_token(session, google)
    horizon = google.first_incomplete_date()
    assert horizon == GTODAY - timedelta(days=2)
    body_in = window(GTODAY - timedelta(days=8), GTODAY + timedelta(days=2), dataState="all")
    status, _, body = await query(session, google, token, DOMAIN, body_in)
    assert status == 200
    assert body["metadata"] == {"first_incomplete_date": horizon.isoformat()}
    rows = {row["keys"][0]: row for row in body["rows"]}
    assert max(rows) <= GTODAY.isoformat()  # nothing after today
    provisional = [d for d in rows if d >= horizon.isoformat()]
    assert provisional, "seed 11 must give at least one provisional row"
    for key in provisional:
        final = google.performance(DOMAIN, date.fromisoformat(key))
        served = google.performance(DOMAIN, date.fromisoformat(key), provisional=True)
        assert (rows[key]["clicks"], rows[key]["impressions"]) == served[:2]
        assert rows[key]["impressions"] < final[1]
    for key in (d for d in rows if d < horizon.isoformat()):
        assert rows[key]["impressions"] == google.performance(DOMAIN, date.fromisoformat(key))[1]


async def test_query_final_data_state_hides_provisional_days(session, google):
    token = await access_token(session, google)
    horizon = google.first_incomplete_date()
    for extra in ({}, {"dataState": "final"}, {"dataState": "FINAL"}):
        status, _, body = await query(
            session, google, token, DOMAIN, window(GTODAY - timedelta(days=10), GTODAY, **extra)
        )
        assert status == 200
        assert "metadata" not in body
        keys = [row["keys"][0] for row in body["rows"]]
        assert keys and max(keys) < horizon.isoformat()


async def test_query_metadata_spelling_is_configurable(session):
    async with google_sim(metadata_spelling="firstIncompleteDate", incomplete_days=3) as sim:
        token = await access_token(session, sim)
        status, _, body = await query(
            session, sim, token, DOMAIN, window(GTODAY, GTODAY, dataState="all")
        )
        assert status == 200
        assert body["metadata"] == {"firstIncompleteDate": (GTODAY - timedelta(3)).isoformat()}


async def test_query_empty_answer_omits_rows(session, google):
    token = await access_token(session, google)
    future = GTODAY + timedelta(days=5)
    status, _, body = await query(session, google, token, DOMAIN, window(future, future))
    assert status == 200
    assert body == {"responseAggregationType": "byProperty"}


async def test_query_paging_with_row_limit_and_start_row(session, google):
    token = await access_token(session, google)
    span = window(GTODAY - timedelta(days=40), GTODAY - timedelta(days=5))
    _, _, whole = await query(session, google, token, DOMAIN, span)
    _, _, first = await query(session, google, token, DOMAIN, {**span, "rowLimit": 10})
    _, _, rest = await query(
        session, google, token, DOMAIN, {**span, "rowLimit": 25000, "startRow": 10}
    )
    assert len(first["rows"]) == 10
    assert first["rows"] + rest["rows"] == whole["rows"]


async def test_query_forbidden_for_unverified_unknown_or_misspelled_property(session, google):
    token = await access_token(session, google)
    for site_url in (UNVERIFIED, "sc-domain:not-mine.com", PREFIX.rstrip("/")):
        status, _, body = await query(session, google, token, site_url, window(GTODAY, GTODAY))
        assert status == 403
        message = (
            f"User does not have sufficient permission for site '{site_url}'. "
            "See also: https://support.google.com/webmasters/answer/2451999."
        )
        assert body["error"]["message"] == message
        assert body["error"]["errors"][0]["reason"] == "forbidden"
        assert body["error"]["status"] == "PERMISSION_DENIED"


async def test_query_unencoded_slashes_do_not_reach_the_method(session, google):
    token = await access_token(session, google)
    url = URL(
        f"{google.url}/webmasters/v3/sites/https://www.example.org//searchAnalytics/query",
        encoded=True,
    )
    async with session.post(
        url, json=window(GTODAY, GTODAY), headers={"Authorization": f"Bearer {token}"}
    ) as response:
        assert response.status == 404


async def test_query_bad_arguments_are_400(session, google):
    token = await access_token(session, google)
    day = GTODAY - timedelta(days=5)
    bad_bodies = [
        window(day, day, dimensions=["query"]),
        window(day, day, dimensions=["date", "page"]),
        window(day, day, dataState="sometimes"),
        window(day, day, startDate="05/01/2024"),
        window(day, day, rowLimit=30000),
        {**window(day, day), "bogusField": 1},
        {"endDate": day.isoformat(), "dimensions": ["date"]},
    ]
    for body_in in bad_bodies:
        status, _, body = await query(session, google, token, DOMAIN, body_in)
        assert status == 400, body_in
        assert body["error"]["status"] == "INVALID_ARGUMENT"
    status, _, _ = await query(
        session, google, token, DOMAIN, window(day, day, dimensions=["DATE"])
    )
    assert status == 200


async def test_query_qps_quota_gives_429_with_retry_after(session):
    async with google_sim(qps_per_account=2) as sim:
        token = await access_token(session, sim)
        day = GTODAY - timedelta(days=5)
        answers = await asyncio.gather(
            *(query(session, sim, token, DOMAIN, window(day, day)) for _ in range(5))
        )
        statuses = sorted(status for status, _, _ in answers)
        assert statuses == [200, 200, 429, 429, 429]
        for status, headers, body in answers:
            if status == 429:
                assert headers["Retry-After"] == "1"
                assert body == {
                    "error": {
                        "code": 429,
                        "message": "Search Analytics QPS quota exceeded.",
                        "errors": [
                            {
                                "message": "Search Analytics QPS quota exceeded.",
                                "domain": "usageLimits",
                                "reason": "rateLimitExceeded",
                            }
                        ],
                        "status": "RESOURCE_EXHAUSTED",
                    }
                }
        assert sim.max_queries_per_second[ALICE] == 5
        assert sim.query_requests == 5


async def test_query_load_quota_exhausted_account_is_403_quota_exceeded(session):
    async with google_sim(quota_exhausted_accounts={ALICE}) as sim:
        token = await access_token(session, sim)
        status, _, body = await query(session, sim, token, DOMAIN, window(GTODAY, GTODAY))
        assert status == 403
        detail = body["error"]["errors"][0]
        assert (detail["reason"], detail["domain"]) == ("quotaExceeded", "usageLimits")
        assert body["error"]["message"].startswith("Search Analytics load quota exceeded.")


async def test_expired_access_token_once_then_refresh_works(session):
    async with google_sim(expire_access_tokens_once=True) as sim:
        first = await access_token(session, sim)
        day = GTODAY - timedelta(days=5)
        status, headers, body = await query(session, sim, first, DOMAIN, window(day, day))
        assert status == 401
        assert body["error"]["status"] == "UNAUTHENTICATED"
        assert body["error"]["errors"][0] == {
            "message": "Invalid Credentials",
            "domain": "global",
            "reason": "authError",
            "location": "Authorization",
            "locationType": "header",
        }
        assert "invalid_token" in headers["WWW-Authenticate"]
        second = await access_token(session, sim)
        status, _, _ = await query(session, sim, second, DOMAIN, window(day, day))
        assert status == 200


async def test_fail_next_gives_503_envelopes(session):
    async with google_sim(fail_next=1) as sim:
        token = await access_token(session, sim)
        day = GTODAY - timedelta(days=5)
        status, _, body = await query(session, sim, token, DOMAIN, window(day, day))
        assert status == 503
        assert body["error"]["code"] == 503
        status, _, _ = await query(session, sim, token, DOMAIN, window(day, day))
        assert status == 200
        assert sim.query_requests == 2


def test_google_data_is_deterministic_per_seed():
    a, b = google_sim(), google_sim()
    c = GoogleSimulator(client_id="x", client_secret="y", accounts={}, seed=12, today=GTODAY)
    days = [GTODAY - timedelta(days=i) for i in range(400)]
    series = [a.performance(DOMAIN, d) for d in days]
    assert series == [b.performance(DOMAIN, d) for d in days]
    assert series != [c.performance(DOMAIN, d) for d in days]
    assert series != [a.performance(PREFIX, d) for d in days]
    zero = sum(s is None for s in series)
    assert 15 <= zero <= 80  # ~10 % zero days
    assert a.performance(DOMAIN, GTODAY + timedelta(days=1)) is None


async def test_latency_and_in_flight_counter(session):
    async with MatomoSimulator(token=TOKEN, sites=SITES, today=TODAY, latency=0.1) as sim:
        calls = [api(session, sim, {"method": "API.getMatomoVersion"}) for _ in range(4)]
        answers = await asyncio.gather(*calls)
        assert [status for status, _ in answers] == [200] * 4
        assert sim.max_in_flight == 4
        assert sim.in_flight == 0
