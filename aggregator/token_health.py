"""How healthy a Google account's refresh token is, from what gsc_accounts records.

Refresh tokens die in known ways (Google, "Refresh token expiration"): seven days after
consent while the OAuth consent screen is in "Testing"; after six months unused; when the user
revokes access; when a client mints a 101st token for the same account; when the OAuth client
is deleted. None announces itself before the next refresh, so the job records when each account
was connected (`connected_at`), its latest refresh attempt and that attempt's error
(`last_refresh_at`, `last_error`), its latest success (`last_success_at`) and since when it
keeps failing (`failing_since`), and these pure functions turn that into what an operator reads
in `check` and the HTML report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import asyncpg

from aggregator import storage
from aggregator.model import AccountRefresh

TESTING_LIFETIME = timedelta(days=7)
# A streak that began this close to connected_at + 7 days is the Testing-mode expiry.
TESTING_TOLERANCE = timedelta(days=1)
UNUSED_LIFETIME = timedelta(days=182)
PUBLISH_ADVICE = (
    'publish the OAuth consent screen ("In production", Google Cloud console > Google Auth '
    'Platform > Audience): while it is in "Testing", refresh tokens expire after 7 days'
)


@dataclass(frozen=True, slots=True)
class TokenHealth:
    """One account's token record. `failing_since` is None while refreshes succeed."""

    connected_at: datetime | None = None
    last_success_at: datetime | None = None
    failing_since: datetime | None = None
    last_error: str | None = None

    @property
    def failing(self) -> bool:
        return self.last_error is not None

    def after(self, refresh: AccountRefresh | None) -> TokenHealth:
        """The record once `refresh` (this check's attempt, if any) is stored."""
        if refresh is None:
            return self
        if refresh.error is None:
            return dataclasses.replace(
                self, last_success_at=refresh.at, failing_since=None, last_error=None
            )
        return dataclasses.replace(
            self, failing_since=self.failing_since or refresh.at, last_error=refresh.error
        )


def age(since: datetime | None, now: datetime) -> str:
    """'3 days ago', '5 h ago', '12 min ago', 'just now', or 'unknown'."""
    if since is None:
        return "unknown"
    elapsed = now - since
    if elapsed >= timedelta(days=2):
        return f"{elapsed.days} days ago"
    if elapsed >= timedelta(hours=1):
        return f"{int(elapsed.total_seconds() // 3600)} h ago"
    if elapsed >= timedelta(minutes=1):
        return f"{int(elapsed.total_seconds() // 60)} min ago"
    return "just now"


def summary(health: TokenHealth, now: datetime) -> str:
    """One phrase for a table cell: connected when, then either the last success or, while
    refreshes fail, since when and the success before that streak. A success is never shown
    beside a streak it does not precede (a record from before migration 006 can hold one)."""
    connected = (
        "connected: unknown"
        if health.connected_at is None
        else f"connected {age(health.connected_at, now)}"
    )
    if not health.failing:
        success = (
            "never refreshed"
            if health.last_success_at is None
            else f"last refresh ok {age(health.last_success_at, now)}"
        )
        return f"{connected}, {success}"
    since = health.failing_since
    streak = (
        "refreshes failing"
        if since is None
        else f"refreshes failing since {since.date().isoformat()} ({age(since, now)})"
    )
    before = health.last_success_at
    if before is None:
        return f"{connected}, {streak}, no successful refresh recorded"
    if since is not None and before >= since:
        return f"{connected}, {streak}"
    return f"{connected}, {streak}, last ok {age(before, now)}"


def failure_cause(health: TokenHealth) -> str | None:
    """Why the refreshes fail, when the error and the dates say so; None when they do not."""
    error = (health.last_error or "").lower()
    if "deleted_client" in error or "invalid_client" in error:
        return "the OAuth client was deleted or GOOGLE_CLIENT_ID/SECRET are wrong"
    if "unauthorized_client" in error:
        return "the token was issued to another OAuth client than GOOGLE_CLIENT_ID"
    if "invalid_grant" not in error:
        return None
    if health.connected_at is not None and health.failing_since is not None:
        died_after = health.failing_since - health.connected_at
        if died_after <= TESTING_LIFETIME + TESTING_TOLERANCE and died_after >= (
            TESTING_LIFETIME - TESTING_TOLERANCE
        ):
            return (
                "it died about 7 days after it was connected: the OAuth consent screen is "
                'still in "Testing"'
            )
    if (
        health.last_success_at is not None
        and health.failing_since is not None
        and (health.failing_since - health.last_success_at >= UNUSED_LIFETIME)
    ):
        return "it was not used for six months"
    return (
        "it was revoked (by the user, a password or policy change, or a 101st token for the "
        "same account and client)"
    )


def testing_deadline(health: TokenHealth, now: datetime) -> date | None:
    """The day a token still under seven days old dies if the app is in Testing, else None."""
    if health.connected_at is None or health.failing:
        return None
    dies = health.connected_at + TESTING_LIFETIME
    return dies.date() if dies > now else None


@dataclass(frozen=True, slots=True)
class AccountHealth:
    """A gsc_accounts row without its token, with its monitored sites counted."""

    id: int
    email: str
    active: bool
    sites: int
    health: TokenHealth


async def load_accounts(conn: asyncpg.Connection) -> list[AccountHealth]:
    """Every account by email. A schema before migration 005 has no connection time nor
    failure streak: they read as unknown. Before 006, last_refresh_at held the last success."""
    recorded = await storage.has_column(conn, "gsc_accounts", "failing_since")
    columns = "a.connected_at, a.failing_since" if recorded else "null, null"
    success = (
        "a.last_success_at"
        if await storage.has_column(conn, "gsc_accounts", "last_success_at")
        else "a.last_refresh_at"
    )
    rows = await conn.fetch(
        f"""
        select a.id, a.email, a.is_active, {success} as last_success_at, a.last_error, {columns},
               count(s.id) filter (where s.is_active and s.deployed_at is not null) as sites
        from gsc_accounts a left join sites s on s.gsc_account_id = a.id
        group by a.id order by a.email
        """
    )
    return [
        AccountHealth(
            r["id"], r["email"], r["is_active"], r["sites"], TokenHealth(r[5], r[3], r[6], r[4])
        )
        for r in rows
    ]
