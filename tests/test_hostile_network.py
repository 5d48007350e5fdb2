"""Hostile networks on real sockets: redirects, impostor answers and trickling servers.

A recorder on another loopback address (127.0.0.2) stands in for a host the operator never
configured: it records everything it receives and answers `200 {}`. Each endpoint (Matomo, the
token endpoint, Search Console) in turn redirects there with every redirect status; the
foreign host must receive nothing, the run must name the target host, and the numbers stored
before must be untouched. A trickling server must be given up within the configured timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta

import asyncpg
import pytest
from aiohttp import web

from aggregator.dates import Window
from aggregator.demo import simulated_settings
from aggregator.pipeline import RunOutcome, RunRequest, run_job
from aggregator.redirects import REDIRECT_STATUSES, refused_redirect
from aggregator.simulators import GoogleSimulator, SimServer
from aggregator.simulators import portfolio as world
from tests.factories import seed

FROM, TO = date(2025, 6, 1), date(2025, 6, 4)
TODAY = date(2025, 6, 10)
FOREIGN_HOST = "127.0.0.2"
MATOMO_COLUMNS = ("matomo_visits", "matomo_actions", "matomo_updated_at")
GSC_COLUMNS = ("gsc_clicks", "gsc_impressions", "gsc_ctr", "gsc_position", "gsc_final")


class ForeignHost(SimServer):
    """Records every request it receives and answers `200 {}`, as a captive portal might
    (or `answer` with `content_type`)."""

    def __init__(self, answer: str = "{}", content_type: str = "application/json") -> None:
        super().__init__(host=FOREIGN_HOST)
        self.received: list[str] = []
        self.answer = answer
        self.content_type = content_type

    def build_app(self) -> web.Application:
        app = self._new_app()
        app.router.add_route("*", "/{tail:.*}", self._record)
        return app

    async def _record(self, request: web.Request) -> web.Response:
        body = (await request.read()).decode(errors="replace")
        self.received.append(f"{request.method} {request.path_qs} {dict(request.headers)} {body}")
        return web.Response(text=self.answer, content_type=self.content_type)


class Redirector(SimServer):
    """Answers every request with `status` pointing at `target` (path and query included)."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.status = 302
        self.requests = 0

    def build_app(self) -> web.Application:
        app = self._new_app()
        app.router.add_route("*", "/{tail:.*}", self._redirect)
        return app

    async def _redirect(self, request: web.Request) -> web.Response:
        self.requests += 1
        location = f"{self.target}{request.path}?landing=secret-path"
        return web.Response(status=self.status, headers={"Location": location})


class Trickle(SimServer):
    """Answers 200 and then one byte of JSON whitespace every 0.1 s, never finishing."""

    def build_app(self) -> web.Application:
        app = self._new_app()
        app.router.add_route("*", "/{tail:.*}", self._trickle)
        return app

    async def _trickle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        while not self._closing.is_set():
            await response.write(b" ")
            await asyncio.sleep(0.1)
        return response


@dataclass
class Stored:
    dsn: str
    portfolio: world.Portfolio

    async def rows(self) -> dict[tuple[int, date], Mapping[str, object]]:
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch("select * from daily_analytics")
        finally:
            await conn.close()
        return {(r["site_id"], r["date"]): dict(r) for r in rows}

    async def store_properties(self) -> None:
        """Store each site's property, so the queries themselves (not only sites.list) meet
        the server under test."""
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute("update sites set gsc_property = 'sc-domain:' || domain")
        finally:
            await conn.close()


@pytest.fixture
async def stored(db: str) -> Stored:
    """A small portfolio whose every day already holds numbers no simulator would produce."""
    portfolio = await seed(db, world.make_portfolio(4, 2))
    conn = await asyncpg.connect(db)
    try:
        await conn.execute(
            """
            insert into daily_analytics (site_id, date, matomo_visits, matomo_actions,
                matomo_updated_at, gsc_clicks, gsc_impressions, gsc_ctr, gsc_position,
                gsc_final, gsc_updated_at)
            select s.id, d::date, 777, 7, now(), 555, 5555, 0.1, 2.5, true, now()
            from sites s, generate_series($1::date, $2::date, interval '1 day') d
            """,
            FROM,
            TO,
        )
    finally:
        await conn.close()
    return Stored(db, portfolio)


def columns(rows: Mapping[tuple[int, date], Mapping[str, object]], names: tuple[str, ...]):
    return {key: tuple(row[name] for name in names) for key, row in rows.items()}


async def run(
    stored: Stored, matomo_url: str, google_url: str, /, **endpoints: object
) -> RunOutcome:
    """One run over FROM..TO with the simulators' URLs, some replaced by `endpoints`."""
    settings = simulated_settings(
        stored.dsn,
        matomo_url,
        google_url,
        gsc_max_qps_per_account=100,
        gsc_max_qps_per_client=100,
        http_max_attempts=1,
    )
    settings = dataclasses.replace(settings, **endpoints)
    return await asyncio.wait_for(run_job(settings, RunRequest(Window(FROM, TO))), 30)


@pytest.mark.parametrize(
    ("endpoint", "variable", "untouched"),
    [
        ("matomo_url", "MATOMO_URL", MATOMO_COLUMNS),
        ("google_token_url", "GOOGLE_TOKEN_URL", GSC_COLUMNS),
        ("gsc_api_url", "GSC_API_URL", GSC_COLUMNS),
    ],
)
async def test_no_redirect_is_followed_and_nothing_reaches_the_foreign_host(
    stored: Stored, endpoint: str, variable: str, untouched: tuple[str, ...]
) -> None:
    before = columns(await stored.rows(), untouched)
    async with (
        world.matomo_simulator(stored.portfolio, today=TODAY) as matomo,
        world.google_simulator(stored.portfolio, today=TODAY) as google,
        ForeignHost() as foreign,
        Redirector(foreign.url) as redirector,
    ):
        for status in sorted(REDIRECT_STATUSES):
            redirector.status = status
            requests_before = redirector.requests
            outcome = await run(stored, matomo.url, google.url, **{endpoint: redirector.url})
            assert redirector.requests > requests_before, status
            assert outcome.status == "partial", (status, outcome.errors)
            failed = [e.error for e in outcome.errors]
            assert failed and all(
                f"HTTP {status} redirecting to {foreign.url}" in e and variable in e for e in failed
            ), failed
            assert not any("landing" in e or "secret-path" in e for e in failed)
        assert foreign.received == []
    assert columns(await stored.rows(), untouched) == before


@pytest.mark.parametrize("endpoint", ["google_token_url", "gsc_api_url"])
async def test_a_refused_redirect_is_a_failed_request_in_the_runs_figures(
    stored: Stored, endpoint: str
) -> None:
    """Every request the redirector refused is in the gsc figures as sent and failed; the
    token requests that reached Google (when only the API is redirected) as sent and ok."""
    async with (
        world.google_simulator(stored.portfolio, today=TODAY) as google,
        Redirector("http://127.0.0.2:9") as redirector,
    ):
        redirector.status = 307
        settings = simulated_settings(
            stored.dsn, "http://unused.invalid", google.url, http_max_attempts=1
        )
        target = f"{redirector.url}/token" if endpoint == "google_token_url" else redirector.url
        settings = dataclasses.replace(settings, **{endpoint: target})
        outcome = await run_job(settings, RunRequest(Window(FROM, TO), sources=("gsc",)))
    figures = outcome.stats["gsc"]
    assert redirector.requests > 0
    assert figures.requests == redirector.requests + google.token_requests
    assert figures.failed_requests == redirector.requests
    assert figures.retries == figures.rate_limited == 0


async def test_an_impostor_answering_200_empty_object_writes_nothing(stored: Stored) -> None:
    await stored.store_properties()
    before = await stored.rows()
    async with (
        world.google_simulator(stored.portfolio, today=TODAY) as google,
        ForeignHost() as impostor,
    ):
        # Matomo and Search Console both answer `{}`; the token endpoint is real.
        outcome = await run(stored, impostor.url, google.url, gsc_api_url=impostor.url)
        assert outcome.status in ("partial", "failed")
        assert impostor.received, "the impostor was asked"
        errors = {(e.source, e.site): e.error for e in outcome.errors}
        assert {source for source, _ in errors} == {"matomo", "gsc"}
        assert any("not a Search Analytics answer" in e for e in errors.values()), errors
        # The token endpoint answering `{}` fails the account, not the run.
        token_outcome = await run(
            stored, impostor.url, google.url, google_token_url=f"{impostor.url}/token"
        )
        assert any(e.source == "gsc" for e in token_outcome.errors)
    after = await stored.rows()
    assert columns(after, GSC_COLUMNS) == columns(before, GSC_COLUMNS)
    assert columns(after, MATOMO_COLUMNS) == columns(before, MATOMO_COLUMNS)


async def test_a_search_analytics_body_not_served_as_json_is_not_data(stored: Stored) -> None:
    await stored.store_properties()
    before = columns(await stored.rows(), GSC_COLUMNS)
    well_formed = '{"rows": [], "responseAggregationType": "byProperty"}'
    async with (
        world.matomo_simulator(stored.portfolio, today=TODAY) as matomo,
        world.google_simulator(stored.portfolio, today=TODAY) as google,
        ForeignHost(well_formed, content_type="text/html") as portal,
    ):
        outcome = await run(stored, matomo.url, google.url, gsc_api_url=portal.url)
    failed = [e.error for e in outcome.errors if e.source == "gsc"]
    assert failed and all("non-JSON" in e for e in failed), failed
    assert columns(await stored.rows(), GSC_COLUMNS) == before


@pytest.mark.parametrize(
    ("location", "origin"),
    [
        ("https://matomo.example/index.php?token_auth=x", "https://matomo.example"),
        ("/elsewhere?token_auth=x", "http://127.0.0.1:8080"),
        ("http://[::1]:9/x", "http://[::1]:9"),
        ("http://[zz/", "an unparseable address"),
        (None, None),
        ("", None),
    ],
)
def test_a_refused_redirect_names_only_the_targets_origin(location, origin) -> None:
    message = refused_redirect(
        "Matomo", "MATOMO_URL", "http://127.0.0.1:8080/index.php", 307, location
    )
    expected = f"HTTP 307 redirecting to {origin};" if origin else "a redirect without a target"
    assert expected in message and "MATOMO_URL" in message
    assert "token_auth" not in message and "\n" not in message


@pytest.mark.parametrize(
    ("endpoint", "timeout_setting"),
    [
        ("matomo_url", "matomo_timeout"),
        ("google_token_url", "gsc_timeout"),
        ("gsc_api_url", "gsc_timeout"),
    ],
)
async def test_a_trickling_endpoint_is_given_up_within_its_timeout(
    stored: Stored, endpoint: str, timeout_setting: str
) -> None:
    async with (
        world.matomo_simulator(stored.portfolio, today=TODAY) as matomo,
        world.google_simulator(stored.portfolio, today=TODAY) as google,
        Trickle() as trickle,
    ):
        began = time.monotonic()
        outcome = await run(
            stored, matomo.url, google.url, **{endpoint: trickle.url, timeout_setting: 1}
        )
        seconds = time.monotonic() - began
    assert outcome.errors, "the trickling endpoint failed its sites"
    # Each byte arrives well within any per-read timeout: only a total deadline ends this.
    assert seconds < 8, f"{endpoint} took {seconds:.1f}s with a 1 s timeout"


@pytest.mark.parametrize(
    ("answer", "content_type"),
    [
        ("<html>Please sign in</html>", "text/html"),
        ('["access_token"]', "application/json"),
        ('{"access_token": 12345, "expires_in": 3599}', "application/json"),
        ('{"access_token": "", "expires_in": 3599}', "application/json"),
        ('{"access_token": "ya29.x", "expires_in": "soon"}', "application/json"),
        ('{"access_token": "ya29.x", "expires_in": 1e300}', "application/json"),
        ('{"access_token": "ya29.x", "expires_in": 0}', "application/json"),
        ('{"access_token": "ya29.x", "expires_in": -3600}', "application/json"),
    ],
)
async def test_a_token_answer_that_holds_no_usable_token_fails_its_accounts_only(
    stored: Stored, answer: str, content_type: str
) -> None:
    """A 200 from the token endpoint that is not an OAuth token answer (a portal's page, a
    list, a token that is not text, an expiry that is not a number) fails each account with
    one error naming GOOGLE_TOKEN_URL and records it in gsc_accounts.last_error; Matomo is
    stored, Search Console's numbers untouched, and the source does not crash."""
    before = columns(await stored.rows(), GSC_COLUMNS)
    async with (
        world.matomo_simulator(stored.portfolio, today=TODAY) as matomo,
        ForeignHost(answer, content_type=content_type) as portal,
    ):
        outcome = await run(stored, matomo.url, portal.url, google_token_url=f"{portal.url}/token")
    gsc_sites = {s.domain for s in stored.portfolio.sites if s.gsc_account_id is not None}
    failed = {e.site: e.error for e in outcome.errors if e.source == "gsc"}
    assert outcome.status == "partial", outcome.errors
    assert set(failed) == gsc_sites, failed
    assert all("GOOGLE_TOKEN_URL" in e and "unexpectedly" not in e for e in failed.values())
    assert not [e for e in outcome.errors if e.source == "matomo"], outcome.errors
    assert columns(await stored.rows(), GSC_COLUMNS) == before
    conn = await asyncpg.connect(stored.dsn)
    try:
        last_errors = await conn.fetch("select last_error from gsc_accounts")
    finally:
        await conn.close()
    assert all("GOOGLE_TOKEN_URL" in (r["last_error"] or "") for r in last_errors), last_errors


def garbled_sites_list(portfolio: world.Portfolio, site_entry: object) -> GoogleSimulator:
    """The Google simulator, but sites.list (after its real token check) answers `siteEntry`
    with `site_entry`."""
    google = world.google_simulator(portfolio, today=TODAY)
    listed = google._sites_list

    async def garbled(request: web.Request) -> web.StreamResponse:
        await listed(request)
        return web.json_response({"siteEntry": site_entry})

    google._sites_list = garbled  # type: ignore[method-assign]
    return google


GARBLED_SITE_ENTRIES = [
    "sc-domain:site00001.example",
    {"siteUrl": "sc-domain:site00001.example"},
    [{"siteUrl": 5, "permissionLevel": "siteOwner"}],
    [["sc-domain:site00001.example", "siteOwner"]],
]


@pytest.mark.parametrize("site_entry", GARBLED_SITE_ENTRIES)
async def test_a_sites_list_that_is_no_listing_fails_the_accounts_sites(
    stored: Stored, site_entry: object
) -> None:
    """A sites.list answer whose `siteEntry` is not a list of {siteUrl, permissionLevel} says
    nothing about the account's properties: each of its sites fails naming the unusable answer
    (not skipped as if the account had no property), and nothing is written."""
    before = columns(await stored.rows(), GSC_COLUMNS)
    async with (
        world.matomo_simulator(stored.portfolio, today=TODAY) as matomo,
        garbled_sites_list(stored.portfolio, site_entry) as google,
    ):
        outcome = await run(stored, matomo.url, google.url)
    gsc_sites = {s.domain for s in stored.portfolio.sites if s.gsc_account_id is not None}
    failed = {e.site: e.error for e in outcome.errors if e.source == "gsc"}
    assert set(failed) == gsc_sites, failed
    assert all("sites.list with unusable data" in e for e in failed.values()), failed
    figures = outcome.stats["gsc"]
    assert (figures.sites_failed, figures.sites_skipped) == (len(gsc_sites), 0)
    assert columns(await stored.rows(), GSC_COLUMNS) == before


async def test_a_matomo_answer_not_served_as_json_is_not_data(stored: Stored) -> None:
    """A well-formed per-site bulk answer served as text/html (a portal or proxy page that
    happens to parse) is not Matomo's answer: Matomo serves JSON as application/json. Every
    site of the batch fails naming the content type, and the stored visits are untouched."""
    days = {
        (FROM + timedelta(days=n)).isoformat(): {"nb_visits": 1, "nb_actions": 2}
        for n in range((TO - FROM).days + 1)
    }
    matomo_sites = [s for s in stored.portfolio.sites if s.matomo_site_id is not None]
    before = columns(await stored.rows(), MATOMO_COLUMNS)
    async with (
        world.google_simulator(stored.portfolio, today=TODAY) as google,
        ForeignHost(json.dumps([days] * len(matomo_sites)), content_type="text/html") as portal,
    ):
        outcome = await run(stored, portal.url, google.url)
    failed = {e.site: e.error for e in outcome.errors if e.source == "matomo"}
    assert set(failed) == {s.domain for s in matomo_sites}, outcome.errors
    assert all("non-JSON answer (text/html)" in e for e in failed.values()), failed
    assert columns(await stored.rows(), MATOMO_COLUMNS) == before


class Flood(Trickle):
    """Answers 200 and streams `megabytes` MiB of JSON whitespace as fast as it can, then
    holds the connection open without another byte."""

    def __init__(self, megabytes: int) -> None:
        super().__init__()
        self.megabytes = megabytes

    async def _trickle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for _ in range(self.megabytes):
            await response.write(b" " * (1024 * 1024))
        await self._closing.wait()
        return response


async def test_a_flooding_token_endpoint_is_cut_off_at_its_size_cap(stored: Stored) -> None:
    """A token answer is about a kilobyte: one of megabytes is refused as soon as it passes
    the cap, naming GOOGLE_TOKEN_URL, instead of being read into memory until the timeout."""
    async with (
        world.matomo_simulator(stored.portfolio, today=TODAY) as matomo,
        Flood(megabytes=16) as flood,
    ):
        began = time.monotonic()
        outcome = await run(
            stored,
            matomo.url,
            flood.url,
            google_token_url=f"{flood.url}/token",
            gsc_timeout=20,
        )
        seconds = time.monotonic() - began
    failed = [e.error for e in outcome.errors if e.source == "gsc"]
    assert failed and all("GOOGLE_TOKEN_URL" in e and "exceeds" in e for e in failed), failed
    assert seconds < 10, f"the flood was read for {seconds:.1f}s"
