"""Access tokens for Search Console accounts, refreshed from their stored OAuth refresh tokens.

google-auth does the OAuth work (form, response parsing, error classes); it runs in a worker
thread over a small urllib transport, so the project needs neither `requests` nor google-auth's
private async modules. Every failure becomes a `TokenError` whose message names the account and
what the operator must do, and never contains a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import structlog
from google.auth import exceptions as google_exceptions
from google.auth import transport
from google.oauth2.credentials import Credentials

from aggregator.api_stats import SourceStats
from aggregator.config import Settings
from aggregator.model import AccountRefresh, GscAccount
from aggregator.redaction import Redactor
from aggregator.redirects import REDIRECT_STATUSES, refused_redirect
from aggregator.search_console.errors import backoff_delay

log = structlog.get_logger(__name__)

Sleep = Callable[[float], Awaitable[None]]

# A token this close to its expiry is refreshed before use rather than sent and rejected.
_EXPIRY_MARGIN = timedelta(minutes=5)
# google-auth retries these statuses, and answers whose error names one of these codes, itself
# with a blocking, uncancellable time.sleep; the transport reports them as TransportError
# instead so that AccountToken's bounded, injectable backoff is the only retry policy, and one
# refresh is exactly one request (counted in the run's stats).
_TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_ERRORS = frozenset({"internal_failure", "server_error", "temporarily_unavailable"})
_RECONNECT_ERRORS = frozenset({"invalid_grant"})
# The OAuth client itself is gone or wrong: no account of it can work, so one error says so.
_BROKEN_CLIENT_ERRORS = frozenset({"invalid_client", "deleted_client"})
# What google-auth raises on a 200 that is not a token answer (a portal's page, a list, an
# `expires_in` that is no number): its parser indexes and converts without checking.
_UNUSABLE_ANSWER_ERRORS = (ValueError, TypeError, KeyError, OverflowError)
# A token answer is about a kilobyte; a body past this is no token answer and is not read on.
MAX_TOKEN_ANSWER_BYTES = 1024 * 1024
_CHECK_TOKEN_URL = "check that GOOGLE_TOKEN_URL is Google's token endpoint"
UNUSABLE_TOKEN_ANSWER = (
    f"the token endpoint's answer holds no usable access token: {_CHECK_TOKEN_URL}"
)


async def in_daemon_thread(function: Callable[..., Any], *args: Any) -> Any:
    """Run blocking `function` in a daemon thread and await its result.

    Unlike asyncio.to_thread, a cancelled caller (SIGTERM, the run deadline) does not keep the
    process alive until a hung token endpoint times out: interpreter exit never waits for a
    daemon thread.
    """
    loop = asyncio.get_running_loop()
    result: asyncio.Future[Any] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not result.done():
            outcome()

    def deliver(outcome: Callable[[], None]) -> None:
        # After a cancelled run the loop may be closed: then nobody is waiting for the answer.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, outcome)

    def work() -> None:
        try:
            value = function(*args)
        except BaseException as exc:  # handed to the awaiting task, which decides
            deliver(partial(result.set_exception, exc))
        else:
            deliver(partial(result.set_result, value))

    threading.Thread(target=work, name="google-token-refresh", daemon=True).start()
    return await result


class TokenError(Exception):
    """An account's access token could not be obtained; the message is safe to store."""


class MissingRefreshToken(TokenError):
    """Neither gsc_accounts.refresh_token nor GSC_REFRESH_TOKEN_<id> holds a token."""


class ReconnectRequired(TokenError):
    """Google answered invalid_grant: the refresh token is dead and needs a new consent."""


class ClientMisconfigured(TokenError):
    """The OAuth client (GOOGLE_CLIENT_ID/SECRET) is wrong or did not issue this token."""


class OAuthClientRejected(ClientMisconfigured):
    """Google does not accept the OAuth client at all (deleted, unknown, wrong secret): every
    account of it fails alike, so the run reports it once and asks Google nothing more."""


class TokenEndpointUnavailable(TokenError):
    """The token endpoint kept failing transiently (5xx, network) for every allowed attempt."""


class TokenEndpointRedirected(TokenError):
    """The token endpoint answered with a redirect, which is refused (see aggregator.redirects)."""


class TokenAnswerTooBig(TokenEndpointUnavailable):
    """The token endpoint's answer passed MAX_TOKEN_ANSWER_BYTES: a flood, not a token (what to
    check is GOOGLE_TOKEN_URL, as for an endpoint that keeps failing)."""


class TransientAnswer(google_exceptions.TransportError):
    """The token endpoint answered with a status or error worth retrying (see
    _TRANSIENT_STATUSES); `status` says whether it was a 429."""

    def __init__(self, status: int, problem: str) -> None:
        super().__init__(f"token endpoint answered HTTP {status}{problem}")
        self.status = status


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows 301/302/303 by default; returning None makes it hand back the 3xx."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_RefuseRedirects)


class _Response(transport.Response):
    """google-auth's response interface, filled from urllib."""

    def __init__(self, status: int, headers: Mapping[str, str], data: bytes) -> None:
        self._status = status
        self._headers = headers
        self._data = data

    @property
    def status(self) -> int:
        return self._status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def data(self) -> bytes:
        return self._data


class UrllibRequest(transport.Request):
    """google-auth's transport interface over urllib.request, with a timeout on every call.

    Besides network failures, transient HTTP statuses are raised as TransportError too (see
    _TRANSIENT_STATUSES) so google-auth does not sleep and retry inside the worker thread.
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: object,
    ) -> _Response:
        request = urllib.request.Request(url, data=body, headers=dict(headers or {}), method=method)
        try:
            with _OPENER.open(request, timeout=timeout or self._timeout) as answer:
                response = _Response(answer.status, dict(answer.headers), _read_capped(answer))
        except urllib.error.HTTPError as error:
            with error:
                response = _Response(error.code, dict(error.headers), _read_capped(error))
        except (OSError, http.client.HTTPException) as error:
            # URLError, timeouts and resets are all OSError; the reason never includes the body.
            reason = getattr(error, "reason", error)
            raise google_exceptions.TransportError(
                f"token endpoint unreachable: {type(error).__name__}: {reason}"
            ) from None
        if response.status in REDIRECT_STATUSES:
            location = next(
                (v for k, v in response.headers.items() if k.lower() == "location"), None
            )
            raise TokenEndpointRedirected(
                refused_redirect(
                    "The token endpoint", "GOOGLE_TOKEN_URL", url, response.status, location
                )
            )
        if response.status in _TRANSIENT_STATUSES:
            raise TransientAnswer(response.status, "")
        code = _transient_error_code(response)
        if code is not None:
            raise TransientAnswer(response.status, f" {code}")
        return response


def _usable(credentials: Credentials) -> bool:
    """A token of text that has not expired yet: one born expired (`expires_in` 0 or less)
    would be refreshed again before every request, one token request per query."""
    return (
        isinstance(credentials.token, str)
        and bool(credentials.token.strip())
        and not _expires_within(credentials, timedelta(0))
    )


def _expires_within(credentials: Credentials, margin: timedelta) -> bool:
    """Whether the token expires within `margin` from now (google-auth's expiry is naive
    UTC; None: it never does)."""
    expiry = credentials.expiry
    return expiry is not None and expiry - margin <= datetime.now(UTC).replace(tzinfo=None)


def _read_capped(answer: Any) -> bytes:
    """The body of a urllib answer, refused as soon as it passes MAX_TOKEN_ANSWER_BYTES."""
    body = answer.read(MAX_TOKEN_ANSWER_BYTES + 1)
    if len(body) > MAX_TOKEN_ANSWER_BYTES:
        raise TokenAnswerTooBig(
            f"the token endpoint's answer exceeds {MAX_TOKEN_ANSWER_BYTES // 1024} kB, which no "
            f"token answer does: {_CHECK_TOKEN_URL}"
        )
    return body


def _transient_error_code(response: _Response) -> str | None:
    """The error code of a refused answer that google-auth would retry (`server_error` and
    kin, in `error` or `error_description`), else None."""
    if response.status == 200:
        return None
    try:
        body = json.loads(response.data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, Mapping):
        return None
    for key in ("error", "error_description"):
        if isinstance(body.get(key), str) and body[key] in _TRANSIENT_ERRORS:
            return body[key]
    return None


def missing_token_message(account: GscAccount) -> str:
    return (
        f"no refresh token for Google account {account.email}: set gsc_accounts.refresh_token "
        f"or GSC_REFRESH_TOKEN_{account.id}"
    )


def explain_refresh_error(account: GscAccount, error: google_exceptions.RefreshError) -> TokenError:
    """Turn google-auth's RefreshError into the operator's next step for this account."""
    code, detail = _oauth_error(error)
    if code in _RECONNECT_ERRORS:
        return ReconnectRequired(
            f"Google refused the refresh token of account {account.email} ({detail}): reconnect "
            "the account to store a new refresh token. If the OAuth app is still in the "
            '"Testing" publishing state, its refresh tokens expire after 7 days: publish it '
            '("In production") and reconnect'
        )
    if code in _BROKEN_CLIENT_ERRORS:
        return OAuthClientRejected(client_rejected_message(code, detail))
    if code == "unauthorized_client":
        return ClientMisconfigured(
            f"Google rejected the OAuth client while refreshing account {account.email} "
            f"({detail}): GOOGLE_CLIENT_ID/GOOGLE_CLIENT_SECRET are wrong or did not issue this "
            "account's refresh token"
        )
    return TokenError(f"Google refused to refresh the token of account {account.email} ({detail})")


def client_rejected_message(code: str | None, detail: str) -> str:
    """What to fix in the Google Cloud console when Google refuses the OAuth client itself."""
    if code == "deleted_client":
        return (
            f"Google says the OAuth client in GOOGLE_CLIENT_ID was deleted ({detail}): restore it "
            "in the Google Cloud console (APIs & Services > Credentials > Deleted credentials, "
            "within 30 days), or create a new OAuth client, set GOOGLE_CLIENT_ID and "
            "GOOGLE_CLIENT_SECRET to it and reconnect every account"
        )
    return (
        f"Google does not accept the OAuth client in GOOGLE_CLIENT_ID/GOOGLE_CLIENT_SECRET "
        f"({detail}): copy the client ID and secret of the OAuth client that issued the refresh "
        "tokens from the Google Cloud console (APIs & Services > Credentials)"
    )


def _oauth_error(error: google_exceptions.RefreshError) -> tuple[str | None, str]:
    """The OAuth error code and a one-line description from google-auth's exception."""
    body = error.args[1] if len(error.args) > 1 else None
    if isinstance(body, Mapping) and isinstance(body.get("error"), str):
        code = body["error"]
        description = body.get("error_description") or body.get("error_subtype")
        return code, f"{code}: {description}" if description else code
    text = " ".join(str(error.args[0] if error.args else error).split())
    # google-auth replaces invalid_grant/rapt_required (Workspace re-authentication) with this
    # gcloud-oriented sentence and drops the body; for us it is a dead grant like any other.
    if text.startswith("Reauthentication is needed"):
        return "invalid_grant", "invalid_grant: rapt_required (re-authentication required)"
    return None, text


class AccountToken:
    """One Google account's access token for one run, shared by all of that account's requests.

    The first `get()` refreshes; later calls reuse the token until it is near expiry. `renew()`
    handles a 401 from the API. A lock makes concurrent site tasks wait for one refresh instead
    of each starting their own, and a failed refresh is remembered so the account's other sites
    fail with the same message without asking Google again.
    """

    def __init__(
        self,
        account: GscAccount,
        settings: Settings,
        redact: Redactor,
        *,
        sleep: Sleep = asyncio.sleep,
        stats: SourceStats | None = None,
    ) -> None:
        """Token requests are counted into `stats` (the gsc source's figures): one per attempt,
        as one refresh sends exactly one request (see UrllibRequest)."""
        self.account = account
        self._settings = settings
        self._stats = stats or SourceStats()
        self._redact = redact
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._credentials: Credentials | None = None
        self._failure: TokenError | None = None
        self._last_attempt: AccountRefresh | None = None
        redact.add(account.refresh_token)

    @property
    def outcome(self) -> AccountRefresh | None:
        """The latest refresh attempt, for gsc_accounts.last_refresh_at/last_error; None if none."""
        return self._last_attempt

    async def get(self) -> str:
        async with self._lock:
            self._raise_remembered_failure()
            if self._credentials is None or _expires_within(self._credentials, _EXPIRY_MARGIN):
                await self._refresh()
            assert self._credentials is not None and self._credentials.token
            return self._credentials.token

    async def renew(self, rejected: str) -> str:
        """A fresh token after the API rejected `rejected`, refreshing only if nobody else has."""
        async with self._lock:
            self._raise_remembered_failure()
            current = self._credentials.token if self._credentials else None
            if current is None or current == rejected:
                await self._refresh()
            assert self._credentials is not None and self._credentials.token
            return self._credentials.token

    def _raise_remembered_failure(self) -> None:
        if self._failure is not None:
            # A new instance per raise: one shared exception would collect every task's traceback.
            raise type(self._failure)(str(self._failure))

    async def _refresh(self) -> None:
        try:
            self._credentials = await self._refreshed_credentials()
        except TokenError as failure:
            self._failure = failure
            self._last_attempt = AccountRefresh(self.account.id, datetime.now(UTC), str(failure))
            log.warning("gsc.token_refresh_failed", account=self.account.email, error=str(failure))
            raise
        self._redact.add(self._credentials.token)
        self._last_attempt = AccountRefresh(self.account.id, datetime.now(UTC), None)
        log.info("gsc.token_refreshed", account=self.account.email)

    async def _refreshed_credentials(self) -> Credentials:
        settings = self._settings
        if not self.account.refresh_token:
            raise MissingRefreshToken(missing_token_message(self.account))
        if not settings.google_client_id or settings.google_client_secret is None:
            raise ClientMisconfigured(
                f"cannot refresh Google account {self.account.email}: "
                "GOOGLE_CLIENT_ID and GOOGLE_CLIENT_SECRET must be set"
            )
        self._redact.add(settings.google_client_secret.reveal())
        request = UrllibRequest(timeout=settings.gsc_timeout)
        for attempt in range(1, settings.http_max_attempts + 1):
            credentials = Credentials(
                None,
                refresh_token=self.account.refresh_token,
                token_uri=settings.google_token_url,
                client_id=settings.google_client_id,
                client_secret=settings.google_client_secret.reveal(),
            )
            self._stats.sent(retry=attempt > 1)
            try:
                # urllib's timeout bounds each socket read, not the exchange: a trickling
                # endpoint would hold the account until the run's deadline without this.
                async with asyncio.timeout(settings.gsc_timeout):
                    await in_daemon_thread(credentials.refresh, request)
            except (TokenEndpointRedirected, TokenAnswerTooBig) as error:
                self._stats.failed()
                raise self._safe(
                    type(error)(
                        f"cannot refresh the token of Google account {self.account.email}: {error}"
                    )
                ) from None
            except TimeoutError:
                self._stats.failed()
                problem = (
                    "token endpoint unreachable: no complete answer within "
                    f"GSC_TIMEOUT_SECONDS={settings.gsc_timeout:g}"
                )
            except google_exceptions.RefreshError as error:
                self._stats.failed()
                if not error.retryable:
                    raise self._safe(explain_refresh_error(self.account, error)) from None
                problem = _oauth_error(error)[1]
            except google_exceptions.TransportError as error:
                self._stats.failed(
                    rate_limited=isinstance(error, TransientAnswer) and error.status == 429
                )
                problem = str(error)
            except _UNUSABLE_ANSWER_ERRORS:
                self._stats.failed()
                problem = UNUSABLE_TOKEN_ANSWER
            else:
                if _usable(credentials):
                    return credentials
                self._stats.failed()
                problem = UNUSABLE_TOKEN_ANSWER
            if attempt < settings.http_max_attempts:
                delay = backoff_delay(attempt)
                log.warning(
                    "gsc.token_retry",
                    account=self.account.email,
                    attempt=attempt,
                    delay=round(delay, 2),
                    problem=self._redact(problem),
                )
                await self._sleep(delay)
        raise self._safe(
            TokenEndpointUnavailable(
                f"could not refresh the token of Google account {self.account.email} after "
                f"{settings.http_max_attempts} attempts ({problem}); will retry next run"
            )
        )

    def _safe(self, error: TokenError) -> TokenError:
        return type(error)(self._redact(str(error)))
