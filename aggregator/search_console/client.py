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
import contextlib
import json
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
from aggregator.dates import PACIFIC, Window, today_in
from aggregator.http_body import read_capped
from aggregator.model import (
    AccountRefresh,
    GscAccount,
    GscDay,
    LearnedRate,
    Site,
    SiteError,
    SiteId,
)
from aggregator.redaction import Redactor
from aggregator.redirects import REDIRECT_STATUSES, refused_redirect
from aggregator.search_console import answers
from aggregator.search_console.account_run import (
    AccountRun,
    ClientBroken,
    ClientGate,
    Paced,
    PropertyUnreachable,
    SiteFailure,
    take_turn,
)
from aggregator.search_console.answers import (
    GscDataError,
    ReadableProperties,
    candidate_properties,
    days_from_search_analytics,
    host_access,
    is_unverified,
    page_rows,
    readable,
    search_analytics_request,
    site_listing,
)
from aggregator.search_console.errors import (
    ErrorKind,
    GoogleError,
    backoff_delay,
    classify_google_error,
    parse_retry_after,
    rate_limit_delay,
)
from aggregator.search_console.inflight import ACCOUNT_CEILING, CLIENT_CEILING
from aggregator.search_console.oauth import (
    AccountToken,
    OAuthClientRejected,
    Sleep,
    TokenError,
)
from aggregator.search_console.rates import COOLDOWN, Throttle

log = structlog.get_logger(__name__)

SOURCE = "gsc"
# The most one answer may hold (module-level so tests can shrink it). A daily-totals answer is
# ~100 bytes a day, well under 1 MiB for Search Console's 16 months; beyond this the site fails
# on its own instead of the process running out of memory.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024

# The one place backoff waits happen, so tests can replace it and never really sleep.
_backoff_sleep: Sleep = asyncio.sleep

GscRecord = GscDay | SiteError | AccountRefresh


class _NoAccess(SiteFailure):
    """403 permission or 404: explained with what the account has for the host (_fetch_site)."""


class _SearchConsole:
    """One run's requests to Search Console for all accounts of one OAuth client."""

    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        window: Window,
        *,
        final_only: bool,
        stats: SourceStats | None = None,
        rest_allowed: bool = True,
        windows: Mapping[SiteId, Window] | None = None,
        pacific_today: date | None = None,
        rates: dict[tuple[str, str], LearnedRate] | None = None,
    ) -> None:
        self._settings = settings
        self._stats = stats or SourceStats()
        # A load-quota rest must end before the run's deadline to be worth taking.
        self._deadline = time.monotonic() + settings.run_deadline if rest_allowed else 0.0
        self._gate = ClientGate()
        self._session = session
        self._window = window
        self._windows = windows or {}
        self._final_only = final_only
        self._pacific_today = pacific_today or today_in(PACIFIC)
        # Learned rates in, learned rates out: the pipeline stores them for the next run.
        self._rates = {} if rates is None else rates
        self._client_key = ("client", settings.google_client_id or "")
        self._client = Paced(
            self._rates.get(self._client_key),
            settings.gsc_max_qps_per_client,
            most_in_flight=CLIENT_CEILING,
        )
        self._refused_at: dict[int, float] = {}
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
        try:
            async with asyncio.TaskGroup() as group:
                for account_id, account_sites in by_account.items():
                    account = accounts.get(account_id)
                    if account is None:
                        message = (
                            f"Google account id {account_id} is not in gsc_accounts or not "
                            "active: fix sites.gsc_account_id or activate the account"
                        )
                        for site in account_sites:
                            emit(SiteError(site.domain, SOURCE, message, skipped=True))
                    else:
                        group.create_task(self._run_account(account, account_sites, emit))
        finally:
            # Cut short too (the deadline, a signal): what was learned so far is kept.
            if self._gate.failure is None:
                self._learned_client_rate()
        if self._gate.failure is not None:
            # One error for the whole client: every site fails for the same reason.
            count = sum(len(group) for group in by_account.values())
            log.warning("gsc.client_broken", sites=count, error=self._gate.failure)
            subject = f"(OAuth client: {count} site{'' if count == 1 else 's'})"
            emit(SiteError(subject, SOURCE, self._gate.failure))

    def _paced_account(self, account: GscAccount) -> Paced:
        start = self._rates.get(("account", str(account.id)))
        return Paced(start, self._settings.gsc_max_qps_per_account, most_in_flight=ACCOUNT_CEILING)

    def _learned_client_rate(self) -> None:
        """Note (and log, once per run) what the OAuth client's scope learned, once the
        accounts are done or cut short."""
        log.info(
            "gsc.client_rate",
            **self._keep_learned(self._client_key, self._client.throttle),
            refused=self._client.throttle.refusals,
        )

    def _keep_learned(self, key: tuple[str, str], throttle: Throttle) -> dict[str, object]:
        """Note what `throttle` learned for the next run and return it for the log; when it
        learned nothing (held by the operator's ceiling) the earlier rate stays."""
        learned = throttle.learned()
        if learned is None:
            return {"learned_qps": None}
        self._rates[key] = learned
        return {
            "learned_qps": round(learned.queries_per_second, 2),
            "limit_shown": learned.limit_shown,
        }

    def _rate_answer(
        self, run: AccountRun, sent_at: float, refused: GoogleError | None = None
    ) -> None:
        """Tell the throttles how Google answered a query sent at `sent_at`. A refusal goes
        to the quota Google's wording names; when it names none, to the account's, and to the
        client's too when other accounts were refused within the same COOLDOWN."""
        now = asyncio.get_running_loop().time()
        if refused is None:
            run.paced.answered(now, sent_at)
            self._client.answered(now, sent_at)
            return
        account_id = run.account.id
        scope = refused.quota_scope
        if scope is None:
            others = any(
                now - at < COOLDOWN for other, at in self._refused_at.items() if other != account_id
            )
            scope = "both" if others else "account"
        self._refused_at[account_id] = now
        if scope in ("account", "both"):
            run.paced.refused(now, sent_at)
        if scope in ("client", "both"):
            self._client.refused(now, sent_at)

    async def _refresh_first(self, token: AccountToken) -> None:
        """The account's first token refresh, through the client's gate (see ClientGate). Any
        outcome but a rejected client opens the gate: a refresh that failed for its own account
        or a token endpoint that is down says nothing against the client, and refreshing the
        accounts one by one would multiply the wait."""
        async with self._gate.passage("token"):
            try:
                await token.get()
            except OAuthClientRejected as rejected:
                raise self._gate.broken(str(rejected)) from None
            finally:
                if self._gate.failure is None:
                    self._gate.proven("token")

    async def _run_account(
        self, account: GscAccount, sites: Sequence[Site], emit: Callable[[GscRecord], None]
    ) -> None:
        token = AccountToken(
            account, self._settings, self._redact, sleep=_backoff_sleep, stats=self._stats
        )
        try:
            await self._refresh_first(token)
        except ClientBroken:
            pass
        except TokenError as failure:
            log.warning("gsc.account_failed", account=account.email, error=str(failure))
            for site in sites:
                emit(SiteError(site.domain, SOURCE, str(failure)))
        else:
            run = AccountRun(account, token, self._paced_account(account))
            await self._fetch_sites(run, sites, emit)
        if token.outcome is not None:
            emit(token.outcome)

    async def _fetch_sites(
        self, run: AccountRun, sites: Sequence[Site], emit: Callable[[GscRecord], None]
    ) -> None:
        """Every site of one account, one task each: how many of their requests are in flight
        is up to the account's and the client's in-flight limits (see _call). The account's
        learned rate is stored and logged once, however its night ends (done, or cut by the
        deadline or a signal)."""
        failed = 0
        began = time.monotonic()

        async def fetch(site: Site) -> None:
            nonlocal failed
            for record in await self._site_records(run, site):
                failed += isinstance(record, SiteError)
                emit(record)

        finished = False
        try:
            async with asyncio.TaskGroup() as group:
                for site in sites:
                    group.create_task(fetch(site))
            finished = True
        finally:
            throttle = run.paced.throttle
            log.info(
                "gsc.account_done" if finished else "gsc.account_cut",
                account=run.account.email,
                sites=len(sites),
                failed=failed,
                seconds=round(time.monotonic() - began, 1),
                **self._keep_learned(("account", str(run.account.id)), throttle),
                refused=throttle.refusals,
            )

    async def _site_records(self, run: AccountRun, site: Site) -> list[GscRecord]:
        skipped = False
        try:
            return list(await self._fetch_site(run, site))
        except ClientBroken:
            return []  # reported once for the whole client by run()
        except (SiteFailure, TokenError) as failure:
            message = str(failure)
            skipped = isinstance(failure, PropertyUnreachable)
        except Exception as unexpected:
            # One odd answer must not cost the other sites their numbers; the log keeps the trace.
            log.exception("gsc.site_crashed", account=run.account.email, site=site.domain)
            message = f"unexpected {type(unexpected).__name__}: {unexpected}"
        return [SiteError(site.domain, SOURCE, self._redact(message), skipped=skipped)]

    async def _fetch_site(self, run: AccountRun, site: Site) -> list[GscDay]:
        window = self._windows.get(site.id, self._window)
        prop = site.gsc_property or await self._resolve_property(run, site)
        path = f"/webmasters/v3/sites/{quote(prop, safe='')}/searchAnalytics/query"
        pages: list[Mapping[str, Any]] = []
        try:
            # With only the date dimension a page never fills up in practice; paging is insurance.
            while True:
                body = search_analytics_request(
                    window.start,
                    window.end,
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
                window.start,
                window.end,
                final_only=self._final_only,
                pacific_today=self._pacific_today,
            )
        except GscDataError as bad:
            raise SiteFailure(f"Search Console answered {prop} with unusable data: {bad}") from None
        except _NoAccess as refused:
            raise SiteFailure(
                await self._explain_no_access(run, site, prop, str(refused))
            ) from None

    def _list_sites(self, run: AccountRun) -> Callable[[], Awaitable[Mapping[str, str]]]:
        async def list_sites() -> Mapping[str, str]:
            answer = await self._call(
                run, "GET", "/webmasters/v3/sites", None, subject="sites.list"
            )
            return listing_of(answer)

        return list_sites

    async def _resolve_property(self, run: AccountRun, site: Site) -> str:
        prop = (await run.readable(self._list_sites(run))).pick(site.domain)
        if prop is None:
            listing = await run.listing(self._list_sites(run))
            first, second, third = candidate_properties(site.domain)
            raise PropertyUnreachable(
                f"Google account {run.account.email} cannot access {first}, {second} or {third} "
                f"({host_access(site.domain, listing)}): add or verify the property in Search "
                "Console or set sites.gsc_property"
            )
        return prop

    async def _explain_no_access(self, run: AccountRun, site: Site, prop: str, problem: str) -> str:
        """The 403/404 message, with what the account does have for the site's host."""
        email = run.account.email
        try:
            listing = await run.listing(self._list_sites(run))
        except SiteFailure:
            return f"Google account {email} cannot access {prop} ({problem})"
        if is_unverified(prop, listing):
            return (
                f"Google account {email} is an unverified user of {prop} ({problem}): verify "
                f"ownership of {prop} in Search Console, or have an owner add {email}"
            )
        return (
            f"Google account {email} cannot access {prop} ({problem}); "
            f"{host_access(site.domain, listing)}: fix sites.gsc_property or the account's "
            "access in Search Console"
        )

    async def _call(
        self,
        run: AccountRun,
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
            await run.rested()
            run.check()
            token = await run.token.get()
            async with self._gate.passage("api"), contextlib.AsyncExitStack() as places:
                await take_turn(run.paced, self._client, places)
                sent_at = asyncio.get_running_loop().time()
                run.paced.throttle.sent(sent_at)
                self._client.throttle.sent(sent_at)
                run.check()
                after_rest = run.has_rested
                retry_after: float | None = None
                self._stats.sent(retry=failures > 0 or renewed)
                try:
                    status, retry_after, body = await self._send(method, url, token, payload)
                except SiteFailure:
                    self._stats.failed()  # a refused redirect, an oversized answer
                    raise
                except (aiohttp.ClientError, TimeoutError) as error:
                    self._stats.failed()
                    kind, problem = ErrorKind.TRANSIENT, f"network error: {type(error).__name__}"
                    log.warning("gsc.query", account=email, property=subject, error=problem)
                    self._gate.proven("api")  # nothing against the client: don't serialize
                else:
                    log.debug("gsc.query", account=email, property=subject, status=status)
                    self._took(run, sent_at)
                    if status == 200:
                        self._rate_answer(run, sent_at)
                        self._gate.proven("api")
                        if not isinstance(body, Mapping):
                            self._stats.failed()
                            raise SiteFailure(
                                f"Search Console answered {subject} with non-JSON data"
                            )
                        return body
                    error = classify_google_error(status, body)
                    kind, problem = error.kind, self._describe(error)
                    self._stats.failed(rate_limited=kind is ErrorKind.RATE_LIMITED)
                    limited = kind is ErrorKind.RATE_LIMITED
                    self._rate_answer(run, sent_at, error if limited else None)
                    if kind is ErrorKind.CLIENT_BROKEN:
                        raise self._gate.broken(self._api_disabled_message(problem))
                    self._gate.proven("api")
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
            if kind is ErrorKind.LOAD_QUOTA:
                await self._rest_or_stop(run, problem, after_rest=after_rest)
                continue
            if kind is ErrorKind.DAILY_LIMIT:
                log.warning("gsc.account_stopped", account=email, error=problem)
                raise run.stop(
                    f"Search Console's daily limit for account {email} is spent ({problem}); "
                    "its remaining sites are fetched on the next run"
                )
            if kind is ErrorKind.NO_ACCESS:
                raise _NoAccess(problem)
            if kind is ErrorKind.REJECTED:
                raise SiteFailure(f"Search Console rejected the request for {subject}: {problem}")
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
                        f"({problem}); gave up after waiting {rate_wait:.0f}s, as waiting "
                        f"{delay:.0f}s more would pass GSC_QUOTA_MAX_WAIT_SECONDS "
                        f"({settings.gsc_quota_max_wait:g}s); will retry next run"
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

    def _took(self, run: AccountRun, sent_at: float) -> None:
        """An answer is in: its latency sizes the account's and the client's in-flight limits."""
        seconds = asyncio.get_running_loop().time() - sent_at
        run.paced.took(seconds)
        self._client.took(seconds)

    async def _rest_or_stop(self, run: AccountRun, problem: str, *, after_rest: bool) -> None:
        """Google's load quota says "wait 15 minutes": the account rests once, if the rest ends
        before the run's deadline; refused again after it, the account stops for this run."""
        email = run.account.email
        pause = self._settings.gsc_load_quota_pause
        if after_rest:
            log.warning("gsc.account_stopped", account=email, error=problem)
            raise run.stop(
                f"Search Console's load quota still refuses account {email} after a rest of "
                f"{pause:.0f}s ({problem}): its daily load quota is spent; its remaining sites "
                "are fetched on the next run"
            )
        if not run.has_rested and time.monotonic() + pause > self._deadline:
            log.warning("gsc.account_stopped", account=email, error=problem)
            raise run.stop(
                f"Search Console's load quota refuses account {email} ({problem}) and a rest of "
                f"{pause:.0f}s (GSC_LOAD_QUOTA_PAUSE_SECONDS) would pass the run's deadline; its "
                "remaining sites are fetched on the next run"
            )
        if not run.has_rested:
            log.warning("gsc.account_resting", account=email, seconds=pause, error=problem)
        await run.rest(pause, _backoff_sleep)

    def _api_disabled_message(self, problem: str) -> str:
        client = self._settings.google_client_id
        return (
            f"the Search Console API is not enabled in the Google Cloud project of OAuth client "
            f'{client} ({problem}): enable "Google Search Console API" for that project in the '
            "Google Cloud console (APIs & Services > Library), wait a few minutes, then run again"
        )

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
        """'HTTP 404 notFound: Google's message', each part once: no message (a bare 404 from
        a proxy) or one that only repeats the status or reason adds nothing."""
        head = f"HTTP {error.status}" + (f" {error.reason}" if error.reason else "")
        if error.message.lower() in head.lower():
            return self._redact(head)
        return self._redact(f"{head}: {error.message}")


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
    windows: Mapping[SiteId, Window] | None = None,
    pacific_today: date | None = None,
    rates: dict[tuple[str, str], float] | None = None,
) -> AsyncIterator[GscDay | SiteError | AccountRefresh]:
    """Search Console numbers for `sites` over start..end (Pacific-time days, inclusive), or
    over `windows[site.id]` where given: one query per site whatever its window.

    `pacific_today` (default: the clock) is Search Console's today, for answers that do not
    say which days are incomplete.

    Yields each site's GscDay records or one SiteError as soon as that site is done, so an
    interrupted run keeps what it fetched, and one AccountRefresh per account whose token
    refresh was attempted. Sites without gsc_account_id are not GSC sites and are ignored.
    Every request is counted into `stats`. `rates` holds the query rates learned by earlier
    runs, keyed ("client", GOOGLE_CLIENT_ID) and ("account", account id); each account's and
    the client's are updated as they finish or are cut short (see .rates).
    """
    console = _SearchConsole(
        settings,
        session,
        Window(start, end),
        final_only=final_only,
        stats=stats,
        windows=windows,
        pacific_today=pacific_today,
        rates=rates,
    )
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
    message and class), sites.list failed (`list_error`) or the OAuth client itself cannot be
    used (`client_error`: the same for every account; fix it in the Google Cloud console, not
    by reconnecting accounts). `refresh` is for gsc_accounts.
    """

    account: GscAccount
    properties: ReadableProperties | None = None
    token_error: TokenError | None = None
    list_error: str | None = None
    client_error: str | None = None
    refresh: AccountRefresh | None = None


def listing_of(answer: Mapping[str, Any]) -> dict[str, str]:
    """The property -> permission listing of a sites.list answer; one that is no listing fails
    the account's sites (their properties cannot be known) with a message safe to store."""
    try:
        return site_listing(answer)
    except GscDataError as bad:
        raise SiteFailure(f"Search Console answered sites.list with unusable data: {bad}") from None


async def account_access(
    accounts: Sequence[GscAccount], settings: Settings, session: aiohttp.ClientSession
) -> list[AccountAccess]:
    """Refresh each account's token and list its properties: two requests per account, the
    accounts concurrently, paced and retried by the same code as a run (a check never rests
    for a load quota)."""
    today = date.today()  # unused: sites.list has no window
    console = _SearchConsole(
        settings, session, Window(today, today), final_only=False, rest_allowed=False
    )

    async def one(account: GscAccount) -> AccountAccess:
        token = AccountToken(
            account, settings, console._redact, sleep=_backoff_sleep, stats=console._stats
        )
        paced = Paced(None, settings.gsc_max_qps_per_account, most_in_flight=ACCOUNT_CEILING)
        run = AccountRun(account, token, paced)
        try:
            await console._refresh_first(token)
            answer = await console._call(
                run, "GET", "/webmasters/v3/sites", None, subject="sites.list"
            )
            properties = readable(listing_of(answer))
        except ClientBroken as broken:
            return AccountAccess(account, client_error=str(broken), refresh=token.outcome)
        except TokenError as failure:
            return AccountAccess(account, token_error=failure, refresh=token.outcome)
        except SiteFailure as failure:
            error = console._redact(str(failure))
            return AccountAccess(account, list_error=error, refresh=token.outcome)
        return AccountAccess(account, properties, refresh=token.outcome)

    return list(await asyncio.gather(*(one(account) for account in accounts)))
