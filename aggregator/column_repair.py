"""Columns of the job's tables dropped after the migration that created them was recorded (by
hand, by a dashboard's tooling): `migrate` adds them back as that migration defined them, so
it stays the one command that makes a schema usable, and running it again changes nothing.

A column migrate cannot make up for the rows a table already holds (part of the table's key, or
a required value without a default) is a conflict instead: one line naming it and the fix, and
nothing is changed. Which columns exist is the database's; what to do about each is decided
here, with plain values.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

_KEY = "it is part of the table's key"
_REQUIRED = "every row needs a value for it and there is none to give the rows it holds"


@dataclass(frozen=True, slots=True)
class Column:
    """A column as the migration `version` creates it: `definition` for `add column`, or
    why it cannot be added back over existing rows."""

    version: str
    definition: str | None = None
    refused: str = _REQUIRED


def _key(version: str) -> Column:
    return Column(version, refused=_KEY)


_SCHEMA, _RUNS, _RATES = "001_schema", "002_durable_runs", "004_api_stats_and_rates"

# Every column of the tables the migrations create or adopt, by table, as the files in sql/
# define it (tests/test_migrate_repair.py drops each and compares the column migrate puts back
# with the one a fresh migrate creates; a column missing here fails that test too).
COLUMNS: Mapping[str, Mapping[str, Column]] = {
    "gsc_accounts": {
        "id": _key(_SCHEMA),
        "email": Column(_SCHEMA),
        "refresh_token": Column(_SCHEMA, "text"),
        "is_active": Column(_SCHEMA, "boolean not null default true"),
        "last_refresh_at": Column(_SCHEMA, "timestamptz"),
        "last_error": Column(_SCHEMA, "text"),
        "connected_at": Column("005_token_health", "timestamptz"),
        "failing_since": Column("005_token_health", "timestamptz"),
        "last_success_at": Column("006_refresh_attempts", "timestamptz"),
    },
    # As 001 adds them to an adopted sites that lacks them; a domain is every site's own.
    "sites": {
        "id": _key(_SCHEMA),
        "domain": Column(_SCHEMA),
        "is_active": Column(_SCHEMA, "boolean not null default true"),
        "deployed_at": Column(_SCHEMA, "timestamptz"),
        "matomo_site_id": Column(_SCHEMA, "integer"),
        "gsc_account_id": Column(_SCHEMA, "bigint references gsc_accounts (id) on delete set null"),
        "gsc_property": Column(_SCHEMA, "text"),
    },
    "daily_analytics": {
        "site_id": _key(_SCHEMA),
        "date": _key(_SCHEMA),
        "matomo_visits": Column(_SCHEMA, "integer"),
        "matomo_actions": Column(_SCHEMA, "integer"),
        "gsc_clicks": Column(_SCHEMA, "integer"),
        "gsc_impressions": Column(_SCHEMA, "bigint"),
        "gsc_ctr": Column(_SCHEMA, "double precision"),
        "gsc_position": Column(_SCHEMA, "double precision"),
        "gsc_final": Column(_SCHEMA, "boolean"),
        "matomo_updated_at": Column(_SCHEMA, "timestamptz"),
        "gsc_updated_at": Column(_SCHEMA, "timestamptz"),
    },
    "aggregator_runs": {
        "id": _key(_SCHEMA),
        "started_at": Column(_SCHEMA, "timestamptz not null default now()"),
        "finished_at": Column(_SCHEMA, "timestamptz"),
        "date_from": Column(_SCHEMA, "date"),
        "date_to": Column(_SCHEMA, "date"),
        "status": Column(_SCHEMA),
        "sites_total": Column(_SCHEMA, "integer not null default 0"),
        "rows_upserted": Column(_SCHEMA, "integer not null default 0"),
        "errors": Column(_SCHEMA, "jsonb not null default '[]'::jsonb"),
        "heartbeat_at": Column(_RUNS, "timestamptz"),
        "lease_until": Column(_RUNS, "timestamptz"),
        "lease_owner": Column(_RUNS, "text"),
        "stats": Column(_RATES, "jsonb not null default '{}'::jsonb"),
    },
    "gsc_learned_rates": {
        "scope": _key(_RATES),
        "key": _key(_RATES),
        "queries_per_second": Column(_RATES),
        "learned_at": Column(_RATES, "timestamptz not null default now()"),
        "limit_shown": Column("007_learned_rate_kind", "boolean not null default false"),
    },
}


@dataclass(frozen=True, slots=True)
class Repair:
    """What migrate does about missing columns: `statements` add back `restored`
    ("table.column"); `conflicts` are the columns it cannot add back, each with its fix."""

    statements: tuple[str, ...] = ()
    restored: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()


def plan_repair(missing: Sequence[str], applied: Collection[str]) -> Repair:
    """For each missing "table.column" that a recorded migration created: add it back, or
    name it as a conflict. A column of a migration not yet applied is that migration's job."""
    statements, restored, conflicts = [], [], []
    for name in missing:
        table, _, column = name.partition(".")
        known = COLUMNS.get(table, {}).get(column)
        if known is None or known.version not in applied:
            continue
        if known.definition is None:
            conflicts.append(refusal(table, column, known))
            continue
        statements.append(
            f"alter table {table} add column if not exists {column} {known.definition};"
        )
        restored.append(name)
    return Repair(tuple(statements), tuple(restored), tuple(conflicts))


def refusal(table: str, column: str, known: Column) -> str:
    return (
        f"table {table}, column {column}: missing, and migrate cannot add it back to the rows "
        f"the table holds ({known.refused}); fix: restore the column from a backup of {table}"
    )


def repairable(name: str) -> bool:
    """Whether migrate adds "table.column" back when it is missing."""
    table, _, column = name.partition(".")
    known = COLUMNS.get(table, {}).get(column)
    return known is not None and known.definition is not None


def created_by(table: str) -> str:
    """The migration that creates `table`: the earliest one defining a column of it."""
    return min(column.version for column in COLUMNS[table].values())


def columns_by_table() -> dict[str, tuple[str, ...]]:
    return {table: tuple(columns) for table, columns in COLUMNS.items()}
