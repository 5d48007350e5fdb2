"""Google API errors told apart, and how long to wait before asking again.

Google answers "slow down", "rest a while", "quota gone for today", "API not enabled" and "no
permission" all with 403; this
module turns a status and error body into the ErrorKind that says how to react, and computes
the waits. Pure: the client in aggregator.search_console.client does the reacting.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

_RATE_REASONS = frozenset({"ratelimitexceeded", "userratelimitexceeded"})
_CLIENT_REASONS = frozenset({"accessnotconfigured", "servicedisabled"})
# A quotaExceeded whose message names a per-second or per-minute quota is QPS, not load: Google
# words those "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute ...'".
_QPS_WORDING = re.compile(r"\bqps\b|per (?:minute|second)|\brate\b", re.IGNORECASE)
# Google Cloud's quota errors name the limit: "... and limit 'Queries per minute per user' of
# service ..." for a user's quota, "... limit 'Queries per minute' ..." for the project's.
_QUOTA_LIMIT = re.compile(r"limit '([^']*)'", re.IGNORECASE)
_MAX_MESSAGE_CHARS = 400
_RETRY_BASE_SECONDS = 1.0
_RETRY_CAP_SECONDS = 30.0
RETRY_AFTER_JITTER = 0.1  # a share of Google's Retry-After added at random (see rate_limit_delay)


class ErrorKind(Enum):
    RATE_LIMITED = "rate limited"  # slow down and retry
    LOAD_QUOTA = "load quota"  # the account rests (Google: "wait 15 minutes"), then once more
    DAILY_LIMIT = "daily limit"  # stop asking this account for this run
    CLIENT_BROKEN = "client broken"  # the OAuth client's Cloud project cannot call the API
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

    @property
    def quota_scope(self) -> str | None:
        """Which quota refused a query, where Google's quota wording says it: "account" for a
        limit "per user", "client" for the Cloud project's own; None when it does not say."""
        if self.kind is not ErrorKind.RATE_LIMITED:
            return None
        match = _QUOTA_LIMIT.search(self.message)
        if match is None:
            return None
        return "account" if "per user" in match.group(1).lower() else "client"


def classify_google_error(status: int, body: object) -> GoogleError:
    """Tell Google's errors apart by reason, not status alone: 403 means "slow down", "rest for
    15 minutes", "done for today", "the API is off in this Cloud project" and "no permission",
    and each needs a different reaction."""
    error = body.get("error") if isinstance(body, Mapping) else None
    error = error if isinstance(error, Mapping) else {}
    details = error.get("errors")
    first = details[0] if isinstance(details, list) and details else {}
    first = first if isinstance(first, Mapping) else {}
    reason = first.get("reason") if isinstance(first.get("reason"), str) else None
    domain = str(first.get("domain", "")).lower()
    message = error.get("message") or first.get("message") or ""  # none: the status says it
    message = " ".join(str(message).split())
    if len(message) > _MAX_MESSAGE_CHARS:  # stored in aggregator_runs.errors: keep it a line
        message = message[: _MAX_MESSAGE_CHARS - 3] + "..."
    lowered = (reason or "").lower()
    status_name = str(error.get("status", "")).upper()

    if status == 429:
        kind = ErrorKind.RATE_LIMITED
    elif status == 403 and (lowered in _CLIENT_REASONS or status_name == "SERVICE_DISABLED"):
        kind = ErrorKind.CLIENT_BROKEN
    elif status == 403 and lowered == "dailylimitexceeded":
        kind = ErrorKind.DAILY_LIMIT
    elif status == 403 and lowered == "quotaexceeded":
        qps = _QPS_WORDING.search(message) and "load" not in message.lower()
        kind = ErrorKind.RATE_LIMITED if qps else ErrorKind.LOAD_QUOTA
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
    """Google's Retry-After when it sends one (plus up to RETRY_AFTER_JITTER of it), else
    backoff. The jitter is small: every retry goes back through its account's pacer, which
    spaces retries that were refused together, so a long one only makes the night's last
    sites wait."""
    if retry_after is None:
        return backoff_delay(failures, rand=rand)
    return retry_after * (1 + RETRY_AFTER_JITTER * rand())


def backoff_delay(attempt: int, *, rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff with jitter for the n-th failed attempt (1-based).

    Jitter spreads out retries of many concurrent tasks that failed together.
    """
    ceiling = min(_RETRY_CAP_SECONDS, _RETRY_BASE_SECONDS * 2 ** (attempt - 1))
    return ceiling / 2 + rand() * ceiling / 2
