"""No secret in any output or table, whatever happens: real processes with debug logging.

Every secret gets a distinctive value (with characters that URL-encoding changes, since a
server that echoes a form body echoes it encoded), then successful and failing runs go
through the real command line. stdout, stderr and every text/json column of every table of
the schema are searched for each value in every spelling.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from urllib.parse import parse_qs, quote, quote_plus, urlsplit

import asyncpg
import pytest
from aiohttp import web

from aggregator.simulators import GoogleSimulator, MatomoSimulator, SimAccount, SimServer
from aggregator.simulators import portfolio as world
from tests.test_signals import FROM, TO, TODAY, job_environment, run_job_process

MATOMO_TOKEN = "mtok/S3CRET+matomo=1a"
CLIENT_SECRET = "GOCSPX-S3CRET/client+secret="
WRONG_CLIENT_SECRET = "GOCSPX-WR0NG/client+secret="
TABLE_REFRESH_TOKEN = "1//0gS3CRET-table-refresh+token"
ENV_REFRESH_TOKEN = "1//0gS3CRET-env-refresh+token"
REVOKED_REFRESH_TOKEN = "1//0gS3CRET-revoked-refresh+token"
DB_PASSWORD = "pg/S3CRET+pass=word"
SECRETS = (
    MATOMO_TOKEN,
    CLIENT_SECRET,
    WRONG_CLIENT_SECRET,
    TABLE_REFRESH_TOKEN,
    ENV_REFRESH_TOKEN,
    REVOKED_REFRESH_TOKEN,
    DB_PASSWORD,
)
ACCESS_TOKEN_PREFIX = "ya29.sim-"  # every access token the Google simulator mints


def spellings(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]}


def leaks(text: str) -> list[str]:
    found = [s for secret in SECRETS for s in spellings(secret) if s in text]
    if ACCESS_TOKEN_PREFIX in text:
        found.append(ACCESS_TOKEN_PREFIX)
    return found


class EchoingMatomo(SimServer):
    """A Matomo that answers every sub-request with an error quoting the whole request body
    (form-encoded token included), as some PHP error pages and proxies do."""

    def build_app(self) -> web.Application:
        app = self._new_app()
        app.router.add_route("*", "/index.php", self._echo)
        return app

    async def _echo(self, request: web.Request) -> web.Response:
        raw = (await request.read()).decode()
        form = parse_qs(raw)
        message = f"Invalid request {raw} token_auth={form.get('token_auth', ['?'])[0]}"
        subrequests = [k for k in form if k.startswith("urls[")]
        return web.json_response([{"result": "error", "message": message}] * len(subrequests))


class EchoingTokenEndpoint(GoogleSimulator):
    """Google's token endpoint, but its errors quote the request body."""

    async def _token(self, request: web.Request) -> web.StreamResponse:
        raw = (await request.read()).decode()
        body = {"error": "invalid_grant", "error_description": f"bad request: {raw}"}
        return web.json_response(body, status=400)


@dataclasses.dataclass
class World:
    db: str  # the schema's DSN as the test server user
    secret_db: str  # the same, as a role whose password is DB_PASSWORD
    schema: str
    portfolio: world.Portfolio


def _with_login(dsn: str, user: str, password: str) -> str:
    parts = urlsplit(dsn)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}{port}"
    return parts._replace(netloc=netloc).geturl()


@pytest.fixture
async def secret_world(db: str, server_dsn: str):
    base = world.make_portfolio(12, 3, revoked_account=True)
    tokens = (TABLE_REFRESH_TOKEN, ENV_REFRESH_TOKEN, REVOKED_REFRESH_TOKEN)
    accounts = tuple(
        dataclasses.replace(account, refresh_token=token)
        for account, token in zip(base.accounts, tokens, strict=True)
    )
    portfolio = dataclasses.replace(base, accounts=accounts)
    role = f"agg_secret_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    conn = await asyncpg.connect(db)
    try:
        await admin.execute(f"create role {role} login superuser password '{DB_PASSWORD}'")
        await world.seed_portfolio(conn, portfolio)
        # Account 2's token comes only from GSC_REFRESH_TOKEN_2.
        await conn.execute("update gsc_accounts set refresh_token = null where id = 2")
        schema = await conn.fetchval("select current_schema()")
        yield World(db, _with_login(db, role, DB_PASSWORD), schema, portfolio)
    finally:
        await conn.close()
        await admin.execute(f"drop role if exists {role}")
        await admin.close()


def _matomo(portfolio: world.Portfolio) -> MatomoSimulator:
    sites = {s.matomo_site_id: "UTC" for s in portfolio.sites if s.matomo_site_id is not None}
    return MatomoSimulator(token=MATOMO_TOKEN, sites=sites, seed=1, today=TODAY)


def _google(portfolio: world.Portfolio, cls=GoogleSimulator) -> GoogleSimulator:
    template = world.google_simulator(portfolio)
    return cls(
        client_id=world.CLIENT_ID,
        client_secret=CLIENT_SECRET,
        accounts={
            token: SimAccount(a.email, a.properties, a.revoked)
            for token, a in template.accounts.items()
        },
        today=TODAY,
    )


async def _table_text(dsn: str, schema: str) -> str:
    """Every text-like value of every table in the schema, except the refresh tokens the
    operator stored on purpose."""
    conn = await asyncpg.connect(dsn)
    try:
        columns = await conn.fetch(
            """
            select table_name, column_name from information_schema.columns
            where table_schema = $1
              and data_type in ('text', 'character varying', 'json', 'jsonb', 'ARRAY')
            order by table_name, column_name
            """,
            schema,
        )
        assert {c["table_name"] for c in columns} >= {"aggregator_runs", "gsc_accounts", "sites"}
        chunks = []
        for column in columns:
            if (column["table_name"], column["column_name"]) == ("gsc_accounts", "refresh_token"):
                continue
            values = await conn.fetch(
                f'select "{column["column_name"]}"::text as v from "{column["table_name"]}"'
            )
            chunks.extend(
                f"{column['table_name']}.{column['column_name']}: {r['v']}" for r in values
            )
        return "\n".join(chunks)
    finally:
        await conn.close()


def _env(w: World, matomo_url: str, google_url: str, **extra: str) -> dict[str, str]:
    return job_environment(
        w.secret_db,
        matomo_url,
        google_url,
        matomo_token=MATOMO_TOKEN,
        client_secret=CLIENT_SECRET,
        GSC_REFRESH_TOKEN_2=ENV_REFRESH_TOKEN,
        HTTP_MAX_ATTEMPTS="2",
        **extra,
    )


WINDOW = ("--from", f"{FROM}", "--to", f"{TO}", "-v")


async def test_no_secret_in_output_or_tables_on_success_or_failure(secret_world, tmp_path: Path):
    w = secret_world
    outputs: dict[str, str] = {}

    def record(name: str, result, expected: int) -> None:
        assert result.returncode == expected, f"{name}: {result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr, name
        outputs[name] = result.stdout + result.stderr

    async with _matomo(w.portfolio) as matomo, _google(w.portfolio) as google:
        ok = await run_job_process(
            _env(w, matomo.url, google.url), tmp_path, *WINDOW, "--source", "matomo"
        )
        record("matomo only", ok, 0)
        # Both sources; account 3 is revoked, account 2 uses the environment's token.
        partial = await run_job_process(_env(w, matomo.url, google.url), tmp_path, *WINDOW)
        record("revoked account", partial, 1)
        assert google.token_requests_by_account["seo-team-2@demo.example"] >= 1
        wrong = await run_job_process(
            _env(w, matomo.url, google.url, GOOGLE_CLIENT_SECRET=WRONG_CLIENT_SECRET),
            tmp_path,
            *WINDOW,
            "--source",
            "gsc",
        )
        record("wrong client secret", wrong, 1)
        assert "GOOGLE_CLIENT_ID/GOOGLE_CLIENT_SECRET" in wrong.stdout

    async with EchoingMatomo() as echo, _google(w.portfolio, EchoingTokenEndpoint) as google:
        echoed = await run_job_process(_env(w, echo.url, google.url), tmp_path, *WINDOW)
        record("servers echoing the request", echoed, 1)
        assert "Invalid request" in echoed.stdout and "bad request" in echoed.stdout

    unreachable = _with_login("postgresql://127.0.0.1:1/nowhere", "postgres", DB_PASSWORD)
    down = await run_job_process(
        job_environment(unreachable, "http://127.0.0.1:1", "http://127.0.0.1:1"),
        tmp_path,
        *WINDOW,
    )
    record("unreachable database", down, 2)

    for name, text in outputs.items():
        assert not leaks(text), f"{name} printed {leaks(text)}:\n{text[-3000:]}"
    tables = await _table_text(w.db, w.schema)
    assert "aggregator_runs.errors" in tables and "gsc_accounts.last_error" in tables
    assert not leaks(tables), f"tables hold {leaks(tables)}"
