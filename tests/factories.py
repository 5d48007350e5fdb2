"""Rows for tests: the smallest inserts that make a site or an account monitored."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from aggregator import migrations
from aggregator.simulators import GoogleSimulator
from aggregator.simulators import portfolio as world


async def add_account(
    conn: asyncpg.Connection, email: str, refresh_token: str | None = None, *, active: bool = True
) -> int:
    return await conn.fetchval(
        "insert into gsc_accounts (email, refresh_token, is_active) values ($1, $2, $3)"
        " returning id",
        email,
        refresh_token,
        active,
    )


async def add_site(
    conn: asyncpg.Connection,
    domain: str,
    *,
    matomo_site_id: int | None = None,
    gsc_account_id: int | None = None,
    gsc_property: str | None = None,
    deployed: bool = True,
    active: bool = True,
    deployed_at: datetime | None = None,
) -> int:
    """A monitored site; deployed long before any test's dates unless `deployed_at` says when."""
    return await conn.fetchval(
        """
        insert into sites (domain, is_active, deployed_at, matomo_site_id, gsc_account_id,
                           gsc_property)
        values ($1, $2, case when $3 then $7::timestamptz end, $4, $5, $6)
        returning id
        """,
        domain,
        active,
        deployed,
        matomo_site_id,
        gsc_account_id,
        gsc_property,
        deployed_at or LONG_AGO,
    )


LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


@contextlib.asynccontextmanager
async def migrated_before(
    dsn: str, version: str, workdir: Path
) -> AsyncIterator[asyncpg.Connection]:
    """A connection to `dsn` with the migrations older than `version` applied (their files
    copied to `workdir`): a database as it stood before that migration."""
    for path in migrations.migration_files():
        if path.stem < version:
            shutil.copy(path, workdir / path.name)
    conn = await asyncpg.connect(dsn)
    try:
        await migrations.apply_migrations(conn, workdir)
        yield conn
    finally:
        await conn.close()


async def stored_rows(conn: asyncpg.Connection) -> dict[tuple[int, str], dict]:
    rows = await conn.fetch("select * from daily_analytics order by site_id, date")
    return {(r["site_id"], r["date"].isoformat()): dict(r) for r in rows}


async def seed(dsn: str, portfolio: world.Portfolio) -> world.Portfolio:
    """Seed a simulated portfolio into the schema behind `dsn`; return it for chaining."""
    conn = await asyncpg.connect(dsn)
    try:
        await world.seed_portfolio(conn, portfolio)
    finally:
        await conn.close()
    return portfolio


def google_like(
    portfolio: world.Portfolio, cls: type[GoogleSimulator], *args: object, **options: object
) -> GoogleSimulator:
    """A `cls` (a GoogleSimulator with a scripted fault) serving `portfolio`'s accounts and
    properties exactly as world.google_simulator does; `args` and `options` go to `cls`."""
    template = world.google_simulator(portfolio)
    return cls(
        *args,
        client_id=template.client_id,
        client_secret=template.client_secret,
        accounts=template.accounts,
        **options,
    )
