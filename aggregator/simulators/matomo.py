"""A local Matomo 5 Reporting API server speaking the real wire protocol.

What it implements (see the Matomo reference, sections 1-7):

* `POST|GET /index.php` (and `/`), `module=API`, parameters from the query string and the
  form body with the query string winning on duplicates (PHP's `$_GET + $_POST`).
* `token_auth` counts only when it is in the POST body and absent from the query string
  (Matomo 5 secure-only tokens); otherwise the call runs as anonymous and fails the access
  check with HTTP 401 and `{"result":"error","message":"You can't access ... id = N."}`.
* `VisitsSummary.get` with `period=day`, `idSite` = int, comma list or `all`, `date` =
  `YYYY-MM-DD`, `A,B`, `today`, `yesterday`, `lastN`, `previousN`; the four JSON shapes
  (flat, keyed by date, keyed by site, site then date), `[]` for an empty day, an object of
  zeros for a single site and single day without data.
* `API.getBulkRequest` with `urls[i]` sub-queries inheriting outer parameters; a JSON list in
  order, one error object in the slot of a failing sub-request only.
* `API.getMatomoVersion`, `SitesManager.getSitesIdWithAtLeastViewAccess`,
  `SitesManager.getSitesWithAtLeastViewAccess` for connectivity checks and site discovery.
* `fatal_sites`: a site whose reports crash PHP (a fatal error): any request that touches it,
  a whole bulk request included, is answered 500 with PHP's HTML error page.
* Any other method: HTTP 200 with an error object. A request without `module=API` gets the
  HTML login page, like a real Matomo.

Numbers are a pure function of (seed, idsite, day): `MatomoSimulator.visits(idsite, day)`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Collection, Mapping
from datetime import date, timedelta
from typing import Any
from urllib.parse import parse_qsl, unquote

from aiohttp import web

from aggregator.simulators.server import SimServer, uniforms

MATOMO_VERSION = "5.2.0"
_JSON = "application/json"
_DAY = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:[ T][0-9:]*)?$")
_LAST = re.compile(r"^(last|previous)(\d+)$")
_URLS_KEY = re.compile(r"^urls\[(\d*)\]$")
_MAX_DAYS = 3660  # one request never spans more than ~10 years of days
_EMPTY_DAY_SHARE = 0.05

_BAD_GATEWAY_HTML = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
_LOGIN_HTML = (
    '<!DOCTYPE html>\n<html id="ng-app"><head><meta charset="utf-8">'
    '<title>Sign in - Matomo</title></head><body class="login">'
    '<form id="login_form" method="post"></form></body></html>\n'
)
_PHP_FATAL_HTML = (
    "<br />\n<b>Fatal error</b>:  Allowed memory size of 134217728 bytes exhausted (tried to "
    "allocate 20480 bytes) in <b>/var/www/matomo/core/DataTable.php</b> on line <b>1187</b><br />"
)
_FAIL_MESSAGE = (
    "Mysql error: SQLSTATE[HY000]: General error: 2006 MySQL server has gone away "
    "(simulated failure for this site)"
)


class PhpFatalError(Exception):
    """The PHP process died: the whole HTTP request fails, not one bulk element."""


class MatomoError(Exception):
    """Rendered as `{"result":"error","message":...}`; `status` is used for top-level calls."""

    def __init__(self, message: str, status: int = 200) -> None:
        super().__init__(message)
        self.message = message.replace("\n", " ")
        self.status = status


def _no_access(idsite: object) -> MatomoError:
    return MatomoError(
        f"You can't access this resource as it requires 'view' access for the website id = "
        f"{idsite}.",
        status=401,
    )


class MatomoSimulator(SimServer):
    """Matomo Reporting API on 127.0.0.1. Use `async with MatomoSimulator(...) as sim: sim.url`.

    Faults and latency are plain attributes and may be changed while the server runs.
    Counters: `requests` (HTTP requests, faults included), `subrequests` (bulk elements),
    `bulk_requests`, `calls` (Counter of API method names, top level and inside bulks),
    `max_in_flight` (peak concurrent HTTP requests). `reset_counters()` zeroes them.
    """

    def __init__(
        self,
        *,
        token: str,
        sites: Mapping[int, str],
        seed: int = 0,
        today: date | None = None,
        latency: float = 0.0,
        fail_sites: Collection[int] = (),
        fatal_sites: Collection[int] = (),
        fail_next: int = 0,
        hang: bool = False,
        empty_day_share: float = _EMPTY_DAY_SHARE,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port, latency=latency)
        self.token = token
        self.sites: dict[int, str] = dict(sites)
        self.seed = seed
        self.today = today or date.today()
        self.fail_sites: set[int] = set(fail_sites)
        self.fatal_sites: set[int] = set(fatal_sites)
        self.fail_next = fail_next
        self.hang = hang
        self.empty_day_share = empty_day_share
        self._site_scale: dict[int, float] = {}
        self.reset_counters()

    def reset_counters(self) -> None:
        self.requests = 0
        self.subrequests = 0
        self.bulk_requests = 0
        self.calls: Counter[str] = Counter()
        self.max_in_flight = self.in_flight

    # ---- pure data ---------------------------------------------------------------------------

    def visits(self, idsite: int, day: date) -> tuple[int, int] | None:
        """(nb_visits, nb_actions) for a site's day, None for an empty day (served as `[]`).

        Days after `today` are empty. Same seed, same numbers.
        """
        metrics = self.metrics(idsite, day)
        return None if metrics is None else (metrics["nb_visits"], metrics["nb_actions"])

    def metrics(self, idsite: int, day: date) -> dict[str, int | float] | None:
        """The full VisitsSummary.get object (format_metrics=0) or None for an empty day."""
        if day > self.today:
            return None
        u = uniforms(self.seed, "matomo", idsite, day.toordinal(), n=8)
        if u[0] < self.empty_day_share:
            return None
        scale = self._site_scale.get(idsite)
        if scale is None:
            scale = 10 ** (1 + 3 * uniforms(self.seed, "matomo-site", idsite, n=1)[0])
            self._site_scale[idsite] = scale
        weekend = 0.7 if day.weekday() >= 5 else 1.0
        visits = max(1, round(scale * weekend * (0.6 + 0.8 * u[1])))
        actions = visits + round(visits * (0.5 + 3.0 * u[2]))
        uniq = max(1, round(visits * (0.75 + 0.2 * u[3])))
        bounces = min(visits, round(visits * (0.2 + 0.5 * u[4])))
        converted = min(visits, round(visits * 0.05 * u[5]))
        sum_length = round(visits * (30 + 400 * u[6]))
        per_visit = actions / visits
        max_actions = max(math.ceil(per_visit), round(per_visit * (2 + 5 * u[7])))
        return {
            "nb_uniq_visitors": uniq,
            "nb_users": 0,
            "nb_visits": visits,
            "nb_actions": actions,
            "nb_visits_converted": converted,
            "bounce_count": bounces,
            "sum_visit_length": sum_length,
            "max_actions": max_actions,
            "bounce_rate": round(bounces / visits, 2),
            "nb_actions_per_visit": round(per_visit, 1),
            "avg_time_on_site": round(sum_length / visits),
        }

    # ---- HTTP --------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = self._new_app()
        for path in ("/index.php", "/"):
            app.router.add_route("GET", path, self._handle)
            app.router.add_route("POST", path, self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=502, text=_BAD_GATEWAY_HTML, content_type="text/html")
        if self.hang:
            return await self._hang_forever(request)
        await self._delay()

        query = request.rel_url.query
        form = await request.post() if request.method == "POST" else None
        params: dict[str, str] = {}
        if form is not None:
            params.update((k, v) for k, v in form.items() if isinstance(v, str))
        params.update(query.items())  # GET wins, last duplicate wins (PHP)
        # Secure token: in the POST body and not in the query string (Matomo 5).
        token_ok = (
            "token_auth" not in query and form is not None and form.get("token_auth") == self.token
        )
        if params.get("module") != "API":
            return web.Response(text=_LOGIN_HTML, content_type="text/html")
        if params.get("format", "xml").lower() != "json":
            return _render(MatomoError(_format_message(params.get("format", "xml"))), 200)
        try:
            if params.get("method") == "API.getBulkRequest":
                urls = _urls(query) or (_urls(form) if form is not None else [])
                result: Any = self._bulk(urls, params, token_ok)
            else:
                result = self._call(params, token_ok)
        except MatomoError as error:
            return _render(error, error.status)
        except PhpFatalError:
            return web.Response(status=500, text=_PHP_FATAL_HTML, content_type="text/html")
        return _render(result, 200)

    def _bulk(self, urls: list[str], outer: dict[str, str], token_ok: bool) -> list[Any]:
        self.bulk_requests += 1
        self.calls["API.getBulkRequest"] += 1
        inherited = {k: v for k, v in outer.items() if not _URLS_KEY.match(k)}
        answers: list[Any] = []
        for url in urls:
            self.subrequests += 1
            params = _parse_subquery(url)
            params["format"] = "json"
            for key, value in inherited.items():
                params.setdefault(key, value)  # PHP `$params += $queryParameters`
            try:
                if params.get("method") == "API.getBulkRequest":
                    raise MatomoError("API.getBulkRequest cannot be nested in a bulk request.")
                # The secure-token check is about the HTTP request; a sub-query may still
                # override token_auth with a different (wrong) value.
                answers.append(
                    self._call(params, token_ok and params.get("token_auth") == self.token)
                )
            except MatomoError as error:
                answers.append({"result": "error", "message": error.message})
        return answers

    def _call(self, params: dict[str, str], token_ok: bool) -> Any:
        method = params.get("method", "")
        self.calls[method] += 1
        if not method:
            raise MatomoError("Please specify a value for 'method'.")
        if method == "VisitsSummary.get":
            return self._visits_summary(params, token_ok)
        if method == "API.getMatomoVersion":
            if not token_ok:
                raise MatomoError(
                    "You can't access this resource as it requires 'view' access for at least "
                    "one website.",
                    status=401,
                )
            return {"value": MATOMO_VERSION}
        if method == "SitesManager.getSitesIdWithAtLeastViewAccess":
            return sorted(self.sites) if token_ok else []
        if method == "SitesManager.getSitesWithAtLeastViewAccess":
            return [self._site_object(i) for i in sorted(self.sites)] if token_ok else []
        module, _, action = method.rpartition(".")
        raise MatomoError(
            f"The method '{action or method}' does not exist or is not available in the module "
            f"'\\Piwik\\Plugins\\{module or 'API'}\\API'."
        )

    def _site_object(self, idsite: int) -> dict[str, Any]:
        return {
            "idsite": idsite,
            "name": f"Site {idsite}",
            "main_url": f"https://site{idsite}.example",
            "ts_created": "2020-01-01 00:00:00",
            "ecommerce": 0,
            "sitesearch": 1,
            "timezone": self.sites[idsite],
            "currency": "EUR",
            "type": "website",
            "timezone_name": self.sites[idsite],
            "currency_name": "Euro",
        }

    def _visits_summary(self, params: dict[str, str], token_ok: bool) -> Any:
        for name in ("idSite", "period", "date"):
            if not params.get(name):
                raise MatomoError(f"Please specify a value for '{name}'.")
        if params["period"] != "day":
            raise MatomoError(
                f"The simulator only implements period=day (got period={params['period']!r})."
            )
        raw_ids = params["idSite"]
        multi_site = raw_ids == "all"
        if multi_site:
            ids = sorted(self.sites) if token_ok else []
        else:
            ids = _site_ids(raw_ids)
            multi_site = len(ids) > 1
        if not ids:
            raise MatomoError("The parameter 'idSite=' is missing from the request.", status=401)
        for idsite in ids:
            if not token_ok or idsite not in self.sites:
                raise _no_access(idsite)
        days, keyed_by_date = self._days(params["date"])
        if any(i in self.fatal_sites for i in ids):
            raise PhpFatalError()
        failing = [i for i in ids if i in self.fail_sites]
        if failing:
            raise MatomoError(_FAIL_MESSAGE)
        numeric = params.get("format_metrics", "bc") in ("0", "false")

        def leaf(idsite: int, day: date, zeros: bool) -> Any:
            metrics = self.metrics(idsite, day)
            if metrics is None:
                if not zeros:
                    return []
                metrics = dict.fromkeys(_ZERO_KEYS, 0)
            if not numeric:
                metrics["bounce_rate"] = f"{round(metrics['bounce_rate'] * 100)}%"
            return metrics

        def per_site(idsite: int) -> Any:
            if keyed_by_date:
                return {d.isoformat(): leaf(idsite, d, False) for d in days}
            return leaf(idsite, days[0], not multi_site)

        if multi_site:
            return {str(i): per_site(i) for i in ids}
        return per_site(ids[0])

    def _days(self, value: str) -> tuple[list[date], bool]:
        """Days of a `date` parameter and whether the answer is keyed by date."""
        last = _LAST.match(value)
        if last:
            count = int(last.group(2))
            if count < 1:
                raise MatomoError(f"The date '{value}' is not a correct date range.")
            end = self.today if last.group(1) == "last" else self.today - timedelta(days=1)
            return _span(end - timedelta(days=count - 1), end, value), True
        if "," in value:
            first, _, second = value.partition(",")
            return _span(self._day(first, value), self._day(second, value), value), True
        return [self._day(value, value)], False

    def _day(self, text: str, whole: str) -> date:
        text = text.strip()
        if text == "today":
            return self.today
        if text == "yesterday":
            return self.today - timedelta(days=1)
        match = _DAY.match(text)
        if match:
            try:
                return date.fromisoformat(match.group(1))
            except ValueError:
                pass
        raise MatomoError(
            "Date format must be: YYYY-MM-DD, or 'today' or 'yesterday' or any keyword supported "
            f"by the strtotime function (see http://php.net/strtotime for more information): "
            f"{whole}"
        )


_ZERO_KEYS = (
    "nb_uniq_visitors",
    "nb_users",
    "nb_visits",
    "nb_actions",
    "nb_visits_converted",
    "bounce_count",
    "sum_visit_length",
    "max_actions",
    "bounce_rate",
    "nb_actions_per_visit",
    "avg_time_on_site",
)


def _span(start: date, end: date, text: str) -> list[date]:
    count = (end - start).days + 1
    if count < 1 or count > _MAX_DAYS:
        raise MatomoError(f"The date '{text}' is not a correct date range.")
    return [start + timedelta(days=i) for i in range(count)]


def _site_ids(text: str) -> list[int]:
    """`Site::getIdSitesFromIdSitesString`: drop non-numeric and <= 0 entries, dedupe in order."""
    ids: dict[int, None] = {}
    for part in text.split(","):
        part = part.strip()
        if part.isdigit() and int(part) > 0:
            ids[int(part)] = None
    return list(ids)


def _urls(source: Mapping[str, Any]) -> list[str]:
    """`urls[i]` / `urls[]` fields in PHP array order (first appearance; `[]` appends)."""
    found: dict[int, str] = {}
    for key, value in source.items():
        match = _URLS_KEY.match(key)
        if match is None or not isinstance(value, str):
            continue
        index = int(match.group(1)) if match.group(1) else max(found, default=-1) + 1
        found[index] = value
    return list(found.values())


def _parse_subquery(text: str) -> dict[str, str]:
    """`Request::fromQueryString`: parse once; retry decoded when it yields one empty key."""
    pairs = parse_qsl(text, keep_blank_values=True)
    if len(pairs) == 1 and pairs[0][1] == "" and "=" in unquote(text):
        pairs = parse_qsl(unquote(text), keep_blank_values=True)
    return dict(pairs)


def _format_message(fmt: str) -> str:
    return (
        f"The simulator only implements format=json; got format={fmt!r} "
        "(Matomo's default is xml: always send format=json)."
    )


def _render(payload: Any, status: int) -> web.Response:
    if isinstance(payload, MatomoError):
        payload = {"result": "error", "message": payload.message}
    return web.Response(
        status=status,
        body=json.dumps(payload, separators=(",", ":")).encode(),
        content_type=_JSON,
        charset="utf-8",
    )
