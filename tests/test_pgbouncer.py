"""Through a real PgBouncer in transaction mode, as Supabase's transaction pooler (port 6543).

In transaction mode every transaction may run on a different server connection, so anything
that outlives a transaction on the server (named prepared statements above all) breaks. The
fixture starts PgBouncer 127.0.0.1 on a free port in front of the test server, with a pool
smaller than the job's own connection pool so that statements really do hop between backends.

asyncpg sends `?search_path=` as a startup parameter, which PgBouncer cannot forward (it is
listed in ignore_startup_parameters), so these tests use a database of their own instead of
the per-test schema the other tests use.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import asyncpg
import pytest

from aggregator import migrations, storage
from aggregator.config import Secret
from aggregator.dates import Window
from aggregator.demo import simulated_settings
from aggregator.pipeline import RunRequest, run_job
from aggregator.simulators import portfolio as world

TODAY = date(2025, 6, 10)
WINDOW = Window(date(2025, 6, 1), date(2025, 6, 9))
POOL_SIZE = 2  # server connections per (database, user): fewer than the job's pool of 4
STARTUP_SECONDS = 15.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _upstream(server_dsn: str) -> dict[str, str]:
    """host, port, user and password of the test server, as PgBouncer's [databases] wants them;
    an embedded server on a Unix socket is reached through its socket directory."""
    parts = urlsplit(server_dsn)
    query = parse_qs(parts.query)
    host = (query.get("host") or [parts.hostname or ""])[0] or "127.0.0.1"
    port = str(parts.port or (query.get("port") or ["5432"])[0])
    if host.startswith("/") and not parts.port:
        sockets = sorted(Path(host).glob(".s.PGSQL.*"))
        if sockets:
            port = sockets[0].name.rsplit(".", 1)[1]
    return {
        "host": host,
        "port": port,
        "user": parts.username or "postgres",
        "password": parts.password or "",
    }


def _run_as(upstream_host: str) -> list[str]:
    """PgBouncer refuses to run as root: drop to the owner of the upstream's socket directory
    (an embedded server's is private to its own user), else `postgres` (or `nobody`)."""
    if os.geteuid() != 0:
        return []
    if upstream_host.startswith("/"):
        owner = pwd.getpwuid(Path(upstream_host).stat().st_uid).pw_name
        if owner != "root":
            return ["-u", owner]
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return ["-u", user]
    pytest.fail("running as root and neither user `postgres` nor `nobody` exists for PgBouncer")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Bouncer:
    def __init__(self, port: int, database: str, user: str, password: str, direct: str) -> None:
        self.port = port
        self.database = database
        self.user = user
        self.password = password
        self.direct = direct  # the same database, straight to the server (for setup/checks)
        self._process: subprocess.Popen[bytes] | None = None
        self._command: list[str] = []
        self._workdir = Path()

    def start(self, command: list[str], workdir: Path) -> None:
        self._command, self._workdir = command, workdir
        process = self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + STARTUP_SECONDS
        while not _accepts(self.port):
            if process.poll() is not None or time.monotonic() > deadline:
                output = process.stdout.read().decode(errors="replace") if process.stdout else ""
                log = workdir / "pgbouncer.log"
                output += log.read_text(errors="replace") if log.exists() else ""
                pytest.fail(f"pgbouncer did not start on 127.0.0.1:{self.port}:\n{output[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()

    def restart(self) -> None:
        """What a pooler restart does to its clients: every connection through it is cut."""
        self.stop()
        self.start(self._command, self._workdir)

    def dsn(self, query: str = "") -> str:
        auth = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}@"
        return f"postgresql://{auth}127.0.0.1:{self.port}/{self.database}{query}"


async def _admin(server_dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pgbouncer(server_dsn: str) -> Iterator[Bouncer]:
    """PgBouncer in transaction mode in front of a database created for this session."""
    binary = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None
    )
    if binary is None:
        pytest.fail(
            "pgbouncer is not installed: `apt-get install -y pgbouncer` (.ci/run does this); "
            "the transaction-pooler tests need it"
        )
    upstream = _upstream(server_dsn)
    database = f"agg_pgb_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(server_dsn, f"create database {database}"))
    workdir = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    workdir.chmod(0o777)  # PgBouncer may run as another user and writes its log here
    port = _free_port()
    password = upstream["password"].replace("'", "''")
    login = f"user={upstream['user']}" + (f" password='{password}'" if password else "")
    (workdir / "userlist.txt").write_text(f'"{upstream["user"]}" ""\n')
    config = workdir / "pgbouncer.ini"
    config.write_text(
        f"""[databases]
{database} = host={upstream["host"]} port={upstream["port"]} dbname={database} {login}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir / "userlist.txt"}
pool_mode = transaction
default_pool_size = {POOL_SIZE}
max_client_conn = 100
ignore_startup_parameters = extra_float_digits,search_path,options
logfile = {workdir / "pgbouncer.log"}
pidfile = {workdir / "pgbouncer.pid"}
"""
    )
    for path in workdir.iterdir():
        path.chmod(0o644)
    command = [binary, *_run_as(upstream["host"]), str(config)]
    direct = _database_dsn(server_dsn, database)
    bouncer = Bouncer(port, database, upstream["user"], upstream["password"], direct)
    try:
        bouncer.start(command, workdir)
        yield bouncer
    finally:
        bouncer.stop()
        asyncio.run(_admin(server_dsn, f"drop database if exists {database} with (force)"))
        shutil.rmtree(workdir, ignore_errors=True)


def _database_dsn(server_dsn: str, database: str) -> str:
    parts = urlsplit(server_dsn)
    return parts._replace(path=f"/{database}").geturl()


async def _backend_pids_seen(dsn: str, statements: int) -> set[int]:
    pool = await storage.connect(Secret(dsn))
    try:

        async def one(n: int) -> int:
            async with pool.acquire() as conn:
                # Two round trips in one transaction: what the job's upsert relies on.
                async with conn.transaction():
                    pid = await conn.fetchval("select pg_backend_pid()")
                    assert await conn.fetchval("select $1::int + 1", n) == n + 1
                    await asyncio.sleep(0.001)
                    assert await conn.fetchval("select pg_backend_pid()") == pid
                # And outside one: each statement may land on another backend.
                assert await conn.fetchval("select $1::text", f"v{n}") == f"v{n}"
                return pid

        return set(await asyncio.gather(*(one(n) for n in range(200))))
    finally:
        await pool.close()


async def test_pipeline_runs_through_a_transaction_pooler(pgbouncer: Bouncer) -> None:
    dsn = pgbouncer.dsn()
    pool = await storage.connect(Secret(dsn))
    try:
        async with pool.acquire() as conn:
            await migrations.apply_migrations(conn)
            again = await migrations.apply_migrations(conn)
            assert again == []
            portfolio = world.make_portfolio(40, 3, revoked_account=True)
            await world.seed_portfolio(conn, portfolio)
    finally:
        await pool.close()

    async with (
        world.matomo_simulator(portfolio, today=TODAY) as matomo,
        world.google_simulator(portfolio, today=TODAY, qps_per_account=50) as google,
    ):
        settings = simulated_settings(
            dsn, matomo.url, google.url, gsc_max_qps_per_account=20, gsc_max_qps_per_client=100
        )
        first = await run_job(settings, RunRequest(WINDOW))
        second = await run_job(settings, RunRequest(WINDOW))

    assert first.status == "partial"  # the revoked account's sites, nothing else
    assert {e.source for e in first.errors} == {"gsc"}
    assert first.rows_upserted > 0 and second.rows_upserted == first.rows_upserted
    direct = await asyncpg.connect(pgbouncer.direct)
    try:
        stored = await direct.fetchval("select count(*) from daily_analytics")
        with_matomo = await direct.fetchval(
            "select count(*) from daily_analytics where matomo_visits is not null"
        )
        with_gsc = await direct.fetchval(
            "select count(*) from daily_analytics where gsc_final is not null"
        )
        runs = await direct.fetch("select status, finished_at from aggregator_runs order by id")
    finally:
        await direct.close()
    matomo_sites = sum(1 for s in portfolio.sites if s.matomo_site_id is not None)
    assert with_matomo == matomo_sites * len(WINDOW.days())
    assert with_gsc > 0 and stored == first.rows_upserted
    assert [r["status"] for r in runs] == ["partial", "partial"]
    assert all(r["finished_at"] is not None for r in runs)


async def test_many_concurrent_statements_share_few_backends(pgbouncer: Bouncer) -> None:
    """200 concurrent transactions from the job's pool over 2 server connections: with named
    prepared statements this fails within a few statements; with the job's settings it does not."""
    pids = await _backend_pids_seen(pgbouncer.dsn(), 200)
    assert 1 <= len(pids) <= POOL_SIZE


async def test_the_pooler_really_breaks_named_prepared_statements(pgbouncer: Bouncer) -> None:
    """The failure mode the job avoids, reproduced: asyncpg's default statement cache prepares
    a named statement on one backend and later finds another backend without it."""
    naive = await asyncpg.connect(pgbouncer.dsn())  # default statement_cache_size=100
    other = await asyncpg.connect(pgbouncer.dsn())
    try:
        assert await naive.fetchval("select 41 + 1") == 42  # prepared on the idle backend
        async with other.transaction():  # pins that backend (PgBouncer reuses it first)
            await other.fetchval("select 1")
            with pytest.raises(asyncpg.exceptions.InvalidSQLStatementNameError):
                await naive.fetchval("select 41 + 1")  # cached: only Bind/Execute sent
    finally:
        await naive.close()
        await other.close()

    # The same sequence with the job's connection settings.
    pool = await storage.connect(Secret(pgbouncer.dsn()))
    try:
        async with pool.acquire() as first, pool.acquire() as second:
            assert await first.fetchval("select 41 + 1") == 42
            async with second.transaction():
                await second.fetchval("select 1")
                assert await first.fetchval("select 41 + 1") == 42
    finally:
        await pool.close()


async def test_sslmode_require_is_honoured_not_downgraded(pgbouncer: Bouncer) -> None:
    """PgBouncer here speaks no TLS. `sslmode=require` must refuse to continue in plain text
    (one clear StorageError) where the default `prefer` would silently fall back."""
    plain = await storage.connect(Secret(pgbouncer.dsn("?sslmode=prefer")))
    await plain.close()
    with pytest.raises(storage.StorageError) as caught:
        await storage.connect(Secret(pgbouncer.dsn("?sslmode=require")))
    message = str(caught.value)
    assert "\n" not in message
    assert f"127.0.0.1:{pgbouncer.port}/{pgbouncer.database}" in message
    assert "rejected SSL upgrade" in message and "sslmode=require" in message
