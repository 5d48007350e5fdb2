"""What Search Console's answers mean, as pure functions: no I/O, no clock, no network.

Which property holds a site's data (Search Console spells hosts in punycode and lists
`sc-domain:` and URL-prefix properties side by side), the searchAnalytics.query body for daily
site totals, and the GscDay records an answer stands for, checked before anything is stored.
Kept apart from the client (.client) so these rules are read and tested on their own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import date, timedelta
from typing import Any

from aggregator.dates import Window
from aggregator.model import GscDay, SiteId

# The most rows one searchAnalytics.query answer may hold (module-level so tests can shrink it).
ROW_LIMIT = 25_000
_UNVERIFIED = "siteunverifieduser"
_SEARCH_ANALYTICS_KEYS = frozenset({"rows", "responseAggregationType", "metadata"})


class GscDataError(ValueError):
    """Search Console answered 200 with data this module refuses to store."""


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


def site_listing(sites_list: Mapping[str, Any]) -> dict[str, str]:
    """Property -> permission level from a sites.list answer (no `siteEntry`: no property).

    GscDataError when `siteEntry` is not a list of entries with a `siteUrl`: such an answer
    says nothing about the account's properties, and read leniently it would look like an
    account without the site's property, skipping the site with the wrong fix."""
    entries = sites_list.get("siteEntry", [])
    if not isinstance(entries, list):
        raise GscDataError(f"'siteEntry' is {type(entries).__name__}, expected a list")
    listing = {}
    for entry in entries:
        if not (isinstance(entry, Mapping) and isinstance(entry.get("siteUrl"), str)):
            raise GscDataError("a siteEntry has no siteUrl")
        listing[entry["siteUrl"]] = str(entry.get("permissionLevel", ""))
    return listing


class ReadableProperties:
    """The properties an account can read, indexed once by the spelling candidate_properties
    uses. Every site of the account is looked up in them: re-spelling a 500-property listing
    for each of its 500 sites took more CPU than the rest of a 10,000-site run."""

    __slots__ = ("_by_canonical", "names")

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)
        self._by_canonical = {_canonical_property(prop): prop for prop in self.names}

    def __len__(self) -> int:
        return len(self.names)

    def pick(self, domain: str) -> str | None:
        """The first candidate property for `domain` this account can read, spelled as
        sites.list spells it."""
        for candidate in candidate_properties(domain):
            if candidate in self._by_canonical:
                return self._by_canonical[candidate]
        return None

    def spelled(self, prop: str) -> str | None:
        """`prop` as sites.list spells it, if the account can read it (case aside)."""
        return self._by_canonical.get(_canonical_property(prop))


def readable(listing: Mapping[str, str]) -> ReadableProperties:
    """The listed properties that return data: unverified entries do not."""
    return ReadableProperties(
        prop for prop, level in listing.items() if level.lower() != _UNVERIFIED
    )


def accessible_properties(sites_list: Mapping[str, Any]) -> ReadableProperties:
    """Properties from a sites.list answer that return data: unverified entries do not."""
    return readable(site_listing(sites_list))


def is_unverified(prop: str, listing: Mapping[str, str]) -> bool:
    """Whether the account is listed for `prop` only as an unverified user."""
    wanted = _canonical_property(prop)
    return any(
        _canonical_property(listed) == wanted and level.lower() == _UNVERIFIED
        for listed, level in listing.items()
    )


_LEVEL_WORDS = {
    "siteowner": "owner",
    "sitefulluser": "full user",
    "siterestricteduser": "restricted user",
    _UNVERIFIED: "unverified",
}


def host_access(domain: str, listing: Mapping[str, str]) -> str:
    """What the account has for the site's host, for an error message: each property with its
    permission ("unverified" where that is why it returns nothing), or that it has none."""
    host = normalize_domain(domain)
    mine = sorted(
        (prop, level)
        for prop, level in listing.items()
        if normalize_domain(prop.removeprefix("sc-domain:")) == host
    )
    if not mine:
        return f"it has no Search Console property for {host}"
    shown = ", ".join(f"{prop} ({_LEVEL_WORDS.get(level.lower(), level)})" for prop, level in mine)
    return f"for {host} it has {shown}"


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
    site_id: SiteId,
    body: Mapping[str, Any],
    start: date,
    end: date,
    *,
    pacific_today: date,
    final_only: bool = False,
) -> list[GscDay]:
    """GscDay records for start..end from a searchAnalytics.query answer (the contract's rules).

    Days before `metadata.firstIncompleteDate` are final and a missing final day is a real zero;
    later days are provisional and a missing provisional day yields nothing, because Google may
    simply not have it yet. Google omits the metadata when it sees no incomplete data point,
    which a quiet site's empty fresh days cannot prove: without it, days from `pacific_today`
    (Search Console's today) minus UNPROVEN_FRESH_DAYS on are provisional, earlier ones final.

    `final_only` answers (dataState=final) never carry metadata, so they follow the same rule:
    a day before `pacific_today` minus UNPROVEN_FRESH_DAYS with no row is a final zero, as a
    normal run stores it (Google omits days without traffic from final data too). Every row of
    such an answer is final, and so is a gap before its newest row (final data arrives day by
    day); a missing day after both is not claimed, since it may only not be final yet.

    Google keeps about 16 months: days that far before the first incomplete day yield only the
    rows Google still has, since a missing day there means "deleted", not zero, and must not
    overwrite stored numbers in a long backfill.
    """
    rows = _rows_by_day(body, start, end)
    unproven = pacific_today - timedelta(days=UNPROVEN_FRESH_DAYS)
    if final_only:
        first_incomplete = max([unproven, *(day + timedelta(days=1) for day in rows)])
    else:
        first_incomplete = _first_incomplete_date(body) or unproven
    retained_from = first_incomplete - timedelta(days=RETENTION_DAYS)
    days: list[GscDay] = []
    for day in Window(start, end).days():
        final = day < first_incomplete
        row = rows.get(day)
        if row is not None:
            days.append(GscDay(site_id, day, *row, final=final))
        elif final and day >= retained_from:
            days.append(GscDay(site_id, day, 0, 0, None, None, final=True))
    return days


# How many of the newest days are taken as provisional when an answer does not say (Google's
# fresh data is typically two or three days behind; one more day errs towards "provisional",
# which later nights replace, never towards a final zero that would block the real numbers).
UNPROVEN_FRESH_DAYS = 3

# Search Console keeps 16 months of data; a few days' margin keeps the cut on the safe side.
RETENTION_DAYS = 16 * 30

_Row = tuple[int, int, float | None, float | None]


def page_rows(body: Mapping[str, Any]) -> list[Any]:
    """The rows of one searchAnalytics.query answer; Google omits the key when nothing matched.

    An answer without rows is Google's only if it still says how it aggregated (Google always
    sends `responseAggregationType`) or carries `metadata`: a bare `{}` from a proxy, a captive
    portal or a foreign host would otherwise read as "no clicks" and overwrite stored numbers.
    """
    if not _SEARCH_ANALYTICS_KEYS.intersection(body):
        raise GscDataError(
            "the answer has none of rows, responseAggregationType or metadata: not a "
            "Search Analytics answer"
        )
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
