"""Google Search Console source: each site's daily clicks, impressions, CTR and position.

One searchAnalytics.query per site covers the whole window (grouped by date), so a 480-day
backfill costs the same quota as one day. Accounts run concurrently, each paced by its own
Pacer and all by one Pacer for the OAuth client (the Cloud project's quota). Every site
ends in GscDay records or one SiteError that tells the operator what to fix: no silent skips,
no invented zeros.

This module is the edge: HTTP, pacing, concurrency and the reaction to each error. What an
answer means is .answers, what an error means .errors (both in this package).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog
from yarl import URL

from aggregator.api_stats import SourceStats
from aggregator.config import Settings
from aggregator.http_body import read_capped
from aggregator.model import AccountRefresh, GscAccount, GscDay, Site, SiteError
from aggregator.redaction import Redactor
from aggregator.redirects import REDIRECT_STATUSES, refused_redirect
from aggregator.search_console import answers
from aggregator.search_console.answers import (
    GscDataError,
    accessible_properties,
    candidate_properties,
    days_from_search_analytics,
    page_rows,
    pick_property,
    search_analytics_request,
)
from aggregator.search_console.errors import (
    ErrorKind,
    GoogleError,
    backoff_delay,
    classify_google_error,
    parse_retry_after,
    rate_limit_delay,
)
from aggregator.search_console.oauth import AccountToken, Sleep, TokenError
from aggregator.search_console.pacing import Pacer

log = structlog.get_logger(__name__)

SOURCE = "gsc"
# The most one answer may hold (module-level so tests can shrink it). A daily-totals answer is
# ~100 bytes a day, well under 1 MiB for Search Console's 16 months; beyond this the site fails
# on its own instead of the process running out of memory.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024

# The one place backoff waits happen, so tests can replace it and never really sleep.
_backoff_sleep: Sleep = asyncio.sleep

GscRecord = GscDay | SiteError | AccountRefresh


class SiteFailure(Exception):
    """A site's GSC numbers could not be fetched; the message is safe to store."""


class PropertyUnreachable(SiteFailure):
    """The account can read none of the site's candidate properties: the site is skipped."""


class AccountQuotaExhausted(SiteFailure):
    """The account hit its load/daily quota: ask it nothing more this run."""


class _AccountRun:
    """Everything shared by one account's site tasks during one run."""

    def __init__(self, account: GscAccount, token: AccountToken, pacer: Pacer) -> None:
        self.account = account
        self.token = token
        self.pacer = pacer
        self.quota_exhausted = False
        self._sites_list_lock = asyncio.Lock()
        self._accessible: frozenset[str] | SiteFailure | None = None

    def exhausted(self) -> AccountQuotaExhausted:
        return AccountQuotaExhausted(
            f"Search Console quota exhausted for account {self.account.email}; will retry next run"
        )

    def check_quota(self) -> None:
        if self.quota_exhausted:
            raise self.exhausted()

    async def accessible(
        self, list_sites: Callable[[], Awaitable[frozenset[str]]]
    ) -> frozenset[str]:
        """sites.list once per account and run; its failure is shared like its answer."""
        async with self._sites_list_lock:
            if self._accessible is None:
                try:
                    self._accessible = await list_sites()
                except SiteFailure as failure:
                    self._accessible = failure
            if isinstance(self._accessible, SiteFailure):
                raise SiteFailure(str(self._accessible))
            return self._accessible


class _SearchConsole:
    """One run's requests to Search Console for all accounts of one OAuth client."""

    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        start: date,
        end: date,
        *,
        final_only: bool,
        stats: SourceStats | None = None,
    ) -> None:
        self._settings = settings
        self._stats = stats or SourceStats()
        self._session = session
        self._start = start
        self._end = end
        self._final_only = final_only
        self._client_pacer = Pacer(settings.gsc_max_qps_per_client)
        self._timeout = aiohttp.ClientTimeout(
            total=settings.gsc_timeout, sock_connect=settings.http_connect_timeout
        )
        secret = settings.google_client_secret
        self._redact = Redactor(secret.reveal() if secret else None)

    async def run(
        self,
        sites: Sequence[Site],
        accounts: Mapping[int, GscAccount],
        emit: Callable[[GscRecord], None],
    ) -> None:
        by_account: dict[int, list[Site]] = defaultdict(list)
        for site in sites:
            if site.gsc_account_id is not None:
                by_account[site.gsc_account_id].append(site)
        async with asyncio.TaskGroup() as group:
            for account_id, account_sites in by_account.items():
                account = accounts.get(account_id)
                if account is None:
                    message = (
                        f"Google account id {account_id} is not in gsc_accounts or not active: "
                        "fix sites.gsc_account_id or activate the account"
                    )
                    for site in account_sites:
                        emit(SiteError(site.domain, SOURCE, message, skipped=True))
                else:
                    group.create_task(self._run_account(account, account_sites, emit))

    async def _run_account(
        self, account: GscAccount, sites: Sequence[Site], emit: Callable[[GscRecord], None]
    ) -> None:
        token = AccountToken(account, self._settings, self._redact, sleep=_backoff_sleep)
        try:
            await token.get()
        except TokenError as failure:
            log.warning("gsc.account_failed", account=account.email, error=str(failure))
            for site in sites:
                emit(SiteError(site.domain, SOURCE, str(failure)))
        else:
            run = _AccountRun(account, token, Pacer(self._settings.gsc_max_qps_per_account))
            parallel = asyncio.Semaphore(
                max(1, math.ceil(self._settings.gsc_max_qps_per_account * 2))
            )

            failed = 0
            began = time.monotonic()

            async def fetch(site: Site) -> None:
                nonlocal failed
                async with parallel:
                    for record in await self._site_records(run, site):
                        failed += isinstance(record, SiteError)
                        emit(record)

            async with asyncio.TaskGroup() as group:
                for site in sites:
                    group.create_task(fetch(site))
            log.info(
                "gsc.account_done",
                account=account.email,
                sites=len(sites),
                failed=failed,
                seconds=round(time.monotonic() - began, 1),
            )
        if token.outcome is not None:
            emit(token.outcome)

    async def _site_records(self, run: _AccountRun, site: Site) -> list[GscRecord]:
        skipped = False
        try:
            return list(await self._fetch_site(run, site))
        except (SiteFailure, TokenError) as failure:
            message = str(failure)
            skipped = isinstance(failure, PropertyUnreachable)
        except Exception as unexpected:
            # One odd answer must not cost the other sites their numbers; the log keeps the trace.
            log.exception("gsc.site_crashed", account=run.account.email, site=site.domain)
            message = f"unexpected {type(unexpected).__name__}: {unexpected}"
        return [SiteError(site.domain, SOURCE, self._redact(message), skipped=skipped)]

    async def _fetch_site(self, run: _AccountRun, site: Site) -> list[GscDay]:
        prop = site.gsc_property or await self._resolve_property(run, site)
        path = f"/webmasters/v3/sites/{quote(prop, safe='')}/searchAnalytics/query"
        pages: list[Mapping[str, Any]] = []
        try:
            # With only the date dimension a page never fills up in practice; paging is insurance.
            while True:
                body = search_analytics_request(
                    self._start,
                    self._end,
                    final_only=self._final_only,
                    start_row=len(pages) * answers.ROW_LIMIT,
                )
                pages.append(await self._call(run, "POST", path, body, subject=prop))
                if len(page_rows(pages[-1])) < answers.ROW_LIMIT:
                    break
            merged = {**pages[0], "rows": [row for page in pages for row in page_rows(page)]}
            return days_from_search_analytics(
                site.id,
                merged,
                self._start,
                self._end,
                final_only=self._final_only,
            )
        except GscDataError as bad:
            raise SiteFailure(f"Search Console answered {prop} with unusable data: {bad}") from None

    async def _resolve_property(self, run: _AccountRun, site: Site) -> str:
        async def list_sites() -> frozenset[str]:
            answer = await self._call(
                run, "GET", "/webmasters/v3/sites", None, subject="sites.list"
            )
            return accessible_properties(answer)

        prop = pick_property(site.domain, await run.accessible(list_sites))
        if prop is None:
            first, second, third = candidate_properties(site.domain)
            raise PropertyUnreachable(
                f"Google account {run.account.email} cannot access {first}, {second} or {third}: "
                "add the property in Search Console or set sites.gsc_property"
            )
        return prop

    async def _call(
        self,
        run: _AccountRun,
        method: str,
        path: str,
        payload: Mapping[str, Any] | None,
        *,
        subject: str,
    ) -> Mapping[str, Any]:
        """One Search Console request with the error policy of classify_google_error applied."""
        settings = self._settings
        email = run.account.email
        url = URL(f"{settings.gsc_api_url}{path}", encoded=True)
        failures = 0
        rate_wait = 0.0
        renewed = False
        while True:
            run.check_quota()
            token = await run.token.get()
            # The account's own slot first, so waiting for it uses up no client capacity; it
            # is held while the client's slot is awaited, so its spacing is kept when sent.
            async with run.pacer.slot(), self._client_pacer.slot():
                pass
            run.check_quota()
            retry_after: float | None = None
            self._stats.sent(retry=failures > 0 or renewed)
            try:
                status, retry_after, body = await self._send(method, url, token, payload)
            except (aiohttp.ClientError, TimeoutError) as error:
                self._stats.failed()
                kind, problem = ErrorKind.TRANSIENT, f"network error: {type(error).__name__}"
                log.warning("gsc.query", account=email, property=subject, error=problem)
            else:
                log.debug("gsc.query", account=email, property=subject, status=status)
                if status == 200:
                    if not isinstance(body, Mapping):
                        self._stats.failed()
                        raise SiteFailure(f"Search Console answered {subject} with non-JSON data")
                    return body
                error = classify_google_error(status, body)
                kind, problem = error.kind, self._describe(error)
                self._stats.failed(rate_limited=kind is ErrorKind.RATE_LIMITED)
                if kind is ErrorKind.UNAUTHENTICATED and not renewed:
                    renewed = True
                    await run.token.renew(token)
                    continue
                if kind is ErrorKind.UNAUTHENTICATED:
                    raise SiteFailure(
                        f"Search Console rejected a freshly refreshed token of account {email} "
                        f"for {subject} ({problem}): reconnect the account with the "
                        "webmasters.readonly scope"
                    )
                if kind is ErrorKind.QUOTA_EXHAUSTED:
                    run.quota_exhausted = True
                    log.warning(
                        "gsc.account_failed", account=email, property=subject, error=problem
                    )
                    raise run.exhausted()
                if kind is ErrorKind.NO_ACCESS:
                    raise SiteFailure(f"Google account {email} cannot access {subject}: {problem}")
                if kind is ErrorKind.REJECTED:
                    raise SiteFailure(
                        f"Search Console rejected the request for {subject}: {problem}"
                    )
            failures += 1
            if failures >= settings.http_max_attempts:
                raise SiteFailure(
                    f"Search Console request for {subject} failed {failures} times for account "
                    f"{email} ({problem}); will retry next run"
                )
            if kind is ErrorKind.RATE_LIMITED:
                delay = rate_limit_delay(failures, retry_after)
                if rate_wait + delay > settings.gsc_quota_max_wait:
                    raise SiteFailure(
                        f"Search Console kept rate-limiting account {email} for {subject} "
                        f"({problem}); gave up after waiting {rate_wait:.0f}s; will retry next run"
                    )
                rate_wait += delay
            else:
                delay = backoff_delay(failures)
            log.warning(
                "gsc.retry",
                account=email,
                property=subject,
                attempt=failures,
                delay=round(delay, 2),
                error=problem,
            )
            await _backoff_sleep(delay)

    async def _send(
        self, method: str, url: URL, token: str, payload: Mapping[str, Any] | None
    ) -> tuple[int, float | None, object]:
        async with self._session.request(
            method,
            url,
            json=payload,
            headers={"Authorization": f"Bearer {token}"},
            timeout=self._timeout,
            allow_redirects=False,
        ) as response:
            if response.status in REDIRECT_STATUSES:
                location = response.headers.get("Location")
                raise SiteFailure(
                    refused_redirect(
                        "Search Console", "GSC_API_URL", str(url), response.status, location
                    )
                )
            raw = await read_capped(
                response,
                MAX_RESPONSE_BYTES,
                lambda: SiteFailure(
                    f"Search Console answer exceeds {MAX_RESPONSE_BYTES // (1024 * 1024)} MiB "
                    f"({response.url.path})"
                ),
            )
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            try:
                body: object = (
                    json.loads(raw) if response.content_type == "application/json" else None
                )
            # Proxies' HTML error pages, truncated or non-UTF-8 bodies; absurd nesting.
            except (ValueError, RecursionError):
                body = None
            return response.status, retry_after, body

    def _describe(self, error: GoogleError) -> str:
        reason = f" {error.reason}" if error.reason else ""
        return self._redact(f"HTTP {error.status}{reason}: {error.message}")


async def fetch_gsc_performance(
    sites: Sequence[Site],
    accounts: Mapping[int, GscAccount],
    start: date,
    end: date,
    settings: Settings,
    session: aiohttp.ClientSession,
    *,
    final_only: bool = False,
    stats: SourceStats | None = None,
) -> AsyncIterator[GscDay | SiteError | AccountRefresh]:
    """Search Console numbers for `sites` over start..end (Pacific-time days, inclusive).

    Yields each site's GscDay records or one SiteError as soon as that site is done, so an
    interrupted run keeps what it fetched, and one AccountRefresh per account whose token
    refresh was attempted. Sites without gsc_account_id are not GSC sites and are ignored.
    Every request is counted into `stats`.
    """
    if start > end:
        raise ValueError(f"start {start} is after end {end}")
    console = _SearchConsole(settings, session, start, end, final_only=final_only, stats=stats)
    ready: asyncio.Queue[GscRecord | None] = asyncio.Queue()
    producer = asyncio.create_task(console.run(sites, accounts, ready.put_nowait))
    producer.add_done_callback(lambda _: ready.put_nowait(None))
    try:
        while (record := await ready.get()) is not None:
            yield record
        producer.result()
    finally:
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)


# --- access check (`aggregator check`) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccountAccess:
    """One account's token refresh and sites.list, as a run would do them, without queries.

    `properties` is None when the token could not be refreshed (`token_error`, the run's own
    message and class) or sites.list failed (`list_error`). `refresh` is for gsc_accounts.
    """

    account: GscAccount
    properties: frozenset[str] | None = None
    token_error: TokenError | None = None
    list_error: str | None = None
    refresh: AccountRefresh | None = None


async def account_access(
    accounts: Sequence[GscAccount], settings: Settings, session: aiohttp.ClientSession
) -> list[AccountAccess]:
    """Refresh each account's token and list its properties: two requests per account, the
    accounts concurrently, paced and retried by the same code as a run."""
    today = date.today()  # unused: sites.list has no window
    console = _SearchConsole(settings, session, today, today, final_only=False)

    async def one(account: GscAccount) -> AccountAccess:
        token = AccountToken(account, settings, console._redact, sleep=_backoff_sleep)
        try:
            await token.get()
        except TokenError as failure:
            return AccountAccess(account, token_error=failure, refresh=token.outcome)
        run = _AccountRun(account, token, Pacer(settings.gsc_max_qps_per_account))
        try:
            answer = await console._call(
                run, "GET", "/webmasters/v3/sites", None, subject="sites.list"
            )
        except TokenError as failure:  # the token died between refresh and use
            return AccountAccess(account, token_error=failure, refresh=token.outcome)
        except SiteFailure as failure:
            error = console._redact(str(failure))
            return AccountAccess(account, list_error=error, refresh=token.outcome)
        return AccountAccess(account, accessible_properties(answer), refresh=token.outcome)

    return list(await asyncio.gather(*(one(account) for account in accounts)))
