"""Google Search Console source: each site's daily clicks, impressions, CTR and position.

One searchAnalytics.query per site covers the whole window (grouped by date), so a 480-day
backfill costs the same quota as one day. Accounts run concurrently, each paced by its own
Pacer and all by one Pacer for the OAuth client (the Cloud project's quota). Every site
ends in GscDay records or one SiteError that tells the operator what to fix: no silent skips,
no invented zeros.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from enum import Enum
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog
from yarl import URL

from aggregator.config import Settings
from aggregator.google_oauth import AccountToken, Sleep, TokenError, backoff_delay
from aggregator.http_body import read_capped
from aggregator.model import AccountRefresh, GscAccount, GscDay, Site, SiteError
from aggregator.redaction import Redactor

log = structlog.get_logger(__name__)

SOURCE = "gsc"
ROW_LIMIT = 25_000
_UNVERIFIED = "siteunverifieduser"
_RATE_REASONS = frozenset({"ratelimitexceeded", "userratelimitexceeded"})
_EXHAUSTED_REASONS = frozenset({"quotaexceeded", "dailylimitexceeded"})
_MAX_MESSAGE_CHARS = 400
# The most one answer may hold (module-level so tests can shrink it). A daily-totals answer is
# ~100 bytes a day, well under 1 MiB for Search Console's 16 months; beyond this the site fails
# on its own instead of the process running out of memory.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024

# The one place backoff waits happen, so tests can replace it and never really sleep.
_backoff_sleep: Sleep = asyncio.sleep

GscRecord = GscDay | SiteError | AccountRefresh


class GscDataError(ValueError):
    """Search Console answered 200 with data this module refuses to store."""


class SiteFailure(Exception):
    """A site's GSC numbers could not be fetched; the message is safe to store."""


class AccountQuotaExhausted(SiteFailure):
    """The account hit its load/daily quota: ask it nothing more this run."""


# --- pure core -------------------------------------------------------------------------------


def normalize_domain(domain: str) -> str:
    """The bare host of a stored domain, which may carry a scheme, `www.`, a port or a trailing
    dot. A non-ASCII (IDN) host is given in punycode (`bücher.example` ->
    `xn--bcher-kva.example`), the form Search Console lists properties in."""
    host = domain.strip().lower()
    if "://" in host:
        host = host.split("://", 1)[1]
    host = host.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0].rsplit("@", 1)[-1]
    name, _, port = host.rpartition(":")
    if name and port.isdigit():
        host = name
    return _ascii_host(host.rstrip(".")).removeprefix("www.")


def _ascii_host(host: str) -> str:
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:  # an empty or over-long label: no property can match it anyway
        return host


def _canonical_property(prop: str) -> str:
    """A sites.list property in the spelling candidate_properties uses (lower case, punycode)."""
    lowered = prop.lower()
    if lowered.startswith("sc-domain:"):
        return "sc-domain:" + _ascii_host(lowered.removeprefix("sc-domain:"))
    scheme, sep, rest = lowered.partition("://")
    if not sep:
        return lowered
    host, slash, path = rest.partition("/")
    return f"{scheme}://{_ascii_host(host)}{slash}{path}"


def candidate_properties(domain: str) -> tuple[str, str, str]:
    """The properties that may hold a site's data, most complete first (the contract's order)."""
    host = normalize_domain(domain)
    return f"sc-domain:{host}", f"https://{host}/", f"https://www.{host}/"


def accessible_properties(sites_list: Mapping[str, Any]) -> frozenset[str]:
    """Properties from a sites.list answer that return data: unverified entries do not."""
    return frozenset(
        entry["siteUrl"]
        for entry in sites_list.get("siteEntry", [])
        if isinstance(entry, Mapping)
        and isinstance(entry.get("siteUrl"), str)
        and str(entry.get("permissionLevel", "")).lower() != _UNVERIFIED
    )


def pick_property(domain: str, accessible: Iterable[str]) -> str | None:
    """The first candidate property the account can read, spelled as sites.list spells it."""
    by_lower = {_canonical_property(prop): prop for prop in accessible}
    for candidate in candidate_properties(domain):
        if candidate in by_lower:
            return by_lower[candidate]
    return None


def search_analytics_request(
    start: date, end: date, *, final_only: bool, start_row: int = 0
) -> dict[str, Any]:
    """The query body for daily site totals: grouped by date only, so totals are unfiltered."""
    body: dict[str, Any] = {
        "startDate": start.isoformat(),
        "endDate": end.isoformat(),
        "dimensions": ["date"],
        "type": "web",
        "dataState": "final" if final_only else "all",
        "rowLimit": ROW_LIMIT,
    }
    if start_row:
        body["startRow"] = start_row
    return body


def days_from_search_analytics(
    site_id: int,
    body: Mapping[str, Any],
    start: date,
    end: date,
    *,
    final_only: bool = False,
) -> list[GscDay]:
    """GscDay records for start..end from a searchAnalytics.query answer (the contract's rules).

    Days before `metadata.firstIncompleteDate` are final and a missing final day is a real zero;
    later days are provisional and a missing provisional day yields nothing, because Google may
    simply not have it yet. Without metadata every day is final.

    `final_only` answers (dataState=final) never carry metadata, yet the last two or three days
    are missing from them because they are not final yet, not because they had no traffic. So
    there the day after the newest row is taken as the first incomplete day: gaps before it are
    zeros, nothing is claimed after it (a site with no rows at all gets no records).

    Google keeps about 16 months: days that far before the first incomplete day yield only the
    rows Google still has, since a missing day there means "deleted", not zero, and must not
    overwrite stored numbers in a long backfill.
    """
    rows = _rows_by_day(body, start, end)
    if final_only:
        first_incomplete = max(rows) + timedelta(days=1) if rows else start
    else:
        first_incomplete = _first_incomplete_date(body)
    retained_from = first_incomplete and first_incomplete - timedelta(days=RETENTION_DAYS)
    days: list[GscDay] = []
    day = start
    while day <= end:
        final = first_incomplete is None or day < first_incomplete
        row = rows.get(day)
        if row is not None:
            days.append(GscDay(site_id, day, *row, final=final))
        elif final and (retained_from is None or day >= retained_from):
            days.append(GscDay(site_id, day, 0, 0, None, None, final=True))
        day += timedelta(days=1)
    return days


# Search Console keeps 16 months of data; a few days' margin keeps the cut on the safe side.
RETENTION_DAYS = 16 * 30

_Row = tuple[int, int, float | None, float | None]


def page_rows(body: Mapping[str, Any]) -> list[Any]:
    """The rows of one answer; Google omits the key when nothing matched."""
    rows = body.get("rows", [])
    if not isinstance(rows, list):
        raise GscDataError(f"'rows' is {type(rows).__name__}, expected a list")
    return rows


def _rows_by_day(body: Mapping[str, Any], start: date, end: date) -> dict[date, _Row]:
    parsed: dict[date, _Row] = {}
    for row in page_rows(body):
        if not isinstance(row, Mapping):
            raise GscDataError(f"a row is {type(row).__name__}, expected an object")
        keys = row.get("keys")
        if not isinstance(keys, list) or not keys or not isinstance(keys[0], str):
            raise GscDataError(f"row keys {_brief(keys)} do not start with a date")
        day = _parse_date(keys[0], "row date")
        if not start <= day <= end:
            continue
        if day in parsed:
            raise GscDataError(f"two rows for {day}")
        parsed[day] = (
            _count(row, "clicks", day, _MAX_CLICKS),
            _count(row, "impressions", day, _MAX_IMPRESSIONS),
            _ratio(row, "ctr", day, high=1.0),
            _ratio(row, "position", day),
        )
    return parsed


# The columns' ranges (daily_analytics.gsc_clicks integer, gsc_impressions bigint): a larger
# number would fail the whole run's upsert, so it is refused here, for its site only.
_MAX_CLICKS = 2**31 - 1
_MAX_IMPRESSIONS = 2**63 - 1


def _brief(value: object) -> str:
    """repr of a value from an answer, cut short: an error message must not carry a payload."""
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _count(row: Mapping[str, Any], name: str, day: date, limit: int) -> int:
    """Clicks/impressions are declared double but are whole, non-negative numbers in practice."""
    value = row.get(name)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= limit  # before int(): also rules out nan, inf and huge ints
        or value != int(value)
    ):
        raise GscDataError(f"{name} for {day} is {_brief(value)}, expected a whole number >= 0")
    return int(value)


def _ratio(row: Mapping[str, Any], name: str, day: date, *, high: float = math.inf) -> float | None:
    """CTR (0..1) or average position (>= 0); absent or null is stored as NULL."""
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GscDataError(f"{name} for {day} is {_brief(value)}, expected a number")
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        number = math.inf
    if not (math.isfinite(number) and 0 <= number <= high):
        bounds = f"from 0 to {high:g}" if math.isfinite(high) else ">= 0"
        raise GscDataError(f"{name} for {day} is {_brief(value)}, expected a number {bounds}")
    return number


def _first_incomplete_date(body: Mapping[str, Any]) -> date | None:
    metadata = body.get("metadata")
    if not isinstance(metadata, Mapping):
        return None
    # Google's reference page and the discovery document disagree on the spelling.
    value = metadata.get("firstIncompleteDate", metadata.get("first_incomplete_date"))
    if value is None:
        return None
    if not isinstance(value, str):
        raise GscDataError(f"metadata firstIncompleteDate is {_brief(value)}, expected a date")
    return _parse_date(value, "metadata firstIncompleteDate")


def _parse_date(value: str, what: str) -> date:
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        raise GscDataError(f"{what} {_brief(value)} is not a YYYY-MM-DD date") from None


class ErrorKind(Enum):
    RATE_LIMITED = "rate limited"  # retry after a pause
    QUOTA_EXHAUSTED = "quota exhausted"  # stop asking this account for this run
    NO_ACCESS = "no access"  # the account cannot read the property
    UNAUTHENTICATED = "unauthenticated"  # refresh the token once, then retry
    TRANSIENT = "transient"  # retry with backoff
    REJECTED = "rejected"  # the request itself is wrong: report Google's message


@dataclass(frozen=True, slots=True)
class GoogleError:
    kind: ErrorKind
    status: int
    reason: str | None
    message: str


def classify_google_error(status: int, body: object) -> GoogleError:
    """Tell Google's errors apart by reason, not status alone: 403 means both "slow down",
    "quota gone for today" and "no permission", and each needs a different reaction."""
    error = body.get("error") if isinstance(body, Mapping) else None
    error = error if isinstance(error, Mapping) else {}
    details = error.get("errors")
    first = details[0] if isinstance(details, list) and details else {}
    first = first if isinstance(first, Mapping) else {}
    reason = first.get("reason") if isinstance(first.get("reason"), str) else None
    domain = str(first.get("domain", "")).lower()
    message = error.get("message") or first.get("message") or f"HTTP {status}"
    message = " ".join(str(message).split())
    if len(message) > _MAX_MESSAGE_CHARS:  # stored in aggregator_runs.errors: keep it a line
        message = message[: _MAX_MESSAGE_CHARS - 3] + "..."
    lowered = (reason or "").lower()

    if status == 429:
        kind = ErrorKind.RATE_LIMITED
    elif status == 403 and lowered in _EXHAUSTED_REASONS:
        kind = ErrorKind.QUOTA_EXHAUSTED
    elif status == 403 and (lowered in _RATE_REASONS or domain == "usagelimits"):
        kind = ErrorKind.RATE_LIMITED
    elif (status == 403 and (lowered == "forbidden" or not reason)) or status == 404:
        kind = ErrorKind.NO_ACCESS
    elif status == 401:
        kind = ErrorKind.UNAUTHENTICATED
    elif status == 408 or status >= 500:
        kind = ErrorKind.TRANSIENT
    else:
        kind = ErrorKind.REJECTED
    return GoogleError(kind, status, reason, message)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds; the HTTP-date form is not used by Google APIs."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def rate_limit_delay(
    failures: int, retry_after: float | None, *, rand: Callable[[], float] = random.random
) -> float:
    """Google's Retry-After when it sends one (plus up to 1s of jitter), else backoff."""
    if retry_after is None:
        return backoff_delay(failures, rand=rand)
    return retry_after + rand()


# Pacing runs this much slower than the configured rate. Requests leave exactly evenly spaced,
# but a server stamps them on arrival, a little later and not all equally late; at exactly
# 1/rate apart the (rate+1)-th request lands on the very edge of a 1-second window, so any
# jitter would tip it over. 10% leaves 100 ms of slack per second of requests: loop stalls of
# 30-45 ms were seen while Matomo bulk answers were being parsed (`make bench`).
PACING_HEADROOM = 1.10


class Pacer:
    """Spaces requests evenly: consecutive slots are at least `headroom / per_second` apart.

    Why not aiolimiter's AsyncLimiter(rate, 1): it is a leaky bucket of capacity `rate`, so
    `rate` requests go out at once and more follow as it drains: a 1-second window sees up to
    about 2 x rate and a server that counts per second answers the excess with 429. Even spacing
    keeps every 1-second window at `per_second` requests or fewer, for rates below 1/s too.

    A slot is held (`async with pacer.slot():`) until the request is about to go out, and the
    next slot is measured from then, so waiting inside one slot for another pacer (the
    account's slot waits for the client's) never bunches this pacer's requests. Waiters are
    served first come, first served; the clock is the event loop's monotonic clock.
    """

    def __init__(self, per_second: float, *, headroom: float = PACING_HEADROOM) -> None:
        if not per_second > 0:
            raise ValueError(f"per_second must be > 0, got {per_second!r}")
        self.per_second = per_second
        self.interval = headroom / per_second
        self.granted = 0
        self._next = -math.inf  # loop time before which no slot starts
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._lock:
            loop = asyncio.get_running_loop()
            delay = self._next - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.granted += 1
            try:
                yield
            finally:
                self._next = loop.time() + self.interval


# --- edges: HTTP, pacing, concurrency ---------------------------------------------------------


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
    ) -> None:
        self._settings = settings
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
                        emit(SiteError(site.domain, SOURCE, message))
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

            async def fetch(site: Site) -> None:
                async with parallel:
                    for record in await self._site_records(run, site):
                        emit(record)

            async with asyncio.TaskGroup() as group:
                for site in sites:
                    group.create_task(fetch(site))
        if token.outcome is not None:
            emit(token.outcome)

    async def _site_records(self, run: _AccountRun, site: Site) -> list[GscRecord]:
        try:
            return list(await self._fetch_site(run, site))
        except (SiteFailure, TokenError) as failure:
            message = str(failure)
        except Exception as unexpected:
            # One odd answer must not cost the other sites their numbers; the log keeps the trace.
            log.exception("gsc.site_crashed", account=run.account.email, site=site.domain)
            message = f"unexpected {type(unexpected).__name__}: {unexpected}"
        return [SiteError(site.domain, SOURCE, self._redact(message))]

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
                    start_row=len(pages) * ROW_LIMIT,
                )
                pages.append(await self._call(run, "POST", path, body, subject=prop))
                if len(page_rows(pages[-1])) < ROW_LIMIT:
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
            raise SiteFailure(
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
            try:
                status, retry_after, body = await self._send(method, url, token, payload)
            except (aiohttp.ClientError, TimeoutError) as error:
                kind, problem = ErrorKind.TRANSIENT, f"network error: {type(error).__name__}"
                log.warning("gsc.query", account=email, property=subject, error=problem)
            else:
                log.info("gsc.query", account=email, property=subject, status=status)
                if status == 200:
                    if not isinstance(body, Mapping):
                        raise SiteFailure(f"Search Console answered {subject} with non-JSON data")
                    return body
                error = classify_google_error(status, body)
                kind, problem = error.kind, self._describe(error)
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
        ) as response:
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
                body: object = json.loads(raw)
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
) -> AsyncIterator[GscDay | SiteError | AccountRefresh]:
    """Search Console numbers for `sites` over start..end (Pacific-time days, inclusive).

    Yields each site's GscDay records or one SiteError as soon as that site is done, so an
    interrupted run keeps what it fetched, and one AccountRefresh per account whose token
    refresh was attempted. Sites without gsc_account_id are not GSC sites and are ignored.
    """
    if start > end:
        raise ValueError(f"start {start} is after end {end}")
    console = _SearchConsole(settings, session, start, end, final_only=final_only)
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
