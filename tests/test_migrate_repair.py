"""`migrate` adds back the columns of its tables that were dropped after their migration was
recorded, as that migration defined them, and refuses in one line, changing nothing, a column
it cannot make up for the rows a table holds."""

from __future__ import annotations

import asyncpg
import pytest

from aggregator import column_repair, migrations
from tests.factories import add_account, add_site
from tests.test_cli import aggregator, one_line_error
from tests.test_supabase import (
    HUB,
    OWNER,
    SupabaseDb,
    connected,
    create_hub_sites,
    supabase,  # noqa: F401 (a fixture)
)

TABLES = list(column_repair.COLUMNS)

_COLUMNS = """
select c.relname || '.' || a.attname as name, format_type(a.atttypid, a.atttypmod) as type,
       a.attnotnull as not_null, pg_get_expr(d.adbin, d.adrelid) as default_value
from pg_attribute a
join pg_class c on c.oid = a.attrelid
join pg_namespace n on n.oid = c.relnamespace and n.nspname = current_schema()
left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
where c.relname = any($1::text[]) and a.attnum > 0 and not a.attisdropped
"""
_CONSTRAINTS = """
select c.relname as table, pg_get_constraintdef(o.oid) as definition
from pg_constraint o
join pg_class c on c.oid = o.conrelid
join pg_namespace n on n.oid = c.relnamespace and n.nspname = current_schema()
where c.relname = any($1::text[])
"""


async def schema_of(conn: asyncpg.Connection) -> tuple[dict, set]:
    """Every column (type, not null, default) and constraint of the job's tables."""
    columns = {r["name"]: tuple(r)[1:] for r in await conn.fetch(_COLUMNS, TABLES)}
    constraints = {tuple(r) for r in await conn.fetch(_CONSTRAINTS, TABLES)}
    return columns, constraints


async def fill_every_table(conn: asyncpg.Connection) -> None:
    """A row in each table: columns added back must fit the rows already there."""
    account = await add_account(conn, "team@example.com")
    site = await add_site(conn, "example.com", matomo_site_id=1, gsc_account_id=account)
    await conn.execute(
        "insert into daily_analytics (site_id, date, matomo_visits) values ($1, '2026-01-01', 3)",
        site,
    )
    await conn.execute("insert into aggregator_runs (status) values ('ok')")
    await conn.execute(
        "insert into gsc_learned_rates (scope, key, queries_per_second) values ('client', 'c', 2)"
    )


def test_every_column_of_the_job_tables_is_known() -> None:
    """Each column required by run, status or check has a way back (or a refusal) here."""
    for table, columns in migrations.required_columns().items():
        assert set(columns) <= set(column_repair.COLUMNS[table]), table


async def test_every_column_a_fresh_migrate_creates_is_known(conn) -> None:
    fresh, _ = await schema_of(conn)
    known = {f"{t}.{c}" for t, columns in column_repair.COLUMNS.items() for c in columns}
    assert set(fresh) == known


async def test_migrate_adds_back_every_dropped_column_as_its_migration_made_it(
    db, conn, tmp_path
) -> None:
    await fill_every_table(conn)
    fresh = await schema_of(conn)
    dropped = [
        name
        for table, columns in column_repair.COLUMNS.items()
        for name in (f"{table}.{column}" for column in columns)
        if column_repair.repairable(name)
    ]
    for name in dropped:
        table, _, column = name.partition(".")
        await conn.execute(f"alter table {table} drop column {column}")
    env = {"DATABASE_URL": db}
    # run and status stop in one line that says migrate is the fix.
    line = one_line_error(aggregator("status", env=env, cwd=tmp_path))
    assert line.endswith("run `aggregator migrate`: it adds the column back")

    printed = aggregator("migrate", "--sql", env=env, cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert "alter table daily_analytics add column if not exists gsc_final boolean;" in (
        printed.stdout
    )
    assert await schema_of(conn) != fresh  # --sql changes nothing

    migrated = aggregator("migrate", env=env, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.startswith(f"added back {', '.join(dropped)} to ")
    assert await schema_of(conn) == fresh
    # The rows are kept (a dropped column's values are gone; defaults fill required ones).
    assert (
        await conn.fetchval("select count(*) from daily_analytics where date = '2026-01-01'") == 1
    )
    assert await conn.fetchval(
        "select is_active and stats = '{}' from gsc_accounts, aggregator_runs"
    )
    again = aggregator("migrate", env=env, cwd=tmp_path)
    assert again.returncode == 0 and "is up to date" in again.stdout, again.stdout
    assert aggregator("status", env=env, cwd=tmp_path).returncode in (0, 1)


async def test_a_column_migrate_cannot_add_back_is_one_line_and_changes_nothing(
    db, conn, tmp_path
) -> None:
    """A key column, or a required one the rows have no value for: exit 2, one line naming the
    table, the column and the fix; the column migrate could add back stays missing too."""
    await fill_every_table(conn)
    await conn.execute("alter table daily_analytics drop column gsc_final")
    await conn.execute("alter table aggregator_runs drop column status")
    before = await schema_of(conn)
    env = {"DATABASE_URL": db}
    for command in (["migrate"], ["migrate", "--sql"]):
        line = one_line_error(aggregator(*command, env=env, cwd=tmp_path))
        assert line == (
            "aggregator: error: cannot migrate, nothing was changed: table aggregator_runs, "
            "column status: missing, and migrate cannot add it back to the rows the table holds "
            "(every row needs a value for it and there is none to give the rows it holds); fix: "
            "restore the column from a backup of aggregator_runs"
        ), command
    assert await schema_of(conn) == before

    await conn.execute("alter table aggregator_runs add column status text not null default 'ok'")
    await conn.execute("alter table daily_analytics drop column date")
    line = one_line_error(aggregator("migrate", env=env, cwd=tmp_path))
    assert "table daily_analytics, column date: missing" in line
    assert "(it is part of the table's key)" in line


async def test_a_column_of_a_sites_owned_by_another_role_is_that_roles_to_add(
    supabase: SupabaseDb,  # noqa: F811 (the fixture imported above)
) -> None:
    """An adopted sites the migrating role may not alter (the Hub's): the conflict names the
    statement for its owner, and nothing is changed."""
    async with connected(supabase.owner) as owner:
        await create_hub_sites(owner, "bigint", ["example.com"])
        await migrations.apply_migrations(owner)
    async with connected(supabase.admin) as admin:
        await admin.execute(f"alter table sites owner to {HUB}")
        await admin.execute(f"grant select on sites to {OWNER}")
        await admin.execute("alter table daily_analytics drop column gsc_final")
        await admin.execute("alter table sites drop column gsc_property")
        before = await schema_of(admin)
        async with connected(supabase.owner) as owner:
            with pytest.raises(migrations.MigrationError) as refused:
                await migrations.apply_migrations(owner)
        assert await schema_of(admin) == before
    assert str(refused.value) == (
        "cannot migrate, nothing was changed: table sites, column gsc_property: missing, and "
        f"role {OWNER} may not add them (the table belongs to {HUB}); fix: run migrate as {HUB}, "
        f"or have {HUB} run: alter table sites add column gsc_property text"
    )
