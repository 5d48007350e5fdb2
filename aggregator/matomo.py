"""Daily visits and actions per site from Matomo's Reporting API.

One `API.getBulkRequest` POST carries `VisitsSummary.get` over the whole window for up to
`matomo_batch_size` sites, so a run costs about one request per hundred sites however many days it
re-fetches. The token travels only in the form body: Matomo 5 "secure only" tokens are refused when
they appear in the query string, and a body keeps the token out of proxy and access logs.

Failures are per site wherever Matomo lets us tell them apart (one bulk element), per batch when
the whole answer is unusable, and never fatal for the run: the pipeline records SiteErrors.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

import aiohttp
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from aggregator.api_stats import SourceStats
from aggregator.config import ConfigError, Secret, Settings
from aggregator.dates import Window
from aggregator.http_body import read_capped
from aggregator.model import MatomoDay, Site, SiteError, SiteId
from aggregator.redaction import Redactor
from aggregator.redirects import REDIRECT_STATUSES, refused_redirect

log = structlog.get_logger(__name__)

SOURCE = "matomo"

# Module-level (read at call time) so tests can shrink the backoff instead of sleeping for seconds.
BACKOFF_INITIAL_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
# Attempts of each half of a split batch: the whole batch already had its retries, so a half
# is asked at most twice (a transient fault once more) before it is split again.
SPLIT_ATTEMPTS = 2

_RETRYABLE_STATUSES = frozenset({408})
_DATE_KEY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# A wrong token is reported as "no access" (the call runs as anonymous): both read as refusal.
_ACCESS_REFUSAL = re.compile(
    r"can.t access|requires .{0,20}access|token|logged in|authenticat", re.IGNORECASE
)
_MAX_MESSAGE_CHARS = 400
TOKEN_REFUSED = (
    "Matomo refused every site of a bulk request, as it answers a wrong or expired token: "
    "check MATOMO_TOKEN (the token_auth of a user with view access to these sites); Matomo "
    "said for the first: "
)
# Postgres `integer` (daily_analytics.matomo_visits/actions): a larger count would fail the
# whole run's upsert, so it is refused here, for its site only.
_MAX_COUNT = 2**31 - 1
# The most one bulk answer may hold (module-level so tests can shrink it). A legitimate answer is
# ~250 bytes per site-day (100 sites x 5 years ~ 45 MB); beyond this the batch fails on its own
# instead of the process running out of memory.
MAX_RESPONSE_BYTES = 256 * 1024 * 1024


class MatomoError(Exception):
    """Matomo answered, but not with usable numbers; sending the same request again won't help."""


class MatomoBatchFailed(MatomoError):
    """A bulk answer as a whole was unusable after its retries (5xx, timeouts, a malformed or
    oversized answer): one site of the batch may be the cause, so smaller batches may succeed."""


class MatomoAccessRefused(MatomoError):
    """Matomo refused MATOMO_TOKEN itself (wrong, expired or without any view access)."""


class MatomoTransientError(Exception):
    """A fault that the same request may well not meet next time: timeouts, 5xx, proxy pages."""


class MatomoUnreachable(MatomoTransientError):
    """No answer at all: the connection failed or the request timed out."""


class MatomoRateLimited(MatomoTransientError):
    """Matomo (or a proxy in front of it) answered 429: slow down."""


async def fetch_matomo_visits(
    sites: Sequence[Site],
    start: date,
    end: date,
    settings: Settings,
    session: aiohttp.ClientSession,
    *,
    stats: SourceStats | None = None,
    windows: Mapping[SiteId, Window] | None = None,
) -> AsyncIterator[MatomoDay | SiteError]:
    """Yield a MatomoDay per day of its window for every site with a Matomo id, or one SiteError.

    A site's window is `windows[site.id]` when given (the nightly plan: each site its own), else
    start..end. Each sub-request of a bulk call carries its own site's range, so sites with
    different windows cost no extra request. Batches run concurrently, at most `matomo_concurrency` POSTs in flight, and each batch's records
    are yielded as soon as it finishes so that an interrupted run keeps what it already fetched.
    Closing or cancelling the generator cancels the batches still running. Every request is
    counted into `stats`.
    """
    if settings.matomo_url is None or settings.matomo_token is None:
        raise ConfigError("MATOMO_URL and MATOMO_TOKEN must both be set to fetch Matomo visits")
    default = Window(start, end)
    own = windows or {}
    tracked = [
        (site, own.get(site.id, default)) for site in sites if site.matomo_site_id is not None
    ]
    size = settings.matomo_batch_size
    batches = [tracked[i : i + size] for i in range(0, len(tracked), size)]
    log.info(
        "matomo.fetch",
        sites=len(tracked),
        batches=len(batches),
        site_days=sum(len(window) for _, window in tracked),
    )
    endpoint = _endpoint_for(settings, session, settings.matomo_concurrency, stats)
    pending = {asyncio.create_task(_fetch_batch(endpoint, batch)) for batch in batches}
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                for record in task.result():
                    yield record
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def build_bulk_form(
    sub_requests: Sequence[tuple[int | None, Window]], token: Secret
) -> dict[str, str]:
    """The form body of one bulk call: one `VisitsSummary.get` sub-request per (Matomo site id,
    that site's own window).

    `date=A,B` even for one day, so every sub-result has the same date-keyed shape. Sub-requests
    inherit token_auth from the outer body; `format_metrics=0` keeps numbers unformatted.
    """
    form = {
        "module": "API",
        "method": "API.getBulkRequest",
        "format": "json",
        "token_auth": token.reveal(),
    }
    for index, (matomo_id, window) in enumerate(sub_requests):
        dates = f"{window.start.isoformat()},{window.end.isoformat()}"
        form[f"urls[{index}]"] = (
            f"method=VisitsSummary.get&idSite={matomo_id}&period=day&date={dates}&format_metrics=0"
        )
    return form


def error_message(payload: Any) -> str | None:
    """Matomo's error text if `payload` is its error envelope, else None."""
    if not (isinstance(payload, dict) and payload.get("result") == "error"):
        return None
    message = payload.get("message")
    return message if isinstance(message, str) and message.strip() else "no message given"


def raise_for_error_envelope(answer: Any, what: str) -> None:
    """MatomoAccessRefused or MatomoError when a whole answer to `what` is Matomo's error
    envelope; a wrong token reads as "no access" (the call ran as anonymous)."""
    message = error_message(answer)
    if message is None:
        return
    if _ACCESS_REFUSAL.search(message):
        raise MatomoAccessRefused(f"Matomo refused token or access for {what}: {message}")
    raise MatomoError(f"Matomo rejected {what}: {message}")


def bulk_results(answer: Any, expected: int) -> list[Any]:
    """The per-site sub-results of a bulk answer, or MatomoError if the answer as a whole is bad.

    A list of another length cannot be matched to sites by position, so the batch fails rather than
    risk storing one site's numbers under another.
    """
    raise_for_error_envelope(answer, "the bulk request")
    if not isinstance(answer, list):
        raise MatomoBatchFailed(f"Matomo bulk answer is {_kind(answer)}, expected a list")
    if len(answer) != expected:
        raise MatomoBatchFailed(
            f"Matomo bulk answer has {len(answer)} results for {expected} sites"
        )
    return answer


def site_days(site: Site, result: Any, days: Sequence[date]) -> list[MatomoDay]:
    """One site's MatomoDays from its bulk sub-result; MatomoError names the site on failure."""
    message = error_message(result)
    if message is not None:
        if _ACCESS_REFUSAL.search(message):
            raise MatomoAccessRefused(
                f"Matomo refused token or access for site id {site.matomo_site_id}"
                f" ({site.domain}): {message}"
            )
        raise MatomoError(f"Matomo site id {site.matomo_site_id} ({site.domain}): {message}")
    try:
        counts = parse_visits_summary(result, days)
    except MatomoError as exc:
        raise MatomoError(f"{exc} (Matomo site id {site.matomo_site_id})") from None
    return [MatomoDay(site.id, day, visits, actions) for day, (visits, actions) in counts.items()]


def parse_visits_summary(payload: Any, days: Sequence[date]) -> dict[date, tuple[int, int]]:
    """(visits, actions) per requested day from one site's `VisitsSummary.get` answer.

    Matomo keys a `date=A,B` answer by day even when A == B, and writes an empty day as `[]`.
    A flat metrics object (or `[]`) is what a single `date=A` returns; it is accepted for a one-day
    window in case a proxy or Matomo version rewrites the request. A requested day missing from the
    answer is an error: inventing zeros would overwrite real numbers stored earlier.
    """
    if isinstance(payload, dict) and payload and not any(map(_DATE_KEY.match, payload)):
        if len(days) != 1:
            raise MatomoError(f"Matomo answer has one set of metrics for {len(days)} days")
        return {days[0]: _day_counts(payload, days[0])}
    if payload == [] and len(days) == 1:
        return {days[0]: (0, 0)}
    if not isinstance(payload, dict):
        raise MatomoError(f"Matomo answer is {_kind(payload)}, expected an object keyed by date")
    counts: dict[date, tuple[int, int]] = {}
    for day in days:
        if day.isoformat() not in payload:
            raise MatomoError(f"Matomo answer lacks {day.isoformat()}")
        counts[day] = _day_counts(payload[day.isoformat()], day)
    return counts


def redact(text: str, token: Secret) -> str:
    """`text` as one bounded line without the token, in case Matomo or a proxy echoed it back."""
    # The one other place the token is revealed: we cannot strip a value we do not know.
    return " ".join(Redactor(token.reveal())(text).split())[:_MAX_MESSAGE_CHARS]


def _day_counts(metrics: Any, day: date) -> tuple[int, int]:
    if metrics == []:
        return 0, 0
    if not isinstance(metrics, dict):
        raise MatomoError(f"Matomo answer for {day} is {_kind(metrics)}, expected metrics or []")
    return _count(metrics, "nb_visits", day), _count(metrics, "nb_actions", day)


def _count(metrics: dict[str, Any], name: str, day: date) -> int:
    if name not in metrics:
        raise MatomoError(f"Matomo answer for {day} lacks {name}")
    count = _as_count(metrics[name])
    if count is None:
        shown = json.dumps(metrics[name], ensure_ascii=False)[:40]
        raise MatomoError(f"Matomo answer for {day} has {name}={shown}, expected a count >= 0")
    return count


def _as_count(value: Any) -> int | None:
    """A non-negative whole number from an int, integral float or numeric string, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                return None
    if isinstance(value, int):
        return value if 0 <= value <= _MAX_COUNT else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value) if 0 <= value <= _MAX_COUNT else None
    return None


def _kind(value: Any) -> str:
    """The JSON type of `value`, for messages that must not echo a possibly large payload."""
    if value == []:
        return "an empty list"
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    return "null" if value is None else names.get(type(value), "a number")


@dataclass(slots=True)
class _Endpoint:
    """Where and how bulk calls go: one per run, shared by its batches. `answered` counts the
    bulk answers that could be used, which tells a broken site from a broken server."""

    session: aiohttp.ClientSession
    url: str
    token: Secret
    timeout: aiohttp.ClientTimeout
    max_attempts: int
    in_flight: asyncio.Semaphore
    backoff_initial: float
    backoff_max: float
    stats: SourceStats
    answered: int = 0


def api_url(matomo_url: str) -> str:
    """Where API calls go. MATOMO_URL is Matomo's base address, but the API's own address
    (`.../index.php`, as Matomo's documentation writes it) is taken as meant, not made into
    `.../index.php/index.php`, which Matomo answers with 404."""
    base = matomo_url.rstrip("/")
    return base if base.endswith("/index.php") else f"{base}/index.php"


def _endpoint_for(
    settings: Settings,
    session: aiohttp.ClientSession,
    concurrency: int,
    stats: SourceStats | None = None,
) -> _Endpoint:
    """The one Matomo endpoint of a run (callers have checked MATOMO_URL and MATOMO_TOKEN)."""
    assert settings.matomo_url is not None and settings.matomo_token is not None
    return _Endpoint(
        session=session,
        url=api_url(settings.matomo_url),
        token=settings.matomo_token,
        timeout=aiohttp.ClientTimeout(
            total=settings.matomo_timeout, sock_connect=settings.http_connect_timeout
        ),
        max_attempts=settings.http_max_attempts,
        in_flight=asyncio.Semaphore(concurrency),
        backoff_initial=BACKOFF_INITIAL_SECONDS,
        backoff_max=BACKOFF_MAX_SECONDS,
        stats=stats or SourceStats(),
    )


async def _fetch_batch(
    endpoint: _Endpoint,
    batch: Sequence[tuple[Site, Window]],
    *,
    split: bool = False,
    tried: int = 0,
) -> list[MatomoDay | SiteError]:
    """All records of one batch, each site's over its own window; every failure it can
    attribute becomes a SiteError.

    A batch whose answer stays unusable after its retries is asked again in halves, down to
    single sites, so one site that breaks the whole bulk answer (a PHP fatal error in its
    reports is a 500 for everyone) costs only itself. `split`: this batch is such a half;
    `tried`: the requests that asked for its sites before it (its errors count them too).
    A half is split further only once Matomo has answered some request usably: when the
    server itself is down, every half fails too, and halving would multiply the requests
    (and timeouts) by the batch size.
    """
    started = time.monotonic()
    form = build_bulk_form(
        [(site.matomo_site_id, window) for site, window in batch], endpoint.token
    )
    allowed = min(SPLIT_ATTEMPTS, endpoint.max_attempts) if split else endpoint.max_attempts
    attempts = allowed
    try:
        answer, attempts = await _post_with_retries(
            endpoint, form, sites=len(batch), max_attempts=allowed, split=split, tried=tried
        )
        try:
            results = bulk_results(answer, len(batch))
        except MatomoError:
            endpoint.stats.failed()
            raise
        endpoint.answered += 1
    except MatomoBatchFailed as exc:
        if len(batch) > 1 and (not split or endpoint.answered):
            log.warning(
                "matomo.batch_split", sites=len(batch), error=redact(str(exc), endpoint.token)
            )
            middle = len(batch) // 2
            halves = await asyncio.gather(
                _fetch_batch(endpoint, batch[:middle], split=True, tried=tried + attempts),
                _fetch_batch(endpoint, batch[middle:], split=True, tried=tried + attempts),
            )
            return [record for half in halves for record in half]
        if split and len(batch) == 1:
            return _batch_failed(
                endpoint,
                batch,
                f"Matomo fails on site id {batch[0][0].matomo_site_id} alone ({exc}): check that "
                "site's reports in Matomo; the other sites of its batch were fetched",
            )
        return _batch_failed(endpoint, batch, str(exc))
    except MatomoError as exc:
        return _batch_failed(endpoint, batch, str(exc))
    records: list[MatomoDay | SiteError] = []
    failed = 0
    refusals: list[str] = []
    for (site, window), result in zip(batch, results, strict=True):
        try:
            records.extend(site_days(site, result, window.days()))
        except MatomoError as exc:
            failed += 1
            if isinstance(exc, MatomoAccessRefused):
                refusals.append(error_message(result) or "")
            message = redact(str(exc), endpoint.token)
            records.append(SiteError(site=site.domain, source=SOURCE, error=message))
    if len(refusals) == len(batch) > 1:
        # Every site refused alike is how Matomo answers a wrong or expired token (the call
        # runs as anonymous): one error naming the token, not one per site and its id.
        shared = redact(TOKEN_REFUSED + refusals[0], endpoint.token)
        records = [SiteError(site=s.domain, source=SOURCE, error=shared) for s, _ in batch]
    if failed:
        # The request was answered with an error for part of it: one failed request (not one
        # per site), so failed_requests / requests stays the share of requests that failed.
        endpoint.stats.failed()
    log.info(
        "matomo.batch",
        sites=len(batch),
        failed=failed,
        attempt=attempts,
        seconds=round(time.monotonic() - started, 3),
    )
    return records


def _batch_failed(
    endpoint: _Endpoint, batch: Sequence[tuple[Site, Window]], error: str
) -> list[MatomoDay | SiteError]:
    message = redact(error, endpoint.token)
    log.warning("matomo.batch_failed", sites=len(batch), error=message)
    return [SiteError(site=site.domain, source=SOURCE, error=message) for site, _ in batch]


async def _post_with_retries(
    endpoint: _Endpoint,
    form: dict[str, str],
    *,
    sites: int,
    max_attempts: int | None = None,
    split: bool = False,
    tried: int = 0,
) -> tuple[Any, int]:
    """The decoded JSON answer and the attempt that got it; MatomoError once retries run out
    (MatomoBatchFailed when every attempt met a transient fault). `split`: the first attempt
    already re-asks what a failed bulk request asked, so it counts as a retry, and the error
    counts the `tried` earlier requests for these sites with its own attempts."""
    attempts_allowed = max_attempts or endpoint.max_attempts

    def log_retry(state: RetryCallState) -> None:
        reason = state.outcome.exception() if state.outcome else None
        log.warning(
            "matomo.retry",
            sites=sites,
            attempt=state.attempt_number,
            reason=redact(str(reason), endpoint.token),
            wait=round(state.next_action.sleep if state.next_action else 0.0, 3),
        )

    retrying = AsyncRetrying(
        stop=stop_after_attempt(attempts_allowed),
        wait=wait_exponential_jitter(
            multiplier=endpoint.backoff_initial,
            max=endpoint.backoff_max,
            jitter=endpoint.backoff_initial,
        ),
        retry=retry_if_exception_type(MatomoTransientError),
        before_sleep=log_retry,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                async with endpoint.in_flight:
                    endpoint.stats.sent(retry=split or attempt.retry_state.attempt_number > 1)
                    try:
                        answer = await _post_once(endpoint, form)
                    except (MatomoError, MatomoTransientError) as failure:
                        endpoint.stats.failed(rate_limited=isinstance(failure, MatomoRateLimited))
                        raise
    except MatomoTransientError as exc:
        # "Unreachable" only when nothing answered: a 5xx or a proxy's page came from somewhere.
        what = (
            "unreachable after"
            if isinstance(exc, MatomoUnreachable)
            else "gave no usable answer in"
        )
        attempts = tried + attempts_allowed
        raise MatomoBatchFailed(f"Matomo {what} {attempts} attempts: {exc}") from None
    return answer, attempt.retry_state.attempt_number


async def _post_once(endpoint: _Endpoint, form: dict[str, str]) -> Any:
    try:
        async with endpoint.session.post(
            endpoint.url, data=form, timeout=endpoint.timeout, allow_redirects=False
        ) as response:
            if response.status in REDIRECT_STATUSES:
                location = response.headers.get("Location")
                raise MatomoError(
                    refused_redirect(
                        "Matomo", "MATOMO_URL", endpoint.url, response.status, location
                    )
                )
            body = await read_capped(response, MAX_RESPONSE_BYTES, _too_big)
            return decode_answer(response.status, response.content_type, body)
    except TimeoutError:
        raise MatomoUnreachable("timed out") from None
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError) as exc:
        raise MatomoUnreachable(f"connection error: {type(exc).__name__}: {exc}") from None
    except aiohttp.ClientError as exc:
        raise MatomoError(f"Matomo request failed: {type(exc).__name__}: {exc}") from None


def _too_big() -> MatomoError:
    return MatomoBatchFailed(
        f"Matomo answer exceeds {MAX_RESPONSE_BYTES // (1024 * 1024)} MiB: lower "
        "MATOMO_BATCH_SIZE or fetch a shorter window"
    )


def decode_answer(status: int, content_type: str, body: bytes) -> Any:
    """The JSON answer of one HTTP exchange, or which of our two error kinds it amounts to.

    The status alone is not trusted: Matomo sends most errors with 200, and a proxy in front of
    it can answer 200 with an HTML page, which is worth another try.
    """
    if status == 429:
        raise MatomoRateLimited("HTTP 429")
    if status >= 500 or status in _RETRYABLE_STATUSES:
        raise MatomoTransientError(f"HTTP {status}")
    if status == 200 and content_type != "application/json":
        # Matomo serves JSON as application/json: another type is someone else's page, even
        # one that happens to parse, and no number is read from it.
        raise MatomoTransientError(f"non-JSON answer ({content_type})")
    try:
        answer = json.loads(body)
    except RecursionError:
        raise MatomoError("Matomo answer is nested too deeply to be metrics") from None
    except ValueError:
        if status == 200:
            raise MatomoTransientError("malformed JSON") from None
        answer = None
    if status != 200:
        message = error_message(answer)
        detail = f": {message}" if message else ""
        if status == 401:
            raise MatomoError(f"Matomo rejected MATOMO_TOKEN (HTTP 401){detail}")
        if status == 404:
            raise MatomoError(
                f"Matomo answered HTTP 404{detail}: no Matomo API there; set MATOMO_URL to the "
                "address Matomo's index.php is in (e.g. https://matomo.example.com)"
            )
        raise MatomoError(f"Matomo answered HTTP {status}{detail}")
    return answer


# --- access check (`aggregator check`) ---------------------------------------------------------


VIEW_ACCESS_METHOD = "SitesManager.getSitesIdWithAtLeastViewAccess"


def parse_site_ids(answer: Any) -> frozenset[int]:
    """The site ids of a `getSitesIdWithAtLeastViewAccess` answer (ints or numeric strings)."""
    raise_for_error_envelope(answer, VIEW_ACCESS_METHOD)
    if not isinstance(answer, list):
        raise MatomoError(f"Matomo answered {VIEW_ACCESS_METHOD} with {_kind(answer)}")
    ids = set()
    for value in answer:
        count = _as_count(value)
        if count is None:
            raise MatomoError(f"Matomo answered {VIEW_ACCESS_METHOD} with a non-id element")
        ids.add(count)
    return frozenset(ids)


async def viewable_site_ids(settings: Settings, session: aiohttp.ClientSession) -> frozenset[int]:
    """Every Matomo site id MATOMO_TOKEN can view, from one POST (the token in the body).

    Matomo runs a call with an unknown token as the anonymous user, which can usually view
    nothing: an empty set is what a wrong token looks like. MatomoAccessRefused when Matomo
    refuses the token outright, MatomoError for anything else; messages never hold the token.
    """
    if settings.matomo_url is None or settings.matomo_token is None:
        raise ConfigError("MATOMO_URL and MATOMO_TOKEN must both be set to check Matomo access")
    endpoint = _endpoint_for(settings, session, 1)
    form = {
        "module": "API",
        "method": VIEW_ACCESS_METHOD,
        "format": "json",
        "token_auth": endpoint.token.reveal(),
    }
    try:
        answer, _ = await _post_with_retries(endpoint, form, sites=0)
        return parse_site_ids(answer)
    except MatomoError as exc:
        refused = isinstance(exc, MatomoAccessRefused) or "HTTP 401" in str(exc)
        kind = MatomoAccessRefused if refused else MatomoError
        raise kind(redact(str(exc), endpoint.token)) from None
