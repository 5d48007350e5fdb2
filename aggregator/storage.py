"""Postgres access: connecting (Supabase poolers included), schema checks, reads and the upsert.

All SQL lives here. Statements are plain (no server-side prepared statements are relied on)
because Supabase's transaction pooler on port 6543 hands each transaction to a different backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import asyncpg

from aggregator.config import Secret, Settings
from aggregator.model import (
    AccountRefresh,
    GscAccount,
    LearnedRate,
    Site,
    SiteError,
    SiteHistory,
    SiteId,
)
from aggregator.redaction import redact, register_secret

# gsc_learned_rates comes with migration 004: its absence means the schema predates it.
REQUIRED_TABLES = (
    "gsc_accounts",
    "sites",
    "daily_analytics",
    "aggregator_runs",
    "gsc_learned_rates",
)


class StorageError(Exception):
    """The database cannot be used; the message says what to fix and never holds the password."""


class RunLocked(StorageError):
    """Another run holds the run lease on this database."""


# No single statement of the job may run (or wait for a lock) longer than this.
STATEMENT_BOUND_CAP_SECONDS = 600.0


@dataclass(slots=True)
class DailyRow:
    """One (site, day) row as staged for the upsert. None for a source means: leave it alone."""

    site_id: SiteId
    day: date
    matomo: tuple[int, int] | None = None
    gsc: tuple[int, int, float | None, float | None, bool] | None = None


def describe_dsn(dsn: str) -> str:
    """host:port/database of a DSN, for error messages (never the user info or query)."""
    parts = urlsplit(dsn)
    host = parts.hostname or "local socket"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path or ''}"


async def connect(database_url: Secret, *, connect_timeout: float = 10.0) -> asyncpg.Pool:
    """Open a small pool, turning every connection failure into one clear StorageError.

    statement_cache_size=0 keeps asyncpg on unnamed statements, which is what PgBouncer and
    Supavisor in transaction mode need; for this job's handful of statements the cost is nil.
    """
    dsn = database_url.reveal()
    where = describe_dsn(dsn)
    try:
        return await asyncpg.create_pool(
            dsn, min_size=1, max_size=4, statement_cache_size=0, timeout=connect_timeout
        )
    except asyncpg.InvalidPasswordError:
        raise StorageError(
            f"database at {where} rejected the user name or password in DATABASE_URL"
        ) from None
    except asyncpg.InvalidCatalogNameError:
        raise StorageError(f"database at {where} does not exist: check DATABASE_URL") from None
    except TimeoutError:
        raise StorageError(
            f"database at {where} did not answer within {connect_timeout:.0f}s"
        ) from None
    except socket.gaierror:
        raise StorageError(f"database host in DATABASE_URL ({where}) cannot be resolved") from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = " ".join(_scrub(str(exc) or type(exc).__name__, dsn).split())  # one line
        raise StorageError(
            f"cannot connect to database at {where}: {reason}{_connect_hint(reason, dsn)}"
        ) from None


_TLS_DEMANDED = frozenset({"require", "verify-ca", "verify-full"})


# asyncpg's words for a peer that hung up before PostgreSQL's greeting.
_HUNG_UP = ("unexpected connection_lost() call", "connection was closed in the middle of operation")


def _connect_hint(reason: str, dsn: str) -> str:
    """What asyncpg's reason means for the operator. It says "rejected SSL upgrade" both when a
    server refuses the TLS that sslmode demands and when what answers is no PostgreSQL at all
    (an HTTP server on that port), so the DSN's sslmode tells which."""
    if "rejected SSL upgrade" in reason:
        modes = parse_qs(urlsplit(dsn).query).get("sslmode") or [os.environ.get("PGSSLMODE", "")]
        if modes[-1] in _TLS_DEMANDED:
            return f" (DATABASE_URL asks for sslmode={modes[-1]}; the server offers no TLS)"
        return " (what answers there is not PostgreSQL: check the host and port in DATABASE_URL)"
    if reason in _HUNG_UP:
        return (
            " (the server hung up before PostgreSQL's greeting: check the host and port in "
            "DATABASE_URL and that the server or pooler accepts connections)"
        )
    return ""


def _scrub(text: str, dsn: str) -> str:
    password = urlsplit(dsn).password
    return text.replace(password, "***") if password else text


async def missing_tables(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        "select t.name from unnest($1::text[]) as t(name) where to_regclass(t.name) is null",
        list(REQUIRED_TABLES),
    )
    return [row["name"] for row in rows]


async def missing_columns(
    conn: asyncpg.Connection, required: Mapping[str, Sequence[str]]
) -> list[str]:
    """`table.column` of each required column absent from its (existing) table."""
    wanted = [(table, column) for table, columns in required.items() for column in columns]
    rows = await conn.fetch(
        """
        select w.t || '.' || w.c as name
        from unnest($1::text[], $2::text[]) with ordinality as w(t, c, n)
        where to_regclass(w.t) is not null
          and not exists (
              select 1 from pg_attribute a
              where a.attrelid = to_regclass(w.t) and a.attname = w.c
                and a.attnum > 0 and not a.attisdropped)
        order by w.n
        """,
        [table for table, _ in wanted],
        [column for _, column in wanted],
    )
    return [row["name"] for row in rows]


async def require_schema(conn: asyncpg.Connection) -> None:
    """StorageError naming the fix unless every table and column the job uses is there: a
    column dropped after migrating (by the dashboard's owners, by hand) must stop the command
    in one line, not crash it on the first statement that reads it."""
    missing = await missing_tables(conn)
    if missing:
        raise StorageError(f"database has no table {missing[0]}: run `aggregator migrate`")
    # migrations imports this module, so its column list is looked up here, when needed.
    from aggregator.migrations import missing_column_fix, required_columns

    absent = await missing_columns(conn, required_columns())
    if absent:
        raise StorageError(f"database has no column {absent[0]}: {missing_column_fix(absent[0])}")


async def time_zone_refusal(conn: asyncpg.Connection, zone: ZoneInfo) -> str | None:
    """Why the database cannot count days in `zone` (None when it can). Postgres computes each
    site's deployment day in AGGREGATOR_TIMEZONE (`at time zone`) from time zone data of its
    own, which may lack a zone this machine's Python knows (a newer zone, an older server)."""
    try:
        await conn.fetchval("select now() at time zone $1", zone.key)
    except asyncpg.InvalidParameterValueError:
        return (
            f"AGGREGATOR_TIMEZONE {zone.key}: the database does not know this time zone (its "
            "time zone data differs from this machine's); fix: set AGGREGATOR_TIMEZONE to a zone "
            "with the same clock that the database knows (select name from pg_timezone_names)"
        )
    return None


async def require_time_zone(conn: asyncpg.Connection, zone: ZoneInfo) -> None:
    """StorageError (one line, exit 2) unless the database knows AGGREGATOR_TIMEZONE."""
    refusal = await time_zone_refusal(conn, zone)
    if refusal is not None:
        raise StorageError(refusal)


def site_name_sql(alias: str) -> str:
    """SQL naming a site as every command does: its domain or, when it has none (an adopted
    sites table need not require one: NULL or blank), `site <id> without a domain`, so runs,
    errors, `status` and `check` can still say which site."""
    return (
        f"case when btrim(coalesce({alias}.domain, '')) = '' "
        f"then 'site ' || {alias}.id::text || ' without a domain' else {alias}.domain end"
    )


async def load_sites(conn: asyncpg.Connection, domains: Sequence[str] = ()) -> list[Site]:
    """Monitored sites (active and deployed), optionally only those named (case-insensitive)."""
    rows = await conn.fetch(
        f"""
        select s.id, {site_name_sql("s")} as name, s.matomo_site_id, s.gsc_account_id,
               s.gsc_property
        from sites s
        where s.is_active and s.deployed_at is not null
          and (cardinality($1::text[]) = 0
               or lower(rtrim(btrim(s.domain), '.')) = any($1::text[]))
        order by s.id
        """,
        [domain_key(d) for d in domains],
    )
    return [
        Site(
            id=row["id"],
            domain=row["name"],
            matomo_site_id=row["matomo_site_id"],
            gsc_account_id=row["gsc_account_id"],
            gsc_property=row["gsc_property"],
        )
        for row in rows
    ]


def domain_key(domain: str) -> str:
    """How `--site` matches sites.domain: the same folding as the SQL in load_sites
    (`lower(rtrim(btrim(domain), '.'))`), so Python and Postgres agree on what "the same site" is."""
    return domain.strip().lower().rstrip(".")


async def load_active_accounts(
    conn: asyncpg.Connection, token_overrides: Mapping[int, Secret]
) -> dict[int, GscAccount]:
    """Active Google accounts; GSC_REFRESH_TOKEN_<id> from the environment wins over the table."""
    rows = await conn.fetch(
        "select id, email, refresh_token from gsc_accounts where is_active order by id"
    )
    accounts = {}
    for row in rows:
        override = token_overrides.get(row["id"])
        token = override.reveal() if override else row["refresh_token"]
        register_secret(token)
        accounts[row["id"]] = GscAccount(id=row["id"], email=row["email"], refresh_token=token)
    return accounts


# Set-based, however many sites: one pass over the heal range's stored rows counts each site's
# days with a value per source (one index range per site on the primary key); only the sites
# short of a day (a few, on a normal night) get their days enumerated to find the oldest gap.
# A day has a value when its numbers are there (Matomo's visits; Search Console's final flag,
# which is NULL exactly where no numbers are stored), as `status` counts it: a row whose numbers
# were cleared keeps its timestamp, yet it is a gap to heal like a missing row.
_SITE_HISTORIES = """
with monitored as (
    select s.id, (s.deployed_at at time zone $4)::date as deployed_on,
           greatest($2::date, (s.deployed_at at time zone $4)::date) as first_day,
           s.matomo_site_id is not null as has_matomo, s.gsc_account_id is not null as has_gsc
    from sites s
    where s.id = any($1)
),
stored as (
    select d.site_id,
           count(*) filter (where d.date <= $3 and d.matomo_visits is not null
                            and d.date >= m.first_day) as matomo_days,
           count(*) filter (where d.date <= $3 and d.gsc_final
                            and d.date >= m.first_day) as gsc_days,
           max(d.matomo_updated_at) as matomo_served_at,
           max(d.gsc_updated_at) as gsc_served_at
    from daily_analytics d
    join monitored m on m.id = d.site_id
    where d.site_id = any($1) and d.date >= $2
    group by d.site_id
),
short as (
    select m.id, m.first_day,
           m.has_matomo and coalesce(st.matomo_days, 0) <= $3::date - m.first_day as matomo_short,
           m.has_gsc and coalesce(st.gsc_days, 0) <= $3::date - m.first_day as gsc_short
    from monitored m
    left join stored st on st.site_id = m.id
    where m.first_day <= $3
),
gaps as (
    select sh.id, oldest.matomo_heal_from, oldest.gsc_heal_from
    from short sh
    cross join lateral (
        select min(sh.first_day + g.n) filter (
                   where sh.matomo_short and d.matomo_visits is null
               ) as matomo_heal_from,
               min(sh.first_day + g.n) filter (
                   where sh.gsc_short and d.gsc_final is not true
               ) as gsc_heal_from
        from generate_series(0, $3::date - sh.first_day) as g(n)
        left join daily_analytics d
            on d.site_id = sh.id and d.date = sh.first_day + g.n
            and d.date between sh.first_day and $3  -- lets the key's index read only these days
    ) as oldest
    where sh.matomo_short or sh.gsc_short
)
select m.id as site_id, m.deployed_on, gaps.matomo_heal_from, gaps.gsc_heal_from,
       st.matomo_served_at, st.gsc_served_at
from monitored m
left join gaps on gaps.id = m.id
left join stored st on st.site_id = m.id
"""


async def site_histories(
    conn: asyncpg.Connection,
    site_ids: Sequence[SiteId],
    *,
    heal_limit: date,
    lookback_start: date,
    zone: str,
) -> dict[SiteId, SiteHistory]:
    """Per site: its deployment day in `zone`, its oldest day to heal per source and when each
    source last served it; in a few set-based statements, so 10,000 sites plan in milliseconds."""
    async with conn.transaction():
        # The row estimates of generate_series are blind (1,000 a call), so the planner would
        # JIT-compile a cheap query; compiling cost more than running it (measured: 250 ms).
        await conn.execute("set local jit = off")
        rows = await conn.fetch(
            _SITE_HISTORIES, list(site_ids), heal_limit, lookback_start - timedelta(days=1), zone
        )
    # The statement names its columns after SiteHistory's fields.
    return {row["site_id"]: SiteHistory(**dict(row)) for row in rows}


STAGE_COLUMNS = (
    "site_id",
    "date",
    "has_matomo",
    "matomo_visits",
    "matomo_actions",
    "has_gsc",
    "gsc_clicks",
    "gsc_impressions",
    "gsc_ctr",
    "gsc_position",
    "gsc_final",
)

_MATOMO_COLUMNS = ("matomo_visits", "matomo_actions")
_GSC_COLUMNS = ("gsc_clicks", "gsc_impressions", "gsc_ctr", "gsc_position", "gsc_final")


def _differs(columns: Sequence[str]) -> str:
    return (
        f"({', '.join(f'd.{c}' for c in columns)}) is distinct from "
        f"({', '.join(f'excluded.{c}' for c in columns)})"
    )


# Whether a source's numbers are to be written into an existing row. A source that did not
# answer stages no timestamp (so its columns are left alone); only changed values are
# written, so a re-run leaves rows (timestamps included) exactly as they were; and a
# provisional answer never replaces numbers already stored as final.
_MATOMO_CHANGED = f"excluded.matomo_updated_at is not null and {_differs(_MATOMO_COLUMNS)}"
_GSC_CHANGED = (
    f"excluded.gsc_updated_at is not null and {_differs(_GSC_COLUMNS)}"
    " and not (d.gsc_final is true and excluded.gsc_final is false)"
)


def _keep_unless(changed: str, columns: Sequence[str]) -> list[str]:
    return [f"{c} = case when {changed} then excluded.{c} else d.{c} end" for c in columns]


_SET_CLAUSES = ",\n    ".join(
    _keep_unless(_MATOMO_CHANGED, (*_MATOMO_COLUMNS, "matomo_updated_at"))
    + _keep_unless(_GSC_CHANGED, (*_GSC_COLUMNS, "gsc_updated_at"))
)

# One statement for both sources, so each row is written once (a new row is not inserted by
# one statement and rewritten by the next): half the row versions, index entries and WAL.
# Only rows whose site still exists are written: the join locks each site row (key share)
# so a site deleted by the dashboard while a run goes on loses only its own rows (a deletion
# that committed first skips them; one that comes later waits, then cascades) instead of
# failing the whole flush on the foreign key. The counts say which halves were written.
_UPSERT = f"""
with written as (
    insert into daily_analytics as d
        (site_id, date, {", ".join(_MATOMO_COLUMNS)}, matomo_updated_at,
         {", ".join(_GSC_COLUMNS)}, gsc_updated_at)
    select s.site_id, s.date, {", ".join(f"s.{c}" for c in _MATOMO_COLUMNS)},
           case when s.has_matomo then now() end,
           {", ".join(f"s.{c}" for c in _GSC_COLUMNS)}, case when s.has_gsc then now() end
    from aggregator_stage s join sites on sites.id = s.site_id
    where s.has_matomo or s.has_gsc
    for key share of sites
    on conflict (site_id, date) do update
    set {_SET_CLAUSES}
    where ({_MATOMO_CHANGED}) or ({_GSC_CHANGED})
    returning d.matomo_updated_at = now() as matomo, d.gsc_updated_at = now() as gsc
)
select now() as at,
       count(*) filter (where matomo) as matomo,
       count(*) filter (where gsc) as gsc
from written
"""


# The staging table takes its column types from daily_analytics itself: site_id is whatever
# sites.id is in this project (bigint, integer, uuid or text), with no type written here.
_CREATE_STAGE = f"""
create temporary table aggregator_stage on commit drop as
select site_id, date,
       false as has_matomo, {", ".join(_MATOMO_COLUMNS)},
       false as has_gsc, {", ".join(_GSC_COLUMNS)}
from daily_analytics
with no data
"""


@dataclass(frozen=True, slots=True)
class Flushed:
    """What one upsert did: rows sent, source halves actually written, and the transaction
    time that those written halves carry in their *_updated_at columns."""

    rows: int
    matomo: int
    gsc: int
    at: datetime


StagedRow = list[object]
"""One (site, day) row as the staging table takes it, columns in STAGE_COLUMNS order (a list:
the in-memory table fills in each source's half where it stands, and COPY reads it as is)."""


def stage_record(row: DailyRow) -> tuple:
    """A DailyRow in STAGE_COLUMNS order: a source left alone stages no values and no flag."""
    matomo = row.matomo or (None, None)
    gsc = row.gsc or (None, None, None, None, None)
    return (row.site_id, row.day, row.matomo is not None, *matomo, row.gsc is not None, *gsc)


def daily_row(staged: Sequence[object]) -> DailyRow:
    """The DailyRow a staged record stands for (a dry run prints these)."""
    site_id, day, has_matomo, visits, actions, has_gsc, *gsc = staged
    return DailyRow(
        site_id,  # type: ignore[arg-type]
        day,  # type: ignore[arg-type]
        matomo=(visits, actions) if has_matomo else None,  # type: ignore[arg-type]
        gsc=tuple(gsc) if has_gsc else None,  # type: ignore[arg-type]
    )


async def upsert_daily_rows(conn: asyncpg.Connection, rows: Iterable[DailyRow]) -> int:
    """Bulk-upsert rows in one transaction; return the rows sent.

    Keys must be unique (the caller joins per key). Rows are streamed into the COPY as they are
    read, so a generator of a million rows costs no more memory than a handful."""
    sent = 0

    def counted() -> Iterator[tuple]:
        nonlocal sent
        for row in rows:
            sent += 1
            yield stage_record(row)

    async with conn.transaction():
        await _stage_and_write(conn, counted())
    return sent


async def stage_and_upsert(
    conn: asyncpg.Connection, records: Collection[Sequence[object]]
) -> Flushed:
    """Upsert staged records (STAGE_COLUMNS order, unique keys) inside the caller's transaction:
    one flush of the in-memory table."""
    if not records:
        return Flushed(0, 0, 0, await conn.fetchval("select now()"))
    result = await _stage_and_write(conn, records)
    return Flushed(len(records), result["matomo"], result["gsc"], result["at"])


async def _stage_and_write(
    conn: asyncpg.Connection, records: Iterable[Sequence[object]]
) -> asyncpg.Record:
    """Binary COPY into a staging table, then one INSERT ... ON CONFLICT in which each source
    writes only its own columns. Call inside a transaction (the staging table dies with it)."""
    await conn.execute(_CREATE_STAGE)
    await conn.copy_records_to_table("aggregator_stage", records=records, columns=STAGE_COLUMNS)
    return await conn.fetchrow(_UPSERT)


async def has_column(conn: asyncpg.Connection, table: str, column: str) -> bool:
    """Whether `table` (on the search path) has `column`: code reading a column a later
    migration adds keeps working on a schema not yet migrated."""
    return await conn.fetchval(
        """
        select exists (select 1 from pg_attribute
                       where attrelid = to_regclass($1) and attname = $2
                         and attnum > 0 and not attisdropped)
        """,
        table,
        column,
    )


async def record_account_refreshes(
    conn: asyncpg.Connection, refreshes: Sequence[AccountRefresh]
) -> None:
    """Each attempt, successful or not, sets last_refresh_at to its time and last_error to its
    one-line error (null after a success), as the contract says. Where migrations 005 and 006
    are applied, failing_since keeps the first failure of the current streak (cleared by a
    success) and last_success_at the latest success, so `check` can say how long a token has
    been dead and why. An attempt older than the one recorded (a `check` and a run racing)
    changes nothing, so the row always describes the latest attempt."""
    if not refreshes:
        return
    health = [
        clause
        for column, clause in (
            (
                "failing_since",
                "failing_since = case when $3::text is null then null"
                " else coalesce(failing_since, $2) end",
            ),
            (
                "last_success_at",
                "last_success_at = case when $3::text is null then $2 else last_success_at end",
            ),
        )
        if await has_column(conn, "gsc_accounts", column)
    ]
    await conn.executemany(
        f"""
        update gsc_accounts
        set {", ".join(["last_refresh_at = $2", "last_error = $3", *health])}
        where id = $1 and (last_refresh_at is null or last_refresh_at <= $2)
        """,
        [(r.account_id, r.at, r.error and " ".join(redact(r.error).split())) for r in refreshes],
    )


def _errors_json(errors: Sequence[SiteError]) -> str:
    """The run row's `errors`, masked once more on the way in (no secret is ever stored)."""
    return json.dumps(
        [{"site": e.site, "source": e.source, "error": redact(e.error)} for e in errors]
    )


async def start_run(
    conn: asyncpg.Connection,
    start: date,
    end: date,
    sites_total: int,
    *,
    lease_seconds: float = 3600.0,
    owner: str | None = None,
) -> int | None:
    """Open a `running` row holding the run lease for `lease_seconds`; None when another
    live run holds it (one `running` row at a time: a unique partial index)."""
    return await conn.fetchval(
        """
        insert into aggregator_runs
            (date_from, date_to, status, sites_total, heartbeat_at, lease_until, lease_owner)
        values ($1, $2, 'running', $3, now(), now() + make_interval(secs => $4), $5)
        on conflict do nothing
        returning id
        """,
        start,
        end,
        sites_total,
        lease_seconds,
        owner,
    )


async def close_dead_runs(conn: asyncpg.Connection, error: str) -> int:
    """Close as `failed` every `running` row whose lease ran out: its process died (a live one
    renews its lease well before). Its finish time is its last sign of life."""
    closed = await conn.fetch(
        """
        update aggregator_runs
        set status = 'failed',
            finished_at = coalesce(heartbeat_at, started_at),
            lease_until = null,
            errors = errors || jsonb_build_array(jsonb_build_object(
                'site', '(run)', 'source', 'pipeline', 'error', $1::text))
        where status = 'running' and (lease_until is null or lease_until < now())
        returning id
        """,
        error,
    )
    return len(closed)


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    """The live run that holds the lease, as an operator needs it in a message."""

    run_id: int
    owner: str | None
    started_at: datetime
    expires_in: float  # seconds until its lease runs out unless renewed (the server's clock)


async def lease_holder(conn: asyncpg.Connection) -> LeaseHolder | None:
    row = await conn.fetchrow(
        """
        select id, lease_owner, started_at,
               greatest(extract(epoch from lease_until - now()), 0)::float8 as expires_in
        from aggregator_runs where status = 'running'
        """
    )
    if row is None:
        return None
    return LeaseHolder(row["id"], row["lease_owner"], row["started_at"], row["expires_in"])


async def renew_lease(
    conn: asyncpg.Connection,
    run_id: int,
    lease_seconds: float,
    *,
    add_rows: int = 0,
    errors: Sequence[SiteError] | None = None,
    stats: Mapping[str, Mapping[str, float]] | None = None,
) -> bool:
    """Extend this run's lease (and record progress: rows, errors and API figures so far, so
    the row of a run killed later still tells what it did); False when the run no longer
    holds it (another run found it expired and closed it). Inside a flush transaction this
    also locks the run row, so no other run can take the lease before the flush commits."""
    renewed = await conn.fetchval(
        """
        update aggregator_runs
        set heartbeat_at = now(), lease_until = now() + make_interval(secs => $2),
            rows_upserted = rows_upserted + $3, errors = coalesce($4::jsonb, errors),
            stats = coalesce($5::jsonb, stats)
        where id = $1 and status = 'running'
        returning id
        """,
        run_id,
        lease_seconds,
        add_rows,
        None if errors is None else _errors_json(errors),
        None if stats is None else json.dumps(stats),
    )
    return renewed is not None


async def load_learned_rates(conn: asyncpg.Connection) -> dict[tuple[str, str], LearnedRate]:
    """The Search Console query rates earlier runs learned, keyed (scope, key)."""
    rows = await conn.fetch(
        "select scope, key, queries_per_second, limit_shown from gsc_learned_rates"
    )
    return {
        (row["scope"], row["key"]): LearnedRate(row["queries_per_second"], row["limit_shown"])
        for row in rows
    }


async def save_learned_rates(
    conn: asyncpg.Connection, rates: Mapping[tuple[str, str], LearnedRate]
) -> None:
    """Store what this run learned, where the next run starts."""
    if not rates:
        return
    await conn.execute(
        """
        insert into gsc_learned_rates (scope, key, queries_per_second, limit_shown, learned_at)
        select scope, key, qps, limit_shown, now()
        from unnest($1::text[], $2::text[], $3::float8[], $4::bool[])
            as t(scope, key, qps, limit_shown)
        on conflict (scope, key) do update
        set queries_per_second = excluded.queries_per_second,
            limit_shown = excluded.limit_shown,
            learned_at = excluded.learned_at
        """,
        [scope for scope, _ in rates],
        [key for _, key in rates],
        [rate.queries_per_second for rate in rates.values()],
        [rate.limit_shown for rate in rates.values()],
    )


async def finish_run(
    conn: asyncpg.Connection,
    run_id: int,
    *,
    status: str,
    rows_upserted: int,
    errors: Sequence[SiteError],
    finished_at: datetime | None = None,
    stats: Mapping[str, Mapping[str, float]] | None = None,
) -> bool:
    """Close this run's row and release its lease; `stats` is each source's API figures
    (aggregator.api_stats). False when another run had already closed it (this run lost its
    lease), whose verdict then stands."""
    closed = await conn.fetchval(
        """
        update aggregator_runs
        set finished_at = coalesce($2, now()), status = $3, rows_upserted = $4,
            errors = $5::jsonb, stats = $6::jsonb, lease_until = null
        where id = $1 and status = 'running'
        returning id
        """,
        run_id,
        finished_at,
        status,
        rows_upserted,
        _errors_json(errors),
        json.dumps(stats or {}),
    )
    return closed is not None


async def bound_statements(conn: asyncpg.Connection, seconds: float) -> None:
    """Bound every statement of the current transaction (running and waiting for locks) by
    `seconds`, so a blocked table, a signal or the run's deadline always reach the store.
    At least 1 ms (0 would mean no bound) and at most STATEMENT_BOUND_CAP_SECONDS."""
    ms = max(1, min(int(seconds * 1000), int(STATEMENT_BOUND_CAP_SECONDS * 1000)))
    await conn.execute(f"set local statement_timeout = {ms}; set local lock_timeout = {ms}")


@contextlib.asynccontextmanager
async def schema_connection(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a database whose tables exist; ConfigError/StorageError otherwise."""
    settings.require_database()
    pool = await connect(settings.database_url)
    try:
        async with pool.acquire() as conn:
            await require_schema(conn)
            yield conn
    finally:
        await pool.close()
