"""`aggregator accounts`: the Google accounts whose refresh tokens the job uses.

`list` says where each account's token comes from (never the token itself), `add` connects an
account through Google's consent screen and stores the refresh token it grants, `deactivate`
stops the job from using one. Only `add` needs google-auth-oauthlib, so that library is an
optional extra, imported when `add` runs.

Exit status: 0 done; 2 nothing could be done (configuration, database, consent), one line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import asyncpg

from aggregator import storage
from aggregator.config import ConfigError, Settings
from aggregator.redaction import register_secret
from aggregator.text_table import table_lines
from aggregator.token_health import PUBLISH_ADVICE
from aggregator.usage import UsageError

SCOPE = "https://www.googleapis.com/auth/webmasters.readonly"
# Asked too so the ID token says which Google account consented (its `email` claim).
IDENTITY_SCOPES = ("openid", "https://www.googleapis.com/auth/userinfo.email")
AUTH_URI = "https://accounts.google.com/o/oauth2/auth"
MISSING_LIBRARY = "accounts add needs google-auth-oauthlib: pip install 'aggregator[accounts]'"


@dataclass(frozen=True, slots=True)
class Grant:
    """What a consent granted: the refresh token and the email of the account that signed in
    (None when Google did not say)."""

    refresh_token: str
    email: str | None


Consent = Callable[[], Grant]
"""Runs Google's consent flow for one account and returns what it granted."""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class AccountLine:
    """One gsc_accounts row as operators see it; `token` is where the token comes from."""

    id: int
    email: str
    active: bool
    last_refresh_at: datetime | None
    last_error: str | None
    token: str
    sites: int
    connected_at: datetime | None = None


def token_source(account_id: int, stored: bool, overrides: Mapping[int, object]) -> str:
    """ "env", "table" or "missing": GSC_REFRESH_TOKEN_<id> wins over the table, as in a run."""
    if account_id in overrides:
        return "env"
    return "table" if stored else "missing"


def render_accounts(lines: list[AccountLine], zone: ZoneInfo) -> str:
    if not lines:
        return "no Google accounts yet: connect one with `aggregator accounts add EMAIL`\n"
    rows = table_lines(
        ("id", "email", "active", "token", "sites", "connected", "last refresh", "last error"),
        (
            (
                str(a.id),
                a.email,
                "yes" if a.active else "no",
                a.token,
                str(a.sites),
                a.connected_at.astimezone(zone).date().isoformat() if a.connected_at else "-",
                a.last_refresh_at.astimezone(zone).strftime("%Y-%m-%d %H:%M")
                if a.last_refresh_at
                else "-",
                " ".join((a.last_error or "").split()),
            )
            for a in lines
        ),
    )
    return "\n".join(rows) + "\n"


def checked_email(text: str) -> str:
    email = text.strip()
    local, _, domain = email.rpartition("@")
    if not local or "." not in domain:
        raise UsageError(f"{text!r} is not an email address")
    return email


def client_config(settings: Settings, secrets_file: Path | None) -> dict[str, Any]:
    """The OAuth client for the consent screen. It must be the job's own client: Google binds a
    refresh token to the client that obtained it, so a token from another client fails later."""
    if secrets_file is None:
        if not (settings.google_client_id and settings.google_client_secret):
            raise ConfigError(
                "GOOGLE_CLIENT_ID and GOOGLE_CLIENT_SECRET must be set "
                "(or pass --client-secrets FILE from the same OAuth client)"
            )
        return {
            "installed": {
                "client_id": settings.google_client_id,
                "client_secret": settings.google_client_secret.reveal(),
                "auth_uri": AUTH_URI,
                "token_uri": settings.google_token_url,
                "redirect_uris": ["http://localhost"],
            }
        }
    try:
        config = json.loads(secrets_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read --client-secrets {secrets_file}: {exc}") from None
    installed = config.get("installed") if isinstance(config, dict) else None
    if not isinstance(installed, dict):
        raise ConfigError(
            f"--client-secrets {secrets_file} is not a Desktop app OAuth client "
            '(no "installed" section): download the JSON of a Desktop app client'
        )
    if settings.google_client_id and installed.get("client_id") != settings.google_client_id:
        raise ConfigError(
            f"--client-secrets {secrets_file} is another OAuth client than GOOGLE_CLIENT_ID: "
            "the job could not use a token it grants"
        )
    return config


def installed_app_consent(
    settings: Settings, secrets_file: Path | None, *, open_browser: bool
) -> Consent:
    """Google's loopback consent flow (a one-shot local server on a free port). With
    open_browser False the library only prints the URL, for a machine without a browser."""
    try:
        from google_auth_oauthlib.flow import InstalledAppFlow
    except ImportError:
        raise ConfigError(MISSING_LIBRARY) from None
    config = client_config(settings, secrets_file)

    def consent() -> Grant:
        flow = InstalledAppFlow.from_client_config(config, scopes=[SCOPE, *IDENTITY_SCOPES])
        # requests re-sends a 307/308 POST body (code and client secret) to the redirect target:
        # a redirecting GOOGLE_TOKEN_URL fails instead (see aggregator.redirects).
        flow.oauth2session.max_redirects = 0
        try:
            credentials = flow.run_local_server(port=0, open_browser=open_browser, prompt="consent")
        except Exception as exc:  # oauthlib's and the server's errors: one line, not a traceback
            reason = getattr(exc, "description", None) or type(exc).__name__
            raise UsageError(f"Google consent failed: {reason}") from None
        if not credentials.refresh_token:
            raise UsageError("Google granted no refresh token: run `accounts add` again")
        return Grant(credentials.refresh_token, signed_in_email(credentials.id_token))

    return consent


def signed_in_email(id_token: str | None) -> str | None:
    """The `email` claim of the ID token the token endpoint returned with the grant. Its
    signature is not checked: it came straight from Google's token endpoint over TLS in the
    same exchange, which OpenID Connect accepts in place of the signature."""
    if not id_token:
        return None
    from google.auth import jwt

    try:
        claims = jwt.decode(id_token, verify=False)
    except ValueError:
        return None
    email = claims.get("email") if isinstance(claims, dict) else None
    return email if isinstance(email, str) and email else None


def refused_grant(named: str, grant: Grant) -> str | None:
    """Why a grant must not be stored for `named`, or None: a token of another account would
    silently read that account's properties under this account's name."""
    if grant.email is None:
        return (
            f"Google did not say which account signed in, so the token is not stored for {named}:"
            " run `accounts add` again and allow the email permission"
        )
    if grant.email.strip().lower() != named.strip().lower():
        return (
            f"signed in as {grant.email}, not {named}: nothing stored. Run `aggregator accounts "
            f"add {named}` and choose {named} on Google's account screen"
        )
    return None


# --- database ---------------------------------------------------------------------------------


async def list_accounts(
    conn: asyncpg.Connection, overrides: Mapping[int, object]
) -> list[AccountLine]:
    """Every account; the query reads only whether a token is stored, never the token."""
    connected = (
        "a.connected_at"
        if await storage.has_column(conn, "gsc_accounts", "connected_at")
        else "null::timestamptz"
    )
    rows = await conn.fetch(
        f"""
        select a.id, a.email, a.is_active, a.last_refresh_at, a.last_error,
               {connected} as connected_at,
               coalesce(a.refresh_token, '') <> '' as has_token,
               count(s.id) filter (where s.is_active and s.deployed_at is not null) as sites
        from gsc_accounts a
        left join sites s on s.gsc_account_id = a.id
        group by a.id
        order by a.id
        """
    )
    return [
        AccountLine(
            id=row["id"],
            email=row["email"],
            active=row["is_active"],
            last_refresh_at=row["last_refresh_at"],
            last_error=row["last_error"],
            token=token_source(row["id"], row["has_token"], overrides),
            sites=row["sites"],
            connected_at=row["connected_at"],
        )
        for row in rows
    ]


async def require_token_health(conn: asyncpg.Connection) -> None:
    """The token-health columns (migration 005) exist, or one line saying to migrate."""
    if not await storage.has_column(conn, "gsc_accounts", "connected_at"):
        raise storage.StorageError(
            "gsc_accounts has no connected_at column: run `aggregator migrate` first"
        )


async def store_refresh_token(conn: asyncpg.Connection, email: str, token: str) -> tuple[int, bool]:
    """Store a fresh token for `email` (matched case-insensitively), reactivate the account,
    forget its last error and start its token health afresh (connected now, not failing);
    return (account id, created)."""
    await require_token_health(conn)
    async with conn.transaction():
        account_id = await conn.fetchval(
            """
            update gsc_accounts
            set refresh_token = $2, is_active = true, last_error = null,
                connected_at = now(), failing_since = null
            where lower(email) = lower($1)
            returning id
            """,
            email,
            token,
        )
        if account_id is not None:
            return account_id, False
        account_id = await conn.fetchval(
            "insert into gsc_accounts (email, refresh_token, is_active, connected_at)"
            " values ($1, $2, true, now()) returning id",
            email,
            token,
        )
        return account_id, True


async def deactivate_account(conn: asyncpg.Connection, email: str) -> tuple[int, int]:
    """Mark `email` inactive; return (account id, monitored sites still assigned to it)."""
    row = await conn.fetchrow(
        """
        with hit as (
            update gsc_accounts set is_active = false where lower(email) = lower($1) returning id
        )
        select hit.id,
               (select count(*) from sites s
                where s.gsc_account_id = hit.id and s.is_active and s.deployed_at is not null)
                   as sites
        from hit
        """,
        email,
    )
    if row is None:
        raise UsageError(f"no Google account {email} in gsc_accounts (see `accounts list`)")
    return row["id"], row["sites"]


def _in_database(settings: Settings, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    async def run() -> T:
        async with storage.schema_connection(settings) as conn:
            return await work(conn)

    return asyncio.run(run())


# --- commands ---------------------------------------------------------------------------------


def add(settings: Settings, email: str, consent: Consent) -> int:
    """Connect `email`: consent in the browser, then store its refresh token.

    The database is checked first so that a wrong DATABASE_URL does not waste a consent; the
    flow runs outside the event loop (it blocks on a local server) and no connection is held
    open while the operator is in the browser.
    """
    email = checked_email(email)
    _in_database(settings, require_token_health)
    grant = consent()
    register_secret(grant.refresh_token)
    refusal = refused_grant(email, grant)
    if refusal is not None:
        raise UsageError(refusal)
    account_id, created = _in_database(
        settings, lambda conn: store_refresh_token(conn, email, grant.refresh_token)
    )
    print(
        f"{'added' if created else 'updated'} {email} (account {account_id}): refresh token "
        f"stored, account active. Assign sites with sites.gsc_account_id = {account_id}."
    )
    if account_id in settings.gsc_refresh_tokens:
        print(
            f"note: GSC_REFRESH_TOKEN_{account_id} is set and overrides the stored token; "
            "unset it to use the new one"
        )
    print(
        f"important: {PUBLISH_ADVICE}. Publishing does not extend tokens granted before it: "
        "reconnect accounts connected while the app was in Testing"
    )
    return 0


def command(args: argparse.Namespace, settings: Settings) -> int:
    if args.accounts_command == "list":
        lines = _in_database(
            settings, lambda conn: list_accounts(conn, settings.gsc_refresh_tokens)
        )
        print(render_accounts(lines, settings.timezone), end="")
        return 0
    if args.accounts_command == "add":
        consent = installed_app_consent(
            settings, args.client_secrets, open_browser=not args.no_browser
        )
        return add(settings, args.email, consent)
    email = checked_email(args.email)
    account_id, sites = _in_database(settings, lambda conn: deactivate_account(conn, email))
    print(f"deactivated {email} (account {account_id})")
    if sites:
        print(f"note: {sites} monitored sites still use it; their Search Console data stops")
    return 0
