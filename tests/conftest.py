"""Real PostgreSQL for every test: DATABASE_URL if set, else the local server on
127.0.0.1:5432, else an embedded server started for the session. Each test gets its own schema
(selected through the DSN's search_path) so tests never see each other's rows."""

from __future__ import annotations

import contextlib
import inspect
import shutil
import tempfile
import types
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
from aioresponses import aioresponses
from aioresponses import core as aioresponses_core

from aggregator import matomo, migrations, redaction
from aggregator.local_postgres import any_postgres, dsn_with_search_path
from aggregator.logs import reset_logging
from aggregator.search_console import rates
from tests.test_pgbouncer import pgbouncer  # noqa: F401  (one real PgBouncer for every module)


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    # Outside pytest's private temp tree: the embedded server drops root to its own user.
    data = Path(tempfile.mkdtemp(prefix="aggregator-test-pg-"))
    try:
        with any_postgres(data / "pgdata") as (dsn, _where):
            yield dsn
    finally:
        shutil.rmtree(data, ignore_errors=True)


@contextlib.asynccontextmanager
async def fresh_schema(server_dsn: str) -> AsyncIterator[str]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"create schema {schema}")
        yield dsn_with_search_path(server_dsn, schema)
    finally:
        await admin.execute(f"drop schema if exists {schema} cascade")
        await admin.close()


@contextlib.asynccontextmanager
async def fresh_database(server_dsn: str) -> AsyncIterator[str]:
    """A DSN of a new database on the test server, for code that chooses its own schema names
    (the demo): nothing another test or run does can meet it there."""
    database = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"create database {database}")
        yield urlsplit(server_dsn)._replace(path=f"/{database}").geturl()
    finally:
        await admin.execute(f"drop database if exists {database} with (force)")
        await admin.close()


@pytest.fixture
async def empty_db(server_dsn: str) -> AsyncIterator[str]:
    """A DSN whose search_path is a new, empty schema."""
    async with fresh_schema(server_dsn) as dsn:
        yield dsn


@pytest.fixture
async def db(empty_db: str) -> AsyncIterator[str]:
    """A DSN for a new schema with the migrations applied."""
    conn = await asyncpg.connect(empty_db)
    try:
        await migrations.apply_migrations(conn)
    finally:
        await conn.close()
    yield empty_db


@pytest.fixture
async def conn(db: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(db)
    try:
        yield connection
    finally:
        await connection.close()


class _ResponseWithStreamWriter(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required `stream_writer` (aioresponses#289)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", types.SimpleNamespace(output_size=0))
        super().__init__(*args, **kwargs)


@pytest.fixture
def mocked(monkeypatch: pytest.MonkeyPatch) -> Iterator[aioresponses]:
    """aioresponses, working on every aiohttp this project allows."""
    if "stream_writer" in inspect.signature(aiohttp.ClientResponse).parameters:
        monkeypatch.setattr(aioresponses_core, "ClientResponse", _ResponseWithStreamWriter)
    with aioresponses() as mock:
        yield mock


@pytest.fixture(autouse=True)
def _reset_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Logging and the registry of secrets to mask are process-wide: a test that runs the CLI
    in-process must not leave its level, renderer, stream or secrets to the tests after it."""
    monkeypatch.setattr(redaction, "SECRETS", redaction.Redactor())
    yield
    reset_logging()


@pytest.fixture
def fast_matomo_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Matomo's retry backoff in milliseconds, for tests whose servers fail on purpose."""
    monkeypatch.setattr(matomo, "BACKOFF_INITIAL_SECONDS", 0.001)
    monkeypatch.setattr(matomo, "BACKOFF_MAX_SECONDS", 0.002)


@pytest.fixture(autouse=True)
def _search_console_starts_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run with nothing learned starts Search Console at one query a second and doubles from
    there: right for a real night, seconds of ramp for every small test portfolio. Tests start
    at 100/s instead; tests about learning rates set START_RATE themselves."""
    monkeypatch.setattr(rates, "START_RATE", 100.0)
