import asyncio
from datetime import UTC, date, datetime

import asyncpg
import pytest

from aggregator import migrations, storage
from aggregator.config import Secret
from aggregator.model import AccountRefresh, SiteError
from aggregator.storage import DailyRow, StorageError
from tests.factories import add_account, add_site, stored_rows

D1, D2 = date(2024, 2, 28), date(2024, 2, 29)


async def test_migrations_apply_twice_cleanly(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        assert await storage.missing_tables(conn) == list(storage.REQUIRED_TABLES)
        assert await migrations.apply_migrations(conn) == [
            p.stem for p in migrations.migration_files()
        ]
        assert await migrations.apply_migrations(conn) == []
        assert await storage.missing_tables(conn) == []
        # The SQL itself is idempotent too, even without the bookkeeping table.
        for path in migrations.migration_files():
            await conn.execute(path.read_text())
        rls = await conn.fetchval(
            "select bool_and(relrowsecurity) from pg_class where oid = any($1::regclass[])",
            list(storage.REQUIRED_TABLES),
        )
        assert rls is True
    finally:
        await conn.close()


async def test_require_schema_names_the_missing_table(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        with pytest.raises(StorageError, match="no table gsc_accounts: run `aggregator migrate`"):
            await storage.require_schema(conn)
    finally:
        await conn.close()


@pytest.mark.parametrize("query", ["", "?sslmode=prefer", "?sslmode=disable"])
async def test_a_database_url_pointing_at_a_web_server_says_it_is_not_postgres(
    query: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg reads any non-PostgreSQL answer as "rejected SSL upgrade" (or, without TLS, a
    dropped connection): without sslmode=require, the line must not blame TLS but name the host
    and port to check."""
    monkeypatch.delenv("PGSSLMODE", raising=False)

    async def answer_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(64)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(StorageError) as caught:
            await storage.connect(Secret(f"postgresql://u:pw@127.0.0.1:{port}/db{query}"))
    finally:
        server.close()
        await server.wait_closed()
    message = str(caught.value)
    assert message.startswith(f"cannot connect to database at 127.0.0.1:{port}/db: ")
    assert "sslmode=require" not in message and "offers no TLS" not in message
    assert "check the host and port in DATABASE_URL" in message


async def test_monitored_sites_are_active_and_deployed_and_filterable(conn) -> None:
    keep = await add_site(conn, "Example.com", matomo_site_id=3)
    await add_site(conn, "undeployed.com", deployed=False)
    await add_site(conn, "inactive.com", active=False)
    other = await add_site(conn, "other.org")
    sites = await storage.load_sites(conn)
    assert [s.id for s in sites] == [keep, other]
    assert sites[0].matomo_site_id == 3
    assert [s.id for s in await storage.load_sites(conn, ["example.com."])] == [keep]


async def test_environment_refresh_token_overrides_the_table(conn) -> None:
    a = await add_account(conn, "a@example.com", "table-token")
    b = await add_account(conn, "b@example.com", None)
    await add_account(conn, "off@example.com", "x", active=False)
    accounts = await storage.load_active_accounts(conn, {b: Secret("env-token")})
    assert accounts[a].refresh_token == "table-token"
    assert accounts[b].refresh_token == "env-token"
    assert len(accounts) == 2


async def test_upsert_writes_only_the_sources_that_answered(conn) -> None:
    site = await add_site(conn, "example.com")
    await storage.upsert_daily_rows(
        conn,
        [DailyRow(site, D1, matomo=(10, 30), gsc=(5, 100, 0.05, 7.5, True))],
    )
    # A later run where only Matomo answered must not null the GSC columns (and vice versa).
    await storage.upsert_daily_rows(conn, [DailyRow(site, D1, matomo=(11, 31))])
    await storage.upsert_daily_rows(conn, [DailyRow(site, D2, gsc=(1, 2, 0.5, 3.0, False))])
    rows = await stored_rows(conn)
    assert rows[(site, "2024-02-28")]["matomo_visits"] == 11
    assert rows[(site, "2024-02-28")]["gsc_clicks"] == 5
    assert rows[(site, "2024-02-28")]["gsc_final"] is True
    assert rows[(site, "2024-02-29")]["matomo_visits"] is None
    assert rows[(site, "2024-02-29")]["gsc_final"] is False
    assert rows[(site, "2024-02-29")]["matomo_updated_at"] is None


async def test_rerunning_the_same_inputs_leaves_rows_identical(conn) -> None:
    site = await add_site(conn, "example.com")
    batch = [DailyRow(site, D1, matomo=(1, 2), gsc=(0, 0, None, None, True))]
    assert await storage.upsert_daily_rows(conn, batch) == 1
    first = await stored_rows(conn)
    await storage.upsert_daily_rows(conn, batch)
    assert await stored_rows(conn) == first


async def test_provisional_numbers_are_replaced_but_never_replace_final_ones(conn) -> None:
    site = await add_site(conn, "example.com")
    await storage.upsert_daily_rows(conn, [DailyRow(site, D1, gsc=(3, 50, 0.06, 9.0, False))])
    await storage.upsert_daily_rows(conn, [DailyRow(site, D1, gsc=(5, 80, 0.0625, 8.0, True))])
    await storage.upsert_daily_rows(conn, [DailyRow(site, D1, gsc=(4, 70, 0.05, 8.0, False))])
    row = (await stored_rows(conn))[(site, "2024-02-28")]
    assert (row["gsc_clicks"], row["gsc_impressions"], row["gsc_final"]) == (5, 80, True)


async def test_account_refresh_outcomes(conn) -> None:
    ok = await add_account(conn, "ok@example.com", "t")
    bad = await add_account(conn, "bad@example.com", "t")
    at = datetime(2026, 1, 1, tzinfo=UTC)
    await conn.execute("update gsc_accounts set last_error = 'old' where id = $1", ok)
    await storage.record_account_refreshes(
        conn, [AccountRefresh(ok, at), AccountRefresh(bad, at, "invalid_grant: reconnect")]
    )
    rows = {r["id"]: r for r in await conn.fetch("select * from gsc_accounts")}
    assert rows[ok]["last_refresh_at"] == at and rows[ok]["last_error"] is None
    assert rows[bad]["last_refresh_at"] == at  # every attempt, failed ones too
    assert rows[bad]["last_error"] == "invalid_grant: reconnect"


async def test_runs_are_recorded_with_errors(conn) -> None:
    run_id = await storage.start_run(conn, D1, D2, 3)
    assert (
        await conn.fetchval("select status from aggregator_runs where id = $1", run_id) == "running"
    )
    await storage.finish_run(
        conn, run_id, status="partial", rows_upserted=4, errors=[SiteError("a.com", "gsc", "boom")]
    )
    run = await conn.fetchrow("select * from aggregator_runs where id = $1", run_id)
    assert run["status"] == "partial" and run["rows_upserted"] == 4
    assert run["finished_at"] is not None
    assert '"site": "a.com"' in run["errors"]


async def test_connection_errors_are_one_line_and_hide_the_password() -> None:
    with pytest.raises(StorageError) as caught:
        await storage.connect(Secret("postgresql://postgres:hunter2@127.0.0.1:1/db"))
    assert "hunter2" not in str(caught.value)
    assert "127.0.0.1:1/db" in str(caught.value)


async def test_wrong_database_name_is_explained(server_dsn: str) -> None:
    from urllib.parse import urlsplit, urlunsplit

    dsn = urlunsplit(urlsplit(server_dsn)._replace(path="/no_such_database_here"))
    with pytest.raises(StorageError, match="does not exist"):
        await storage.connect(Secret(dsn))
