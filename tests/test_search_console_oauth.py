"""Token refresh through google-auth and the urllib transport, against a real local HTTP server.

The server stands in for https://oauth2.googleapis.com/token and answers with the recorded
bodies in tests/fixtures/oauth, so the whole path (google-auth's form, urllib, error parsing)
runs for real; only backoff sleeps are replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from datetime import UTC
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl

import pytest

from aggregator.api_stats import SourceStats
from aggregator.config import Secret, Settings
from aggregator.model import GscAccount
from aggregator.redaction import Redactor
from aggregator.search_console.errors import backoff_delay
from aggregator.search_console.oauth import (
    AccountToken,
    ClientMisconfigured,
    MissingRefreshToken,
    OAuthClientRejected,
    ReconnectRequired,
    TokenEndpointUnavailable,
    TokenError,
)

OAUTH_FIXTURES = Path(__file__).parent / "fixtures" / "oauth"
CLIENT_ID = "123-test.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-client-secret-value"


def oauth_fixture(name: str) -> bytes:
    return (OAUTH_FIXTURES / name).read_bytes()


INVALID_GRANT = oauth_fixture(
    "issue_apache-opendal_3901__400_invalid_grant_expired_or_revoked.json"
)
INVALID_CLIENT = oauth_fixture("singer_tap__401_invalid_client.json")


class TokenEndpoint:
    """A Google token endpoint on 127.0.0.1 with scripted answers per refresh token.

    Unscripted refreshes succeed with a new access token each time (ya29.access-1, -2, ...), so
    tests can tell which refresh produced the token a request carried.
    """

    def __init__(self) -> None:
        self.forms: list[dict[str, str]] = []
        self._scripts: dict[str, deque[tuple[int, bytes]]] = defaultdict(deque)
        self._issued = 0
        self.stalls = 0  # this many requests get their answer only after `stall_seconds`
        self.stall_seconds = 0.0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                form = dict(parse_qsl(self.rfile.read(length).decode()))
                status, body = endpoint._answer(form)
                if endpoint.stalls > 0:
                    endpoint.stalls -= 1
                    time.sleep(endpoint.stall_seconds)  # the endpoint is slow, not the test
                # After a stall the client may have given up and closed the connection.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def script(self, refresh_token: str, *answers: tuple[int, bytes]) -> None:
        self._scripts[refresh_token].extend(answers)

    def calls_for(self, refresh_token: str) -> int:
        return sum(form.get("refresh_token") == refresh_token for form in self.forms)

    def _answer(self, form: dict[str, str]) -> tuple[int, bytes]:
        self.forms.append(form)
        scripted = self._scripts[form.get("refresh_token", "")]
        if scripted:
            return scripted.popleft()
        self._issued += 1
        body = {
            "access_token": f"ya29.access-{self._issued}",
            "expires_in": 3599,
            "scope": "https://www.googleapis.com/auth/webmasters.readonly",
            "token_type": "Bearer",
        }
        return 200, json.dumps(body).encode()

    def __enter__(self) -> TokenEndpoint:
        threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def settings_for(token_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "google_client_id": CLIENT_ID,
        "google_client_secret": Secret(CLIENT_SECRET),
        "google_token_url": token_url,
        "gsc_api_url": "https://gsc.test",
        "gsc_max_qps_per_account": 100.0,
        "gsc_max_qps_per_client": 1000.0,
        "http_max_attempts": 3,
        "gsc_timeout": 5.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


class RecordedSleep:
    """Stands in for asyncio.sleep: remembers the waits, waits for nothing."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def token_endpoint() -> Iterator[TokenEndpoint]:
    with TokenEndpoint() as endpoint:
        yield endpoint


@pytest.fixture
def sleep() -> RecordedSleep:
    return RecordedSleep()


ACCOUNT = GscAccount(7, "owner@example.com", "1//refresh-token-of-owner")


def token_for(
    endpoint: TokenEndpoint, sleep: RecordedSleep, account: GscAccount = ACCOUNT, **settings: object
) -> tuple[AccountToken, Redactor]:
    redact = Redactor(CLIENT_SECRET)
    token = AccountToken(account, settings_for(endpoint.url, **settings), redact, sleep=sleep)
    return token, redact


async def test_refresh_sends_the_refresh_grant_and_caches_the_token(
    token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    token, _ = token_for(token_endpoint, sleep)

    first = await token.get()
    second = await token.get()

    assert first == second == "ya29.access-1"
    assert token_endpoint.forms == [
        {
            "grant_type": "refresh_token",
            "refresh_token": ACCOUNT.refresh_token,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        }
    ]
    assert token.outcome is not None
    assert token.outcome.account_id == ACCOUNT.id
    assert token.outcome.error is None
    assert token.outcome.at.tzinfo is UTC


async def test_the_recorded_google_success_body_is_accepted(
    token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    token_endpoint.script(
        ACCOUNT.refresh_token,
        (200, oauth_fixture("google_docs_web-server_offline__refresh_response.json")),
    )
    token, _ = token_for(token_endpoint, sleep)

    assert await token.get() == "1/fFAGRNJru1FTz70BzhT3Zg"


async def test_concurrent_callers_share_one_refresh(
    token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    token, _ = token_for(token_endpoint, sleep)

    tokens = await asyncio.gather(*(token.get() for _ in range(10)))

    assert set(tokens) == {"ya29.access-1"}
    assert len(token_endpoint.forms) == 1


@pytest.mark.parametrize(
    "body",
    [
        INVALID_GRANT,
        oauth_fixture("issue_google-auth-library-python_1043__400_invalid_grant_bad_request.json"),
        oauth_fixture("google-auth_test_reauth__invalid_grant_rapt_required.json"),
    ],
    ids=["expired_or_revoked", "bad_request", "rapt_required"],
)
async def test_invalid_grant_asks_for_a_reconnect_once(
    token_endpoint: TokenEndpoint, sleep: RecordedSleep, body: bytes
) -> None:
    token_endpoint.script(ACCOUNT.refresh_token, (400, body))
    token, _ = token_for(token_endpoint, sleep)

    with pytest.raises(ReconnectRequired) as raised:
        await token.get()
    with pytest.raises(ReconnectRequired):
        await token.get()

    message = str(raised.value)
    assert "owner@example.com" in message
    assert "reconnect" in message
    assert '"Testing"' in message and "7 days" in message
    assert "invalid_grant" in message
    assert len(token_endpoint.forms) == 1, "a dead grant is neither retried nor asked again"
    assert sleep.waits == []
    assert token.outcome is not None and token.outcome.error == message


async def test_a_token_from_another_client_points_at_the_client_settings(
    token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    body = b'{"error": "unauthorized_client", "error_description": "Unauthorized"}'
    token_endpoint.script(ACCOUNT.refresh_token, (401, body))
    token, _ = token_for(token_endpoint, sleep)

    with pytest.raises(ClientMisconfigured) as raised:
        await token.get()

    assert "GOOGLE_CLIENT_ID/GOOGLE_CLIENT_SECRET are wrong or did not issue" in str(raised.value)
    assert "owner@example.com" in str(raised.value)
    assert len(token_endpoint.forms) == 1


@pytest.mark.parametrize(
    ("body", "fix"),
    [
        (INVALID_CLIENT, "copy the client ID and secret"),
        (
            b'{"error": "deleted_client", "error_description": "The OAuth client was deleted."}',
            "Deleted credentials",
        ),
    ],
    ids=["invalid_client", "deleted_client"],
)
async def test_a_rejected_client_says_what_to_fix_in_the_cloud_console(
    token_endpoint: TokenEndpoint, sleep: RecordedSleep, body: bytes, fix: str
) -> None:
    token_endpoint.script(ACCOUNT.refresh_token, (401, body))
    token, _ = token_for(token_endpoint, sleep)

    with pytest.raises(OAuthClientRejected) as raised:
        await token.get()

    message = str(raised.value)
    assert "Google Cloud console" in message and fix in message
    assert "reconnect" not in message or "deleted" in message
    assert len(token_endpoint.forms) == 1 and sleep.waits == []


async def test_missing_refresh_token_names_both_places_to_set_it(
    token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    token, _ = token_for(token_endpoint, sleep, GscAccount(12, "nobody@example.com", None))

    with pytest.raises(MissingRefreshToken) as raised:
        await token.get()

    assert str(raised.value) == (
        "no refresh token for Google account nobody@example.com: "
        "set gsc_accounts.refresh_token or GSC_REFRESH_TOKEN_12"
    )
    assert token_endpoint.forms == []
    assert token.outcome is not None and token.outcome.error == str(raised.value)


async def test_missing_client_settings_fail_clearly(
    token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    token, _ = token_for(token_endpoint, sleep, google_client_secret=None)

    with pytest.raises(ClientMisconfigured, match="GOOGLE_CLIENT_ID and GOOGLE_CLIENT_SECRET"):
        await token.get()
    assert token_endpoint.forms == []


async def test_server_errors_are_retried_with_backoff(
    token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    token_endpoint.script(ACCOUNT.refresh_token, (503, b"{}"), (500, b"<html>oops</html>"))
    token, _ = token_for(token_endpoint, sleep)

    assert await token.get() == "ya29.access-1"
    assert len(token_endpoint.forms) == 3
    assert len(sleep.waits) == 2
    assert 0.5 <= sleep.waits[0] <= 1.0 and 1.0 <= sleep.waits[1] <= 2.0


async def test_server_errors_give_up_after_the_attempt_limit(
    token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    token_endpoint.script(ACCOUNT.refresh_token, *[(500, b"{}")] * 5)
    token, _ = token_for(token_endpoint, sleep, http_max_attempts=4)

    with pytest.raises(TokenEndpointUnavailable, match="after 4 attempts") as raised:
        await token.get()

    assert len(token_endpoint.forms) == 4
    assert len(sleep.waits) == 3
    assert "owner@example.com" in str(raised.value)
    assert token.outcome is not None and token.outcome.error == str(raised.value)


async def test_unreachable_endpoint_is_retried_then_reported(sleep: RecordedSleep) -> None:
    with TokenEndpoint() as endpoint:
        closed_url = endpoint.url
    redact = Redactor(CLIENT_SECRET)
    token = AccountToken(ACCOUNT, settings_for(closed_url), redact, sleep=sleep)

    with pytest.raises(TokenEndpointUnavailable, match="unreachable"):
        await token.get()
    assert len(sleep.waits) == 2


async def test_renew_refreshes_only_for_the_rejected_token(
    token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    token, _ = token_for(token_endpoint, sleep)
    rejected = await token.get()

    renewed = await asyncio.gather(token.renew(rejected), token.renew(rejected))

    assert renewed == ["ya29.access-2", "ya29.access-2"], "the second caller reuses the new token"
    assert len(token_endpoint.forms) == 2


async def test_a_token_close_to_expiry_is_refreshed_before_use(
    token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    short_lived = b'{"access_token": "ya29.short", "expires_in": 60, "token_type": "Bearer"}'
    token_endpoint.script(ACCOUNT.refresh_token, (200, short_lived))
    token, _ = token_for(token_endpoint, sleep)

    assert await token.get() == "ya29.short"
    assert await token.get() == "ya29.access-1"


async def test_secrets_echoed_by_the_endpoint_are_masked(
    token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    echo = {
        "error": "invalid_request",
        "error_description": f"bad {ACCOUNT.refresh_token} with {CLIENT_SECRET}",
    }
    token_endpoint.script(ACCOUNT.refresh_token, (400, json.dumps(echo).encode()))
    token, _ = token_for(token_endpoint, sleep)

    with pytest.raises(TokenError) as raised:
        await token.get()

    assert ACCOUNT.refresh_token not in str(raised.value)
    assert CLIENT_SECRET not in str(raised.value)
    assert "invalid_request: bad *** with ***" in str(raised.value)


async def test_every_token_request_is_counted_with_its_outcome(
    token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    """One refresh attempt is one request, even for an answer google-auth would retry itself
    (`server_error`): a 503, a 429 and a 400 server_error are failed requests, then a token."""
    token_endpoint.script(
        ACCOUNT.refresh_token,
        (503, b"{}"),
        (429, b'{"error": "rate_limit_exceeded"}'),
        (400, b'{"error": "server_error", "error_description": "try again"}'),
    )
    stats = SourceStats()
    token = AccountToken(
        ACCOUNT,
        settings_for(token_endpoint.url, http_max_attempts=5, gsc_timeout=0.3),
        Redactor(CLIENT_SECRET),
        sleep=sleep,
        stats=stats,
    )

    assert await token.get() == "ya29.access-1"

    assert len(token_endpoint.forms) == 4
    assert (stats.requests, stats.retries, stats.failed_requests) == (4, 3, 3)
    assert stats.rate_limited == 1


async def test_a_refused_or_timed_out_token_request_is_a_failed_request(
    token_endpoint: TokenEndpoint, sleep: RecordedSleep
) -> None:
    stats = SourceStats()
    slow = AccountToken(
        ACCOUNT,
        settings_for(token_endpoint.url, http_max_attempts=2, gsc_timeout=0.2),
        Redactor(CLIENT_SECRET),
        sleep=sleep,
        stats=stats,
    )
    token_endpoint.stalls, token_endpoint.stall_seconds = 2, 1.0
    with pytest.raises(TokenEndpointUnavailable, match="GSC_TIMEOUT_SECONDS"):
        await slow.get()
    assert (stats.requests, stats.retries, stats.failed_requests) == (2, 1, 2)

    dead = GscAccount(8, "gone@example.com", "1//dead")
    token_endpoint.script(dead.refresh_token, (400, INVALID_GRANT))
    refused = AccountToken(
        dead, settings_for(token_endpoint.url), Redactor(CLIENT_SECRET), sleep=sleep, stats=stats
    )
    with pytest.raises(ReconnectRequired):
        await refused.get()
    with pytest.raises(ReconnectRequired):
        await refused.get()  # remembered: not asked again, not counted again
    assert (stats.requests, stats.failed_requests, stats.rate_limited) == (3, 3, 0)


def test_redactor_masks_every_known_secret_longest_first() -> None:
    redact = Redactor("abc", None, "abcdef")
    redact.add("")

    assert redact("x abcdef y abc z") == "x *** y *** z"


@pytest.mark.parametrize("attempt", [1, 2, 3, 8, 30])
def test_backoff_grows_with_jitter_and_is_capped(attempt: int) -> None:
    low = backoff_delay(attempt, rand=lambda: 0.0)
    high = backoff_delay(attempt, rand=lambda: 0.999)

    ceiling = min(30.0, 2.0 ** (attempt - 1))
    assert low == pytest.approx(ceiling / 2)
    assert ceiling / 2 < high <= ceiling
