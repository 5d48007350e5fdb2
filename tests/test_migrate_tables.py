"""`migrate` re-creates a table of a recorded migration that was dropped by hand, exactly as a
fresh migrate makes it, by applying the (idempotent) migrations again; and it refuses, in one
line changing nothing, when a re-created table could not come back whole."""

from __future__ import annotations

import asyncpg

from aggregator import migrations, storage
from tests.test_cli import aggregator, one_line_error
from tests.test_supabase import (
    SupabaseDb,
    connected,
    create_hub_sites,
    supabase,  # noqa: F401 (a fixture)
)

# What makes a table what a fresh migrate made it, per table of the current schema: columns
# (type, not null, default, comment), constraints, indexes, row level security, grants,
# policies, and the grants of the sequences it owns.
_CATALOG = """
select c.relname as table,
       c.relrowsecurity, c.relforcerowsecurity, c.relacl::text,
       (select array_agg(format('%s %s %s %s %s', a.attname, format_type(a.atttypid, a.atttypmod),
                                a.attnotnull, pg_get_expr(d.adbin, d.adrelid),
                                col_description(c.oid, a.attnum)) order by a.attname)
        from pg_attribute a left join pg_attrdef d on d.adrelid = c.oid and d.adnum = a.attnum
        where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped) as columns,
       (select array_agg(o.conname || ' ' || pg_get_constraintdef(o.oid) order by o.conname)
        from pg_constraint o where o.conrelid = c.oid) as constraints,
       (select array_agg(pg_get_indexdef(i.indexrelid) order by 1)
        from pg_index i where i.indrelid = c.oid) as indexes,
       (select array_agg(format('%s %s %s %s', p.polname, p.polcmd, p.polroles::text,
                                pg_get_expr(p.polqual, p.polrelid)) order by p.polname)
        from pg_policy p where p.polrelid = c.oid) as policies,
       (select array_agg(s.relname || ' ' || coalesce(s.relacl::text, '') order by s.relname)
        from pg_depend dep join pg_class s on s.oid = dep.objid and s.relkind = 'S'
        where dep.refobjid = c.oid and dep.classid = 'pg_class'::regclass) as sequences
from pg_class c join pg_namespace n on n.oid = c.relnamespace and n.nspname = current_schema()
where c.relkind = 'r'
"""

# Nothing references these: a plain `drop table` takes them alone.
DROPPED = ("daily_analytics", "aggregator_runs", "gsc_learned_rates")


async def catalog(conn: asyncpg.Connection) -> dict[str, tuple]:
    return {r["table"]: tuple(r)[1:] for r in await conn.fetch(_CATALOG)}


async def test_migrate_re_creates_dropped_tables_as_a_fresh_migrate_makes_them(
    supabase: SupabaseDb,  # noqa: F811 (the fixture imported above)
    tmp_path,
) -> None:
    """A Supabase project (API roles with default privileges, the Hub's uuid-keyed sites with
    its own policy): the dropped tables come back with every key, index, comment, row level
    security and closed grant of a fresh migrate; the Hub's sites and the rows of the tables
    that stayed are untouched; `--sql` prints statements that do the same; then up to date."""
    env = {"DATABASE_URL": supabase.owner}
    async with connected(supabase.owner) as owner:
        [site, _] = await create_hub_sites(owner, "uuid", ["a.example", "b.example"])
        await migrations.apply_migrations(owner)
        await owner.execute("insert into gsc_accounts (email) values ('team@example.com')")
        fresh = await catalog(owner)
        assert fresh["daily_analytics"] != fresh["gsc_learned_rates"]  # the snapshot tells apart

        async def drop() -> None:
            await owner.execute(f"drop table {', '.join(DROPPED)}")
            assert set(await catalog(owner)) == set(fresh) - set(DROPPED)

        await drop()
        line = one_line_error(aggregator("status", env=env, cwd=tmp_path))
        assert line.endswith("database has no table daily_analytics: run `aggregator migrate`")

        printed = aggregator("migrate", "--sql", env=env, cwd=tmp_path)
        assert printed.returncode == 0, printed.stderr
        assert f"(they are idempotent): {', '.join(DROPPED)}.\n" in printed.stdout
        assert set(await catalog(owner)) == set(fresh) - set(DROPPED)  # --sql changes nothing
        await owner.execute(printed.stdout)  # as `supabase db push` would
        assert await catalog(owner) == fresh

        await drop()
        migrated = aggregator("migrate", env=env, cwd=tmp_path)
        assert migrated.returncode == 0, migrated.stderr
        where = storage.describe_dsn(supabase.owner)
        assert migrated.stdout == f"re-created {', '.join(DROPPED)} in {where}\n"
        assert await catalog(owner) == fresh
        assert await owner.fetchval("select count(*) from gsc_accounts") == 1
        assert await owner.fetchval("select count(*) from sites") == 2
        await owner.execute(
            "insert into daily_analytics (site_id, date, matomo_visits) values ($1, now(), 1)",
            site,
        )

        again = aggregator("migrate", env=env, cwd=tmp_path)
        assert again.returncode == 0 and "is up to date" in again.stdout, again.stdout
        assert await catalog(owner) == fresh


async def test_gsc_accounts_dropped_with_cascade_comes_back_as_created(db, conn, tmp_path) -> None:
    """gsc_accounts can only be dropped with the foreign key of sites.gsc_account_id: the table
    itself comes back as a fresh migrate made it."""
    fresh = await catalog(conn)
    await conn.execute("drop table gsc_accounts cascade")
    migrated = aggregator("migrate", env={"DATABASE_URL": db}, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.startswith("re-created gsc_accounts in "), migrated.stdout
    assert (await catalog(conn))["gsc_accounts"] == fresh["gsc_accounts"]


async def test_a_table_that_cannot_come_back_whole_is_one_line_and_changes_nothing(
    db, conn, tmp_path
) -> None:
    """aggregator_runs renamed to keep a copy: its index keeps the name of the index that lets
    one run at a time hold the lease. Re-created without it, runs would be unguarded: migrate
    refuses in one line naming the index and the fix, and changes nothing."""
    await conn.execute("alter table aggregator_runs rename to aggregator_runs_kept")
    before = await catalog(conn)
    env = {"DATABASE_URL": db}
    line = one_line_error(aggregator("migrate", env=env, cwd=tmp_path))
    assert 'relation "aggregator_runs_one_running" already exists' in line
    assert "nothing was changed" in line
    assert "fix: rename the relation that holds the name" in line
    assert await catalog(conn) == before

    await conn.execute("alter index aggregator_runs_one_running rename to kept_one_running")
    assert aggregator("migrate", env=env, cwd=tmp_path).returncode == 0
    indexes = (await catalog(conn))["aggregator_runs"][5]
    assert any("aggregator_runs_one_running" in index for index in indexes), indexes
