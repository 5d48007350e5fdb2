"""An existing Supabase project: roles anon/authenticated/service_role, a non-superuser owner, a
Management Hub `sites` table with its own row level security. `migrate` adopts it without
touching its security, the job runs as the non-superuser owner, and the dashboard reads
daily_analytics only after the documented opt-in."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from aggregator import migrations, storage
from aggregator.dates import Window
from aggregator.demo import simulated_settings
from aggregator.local_postgres import dsn_with_search_path
from aggregator.pipeline import RunRequest, run_job
from aggregator.simulators import portfolio as world
from aggregator.status import queries, render
from aggregator.storage import DailyRow
from tests.factories import stored_rows
from tests.test_cli import aggregator, one_line_error
from tests.test_end_to_end import expected_gsc, expected_matomo

OWNER = "aggregator_test_owner"  # Supabase's `postgres`: owns the tables, not a superuser
HUB = "aggregator_test_hub"  # another owner, for tables the migrating role may not alter
PASSWORD = "owner-pw"
TODAY = date(2025, 6, 10)
WINDOW = Window(date(2025, 6, 6), date(2025, 6, 9))

# Roles are cluster-wide and other suites run at the same time: create each one only if it is
# missing, and take a concurrent creation as success.
_ROLES = f"""
do $$
declare
    wanted text[];
begin
    foreach wanted slice 1 in array array[
        array['anon', 'nologin'],
        array['authenticated', 'nologin'],
        array['service_role', 'nologin bypassrls'],
        array['{OWNER}', 'login nosuperuser nobypassrls password ''{PASSWORD}'''],
        array['{HUB}', 'login nosuperuser nobypassrls password ''{PASSWORD}''']
    ] loop
        begin
            execute format('create role %I %s', wanted[1], wanted[2]);
        exception when duplicate_object or unique_violation then
            null;
        end;
    end loop;
end
$$;
"""


@dataclasses.dataclass(frozen=True)
class SupabaseDb:
    schema: str
    admin: str  # superuser DSN (the test's own eyes)
    owner: str  # what the job connects with


def _as_user(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    netloc = f"{user}:{PASSWORD}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
async def supabase(server_dsn: str) -> AsyncIterator[SupabaseDb]:
    """A schema shaped like Supabase's `public`: owned by a non-superuser, its API roles granted
    usage, and the default privileges that give them every new table."""
    schema = f"sb_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(_ROLES)
        await admin.execute(f"create schema {schema} authorization {OWNER}")
        await admin.execute(f"grant usage on schema {schema} to anon, authenticated, service_role")
        await admin.execute(
            f"alter default privileges for role {OWNER} in schema {schema}"
            " grant all on tables to anon, authenticated, service_role"
        )
        yield SupabaseDb(
            schema=schema,
            admin=dsn_with_search_path(server_dsn, schema),
            owner=dsn_with_search_path(_as_user(server_dsn, OWNER), schema),
        )
    finally:
        await admin.execute(f"drop schema if exists {schema} cascade")
        await admin.close()


@contextlib.asynccontextmanager
async def connected(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


HUB_ID_VALUES: dict[str, Callable[[int], Any]] = {
    "uuid": lambda n: uuid.UUID(int=n * 7919),
    "bigint": lambda n: 10_000_000_000 + n,  # beyond integer: proves no int4 on the way
    "integer": lambda n: n * 3,
    "text": lambda n: f"hub-site-{n}",
}


async def create_hub_sites(conn: asyncpg.Connection, id_type: str, domains: list[str]) -> list:
    """The Management Hub's own sites table: its id type, its columns, its policy (authenticated
    users see the public sites only), its grants."""
    await conn.execute(
        f"""
        create table sites (
            id {id_type} primary key, domain text not null unique, name text,
            is_public boolean not null default false
        );
        alter table sites enable row level security;
        create policy hub_public_sites on sites for select to authenticated using (is_public);
        revoke all on sites from anon;
        """
    )
    ids = [HUB_ID_VALUES[id_type](n) for n in range(1, len(domains) + 1)]
    await conn.executemany(
        "insert into sites (id, domain, name, is_public) values ($1, $2, $3, $4)",
        [(i, d, d.upper(), n % 2 == 0) for n, (i, d) in enumerate(zip(ids, domains, strict=True))],
    )
    return ids


async def as_role(admin: str, role: str, query: str) -> list[asyncpg.Record]:
    async with connected(admin) as conn, conn.transaction():
        await conn.execute(f"set local role {role}")
        return await conn.fetch(query)


async def security_of(conn: asyncpg.Connection, schema: str) -> list[tuple]:
    """Everything `migrate` might change: tables, columns, owners, RLS, grants, policies."""
    rows = await conn.fetch(
        """
        select c.relname, c.relkind::text, pg_get_userbyid(c.relowner), c.relrowsecurity,
               c.relacl::text,
               (select string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod),
                                  ', ' order by a.attnum)
                from pg_attribute a
                where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped),
               (select string_agg(p.polname || ' ' || pg_get_expr(p.polqual, p.polrelid), ', ')
                from pg_policy p where p.polrelid = c.oid)
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = $1
        order by c.relname
        """,
        schema,
    )
    return [tuple(r) for r in rows]


@pytest.mark.parametrize("id_type", ["uuid", "bigint", "integer", "text"])
async def test_adopts_the_hub_sites_table_and_runs_as_a_non_superuser(
    supabase: SupabaseDb, id_type: str
) -> None:
    portfolio = world.make_portfolio(6, 2, unreachable_every=5)
    async with connected(supabase.owner) as owner:
        assert not await owner.fetchval(
            "select rolsuper from pg_roles where rolname = current_user"
        )
        ids = await create_hub_sites(owner, id_type, [s.domain for s in portfolio.sites])
        hub_view = "select id, domain, name, is_public from sites order by domain"
        before = await as_role(supabase.admin, "authenticated", hub_view)
        sites_before = [r for r in await security_of(owner, supabase.schema) if r[0] == "sites"]

        assert await migrations.apply_migrations(owner) == [
            p.stem for p in migrations.migration_files()
        ]
        # The Hub's table: only columns were added; its RLS, grants and policy are untouched.
        sites_after = [r for r in await security_of(owner, supabase.schema) if r[0] == "sites"]
        assert sites_after[0][:5] == sites_before[0][:5]
        assert sites_after[0][6] == sites_before[0][6]
        site_id_type = await owner.fetchval(
            "select format_type(atttypid, atttypmod) from pg_attribute"
            " where attrelid = 'daily_analytics'::regclass and attname = 'site_id'"
        )
        assert site_id_type == id_type

        # The portfolio, keyed by the Hub's own ids.
        portfolio = dataclasses.replace(
            portfolio,
            sites=tuple(
                dataclasses.replace(s, id=i) for s, i in zip(portfolio.sites, ids, strict=True)
            ),
        )
        await owner.executemany(
            "insert into gsc_accounts (id, email, refresh_token) values ($1, $2, $3)",
            [(a.id, a.email, a.refresh_token) for a in portfolio.accounts],
        )
        await owner.executemany(
            "update sites set deployed_at = '2024-01-01', matomo_site_id = $2,"
            " gsc_account_id = $3, gsc_property = $4 where id = $1",
            [
                (s.id, s.matomo_site_id, s.gsc_account_id, s.stored_property)
                for s in portfolio.sites
            ],
        )

        async with (
            world.matomo_simulator(portfolio, today=TODAY) as matomo,
            world.google_simulator(portfolio, today=TODAY, qps_per_account=50) as google,
        ):
            settings = simulated_settings(
                supabase.owner,
                matomo.url,
                google.url,
                gsc_max_qps_per_account=20,
                gsc_max_qps_per_client=100,
            )
            outcome = await run_job(settings, RunRequest(WINDOW))
            again = await run_job(
                settings, RunRequest(WINDOW, domains=(portfolio.sites[0].domain,))
            )
            want_matomo = expected_matomo(matomo, portfolio, WINDOW)
            want_gsc = expected_gsc(google, portfolio, WINDOW)
        assert outcome.rows_upserted > 0 and again.status == "ok"
        rows = await stored_rows(owner)
        assert {k: (r["matomo_visits"], r["matomo_actions"]) for k, r in rows.items()} == {
            k: want_matomo.get(k, (None, None)) for k in rows
        }
        assert set(want_matomo) <= set(rows)
        got_gsc = {
            k: (
                r["gsc_clicks"],
                r["gsc_impressions"],
                r["gsc_ctr"],
                r["gsc_position"],
                r["gsc_final"],
            )
            for k, r in rows.items()
            if r["gsc_final"] is not None
        }
        assert got_gsc == want_gsc
        # status reads the same sites and rows through the same ids.
        report = await queries.collect(settings, datetime(2025, 6, 10, 12, tzinfo=UTC))
        by_source = render.as_json(report, every_site=True)["sources"]
        assert by_source["matomo"]["sites"] == by_source["gsc"]["sites"] == len(ids)

    # The dashboard's view of sites is exactly what it was; the job's tables are closed to it.
    assert await as_role(supabase.admin, "authenticated", hub_view) == before
    for role in ("anon", "authenticated"):
        for table in ("gsc_accounts", "daily_analytics", "aggregator_runs"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await as_role(supabase.admin, role, f"select * from {table}")

    # The documented opt-in: authenticated reads the numbers of the sites it can read, only.
    async with connected(supabase.owner) as owner:
        assert await migrations.apply_migrations(owner, readers=["authenticated"]) == []
    seen = await as_role(
        supabase.admin, "authenticated", "select distinct site_id from daily_analytics"
    )
    public = {r["id"] for r in before if r["is_public"]}
    assert {r["site_id"] for r in seen} == {k[0] for k in rows} & public
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_role(supabase.admin, "anon", "select * from daily_analytics")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_role(supabase.admin, "authenticated", "select * from gsc_accounts")


async def test_a_new_project_gets_its_tables_secured(supabase: SupabaseDb) -> None:
    async with connected(supabase.owner) as owner:
        await migrations.apply_migrations(owner)
        secured = await owner.fetch(
            """
            select c.relname, c.relrowsecurity,
                   has_table_privilege('anon', c.oid, 'select') as anon,
                   has_table_privilege('authenticated', c.oid, 'select') as authenticated
            from pg_class c join pg_namespace n on n.oid = c.relnamespace
            where n.nspname = current_schema() and c.relkind = 'r'
            """
        )
    assert {r["relname"] for r in secured} >= {
        *migrations.EXPECTED_COLUMNS,
        "gsc_learned_rates",  # 004 leaves securing it to migrate, as every file does
        "aggregator_schema_migrations",
    }
    assert all(r["relrowsecurity"] and not r["anon"] and not r["authenticated"] for r in secured)


_DAILY_COLUMNS = (
    "matomo_visits integer, matomo_actions integer, gsc_clicks integer, gsc_impressions bigint,"
    " gsc_ctr double precision, gsc_position double precision, gsc_final boolean,"
    " matomo_updated_at timestamptz, gsc_updated_at timestamptz"
)

_GSC_ACCOUNTS = (
    "create table gsc_accounts (id bigint primary key, email text unique, refresh_token text,"
    " is_active boolean default true, last_refresh_at timestamptz, last_error text)"
)
CONFLICTS = {
    "a gsc_accounts the API roles can read": (
        f"{_GSC_ACCOUNTS}; grant select on gsc_accounts to anon, authenticated",
        OWNER,
        "table gsc_accounts: its rows (refresh tokens) are readable by anon, authenticated; fix: "
        "revoke all on gsc_accounts from anon, authenticated",
    ),
    "a gsc_accounts with row level security and a policy for anon": (
        f"{_GSC_ACCOUNTS}; grant select on gsc_accounts to anon, authenticated;"
        " alter table gsc_accounts enable row level security;"
        " create policy everyone on gsc_accounts for select to anon using (true)",
        OWNER,
        "table gsc_accounts: its rows (refresh tokens) are readable by anon; fix: revoke all on "
        "gsc_accounts from anon",
    ),
    "a column of the wrong type": (
        "create table sites (id bigint primary key, domain text unique, matomo_site_id text)",
        OWNER,
        "table sites, column matomo_site_id: is text, the aggregator needs integer; fix: alter "
        "table sites alter column matomo_site_id type integer using matomo_site_id::integer",
    ),
    "a site id of another type": (
        "create table sites (id numeric primary key, domain text)",
        OWNER,
        "table sites, column id: is numeric, but a site id must be one of bigint, integer, uuid,",
    ),
    "a site id without a key": (
        "create table sites (id uuid, domain text)",
        OWNER,
        "table sites, column id: no primary key or unique constraint on (id)",
    ),
    "a daily_analytics with another key": (
        "create table sites (id bigint primary key, domain text);"
        " create table daily_analytics (id bigint primary key, site_id bigint, date date, "
        f"{_DAILY_COLUMNS})",
        OWNER,
        "table daily_analytics, columns site_id, date: primary key daily_analytics_pkey is (id), "
        "but the aggregator needs primary key (site_id, date) and no narrower unique key (one "
        "row per site and day); fix: alter table daily_analytics drop constraint "
        "daily_analytics_pkey, add primary key (site_id, date)",
    ),
    "a daily_analytics keyed on the site alone, beside a unique (site_id, date)": (
        "create table sites (id bigint primary key, domain text);"
        f" create table daily_analytics (site_id bigint primary key, date date, {_DAILY_COLUMNS},"
        " unique (site_id, date), constraint one_day unique (date));"
        " create unique index one_visit_count on daily_analytics (matomo_visits)",
        OWNER,
        "table daily_analytics, columns site_id, date: primary key daily_analytics_pkey is "
        "(site_id), unique constraint one_day is (date), unique index one_visit_count is "
        "(matomo_visits), but the aggregator needs primary key (site_id, date) and no narrower "
        "unique key (one row per site and day); fix: drop index one_visit_count; alter table "
        "daily_analytics drop constraint one_day, drop constraint daily_analytics_pkey, add "
        "primary key (site_id, date)",
    ),
    "another key and missing columns: the key first": (
        "create table sites (id bigint primary key, domain text);"
        " create table daily_analytics (id bigint primary key, site_id bigint, date date,"
        " matomo_visits integer)",
        OWNER,
        "table daily_analytics, columns site_id, date: primary key daily_analytics_pkey is (id)",
    ),
    "a daily_analytics keyed on another site id type": (
        "create table sites (id uuid primary key, domain text);"
        f" create table daily_analytics (site_id bigint, date date, {_DAILY_COLUMNS},"
        " primary key (site_id, date))",
        OWNER,
        "table daily_analytics, column site_id: is bigint but sites.id is uuid; fix: alter table "
        "daily_analytics alter column site_id type uuid",
    ),
    "a sites table the migrating role may not alter": (
        "create table sites (id uuid primary key, domain text unique)",
        HUB,
        "table sites, columns is_active, deployed_at, matomo_site_id, gsc_account_id, "
        f"gsc_property: missing, and role {OWNER} may not add them (the table belongs to {HUB}); "
        f"fix: run migrate as {HUB}, or have {HUB} run: alter table sites add column is_active",
    ),
    "a bookkeeping table the role may not read": (
        "create table aggregator_schema_migrations (version text primary key)",
        HUB,
        "permission denied for table aggregator_schema_migrations",
    ),
}


async def build(admin: str, sql: str, owner: str) -> None:
    async with connected(admin) as conn:
        await conn.execute(sql)
        for row in await conn.fetch(
            "select tablename from pg_tables where schemaname = current_schema()"
        ):
            await conn.execute(f"alter table {row['tablename']} owner to {owner}")


@pytest.mark.parametrize("case", list(CONFLICTS))
async def test_a_conflict_is_one_line_with_the_fix_and_changes_nothing(
    supabase: SupabaseDb, case: str
) -> None:
    sql, table_owner, expected = CONFLICTS[case]
    await build(supabase.admin, sql, table_owner)
    async with connected(supabase.admin) as admin:
        before = await security_of(admin, supabase.schema)
        async with connected(supabase.owner) as owner:
            with pytest.raises(migrations.MigrationError) as refused:
                await migrations.apply_migrations(owner)
            with pytest.raises(migrations.MigrationError):
                await migrations.pending_sql(owner)
        assert await security_of(admin, supabase.schema) == before
    message = str(refused.value)
    first = message.removeprefix("cannot migrate, nothing was changed: ").removeprefix("(1) ")
    assert first.startswith(expected.removeprefix("(1) ")), message
    assert "\n" not in message


def test_migrate_exits_2_with_one_line_on_a_conflict(supabase: SupabaseDb, tmp_path: Path) -> None:
    import asyncio

    asyncio.run(build(supabase.admin, CONFLICTS["a column of the wrong type"][0], OWNER))
    line = one_line_error(aggregator("migrate", env={"DATABASE_URL": supabase.owner}, cwd=tmp_path))
    assert "table sites, column matomo_site_id: is text" in line
    assert PASSWORD not in line


async def test_the_printed_fixes_of_a_site_keyed_daily_analytics_make_it_work(
    supabase: SupabaseDb, tmp_path: Path
) -> None:
    """A daily_analytics keyed on site_id alone passed once a unique (site_id, date) stood beside
    its key, and every run then failed: the fixes migrate prints, applied as printed, now end in
    a table that keeps one row per site and day."""
    await build(
        supabase.admin,
        "create table sites (id bigint primary key, domain text unique);"
        " create table daily_analytics (site_id bigint, date date, visits int,"
        " primary key (site_id))",
        OWNER,
    )
    env = {"DATABASE_URL": supabase.owner}
    line = one_line_error(aggregator("migrate", env=env, cwd=tmp_path))
    assert "drop constraint daily_analytics_pkey, add primary key (site_id, date)" in line
    assert "more" not in line
    fixes = re.findall(r"fix: (.*?)(?= \(\d+\) table |$)", line)
    assert len(fixes) == 2, line
    async with connected(supabase.owner) as owner:
        for fix in fixes:
            await owner.execute(fix)
    applied = aggregator("migrate", env=env, cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr
    async with connected(supabase.owner) as owner:
        await owner.execute("insert into sites (id, domain) values (1, 'a.example')")
        days = [DailyRow(1, date(2025, 6, d), matomo=(d, 2 * d)) for d in (8, 9)]
        assert await storage.upsert_daily_rows(owner, days) == 2
        stored = await owner.fetch("select date, matomo_visits from daily_analytics order by date")
    assert [(r["date"], r["matomo_visits"]) for r in stored] == [
        (date(2025, 6, 8), 8),
        (date(2025, 6, 9), 9),
    ]


async def test_the_sequences_of_created_tables_are_closed_to_the_api_roles(
    supabase: SupabaseDb,
) -> None:
    """Supabase grants the API roles every new sequence by default: migrate closes those of the
    tables it creates, and leaves those of a table it adopts."""
    async with connected(supabase.admin) as admin:
        await admin.execute(
            f"alter default privileges for role {OWNER} in schema {supabase.schema}"
            " grant all on sequences to anon, authenticated"
        )
    async with connected(supabase.owner) as owner:
        await owner.execute(
            "create table sites (id bigint generated by default as identity primary key,"
            " domain text unique)"
        )
        await migrations.apply_migrations(owner)
        sequences = await owner.fetch(
            """
            select c.relname,
                   has_sequence_privilege('anon', c.oid, 'usage') as anon,
                   has_sequence_privilege('authenticated', c.oid, 'usage') as authenticated
            from pg_class c join pg_namespace n on n.oid = c.relnamespace
            where n.nspname = current_schema() and c.relkind = 'S'
            """
        )
    opened = {r["relname"]: (r["anon"], r["authenticated"]) for r in sequences}
    assert opened == {
        "gsc_accounts_id_seq": (False, False),
        "aggregator_runs_id_seq": (False, False),
        "sites_id_seq": (True, True),  # the adopted table's: not migrate's to change
    }


async def test_a_failing_migration_leaves_nothing_behind(
    supabase: SupabaseDb, tmp_path: Path
) -> None:
    for path in migrations.migration_files():
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "999_broken.sql").write_text("create table broken (x int);\nselect 1 / 0;\n")
    async with connected(supabase.owner) as owner:
        with pytest.raises(migrations.MigrationError) as refused:
            await migrations.apply_migrations(owner, tmp_path)
        assert await security_of(owner, supabase.schema) == []
    assert str(refused.value) == (
        "migration 999_broken cannot apply, nothing was changed: division by zero"
    )


async def test_printed_sql_applied_elsewhere_is_recognised(
    supabase: SupabaseDb, tmp_path: Path
) -> None:
    async with connected(supabase.owner) as owner:
        await create_hub_sites(owner, "uuid", ["a.example", "b.example"])
        script = await migrations.pending_sql(owner, readers=["authenticated"])
        # What `supabase db push` does with a file in supabase/migrations/: one transaction.
        async with owner.transaction():
            await owner.execute(script)
        assert await migrations.pending_sql(owner) == (
            "-- aggregator: nothing to apply, the schema is up to date\n"
        )
        assert await migrations.apply_migrations(owner) == []
        assert (
            await owner.fetchval(
                "select format_type(atttypid, atttypmod) from pg_attribute"
                " where attrelid = 'daily_analytics'::regclass and attname = 'site_id'"
            )
            == "uuid"
        )
    assert await as_role(supabase.admin, "authenticated", "select * from daily_analytics") == []


async def test_read_grant_needs_a_role_that_can_read_sites(supabase: SupabaseDb) -> None:
    async with connected(supabase.owner) as owner:
        with pytest.raises(migrations.MigrationError, match="no such role in this database"):
            await migrations.apply_migrations(owner, readers=["dashboard_nobody"])
        # A new project: the sites table migrate creates is closed to authenticated too.
        with pytest.raises(
            migrations.MigrationError, match="fix: grant select on sites to authenticated"
        ):
            await migrations.apply_migrations(owner, readers=["authenticated"])
        assert await security_of(owner, supabase.schema) == []


async def test_migrate_sql_prints_the_script_and_changes_nothing(
    supabase: SupabaseDb, tmp_path: Path
) -> None:
    env = {"DATABASE_URL": supabase.owner}
    printed = aggregator("migrate", "--sql", "--grant-read", "service_role", env=env, cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert "create table if not exists daily_analytics" in printed.stdout
    assert (
        "insert into aggregator_schema_migrations (version) values ('001_schema')" in printed.stdout
    )
    assert 'grant select on daily_analytics to "service_role"' in printed.stdout
    async with connected(supabase.admin) as admin:
        assert await security_of(admin, supabase.schema) == []
    applied = aggregator("migrate", env=env, cwd=tmp_path)
    assert applied.returncode == 0 and "applied 001_schema" in applied.stdout


async def test_an_upgrade_secures_the_bookkeeping_table_of_older_versions(
    supabase: SupabaseDb, tmp_path: Path
) -> None:
    first = migrations.migration_files()[0]
    (tmp_path / first.name).write_text(first.read_text())
    async with connected(supabase.owner) as owner:
        await migrations.apply_migrations(owner, tmp_path)
        # What versions before the epilogue left: the bookkeeping table open to the API roles.
        await owner.execute(
            "alter table aggregator_schema_migrations disable row level security;"
            " grant all on aggregator_schema_migrations to anon, authenticated"
        )
        assert await migrations.apply_migrations(owner) == [
            p.stem for p in migrations.migration_files()[1:]
        ]
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_role(supabase.admin, "anon", "select * from aggregator_schema_migrations")


def facts(**tables: migrations.TableFacts) -> migrations.CatalogFacts:
    return migrations.CatalogFacts(schema="public", role="job", may_create=False, tables=tables)


def table(columns: dict[str, str], *, owned: bool = True, keys=()) -> migrations.TableFacts:
    return migrations.TableFacts(
        owner="job" if owned else "hub",
        owned=owned,
        columns=columns,
        keys=tuple(
            migrations.UniqueKey(f"key_{n}", frozenset(k), primary=n == 0)
            for n, k in enumerate(keys)
        ),
        may_reference_id=owned,
        readable=owned,
    )


def test_a_role_that_may_not_create_tables_is_told_how_to_fix_it() -> None:
    (line,) = migrations.schema_conflicts(facts())
    assert line == (
        "schema public: role job may not create tables in it (table gsc_accounts is missing); "
        "fix: grant create on schema public to job, or run migrate as the schema's owner "
        "(on Supabase: postgres)"
    )


def test_a_sites_table_of_another_owner_must_be_readable_and_referenceable() -> None:
    sites = table(
        dict.fromkeys(migrations.EXPECTED_COLUMNS["sites"], "text"), owned=False, keys=[["id"]]
    )
    found = migrations.schema_conflicts(dataclasses.replace(facts(sites=sites), may_create=True))
    assert found == [
        "table sites, column is_active: is text, the aggregator needs boolean; fix: alter table "
        "sites alter column is_active type boolean using is_active::boolean (or rename the "
        "column and run migrate again)",
        "table sites, column deployed_at: is text, the aggregator needs timestamp with time "
        "zone; fix: alter table sites alter column deployed_at type timestamp with time zone "
        "using deployed_at::timestamp with time zone (or rename the column and run migrate "
        "again)",
        "table sites, column matomo_site_id: is text, the aggregator needs integer; fix: alter "
        "table sites alter column matomo_site_id type integer using matomo_site_id::integer (or "
        "rename the column and run migrate again)",
        "table sites, column gsc_account_id: is text, the aggregator needs bigint; fix: alter "
        "table sites alter column gsc_account_id type bigint using gsc_account_id::bigint (or "
        "rename the column and run migrate again)",
        "table sites: role job may not read it (it belongs to hub); fix: grant select on sites "
        "to job, or connect as hub",
        "table sites, column id: role job may not reference it from daily_analytics.site_id; "
        "fix: grant references (id) on sites to job, or run migrate as hub",
    ]
    assert migrations.owner_conflicts(facts(sites=sites)) == []
    runs = table(dict.fromkeys(migrations.EXPECTED_COLUMNS["aggregator_runs"], "x"), owned=False)
    assert migrations.owner_conflicts(facts(aggregator_runs=runs)) == [
        "table aggregator_runs: belongs to role hub, and the aggregator must own the tables it "
        "writes; fix: run migrate as hub, or alter table aggregator_runs owner to job"
    ]


def test_a_wrong_key_or_type_is_reported_before_the_columns_to_add() -> None:
    daily = table(
        {"id": "bigint", "site_id": "bigint", "date": "date", "gsc_ctr": "text"}, keys=[["id"]]
    )
    sites = table({"id": "bigint", "domain": "text"}, owned=False, keys=[["id"]])
    found = migrations.schema_conflicts(
        dataclasses.replace(facts(sites=sites, daily_analytics=daily), may_create=True)
    )
    firsts = [line.split(":")[0] for line in found[:4]]
    assert firsts == [
        "table daily_analytics, columns site_id, date",  # the key
        "table daily_analytics, column gsc_ctr",  # the type
        "table sites, columns is_active, deployed_at, matomo_site_id, gsc_account_id, "
        "gsc_property",  # then what to add, table by table
        "table daily_analytics, columns matomo_visits, matomo_actions, gsc_clicks, "
        "gsc_impressions, gsc_position, gsc_final, matomo_updated_at, gsc_updated_at",
    ]
    keyless = table({"domain": "text"})
    (line, *_) = migrations.schema_conflicts(facts(sites=keyless))
    assert line.startswith("table sites, column id: missing, and every site is keyed by it")


async def test_printed_sql_with_a_read_grant_is_refused_where_migrate_refuses_it(
    supabase: SupabaseDb,
) -> None:
    """A project without sites: the sites the migrations create is closed to the API roles, so
    `--grant-read authenticated` could only give the dashboard permission errors. `migrate`
    refuses it, and `--sql` (which prints what migrate would apply) refuses it alike instead
    of printing a script with that grant; neither changes anything."""
    async with connected(supabase.owner) as owner:
        with pytest.raises(migrations.MigrationError) as applied:
            await migrations.apply_migrations(owner, readers=["authenticated"])
        with pytest.raises(migrations.MigrationError) as printed:
            await migrations.pending_sql(owner, readers=["authenticated"])
        assert await owner.fetchval("select to_regclass('sites') is null")
    assert str(printed.value) == str(applied.value)
    assert "role authenticated cannot read table sites" in str(printed.value)
