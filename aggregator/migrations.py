"""Schema migrations: sql/NNN_*.sql applied all or nothing, refused with the fix when the
database does not fit, and printable for projects that keep their own migration files.

The job drops into Supabase projects that already exist, so `migrate` must
- apply every pending file in one transaction: a failure leaves the database as it was;
- check an existing `sites` (and any other table it would reuse) before touching anything, and
  name the table, the column and the fix in one line when it cannot work with it;
- add back a column of its tables dropped after its migration was recorded, as that migration
  defined it (aggregator.column_repair), in the same transaction;
- re-create a table of a recorded migration that is missing (dropped by hand) by applying every
  migration again: the files are idempotent, so the tables that exist are left as they are and
  the missing one comes back exactly as a fresh migrate makes it (keys, indexes, comments, row
  level security and no privilege for the API roles, through the same epilogue);
- secure only what it creates: every table created by a migration gets row level security and
  no privilege for Supabase's `anon`/`authenticated`, whoever wrote the file; a table it did not
  create keeps its row level security, grants and policies;
- print the very SQL it would run (`migrate --sql`) including the bookkeeping insert, so a schema
  applied by `supabase db push` is recognised by the next `migrate`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from aggregator import column_repair, storage
from aggregator.config import Settings
from aggregator.graceful import run_until_stopped
from aggregator.output import stdout_closed_at_start
from aggregator.storage import StorageError

MIGRATIONS_TABLE = "aggregator_schema_migrations"
SQL_DIR = Path(__file__).parent / "sql"
SCHEMA_MIGRATION = "001_schema"  # the file that creates or adopts the tables checked below
SITE_ID_TYPES = ("bigint", "integer", "uuid", "text")
SUPABASE_API_ROLES = ("anon", "authenticated")

_VERSION = re.compile(r"[0-9]{3}_[a-z0-9_]+")
_TEXT = ("text", "character varying")
_TIMESTAMPTZ = ("timestamp with time zone",)
_BOOLEAN = ("boolean",)
_INTEGER = ("integer",)

# The columns 001 creates, and the types an existing column may have (the first is the one a
# fix proposes). daily_analytics.site_id must moreover be exactly the type of sites.id.
EXPECTED_COLUMNS: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "gsc_accounts": {
        "id": ("bigint", "integer"),
        "email": _TEXT,
        "refresh_token": _TEXT,
        "is_active": _BOOLEAN,
        "last_refresh_at": _TIMESTAMPTZ,
        "last_error": _TEXT,
    },
    "sites": {
        "id": SITE_ID_TYPES,
        "domain": _TEXT,
        "is_active": _BOOLEAN,
        "deployed_at": _TIMESTAMPTZ,
        "matomo_site_id": ("integer", "bigint", "smallint"),
        "gsc_account_id": ("bigint", "integer"),
        "gsc_property": _TEXT,
    },
    "daily_analytics": {
        "site_id": SITE_ID_TYPES,
        "date": ("date",),
        "matomo_visits": _INTEGER,
        "matomo_actions": _INTEGER,
        "gsc_clicks": _INTEGER,
        "gsc_impressions": ("bigint",),
        "gsc_ctr": ("double precision",),
        "gsc_position": ("double precision",),
        "gsc_final": _BOOLEAN,
        "matomo_updated_at": _TIMESTAMPTZ,
        "gsc_updated_at": _TIMESTAMPTZ,
    },
    "aggregator_runs": {
        "id": ("bigint", "integer"),
        "started_at": _TIMESTAMPTZ,
        "finished_at": _TIMESTAMPTZ,
        "date_from": ("date",),
        "date_to": ("date",),
        "status": _TEXT,
        "sites_total": _INTEGER,
        "rows_upserted": _INTEGER,
        "errors": ("jsonb",),
    },
}
# Columns later files add to the job's own tables (no conflict to check: nobody else's table),
# which a run needs as much as 001's.
LATER_COLUMNS: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "aggregator_runs": {
        "heartbeat_at": _TIMESTAMPTZ,
        "lease_until": _TIMESTAMPTZ,
        "lease_owner": _TEXT,
        "stats": ("jsonb",),
    },
    "gsc_learned_rates": {
        "scope": _TEXT,
        "key": _TEXT,
        "queries_per_second": ("double precision",),
        "learned_at": _TIMESTAMPTZ,
        "limit_shown": ("boolean",),
    },
}
# The one table 001 adopts (adding missing columns) rather than requiring whole.
ADOPTED_TABLE = "sites"
# The longest conflict line listing every conflict; beyond it, only the first is named.
CONFLICTS_LINE_LIMIT = 1200
# The table the run upserts into: its key must be exactly REQUIRED_KEYS', as its primary key.
UPSERTED_TABLE = "daily_analytics"
# The keys the job relies on: the foreign key to sites(id) and the upsert's on conflict.
REQUIRED_KEYS: Mapping[str, tuple[str, ...]] = {
    "sites": ("id",),
    "daily_analytics": ("site_id", "date"),
}


def required_columns() -> dict[str, tuple[str, ...]]:
    """Every column the job reads or writes, by table (what `check` looks for): 001's and the
    later files'. Columns the job can do without (token health's) are not required."""
    required: dict[str, tuple[str, ...]] = {}
    for columns in (EXPECTED_COLUMNS, LATER_COLUMNS):
        for table, typed in columns.items():
            required[table] = (*required.get(table, ()), *typed)
    return required


def missing_column_fix(name: str) -> str:
    """How to get `table.column` back: migrate adds it, whether its migration is pending or
    was recorded before the column was dropped, unless no value can be made up for it."""
    table, _, column = name.partition(".")
    known = column_repair.COLUMNS.get(table, {}).get(column)
    if known is None or known.definition is not None:
        return "run `aggregator migrate`: it adds the column back"
    return column_repair.refusal(table, column, known).partition("; fix: ")[2]


class MigrationError(StorageError):
    """A migration cannot apply; nothing was changed. The message names the fix."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    sql: str


def migration_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    files = sorted(sql_dir.glob("[0-9]*.sql"))
    if not files:
        raise StorageError(f"no migrations found in {sql_dir}")
    return files


def load_migrations(sql_dir: Path = SQL_DIR) -> list[Migration]:
    migrations = []
    for path in migration_files(sql_dir):
        if not _VERSION.fullmatch(path.stem):
            raise StorageError(f"migration file {path.name} is not named NNN_lowercase_words.sql")
        migrations.append(Migration(path.stem, path.read_text(encoding="utf-8")))
    return migrations


# --- the SQL around the files (printed by --sql exactly as migrate runs it) -----------------------

_PROLOGUE = f"""\
-- Which tables exist before the migrations below: only the tables they create are secured.
drop table if exists pg_temp.aggregator_tables_before;
create temporary table aggregator_tables_before as
    select c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where n.nspname = current_schema() and c.relkind in ('r', 'p');

create table if not exists {MIGRATIONS_TABLE} (
    version text primary key,
    applied_at timestamptz not null default now()
);
"""

_EPILOGUE = f"""\
-- The tables created above hold the job's data and refresh tokens: row level security on, and no
-- privilege for Supabase's API roles (the dashboard's read of daily_analytics is an opt-in:
-- `aggregator migrate --grant-read ROLE`). The sequences those tables own (identity and serial
-- columns) are closed too: default privileges may have granted them. Tables that existed before,
-- and their sequences, are left as they were.
do $$
declare
    created regclass;
    owned_sequence regclass;
    api_role text;
begin
    for created in
        select c.oid::regclass from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = current_schema() and c.relkind in ('r', 'p')
          and (c.oid not in (select oid from aggregator_tables_before)
               or c.relname = '{MIGRATIONS_TABLE}')
    loop
        execute format('alter table %s enable row level security', created);
        foreach api_role in array array[{", ".join(f"'{r}'" for r in SUPABASE_API_ROLES)}] loop
            if exists (select 1 from pg_roles where rolname = api_role) then
                execute format('revoke all on %s from %I', created, api_role);
                for owned_sequence in
                    select d.objid::regclass from pg_depend d join pg_class s on s.oid = d.objid
                    where d.classid = 'pg_class'::regclass and d.refobjid = created
                      and d.deptype in ('a', 'i') and s.relkind = 'S'
                loop
                    execute format('revoke all on sequence %s from %I', owned_sequence, api_role);
                end loop;
            end if;
        end loop;
    end loop;
end
$$;
drop table pg_temp.aggregator_tables_before;
"""


def _recorded(migration: Migration) -> str:
    return (
        f"{migration.sql.rstrip()}\n\n"
        f"insert into {MIGRATIONS_TABLE} (version) values ('{migration.version}')"
        " on conflict (version) do nothing;\n"
    )


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def read_grant_sql(role: str) -> str:
    """Let `role` (the dashboard's) read daily_analytics: only the rows of the sites it can read
    in `sites` itself, so the dashboard's own policies on sites keep deciding who sees what."""
    quoted = quote_identifier(role)
    policy = quote_identifier(f"aggregator_read_{role}")
    return (
        "-- Opt-in: this role reads the daily_analytics rows of the sites it can read.\n"
        f"grant select on daily_analytics to {quoted};\n"
        f"drop policy if exists {policy} on daily_analytics;\n"
        f"create policy {policy} on daily_analytics for select to {quoted}\n"
        "    using (site_id in (select id from sites));\n"
    )


def migration_script(
    pending: Sequence[Migration],
    readers: Sequence[str] = (),
    repairs: Sequence[str] = (),
    recreated: Sequence[str] = (),
) -> str:
    """The SQL `migrate` runs for these pending migrations, as one file (what --sql prints):
    first the columns of recorded migrations it adds back (`repairs`); `recreated` names the
    missing tables that applying the migrations again brings back."""
    parts = []
    if repairs:
        parts.append(
            "-- Columns of the aggregator's tables dropped since their migration: added back.\n"
            + "".join(f"{statement}\n" for statement in repairs)
        )
    if recreated:
        parts.append(
            "-- Tables missing since their migration was recorded, re-created by applying every\n"
            f"-- migration again (they are idempotent): {', '.join(recreated)}.\n"
        )
    if pending:
        parts.append(_PROLOGUE)
        parts += [f"-- aggregator migration {m.version}\n{_recorded(m)}" for m in pending]
        parts.append(_EPILOGUE)
    parts += [read_grant_sql(role) for role in readers]
    return "\n".join(parts) or "-- aggregator: nothing to apply, the schema is up to date\n"


# --- what the database holds, and whether 001 can work with it (pure) ---------------------------


@dataclass(frozen=True, slots=True)
class UniqueKey:
    """A non-partial unique index on plain columns: a primary key, a unique constraint, or a
    bare unique index (dropped with `drop index`, not `drop constraint`)."""

    name: str
    columns: frozenset[str]
    primary: bool = False
    constraint: bool = True


@dataclass(frozen=True, slots=True)
class TableFacts:
    """An existing table of the current schema, as far as the migration cares."""

    owner: str
    owned: bool  # the migrating role owns it (or is a member of its owner)
    columns: Mapping[str, str]  # column -> type, without modifiers
    keys: tuple[UniqueKey, ...]
    may_reference_id: bool  # the migrating role may create a foreign key to its `id`
    readable: bool  # the migrating role may select from it
    api_readers: tuple[str, ...] = ()  # Supabase's API roles that may read its rows

    @property
    def unique_keys(self) -> frozenset[frozenset[str]]:
        return frozenset(key.columns for key in self.keys)


@dataclass(frozen=True, slots=True)
class CatalogFacts:
    schema: str
    role: str
    may_create: bool  # CREATE on the schema
    tables: Mapping[str, TableFacts]  # only the ones that exist


def schema_conflicts(facts: CatalogFacts) -> list[str]:
    """Why 001 cannot apply to this database, each as "table ..., column ...: ...; fix: ...",
    the most fundamental first (the order to fix them in): a missing or wrong key and a column
    of the wrong type, whose fix may change the table's design, before the columns to add,
    which are mechanical once the table fits."""
    fundamental: list[str] = []
    additions: list[str] = []
    sites = facts.tables.get(ADOPTED_TABLE)
    for table, expected in EXPECTED_COLUMNS.items():
        existing = facts.tables.get(table)
        if existing is None:
            continue
        keyless = _missing_id_conflicts(table, existing)
        fundamental += keyless + _key_conflicts(table, existing)
        fundamental += _type_conflicts(table, existing, expected, sites)
        if not keyless:
            additions += _missing_column_conflicts(facts, table, existing, expected)
    found = fundamental + additions + exposed_token_conflicts(facts)
    if sites is not None:
        found += _site_access_conflicts(facts, sites)
    if not facts.may_create and len(facts.tables) < len(EXPECTED_COLUMNS):
        missing = next(t for t in EXPECTED_COLUMNS if t not in facts.tables)
        found.append(
            f"schema {facts.schema}: role {facts.role} may not create tables in it (table "
            f"{missing} is missing); fix: grant create on schema {facts.schema} to {facts.role}, "
            "or run migrate as the schema's owner (on Supabase: postgres)"
        )
    return found


def exposed_token_conflicts(facts: CatalogFacts) -> list[str]:
    """A gsc_accounts whose rows Supabase's API roles can read hands every refresh token to the
    dashboard's users: migrate does not change the security of a table it did not create, so it
    refuses to adopt it (or, opened after migrating, to call the schema up to date) until the
    operator has closed it; check names it too."""
    existing = facts.tables.get("gsc_accounts")
    if existing is None or not existing.api_readers:
        return []
    roles = ", ".join(existing.api_readers)
    return [
        f"table gsc_accounts: its rows (refresh tokens) are readable by {roles}; fix: revoke all "
        f"on gsc_accounts from {roles}"
    ]


def _site_access_conflicts(facts: CatalogFacts, sites: TableFacts) -> list[str]:
    """An adopted sites table may belong to another role: the job must still read it, and its
    foreign key must be allowed to point at it."""
    found = []
    if not sites.readable:
        found.append(
            f"table sites: role {facts.role} may not read it (it belongs to {sites.owner}); "
            f"fix: grant select on sites to {facts.role}, or connect as {sites.owner}"
        )
    if "daily_analytics" not in facts.tables and not sites.may_reference_id:
        found.append(
            f"table sites, column id: role {facts.role} may not reference it from "
            f"daily_analytics.site_id; fix: grant references (id) on sites to {facts.role}, or "
            f"run migrate as {sites.owner}"
        )
    return found


def _type_conflicts(
    table: str,
    existing: TableFacts,
    expected: Mapping[str, tuple[str, ...]],
    sites: TableFacts | None,
) -> list[str]:
    found = []
    for column, accepted in expected.items():
        actual = existing.columns.get(column)
        if actual is None:
            continue
        if table == "daily_analytics" and column == "site_id" and sites is not None:
            wanted = sites.columns.get("id")
            if wanted in SITE_ID_TYPES and actual != wanted:
                found.append(
                    f"table daily_analytics, column site_id: is {actual} but sites.id is "
                    f"{wanted}; fix: alter table daily_analytics alter column site_id type "
                    f"{wanted} (drop its foreign key first if one stands in the way)"
                )
            continue
        if actual in accepted:
            continue
        if table == "sites" and column == "id":
            found.append(
                f"table sites, column id: is {actual}, but a site id must be one of "
                f"{', '.join(SITE_ID_TYPES)}; fix: alter table sites alter column id type text"
            )
            continue
        found.append(
            f"table {table}, column {column}: is {actual}, the aggregator needs {accepted[0]}; "
            f"fix: alter table {table} alter column {column} type {accepted[0]} using "
            f"{column}::{accepted[0]} (or rename the column and run migrate again)"
        )
    return found


def _key_conflicts(table: str, existing: TableFacts) -> list[str]:
    key = REQUIRED_KEYS.get(table)
    if key is None or any(column not in existing.columns for column in key):
        return []  # no key to check, or reported as a missing column
    if table == UPSERTED_TABLE:
        return _upsert_key_conflicts(existing, key)
    if frozenset(key) in existing.unique_keys:
        return []
    columns = ", ".join(key)
    return [
        f"table {table}, column{'s' if len(key) > 1 else ''} {columns}: no primary key or unique "
        f"constraint on ({columns}), which the aggregator needs "
        f"({'one row per site and day' if len(key) > 1 else 'for foreign keys to it'}); "
        f"fix: alter table {table} add unique ({columns})"
    ]


def _upsert_key_conflicts(existing: TableFacts, key: tuple[str, ...]) -> list[str]:
    """The upsert needs one row per site and day, so the primary key must be exactly the key
    and no unique key may be narrower: a unique (site_id, date) beside a primary key (site_id)
    passes `on conflict` and still lets a site keep one day only."""
    wanted = frozenset(key)
    primary = next((k for k in existing.keys if k.primary), None)
    narrower = [k for k in existing.keys if not k.primary and not wanted <= k.columns]
    if primary is not None and primary.columns == wanted and not narrower:
        return []
    columns = ", ".join(key)
    found = []
    if primary is None:
        found.append("no primary key")
    elif primary.columns != wanted:
        found.append(f"primary key {primary.name} is ({_listed(primary.columns, key)})")
    found += [
        f"unique {'constraint' if k.constraint else 'index'} {k.name} is "
        f"({_listed(k.columns, key)})"
        for k in narrower
    ]
    drops = [f"drop index {_sql_name(k.name)}; " for k in narrower if not k.constraint]
    alters = [f"drop constraint {_sql_name(k.name)}" for k in narrower if k.constraint]
    if primary is not None and primary.columns != wanted:
        alters.append(f"drop constraint {_sql_name(primary.name)}")
    if primary is None or primary.columns != wanted:
        alters.append(f"add primary key ({columns})")
    return [
        f"table {UPSERTED_TABLE}, columns {columns}: {', '.join(found)}, but the aggregator "
        f"needs primary key ({columns}) and no narrower unique key (one row per site and day); "
        f"fix: {''.join(drops)}alter table {UPSERTED_TABLE} {', '.join(alters)}"
    ]


def upsert_key_conflicts(facts: CatalogFacts) -> list[str]:
    """The conflict of an existing daily_analytics whose keys defeat the upsert, checked on
    migrated databases too: older versions accepted a unique (site_id, date) beside a narrower
    primary key, and every run on such a table fails."""
    existing = facts.tables.get(UPSERTED_TABLE)
    if existing is None:
        return []
    return _key_conflicts(UPSERTED_TABLE, existing)


def _listed(columns: frozenset[str], key: tuple[str, ...]) -> str:
    """A key's columns, those of the required key first in its order (stable messages)."""
    return ", ".join([c for c in key if c in columns] + sorted(columns - set(key)))


def _sql_name(name: str) -> str:
    return name if re.fullmatch(r"[a-z_][a-z0-9_]*", name) else quote_identifier(name)


def _missing_id_conflicts(table: str, existing: TableFacts) -> list[str]:
    if table != ADOPTED_TABLE or "id" in existing.columns:
        return []
    return [
        "table sites, column id: missing, and every site is keyed by it; fix: alter table "
        "sites add column id bigint generated by default as identity primary key"
    ]


def _missing_column_conflicts(
    facts: CatalogFacts, table: str, existing: TableFacts, expected: Mapping[str, tuple[str, ...]]
) -> list[str]:
    missing = [c for c in expected if c not in existing.columns]
    if not missing:
        return []
    if table == ADOPTED_TABLE and existing.owned:
        return []  # 001 adds them
    listed = ", ".join(missing)
    adds = ", ".join(f"add column {c} {expected[c][0]}" for c in missing)
    if table == ADOPTED_TABLE:
        return [
            f"table sites, column{'s' if len(missing) > 1 else ''} {listed}: missing, and role "
            f"{facts.role} may not add them (the table belongs to {existing.owner}); fix: run "
            f"migrate as {existing.owner}, or have {existing.owner} run: alter table sites {adds}"
        ]
    return [
        f"table {table}, column{'s' if len(missing) > 1 else ''} {listed}: missing from the "
        f"existing table; fix: alter table {table} {adds}"
    ]


def owner_conflicts(facts: CatalogFacts) -> list[str]:
    """Tables the job writes and indexes must be the migrating role's own."""
    return [
        f"table {table}: belongs to role {existing.owner}, and the aggregator must own the tables "
        f"it writes; fix: run migrate as {existing.owner}, or alter table {table} owner to "
        f"{facts.role}"
        for table, existing in facts.tables.items()
        if table != ADOPTED_TABLE and not existing.owned
    ]


# --- database edge ---------------------------------------------------------------------------------

_FACTS = """
select t.name, pg_get_userbyid(c.relowner) as owner,
       pg_has_role(c.relowner, 'MEMBER') as owned,
       (select coalesce(jsonb_object_agg(a.attname, format_type(a.atttypid, null)), '{}')
        from pg_attribute a
        where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped) as columns,
       (select coalesce(jsonb_agg(k), '[]')
        from (select ic.relname as name, jsonb_agg(a.attname) as columns,
                     i.indisprimary as primary,
                     exists (select 1 from pg_constraint o
                             where o.conindid = i.indexrelid and o.conrelid = c.oid) as constraint
              from pg_index i join pg_class ic on ic.oid = i.indexrelid
              join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
              where i.indrelid = c.oid and i.indisunique and i.indpred is null
                and i.indexprs is null
              group by i.indexrelid, ic.relname, i.indisprimary) k) as keys,
       exists (select 1 from pg_attribute a where a.attrelid = c.oid and a.attname = 'id'
               and has_column_privilege(c.oid, a.attnum, 'REFERENCES')) as may_reference_id,
       has_table_privilege(c.oid, 'SELECT') as readable,
       array(select r.rolname from pg_roles r
             where r.rolname = any($2::text[]) and has_table_privilege(r.oid, c.oid, 'SELECT')
               and (not c.relrowsecurity
                    or exists (select 1 from pg_policy p
                               where p.polrelid = c.oid and p.polpermissive
                                 and p.polcmd in ('r', '*')
                                 and (0 = any(p.polroles) or r.oid = any(p.polroles))))
             order by r.rolname) as api_readers
from unnest($1::text[]) as t(name)
join pg_class c on c.relname = t.name and c.relkind in ('r', 'p')
join pg_namespace n on n.oid = c.relnamespace and n.nspname = current_schema()
"""


async def catalog_facts(conn: asyncpg.Connection) -> CatalogFacts:
    schema, role, may_create = await conn.fetchrow(
        "select current_schema(), current_user,"
        " coalesce(has_schema_privilege(current_schema(), 'CREATE'), false)"
    )
    if schema is None:
        raise MigrationError(
            "no schema to create the tables in: the search_path of DATABASE_URL names no "
            "existing schema; fix: create the schema or correct search_path"
        )
    tables = {}
    for row in await conn.fetch(_FACTS, list(EXPECTED_COLUMNS), list(SUPABASE_API_ROLES)):
        tables[row["name"]] = TableFacts(
            owner=row["owner"],
            owned=row["owned"],
            columns=json.loads(row["columns"]),
            keys=tuple(
                UniqueKey(k["name"], frozenset(k["columns"]), k["primary"], k["constraint"])
                for k in json.loads(row["keys"])
            ),
            may_reference_id=row["may_reference_id"],
            readable=row["readable"],
            api_readers=tuple(row["api_readers"]),
        )
    return CatalogFacts(schema=schema, role=role, may_create=may_create, tables=tables)


async def applied_versions(conn: asyncpg.Connection) -> frozenset[str] | None:
    """Versions recorded in the current schema, None when nothing was ever recorded there."""
    exists = await conn.fetchval(
        "select exists (select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = current_schema() and c.relname = $1)",
        MIGRATIONS_TABLE,
    )
    if not exists:
        return None
    return frozenset(
        r["version"] for r in await conn.fetch(f"select version from {MIGRATIONS_TABLE}")
    )


@dataclass(frozen=True, slots=True)
class Plan:
    """What migrate does: add back the dropped columns of recorded migrations, then apply the
    pending ones, or every one when a table of a recorded migration is missing."""

    pending: list[Migration]  # not recorded yet
    repair: column_repair.Repair
    recreated: tuple[str, ...]  # tables of recorded migrations that are missing
    applying: list[Migration]  # pending, or every migration when a table is re-created


async def _plan(
    conn: asyncpg.Connection, migrations: Sequence[Migration], readers: Sequence[str]
) -> Plan:
    """The plan, once the database is known to fit it (MigrationError if not)."""
    applied = await applied_versions(conn) or frozenset()
    pending = [m for m in migrations if m.version not in applied]
    recreated = tuple(
        table
        for table in await storage.missing_tables(conn)
        if column_repair.created_by(table) in applied
    )
    facts = await catalog_facts(conn)
    if any(m.version == SCHEMA_MIGRATION for m in pending):
        conflicts = schema_conflicts(facts) + owner_conflicts(facts)
    else:
        conflicts = upsert_key_conflicts(facts) + exposed_token_conflicts(facts)
    missing = await storage.missing_columns(conn, column_repair.columns_by_table())
    repair = column_repair.plan_repair(missing, applied)
    conflicts += [*repair.conflicts, *_unalterable_sites_conflicts(facts, repair)]
    if conflicts:
        raise MigrationError(f"cannot migrate, nothing was changed: {_summed_up(conflicts)}")
    for role in readers:
        if not await conn.fetchval(
            "select exists (select 1 from pg_roles where rolname = $1)", role
        ):
            raise MigrationError(
                f"--grant-read {role}: no such role in this database; nothing was changed"
            )
    return Plan(pending, repair, recreated, list(migrations) if recreated else pending)


def _unalterable_sites_conflicts(facts: CatalogFacts, repair: column_repair.Repair) -> list[str]:
    """An adopted sites owned by another role: its columns are added back by that role."""
    sites = facts.tables.get(ADOPTED_TABLE)
    if sites is None or not any(n.startswith(f"{ADOPTED_TABLE}.") for n in repair.restored):
        return []
    return _missing_column_conflicts(facts, ADOPTED_TABLE, sites, EXPECTED_COLUMNS[ADOPTED_TABLE])


def _summed_up(conflicts: Sequence[str]) -> str:
    """Every conflict when they fit one readable line, numbered in the order to fix them;
    otherwise the first, and the next migrate names the rest (each fix is applied alone)."""
    if len(conflicts) == 1:
        return conflicts[0]
    numbered = " ".join(f"({n}) {c}" for n, c in enumerate(conflicts, 1))
    if len(numbered) <= CONFLICTS_LINE_LIMIT:
        return numbered
    return f"{conflicts[0]} (and {len(conflicts) - 1} more, named by migrate once this is fixed)"


async def _refuse_unreadable_sites(conn: asyncpg.Connection, readers: Sequence[str]) -> None:
    """The read policy shows a role the rows of the sites it can read: it must read sites.id."""
    for role in readers:
        readable = await conn.fetchval(
            "select to_regclass('sites') is null"
            " or has_column_privilege($1, to_regclass('sites'), 'id', 'SELECT')",
            role,
        )
        if not readable:
            raise MigrationError(
                f"--grant-read {role}: role {role} cannot read table sites, and it is shown the "
                f"daily_analytics rows of the sites it can read; fix: grant select on sites to "
                f"{role} (with a policy for it if sites has row level security), then run migrate "
                "again; nothing was changed"
            )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


async def _execute(conn: asyncpg.Connection, what: str, sql: str) -> None:
    try:
        await conn.execute(sql)
    except asyncpg.PostgresError as exc:
        fix = ""
        if isinstance(exc, asyncpg.InsufficientPrivilegeError):
            fix = "; fix: run migrate as the owner of the tables (on Supabase: the postgres role)"
        elif isinstance(exc, asyncpg.DuplicateTableError):
            fix = (
                "; fix: rename the relation that holds the name (a table renamed to keep a copy "
                "keeps its indexes' names: alter index NAME rename to NEW_NAME), then run "
                "migrate again"
            )
        raise MigrationError(
            f"{what} cannot apply, nothing was changed: {_one_line(exc)}{fix}"
        ) from None


@contextlib.asynccontextmanager
async def _explained() -> AsyncIterator[None]:
    """Whatever else goes wrong while migrating is one line too, never a traceback."""
    try:
        yield
    except MigrationError:
        raise
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"cannot migrate, nothing was changed: {_one_line(exc)}") from None
    except (asyncpg.InterfaceError, OSError) as exc:
        raise MigrationError(
            f"the database connection broke during migrate ({_one_line(exc)}); run migrate "
            "again: it applies whatever is still missing"
        ) from None


async def _lock(conn: asyncpg.Connection) -> None:
    """Two `migrate` calls on one schema queue up; a transaction lock works through poolers."""
    await conn.execute(
        "select pg_advisory_xact_lock(hashtext('aggregator.migrate:' || current_schema()))"
    )


@dataclass(frozen=True, slots=True)
class Migrated:
    versions: list[str]  # the migrations applied for the first time
    restored: tuple[str, ...]  # "table.column" added back
    recreated: tuple[str, ...]  # tables re-created


async def apply_migrations(
    conn: asyncpg.Connection, sql_dir: Path = SQL_DIR, *, readers: Sequence[str] = ()
) -> list[str]:
    """migrate_schema, returning the versions applied."""
    return (await migrate_schema(conn, sql_dir, readers=readers)).versions


async def migrate_schema(
    conn: asyncpg.Connection, sql_dir: Path = SQL_DIR, *, readers: Sequence[str] = ()
) -> Migrated:
    """Add back dropped columns, apply the pending migrations (and the read grants asked for)
    in one transaction. MigrationError, with the database unchanged, when anything fails."""
    migrations = load_migrations(sql_dir)
    async with _explained(), conn.transaction():
        await _lock(conn)
        plan = await _plan(conn, migrations, readers)
        if plan.repair.statements:
            await _execute(conn, "adding back dropped columns", "\n".join(plan.repair.statements))
        if plan.applying:
            await _execute(conn, "migration bookkeeping", _PROLOGUE)
            for migration in plan.applying:
                await _execute(conn, f"migration {migration.version}", _recorded(migration))
            await _execute(conn, "securing the new tables", _EPILOGUE)
        await _refuse_unreadable_sites(conn, readers)
        for role in readers:
            await _execute(conn, f"--grant-read {role}", read_grant_sql(role))
    return Migrated([m.version for m in plan.pending], plan.repair.restored, plan.recreated)


async def pending_sql(
    conn: asyncpg.Connection, sql_dir: Path = SQL_DIR, *, readers: Sequence[str] = ()
) -> str:
    """What apply_migrations would run on this database, as one SQL file; nothing is changed.

    With read grants the script is rehearsed in a transaction that is rolled back: whether a
    reader can read sites is known only once the script has run (the sites it creates is
    closed to the API roles), and a grant migrate refuses is not printed either."""
    migrations = load_migrations(sql_dir)
    async with _explained(), conn.transaction(readonly=True):
        plan = await _plan(conn, migrations, readers)
        await _refuse_unreadable_sites(conn, readers)
    if readers and (plan.applying or plan.repair.statements):
        changes = migration_script(plan.applying, (), plan.repair.statements, plan.recreated)
        await _rehearse(conn, changes, readers)
    return migration_script(plan.applying, readers, plan.repair.statements, plan.recreated)


async def _rehearse(conn: asyncpg.Connection, script: str, readers: Sequence[str]) -> None:
    """Run `script`, check that `readers` can read sites after it, and roll it all back."""
    rehearsal = conn.transaction()
    await rehearsal.start()
    try:
        async with _explained():
            await conn.execute(script)
            await _refuse_unreadable_sites(conn, readers)
    finally:
        await rehearsal.rollback()


def command(args: argparse.Namespace, settings: Settings) -> int:
    """`aggregator migrate [--sql] [--grant-read ROLE]`: apply (or print) what is pending."""
    readers = tuple(dict.fromkeys(args.readers))
    dsn = settings.require_database()

    async def migrate(_stop: asyncio.Event) -> int:
        pool = await storage.connect(settings.database_url)
        try:
            async with pool.acquire() as conn:
                if args.sql:
                    print(await pending_sql(conn, readers=readers), end="")
                    return 0
                migrated = await migrate_schema(conn, readers=readers)
        finally:
            await pool.close()
        if stdout_closed_at_start():
            return 0  # `migrate >&-`: the schema is migrated, the report has no reader
        where = storage.describe_dsn(dsn)
        if migrated.restored:
            print(f"added back {', '.join(migrated.restored)} to {where}")
        if migrated.recreated:
            print(f"re-created {', '.join(migrated.recreated)} in {where}")
        if migrated.versions:
            print(f"applied {', '.join(migrated.versions)} to {where}")
        elif not migrated.restored and not migrated.recreated:
            print(f"schema of {where} is up to date")
        for role in readers:
            print(f"{role} may read daily_analytics (the rows of the sites it can read)")
        return 0

    return run_until_stopped(migrate)
