"""A local Google OAuth token endpoint + Search Console API speaking the real wire protocol.

One aiohttp app serves both, so one base URL works as `GOOGLE_TOKEN_URL=<url>/token` and
`GSC_API_URL=<url>`:

* `POST /token` (form `grant_type=refresh_token&refresh_token&client_id&client_secret[&scope]`):
  200 with an opaque `access_token`, 400 `invalid_grant` for an unknown or revoked refresh
  token, 401 `invalid_client` for a wrong client id/secret, 400 `invalid_request` /
  `unsupported_grant_type` / `invalid_scope` for malformed requests.
* `GET /webmasters/v3/sites` (sites.list): `{"siteEntry": [...]}`, key omitted when empty.
* `POST /webmasters/v3/sites/{siteUrl}/searchAnalytics/query`: `siteUrl` percent-encoded as one
  path segment (`%3A` or a literal `:` both work, `%2F` for slashes), decoded from the raw path.
  Only `dimensions: ["date"]` is implemented. Days without impressions have no row, rows are
  sorted by clicks descending, `rows` is omitted when empty. `dataState: all` adds the
  provisional days (first_incomplete_date = today - incomplete_days, so with the default 2 the
  days today-2, today-1 and today are provisional, served at `provisional_factor` of their final
  numbers) and `metadata`; `final` (the default) stops before that horizon. With
  `metadata_only_when_incomplete` the metadata is left out when no row of the answer is on or
  after the horizon, as Google does; properties in `quiet_properties` have no provisional rows.
* Errors use Google's envelope `{"error": {"code", "message", "errors": [...], "status"}}`:
  401 UNAUTHENTICATED, 403 forbidden (no/unverified access), 403 quotaExceeded (load quota),
  429 beyond `qps_per_account` / `qps_per_project` queries in any second, counted as Google
  counts them: on arrival, before the `latency` the answer takes (`foreign_qps`: another
  client's share of the project quota), 403 dailyLimitExceeded, 403 accessNotConfigured (`api_disabled`: the API is off in the
  Cloud project), 429 rateLimitExceeded with `Retry-After: 1` (per-account QPS; or one of
  the 403 forms in `RATE_LIMIT_ANSWERS`), 400 INVALID_ARGUMENT, 503. The token endpoint
  answers 401 deleted_client when `client_deleted` is set.

Numbers are a pure function of (seed, siteUrl, day): `GoogleSimulator.performance()`.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import unquote
from zoneinfo import ZoneInfo

from aiohttp import web

from aggregator.simulators.server import SimServer, uniforms

SCOPE_READONLY = "https://www.googleapis.com/auth/webmasters.readonly"
SCOPE_FULL = "https://www.googleapis.com/auth/webmasters"
VERIFIED_LEVELS = frozenset({"siteOwner", "siteFullUser", "siteRestrictedUser"})
_JSON = "application/json"
_SITES_PREFIX = "/webmasters/v3/sites/"
_QUERY_SUFFIX = "/searchAnalytics/query"
_ISO_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_PERMISSION_HELP = "See also: https://support.google.com/webmasters/answer/2451999."
_LOAD_QUOTA = (
    "Search Analytics load quota exceeded. Learn about usage limits: "
    "https://developers.google.com/webmaster-tools/v3/limits."
)
_QPS_QUOTA = "Search Analytics QPS quota exceeded."
_DAILY_LIMIT = "Daily Limit Exceeded. The quota will be reset at midnight Pacific Time (PT)."
_API_DISABLED = (
    "Google Search Console API has not been used in project 123456789012 before or it is "
    "disabled. Enable it by visiting https://console.developers.google.com/apis/api/"
    "searchconsole.googleapis.com/overview?project=123456789012 then retry. If you enabled this "
    "API recently, wait a few minutes for the action to propagate to our systems and retry."
)
# With `quota_wording`, a 429 says which quota refused, as Google Cloud's quota system words it.
_USER_QUOTA = (
    "Quota exceeded for quota metric 'Search Analytics queries' and limit 'Queries per minute "
    "per user' of service 'searchconsole.googleapis.com' for consumer 'project_number:123456'."
)
_PROJECT_QUOTA = (
    "Quota exceeded for quota metric 'Search Analytics queries' and limit 'Queries per minute' "
    "of service 'searchconsole.googleapis.com' for consumer 'project_number:123456'."
)
# How the per-account QPS limit is answered: Google uses 429, and 403 with these reasons.
RATE_LIMIT_ANSWERS = {
    "429": (429, "rateLimitExceeded", _QPS_QUOTA),
    "403 rateLimitExceeded": (403, "rateLimitExceeded", "Rate Limit Exceeded"),
    "403 userRateLimitExceeded": (403, "userRateLimitExceeded", "User Rate Limit Exceeded"),
    "403 quotaExceeded": (
        403,
        "quotaExceeded",
        "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute per user'.",
    ),
}
_INVALID_CREDENTIALS = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
_MISSING_CREDENTIALS = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
_BODY_FIELDS = {
    "startDate",
    "endDate",
    "dimensions",
    "type",
    "searchType",
    "dimensionFilterGroups",
    "aggregationType",
    "rowLimit",
    "startRow",
    "dataState",
}
_SEARCH_TYPES = {"web", "image", "video", "news", "discover", "googlenews"}
_NO_STORE = {
    "Cache-Control": "no-cache, no-store, max-age=0, must-revalidate",
    "Pragma": "no-cache",
    "Expires": "Mon, 01 Jan 1990 00:00:00 GMT",
}


@dataclass(frozen=True)
class SimAccount:
    """A connected Google account: its email and the properties sites.list shows for it."""

    email: str
    properties: Mapping[str, str] = field(default_factory=dict)  # siteUrl -> permissionLevel
    revoked: bool = False


@dataclass
class _Grant:
    email: str
    refresh_token: str
    expires_at: float
    expired: bool = False  # set by expire_access_tokens_once or revoke()


class GoogleError(Exception):
    """A Google JSON error envelope with its HTTP status."""

    def __init__(
        self,
        code: int,
        message: str,
        reason: str,
        *,
        status: str | None,
        domain: str = "global",
        headers: Mapping[str, str] | None = None,
        detail_message: str | None = None,
        **extra: str,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.headers = dict(headers or {})
        detail: dict[str, str] = {
            "message": detail_message or message,
            "domain": domain,
            "reason": reason,
            **extra,
        }
        body: dict[str, Any] = {"code": code, "message": message, "errors": [detail]}
        if status is not None:
            body["status"] = status
        self.body = {"error": body}

    def response(self) -> web.Response:
        return _json(self.body, status=self.code, headers=self.headers)


def _bad_request(message: str) -> GoogleError:
    return GoogleError(400, message, "badRequest", status="INVALID_ARGUMENT")


def _forbidden(site_url: str) -> GoogleError:
    return GoogleError(
        403,
        f"User does not have sufficient permission for site '{site_url}'. {_PERMISSION_HELP}",
        "forbidden",
        status="PERMISSION_DENIED",
    )


class GoogleSimulator(SimServer):
    """Google token endpoint + Search Console API on 127.0.0.1.

    `accounts` is keyed by refresh token. Faults/latency are attributes and may change while
    running. `expire_access_tokens_once`: the first access token minted for each account is
    already expired when first used (401 UNAUTHENTICATED on every use), so a client must
    refresh once and retry; tokens minted afterwards work.

    Counters (`reset_counters()` zeroes them): `token_requests`, `sites_requests`,
    `query_requests` (totals, faults included) and `*_by_account` Counters keyed by email
    (requests that identified an account); `queried`: (siteUrl, startDate, endDate) of each
    well-formed query of an authenticated account; `max_queries_per_second[email]`: the most query
    requests (accepted or refused) that arrived within any 1-second sliding window;
    `max_in_flight`.
    """

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        accounts: Mapping[str, SimAccount],
        seed: int = 0,
        today: date | None = None,
        latency: float = 0.0,
        incomplete_days: int = 2,
        qps_per_account: float | None = None,
        qps_per_project: float | None = None,
        foreign_qps: float = 0.0,
        quota_wording: bool = False,
        quota_exhausted_accounts: Collection[str] = (),
        daily_limit_accounts: Collection[str] = (),
        rate_limit_answer: str = "429",
        api_disabled: bool = False,
        client_deleted: bool = False,
        expire_access_tokens_once: bool = False,
        fail_next: int = 0,
        hang: bool = False,
        metadata_spelling: str = "first_incomplete_date",
        metadata_only_when_incomplete: bool = False,
        quiet_properties: Collection[str] = (),
        zero_day_share: float = 0.10,
        provisional_factor: float = 0.6,
        retention_days: int = 486,
        token_lifetime: int = 3599,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port, latency=latency)
        if metadata_spelling not in ("first_incomplete_date", "firstIncompleteDate"):
            raise ValueError("metadata_spelling: first_incomplete_date or firstIncompleteDate")
        self.client_id = client_id
        self.client_secret = client_secret
        self.accounts: dict[str, SimAccount] = dict(accounts)
        self.seed = seed
        self.today = today or datetime.now(ZoneInfo("America/Los_Angeles")).date()
        self.incomplete_days = incomplete_days
        self.qps_per_account = qps_per_account
        self.qps_per_project = qps_per_project
        self.foreign_qps = foreign_qps
        self.quota_wording = quota_wording
        self.quota_exhausted_accounts: set[str] = set(quota_exhausted_accounts)
        self.daily_limit_accounts: set[str] = set(daily_limit_accounts)
        if rate_limit_answer not in RATE_LIMIT_ANSWERS:
            raise ValueError(f"rate_limit_answer: one of {', '.join(RATE_LIMIT_ANSWERS)}")
        self.rate_limit_answer = rate_limit_answer
        self.api_disabled = api_disabled
        self.client_deleted = client_deleted
        self.expire_access_tokens_once = expire_access_tokens_once
        self.fail_next = fail_next
        self.hang = hang
        self.metadata_spelling = metadata_spelling
        self.metadata_only_when_incomplete = metadata_only_when_incomplete
        self.quiet_properties: set[str] = set(quiet_properties)
        self.zero_day_share = zero_day_share
        self.provisional_factor = provisional_factor
        self.retention_days = retention_days
        self.token_lifetime = token_lifetime
        self._revoked = {rt for rt, account in self.accounts.items() if account.revoked}
        self._grants: dict[str, _Grant] = {}
        self._minted_for: set[str] = set()  # refresh tokens that already got an access token
        self._windows: dict[str, deque[float]] = {}
        self._site_params: dict[str, tuple[float, float, float]] = {}
        self.reset_counters()

    def reset_counters(self) -> None:
        self.token_requests = 0
        self.sites_requests = 0
        self.query_requests = 0
        self.token_requests_by_account: Counter[str] = Counter()
        self.sites_requests_by_account: Counter[str] = Counter()
        self.query_requests_by_account: Counter[str] = Counter()
        self.queried: list[tuple[str, date, date]] = []  # (siteUrl, startDate, endDate)
        self.max_queries_per_second: dict[str, int] = {}
        self.rate_limited = 0
        self._windows.clear()
        self.max_in_flight = self.in_flight

    def forget_recent_queries(self) -> None:
        """Empty the sliding rate windows, as if a quiet second had passed: lets a test whose
        client never really sleeps simulate the wait it asked for."""
        for window in self._windows.values():
            window.clear()

    def reinstate(self, refresh_token: str) -> None:
        """Undo revoke(): the user connected the account again (the same token for brevity)."""
        self._revoked.discard(refresh_token)

    def revoke(self, refresh_token: str) -> None:
        """Revoke a refresh token (user removed access): refresh and its access tokens fail."""
        self._revoked.add(refresh_token)
        for grant in self._grants.values():
            if grant.refresh_token == refresh_token:
                grant.expired = True

    # ---- pure data ---------------------------------------------------------------------------

    def first_incomplete_date(self) -> date:
        """First provisional day: `today - incomplete_days` (Pacific). Earlier days are final."""
        return self.today - timedelta(days=self.incomplete_days)

    def performance(
        self, site_url: str, day: date, *, provisional: bool = False
    ) -> tuple[int, int, float, float] | None:
        """(clicks, impressions, ctr, position) of a property's day; None = no row.

        Without `provisional`: the final numbers (what `dataState: final` serves once the day
        is before the horizon). With `provisional=True`: what `dataState: all` serves today,
        i.e. reduced numbers for days on or after `first_incomplete_date()`.
        Days after today or beyond retention have no row.
        """
        if day > self.today or (self.today - day).days > self.retention_days:
            return None
        u = uniforms(self.seed, "gsc", site_url, day.toordinal(), n=4)
        if u[0] < self.zero_day_share:
            return None
        site = self._site_params.get(site_url)
        if site is None:
            s = uniforms(self.seed, "gsc-site", site_url, n=3)
            site = (10 ** (1 + 4 * s[0]), 0.005 + 0.08 * s[1], 2.0 + 35.0 * s[2])
            self._site_params[site_url] = site
        scale, ctr_base, position_base = site
        impressions = max(1, round(scale * (0.6 + 0.8 * u[1])))
        clicks = min(impressions, round(impressions * ctr_base * (0.7 + 0.6 * u[2])))
        position = max(1.0, position_base * (0.85 + 0.3 * u[3]))
        if provisional and day >= self.first_incomplete_date():
            if site_url in self.quiet_properties:
                return None
            impressions = int(impressions * self.provisional_factor)
            clicks = int(clicks * self.provisional_factor)
            if impressions == 0:
                return None
        return clicks, impressions, clicks / impressions, position

    # ---- HTTP --------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = self._new_app()
        app.router.add_post("/token", self._token)
        app.router.add_get("/webmasters/v3/sites", self._sites_list)
        app.router.add_post("/webmasters/v3/sites/{tail:.+}", self._query)
        return app

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.token_requests += 1
        if self.hang:
            return await self._hang_forever(request)
        await self._delay()
        form = await request.post()

        def oauth_error(status: int, error: str, description: str) -> web.Response:
            body = {"error": error, "error_description": description}
            return _json(body, status=status, headers=_NO_STORE)

        client_id = form.get("client_id")
        if not client_id:
            return oauth_error(
                400, "invalid_request", "Could not determine client ID from request."
            )
        if client_id != self.client_id or form.get("client_secret") != self.client_secret:
            return oauth_error(401, "invalid_client", "The OAuth client was not found.")
        if self.client_deleted:
            return oauth_error(401, "deleted_client", "The OAuth client was deleted.")
        grant_type = form.get("grant_type")
        if grant_type != "refresh_token":
            return oauth_error(400, "unsupported_grant_type", f"Invalid grant_type: {grant_type}")
        refresh_token = form.get("refresh_token")
        if not refresh_token or not isinstance(refresh_token, str):
            return oauth_error(400, "invalid_request", "Missing required parameter: refresh_token")
        account = self.accounts.get(refresh_token)
        if account is None or refresh_token in self._revoked:
            return oauth_error(400, "invalid_grant", "Token has been expired or revoked.")
        self.token_requests_by_account[account.email] += 1
        scope = form.get("scope")
        if isinstance(scope, str) and scope.strip():
            granted = {SCOPE_READONLY}
            if not set(scope.split()) <= granted:
                return oauth_error(400, "invalid_scope", "Bad Request")
        access_token = "ya29.sim-" + secrets.token_urlsafe(32)
        expired = self.expire_access_tokens_once and refresh_token not in self._minted_for
        self._minted_for.add(refresh_token)
        now = asyncio.get_running_loop().time()
        self._grants[access_token] = _Grant(
            account.email, refresh_token, now + self.token_lifetime, expired
        )
        body = {
            "access_token": access_token,
            "expires_in": self.token_lifetime,
            "scope": SCOPE_READONLY,
            "token_type": "Bearer",
        }
        return _json(body, headers=_NO_STORE)

    def _authenticate(self, request: web.Request) -> SimAccount:
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise GoogleError(
                401,
                _MISSING_CREDENTIALS,
                "required",
                status="UNAUTHENTICATED",
                headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
                location="Authorization",
                locationType="header",
            )
        grant = self._grants.get(credential.strip())
        now = asyncio.get_running_loop().time()
        if grant is None or grant.expired or grant.expires_at <= now:
            raise GoogleError(
                401,
                _INVALID_CREDENTIALS,
                "authError",
                status="UNAUTHENTICATED",
                headers={
                    "WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", '
                    'error="invalid_token"'
                },
                detail_message="Invalid Credentials",
                location="Authorization",
                locationType="header",
            )
        return self.accounts[grant.refresh_token]

    def _fault(self) -> GoogleError | None:
        if self.fail_next > 0:
            self.fail_next -= 1
            return GoogleError(
                503,
                "The service is currently unavailable.",
                "backendError",
                status="UNAVAILABLE",
            )
        return None

    async def _admit(
        self, request: web.Request, counted: Callable[[SimAccount], None] | None = None
    ) -> SimAccount:
        """The gate of every API call: an injected fault, then Google's decisions on arrival
        (the bearer token, the API switched on, `counted`: the quotas), then the latency;
        refused or not, the answer comes after the latency."""
        fault = self._fault()
        if fault is not None:
            raise fault
        try:
            account = self._authenticate(request)
            if self.api_disabled:
                raise GoogleError(
                    403,
                    _API_DISABLED,
                    "accessNotConfigured",
                    status="PERMISSION_DENIED",
                    domain="usageLimits",
                    extendedHelp="https://console.developers.google.com",
                )
            if counted is not None:
                counted(account)
        except GoogleError:
            await self._delay()
            raise
        await self._delay()
        return account

    async def _sites_list(self, request: web.Request) -> web.StreamResponse:
        self.sites_requests += 1
        try:
            if self.hang and self.fail_next <= 0:
                return await self._hang_forever(request)
            account = await self._admit(request)
            self.sites_requests_by_account[account.email] += 1
        except GoogleError as error:
            return error.response()
        entries = [
            {"siteUrl": site_url, "permissionLevel": level}
            for site_url, level in account.properties.items()
        ]
        return _json({"siteEntry": entries} if entries else {})

    async def _query(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.partition("?")[0]
        if not (path.startswith(_SITES_PREFIX) and path.endswith(_QUERY_SUFFIX)):
            raise web.HTTPNotFound()
        raw_site = path[len(_SITES_PREFIX) : -len(_QUERY_SUFFIX)]
        if not raw_site or "/" in raw_site:  # an unencoded slash splits the segment
            raise web.HTTPNotFound()
        site_url = unquote(raw_site)
        self.query_requests += 1
        try:
            if self.hang and self.fail_next <= 0:
                return await self._hang_forever(request)
            account = await self._admit(request, self._count_query)
            if account.email in self.quota_exhausted_accounts:
                raise GoogleError(
                    403, _LOAD_QUOTA, "quotaExceeded", status=None, domain="usageLimits"
                )
            if account.email in self.daily_limit_accounts:
                raise GoogleError(
                    403, _DAILY_LIMIT, "dailyLimitExceeded", status=None, domain="usageLimits"
                )
            query = _parse_query_body(await request.read())
            self.queried.append((site_url, query.start, query.end))
            if account.properties.get(site_url) not in VERIFIED_LEVELS:
                raise _forbidden(site_url)
            return _json(self._answer(site_url, query))
        except GoogleError as error:
            return error.response()

    def _count_query(self, account: SimAccount) -> None:
        self.query_requests_by_account[account.email] += 1
        self._check_rate(account.email)

    def _recent(self, key: str, now: float) -> deque[float]:
        """The arrival times of `key`'s queries in the last second."""
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = deque()
        while window and window[0] <= now - 1.0:
            window.popleft()
        return window

    def _check_rate(self, email: str) -> None:
        """Per account and per project, a query beyond the quota's count of accepted queries
        in the last second is answered 429 (or a 403 form) and not counted against the quota.
        `foreign_qps` is another client's steady use of the project's quota.
        `max_queries_per_second[email]` counts every arrival, refused ones included."""
        now = asyncio.get_running_loop().time()
        arrivals = self._recent("\x00arrivals:" + email, now)
        arrivals.append(now)
        self.max_queries_per_second[email] = max(
            self.max_queries_per_second.get(email, 0), len(arrivals)
        )
        accepted = self._recent(email, now)
        project = self._recent("\x00project", now)
        over_account = self.qps_per_account is not None and len(accepted) >= self.qps_per_account
        over_project = (
            self.qps_per_project is not None
            and len(project) + self.foreign_qps >= self.qps_per_project
        )
        if not (over_account or over_project):
            accepted.append(now)
            project.append(now)
        else:
            self.rate_limited += 1
            code, reason, message = RATE_LIMIT_ANSWERS[self.rate_limit_answer]
            if code == 429 and self.quota_wording:
                message = _PROJECT_QUOTA if over_project else _USER_QUOTA
            raise GoogleError(
                code,
                message,
                reason,
                status="RESOURCE_EXHAUSTED" if code == 429 else "PERMISSION_DENIED",
                domain="usageLimits",
                headers={"Retry-After": "1"} if code == 429 else {},
            )

    def _answer(self, site_url: str, query: _Query) -> dict[str, Any]:
        horizon = self.first_incomplete_date()
        start = max(query.start, self.today - timedelta(days=self.retention_days))
        end = min(query.end, self.today if query.fresh else horizon - timedelta(days=1))
        rows: list[tuple[int, int, float, float, str]] = []
        if query.search_type == "web":
            for offset in range((end - start).days + 1):
                day = start + timedelta(days=offset)
                numbers = self.performance(site_url, day, provisional=query.fresh)
                if numbers is not None:
                    rows.append((*numbers, day.isoformat()))
        rows.sort(key=lambda row: (-row[0], row[4]))
        page = rows[query.start_row : query.start_row + query.row_limit]
        body: dict[str, Any] = {}
        if page:
            body["rows"] = [
                {
                    "keys": [day],
                    "clicks": clicks,
                    "impressions": impressions,
                    "ctr": ctr,
                    "position": position,
                }
                for clicks, impressions, ctr, position, day in page
            ]
        body["responseAggregationType"] = "byProperty"
        incomplete = any(date.fromisoformat(row[4]) >= horizon for row in rows)
        if query.fresh and (incomplete or not self.metadata_only_when_incomplete):
            body["metadata"] = {self.metadata_spelling: horizon.isoformat()}
        return body


@dataclass(frozen=True)
class _Query:
    start: date
    end: date
    fresh: bool  # dataState all
    search_type: str
    row_limit: int
    start_row: int


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _enum(value: object) -> str:
    return value.replace("_", "").lower() if isinstance(value, str) else ""


def _parse_query_body(raw: bytes) -> _Query:
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise GoogleError(
            400, "Invalid JSON payload received.", "parseError", status="INVALID_ARGUMENT"
        ) from None
    if not isinstance(body, dict):
        raise _bad_request("Invalid JSON payload received. Root element must be a message.")
    fields = {}
    for name, value in body.items():
        key = _camel(name)
        if key not in _BODY_FIELDS:
            raise _bad_request(
                f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.'
            )
        fields[key] = value

    def day(name: str) -> date:
        value = fields.get(name)
        if value is None:
            raise _bad_request(f"Missing required field {name}.")
        if isinstance(value, str) and _ISO_DAY.match(value):
            try:
                return date.fromisoformat(value)
            except ValueError:
                pass
        raise _bad_request(f"Invalid value at '{name}' ({value!r}): expected YYYY-MM-DD.")

    start, end = day("startDate"), day("endDate")
    if end < start:
        raise _bad_request("startDate must be earlier than or equal to endDate.")
    dimensions = fields.get("dimensions")
    if not isinstance(dimensions, list) or [_enum(d) for d in dimensions] != ["date"]:
        raise _bad_request(
            f'The simulator only implements dimensions ["date"], got {dimensions!r}.'
        )
    if fields.get("dimensionFilterGroups"):
        raise _bad_request("The simulator does not implement dimensionFilterGroups.")
    search_type = _enum(fields.get("type", fields.get("searchType", "web")))
    if search_type not in _SEARCH_TYPES:
        raise _bad_request(f"Invalid value at 'type' ({fields.get('type')!r}).")
    state = _enum(fields.get("dataState", "final"))
    if state not in ("final", "all"):
        raise _bad_request(f"Invalid value at 'data_state' ({fields.get('dataState')!r}).")
    aggregation = _enum(fields.get("aggregationType", "auto"))
    if aggregation not in ("auto", "byproperty"):
        raise _bad_request(f"Invalid value at 'aggregation_type' ({aggregation!r}).")
    row_limit = fields.get("rowLimit", 1000)
    start_row = fields.get("startRow", 0)
    if not isinstance(row_limit, int) or not 1 <= row_limit <= 25000:
        raise _bad_request("rowLimit must be between 1 and 25000.")
    if not isinstance(start_row, int) or start_row < 0:
        raise _bad_request("startRow must be a non-negative integer.")
    return _Query(start, end, state == "all", search_type, row_limit, start_row)


def _json(
    body: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode(),
        content_type=_JSON,
        charset="utf-8",
        headers=headers,
    )
