"""`aggregator check`: will tonight's run work? Configuration, database, tokens and site ids.

A handful of requests in total: one Matomo call listing the site ids MATOMO_TOKEN can view, and
per active Google account (those without sites too, so no token dies of disuse) one token
refresh and one sites.list, all concurrent. Nothing is fetched or written except each refresh
attempt's record in gsc_accounts (last_refresh_at, last_error and the token-health columns),
written exactly as a run writes it.

The verdict is a pure function of gathered facts (`build_report`), so every rule is tested
without a network; `gather_facts` is the edge that asks the database, Matomo and Google.

Exit status: 0 no problem (warnings and notes allowed), 1 at least one problem (a missing or
outdated schema included: it is reported as a row), 2 the check could not run (configuration
invalid or database unreachable; raised as ConfigError/StorageError for cli.main).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import textwrap
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import aiohttp
import asyncpg

from aggregator import matomo, migrations, storage, token_health
from aggregator.config import Settings, default_of
from aggregator.model import Site
from aggregator.output import stdout_closed_at_start
from aggregator.search_console import client as gsc
from aggregator.search_console.answers import ReadableProperties, candidate_properties
from aggregator.search_console.oauth import (
    ClientMisconfigured,
    MissingRefreshToken,
    ReconnectRequired,
    TokenEndpointRedirected,
    TokenEndpointUnavailable,
)
from aggregator.text_table import table_lines
from aggregator.token_health import TokenHealth

EXIT_OK, EXIT_PROBLEMS = 0, 1
Level = Literal["problem", "warning", "note"]
_LEVEL_ORDER: dict[str, int] = {"problem": 0, "warning": 1, "note": 2}
_LEVEL_SHOWN = {"problem": "PROBLEM", "warning": "warning", "note": "note"}

# A check is interactive: fail over a transient fault after one retry, not after minutes.
CHECK_MAX_ATTEMPTS = 2
CHECK_TIMEOUT_SECONDS = 60.0
CHECK_QUOTA_MAX_WAIT_SECONDS = 15.0

# The columns the job needs, as the migrations define them (with their types).
REQUIRED_COLUMNS: Mapping[str, tuple[str, ...]] = migrations.required_columns()


# --- facts (what was found) and the report (what it means) ------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One finding: `subject` is a site, an account, a setting or the database."""

    level: Level
    subject: str
    check: str
    problem: str
    fix: str


@dataclass(frozen=True, slots=True)
class AccountInfo:
    """A gsc_accounts row without its token; `health` as stored before this check."""

    id: int
    email: str
    active: bool
    health: TokenHealth = field(default_factory=TokenHealth)


@dataclass(frozen=True, slots=True)
class SchemaFacts:
    missing_tables: tuple[str, ...] = ()
    missing_columns: tuple[str, ...] = ()  # "table.column"
    migration_files: tuple[str, ...] = ()
    applied: frozenset[str] | None = None  # None: no aggregator_schema_migrations table
    key_conflicts: tuple[str, ...] = ()  # "what is wrong; fix: how", as migrate words them

    @property
    def usable(self) -> bool:
        return not self.missing_tables and not self.missing_columns


@dataclass(frozen=True, slots=True)
class MatomoFacts:
    """The answer to the one Matomo request: the viewable ids, or why there are none."""

    viewable: frozenset[int] | None = None
    error: str | None = None
    refused: bool = False


@dataclass(frozen=True)
class Facts:
    database: str
    schema: SchemaFacts
    zone_refused: str | None = None  # why the database cannot count days in the timezone
    matomo_configured: bool = False
    gsc_configured: bool = False
    sites: tuple[Site, ...] = ()
    accounts: Mapping[int, AccountInfo] = field(default_factory=dict)
    token_overrides: frozenset[int] = frozenset()
    matomo_answer: MatomoFacts | None = None  # None: not asked
    google_access: Mapping[int, gsc.AccountAccess] = field(default_factory=dict)  # by account
    now: datetime = field(default_factory=lambda: datetime.now(UTC))  # for token ages


@dataclass(frozen=True)
class Report:
    rows: tuple[Row, ...]
    verified: tuple[str, ...]
    sites: int
    accounts: int

    def count(self, level: Level) -> int:
        return sum(1 for row in self.rows if row.level == level)

    @property
    def exit_code(self) -> int:
        return EXIT_PROBLEMS if self.count("problem") else EXIT_OK

    def summary(self) -> str:
        problems, warnings, notes = (self.count(lv) for lv in ("problem", "warning", "note"))
        return (
            f"checked {self.sites} sites, {self.accounts} accounts: "
            f"{_plural(problems, 'problem')}, {_plural(warnings, 'warning')}, "
            f"{_plural(notes, 'note')}"
        )


def build_report(facts: Facts) -> Report:
    """Every finding, problems first; `verified` says in one line per area what is fine."""
    rows: list[Row] = []
    verified: list[str] = []
    _schema_rows(facts, rows, verified)
    if facts.zone_refused is not None:
        problem, _, fix = facts.zone_refused.partition("; fix: ")
        rows.append(Row("problem", "AGGREGATOR_TIMEZONE", "database", problem, fix))
    checked_accounts = 0
    if facts.schema.usable:
        _site_rows(facts, rows)
        _matomo_rows(facts, rows, verified)
        checked_accounts = _gsc_rows(facts, rows, verified)
    rows.sort(key=lambda row: _LEVEL_ORDER[row.level])  # stable: areas keep their order
    return Report(tuple(rows), tuple(verified), len(facts.sites), checked_accounts)


def _schema_rows(facts: Facts, rows: list[Row], verified: list[str]) -> None:
    schema = facts.schema
    migrate = "run `aggregator migrate`"
    if schema.missing_tables:
        rows.append(
            Row(
                "problem",
                "database",
                "schema",
                f"no table {', '.join(schema.missing_tables)}; sites and accounts not checked",
                migrate,
            )
        )
    if schema.missing_columns:
        rows.append(
            Row(
                "problem",
                "database",
                "schema",
                f"missing column {', '.join(schema.missing_columns)}; sites and accounts "
                "not checked",
                migrations.missing_column_fix(schema.missing_columns[0]),
            )
        )
    for conflict in schema.key_conflicts:
        problem, _, fix = conflict.partition("; fix: ")
        rows.append(Row("problem", "database", "schema", problem, fix))
    if not schema.usable:
        verified.append(f"database {facts.database}: reachable")
        return
    files = set(schema.migration_files)
    if schema.applied is None:
        rows.append(
            Row(
                "warning",
                "database",
                "schema",
                "tables exist but no migration is recorded (created by hand?)",
                f"{migrate} (idempotent) so later migrations apply",
            )
        )
    else:
        pending = sorted(files - schema.applied)
        unknown = sorted(schema.applied - files)
        if pending:
            rows.append(
                Row("problem", "database", "schema", f"not applied: {', '.join(pending)}", migrate)
            )
        if unknown:
            rows.append(
                Row(
                    "warning",
                    "database",
                    "schema",
                    f"applied migrations this version does not have: {', '.join(unknown)}",
                    "upgrade aggregator to the version that wrote them",
                )
            )
        if not pending:
            latest = max(schema.applied & files, default="none")
            verified.append(f"database {facts.database}: schema up to date ({latest})")
            return
    verified.append(f"database {facts.database}: reachable, tables present")


def _site_rows(facts: Facts, rows: list[Row]) -> None:
    """Notes and warnings about the portfolio itself; none of them fails the check."""
    sites = sorted(facts.sites, key=lambda s: s.domain)
    for site in sites:
        if site.matomo_site_id is None:
            rows.append(
                Row(
                    "note",
                    site.domain,
                    "matomo",
                    "no matomo_site_id: Matomo visits are not collected",
                    "set sites.matomo_site_id if it is tracked in Matomo",
                )
            )
        if site.gsc_account_id is None:
            rows.append(
                Row(
                    "note",
                    site.domain,
                    "gsc",
                    "no gsc_account_id: Search Console data is not collected",
                    "set sites.gsc_account_id to an account's id",
                )
            )
    by_matomo_id: dict[int, list[str]] = defaultdict(list)
    for site in sites:
        if site.matomo_site_id is not None:
            by_matomo_id[site.matomo_site_id].append(site.domain)
    for matomo_id, domains in sorted(by_matomo_id.items()):
        if len(domains) > 1:
            rows.append(
                Row(
                    "warning",
                    f"matomo_site_id {matomo_id}",
                    "matomo",
                    f"shared by {_listing(domains)}: each gets the same visits",
                    "correct sites.matomo_site_id",
                )
            )
    inactive: dict[int, list[str]] = defaultdict(list)
    for site in sites:
        account = facts.accounts.get(site.gsc_account_id) if site.gsc_account_id else None
        if account is not None and not account.active:
            inactive[account.id].append(site.domain)
    # Every run skips these sites' Search Console numbers and so ends partial (exit 1): a
    # problem, not a warning, or check would call well what no run can finish.
    for account_id, domains in sorted(inactive.items()):
        email = facts.accounts[account_id].email
        rows.append(
            Row(
                "problem",
                email,
                "gsc account",
                f"inactive but assigned to {_plural(len(domains), 'monitored site')} "
                f"({_listing(domains)}): their Search Console data is not collected",
                f"`aggregator accounts add {email}` to reactivate, or reassign "
                "sites.gsc_account_id",
            )
        )
    for account_id in sorted(facts.token_overrides - facts.accounts.keys()):
        rows.append(
            Row(
                "warning",
                f"GSC_REFRESH_TOKEN_{account_id}",
                "configuration",
                f"no gsc_accounts row has id {account_id}: the variable is unused",
                "remove it or correct the id",
            )
        )


def _matomo_rows(facts: Facts, rows: list[Row], verified: list[str]) -> None:
    tracked = sorted(
        (s for s in facts.sites if s.matomo_site_id is not None), key=lambda s: s.domain
    )
    if not tracked:
        verified.append("Matomo: not used (no monitored site has a matomo_site_id)")
        return
    if not facts.matomo_configured:
        rows.append(
            Row(
                "problem",
                "MATOMO_URL, MATOMO_TOKEN",
                "configuration",
                f"not set, but {_plural(len(tracked), 'monitored site')} have a matomo_site_id",
                "set MATOMO_URL and MATOMO_TOKEN (environment or .env)",
            )
        )
        return
    answer = facts.matomo_answer
    if answer is None:
        return
    token_fix = (
        "set MATOMO_TOKEN to the token_auth of a Matomo user with view access to the sites "
        "(Matomo: Administration > Personal > Security > Auth tokens)"
    )
    if answer.refused:
        rows.append(Row("problem", "MATOMO_TOKEN", "matomo token", answer.error or "", token_fix))
        return
    if answer.error is not None or answer.viewable is None:
        rows.append(
            Row(
                "problem",
                "MATOMO_URL",
                "matomo",
                answer.error or "no answer",
                "check that MATOMO_URL is your Matomo's base URL and that Matomo is up",
            )
        )
        return
    if not answer.viewable:
        rows.append(
            Row(
                "problem",
                "MATOMO_TOKEN",
                "matomo token",
                "the token can view no Matomo site: it is wrong or expired, or its user has "
                "no view access",
                token_fix,
            )
        )
        return
    readable = 0
    for site in tracked:
        if site.matomo_site_id in answer.viewable:
            readable += 1
            continue
        rows.append(
            Row(
                "problem",
                site.domain,
                "matomo site",
                f"Matomo site id {site.matomo_site_id} does not exist or MATOMO_TOKEN cannot "
                "view it",
                f"correct sites.matomo_site_id, or give the token's user view access to "
                f"site {site.matomo_site_id}",
            )
        )
    verified.append(f"Matomo token: ok ({readable} of {_plural(len(tracked), 'site')} readable)")


def _gsc_rows(facts: Facts, rows: list[Row], verified: list[str]) -> int:
    """Rows per account and per unreachable site; returns how many accounts were checked.
    Every active account's token is refreshed, those without sites too, so that none dies of
    six months' disuse unnoticed."""
    by_account: dict[int, list[Site]] = {a.id: [] for a in facts.accounts.values() if a.active}
    for site in facts.sites:
        if site.gsc_account_id in by_account:
            by_account[site.gsc_account_id].append(site)
    for email in sorted(facts.accounts[i].email for i, sites in by_account.items() if not sites):
        rows.append(
            Row(
                "note",
                email,
                "gsc account",
                "active, but no monitored site is assigned to it (its token is still refreshed)",
                f"assign sites to it, or `aggregator accounts deactivate {email}`",
            )
        )
    if not any(by_account.values()):
        verified.append("Search Console: not used (no monitored site has an active account)")
    if not facts.gsc_configured:
        count = sum(len(sites) for sites in by_account.values())
        if count:
            rows.append(
                Row(
                    "problem",
                    "GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET",
                    "configuration",
                    f"not set, but {_plural(count, 'monitored site')} have an active Google "
                    "account",
                    "set both to the OAuth client that issued the refresh tokens",
                )
            )
        return 0
    broken = next((a.client_error for a in facts.google_access.values() if a.client_error), None)
    if broken is not None:
        # The OAuth client itself: one row, fixed in the Cloud console; reconnecting accounts
        # cannot help.
        count = sum(len(sites) for sites in by_account.values())
        rows.append(
            Row(
                "problem",
                "GOOGLE_CLIENT_ID",
                "oauth client",
                f"{_one_line(broken)} ({_plural(count, 'site')} without Search Console data)",
                "fix the OAuth client in the Google Cloud console as the problem says; "
                "reconnecting accounts does not help",
            )
        )
        return len(by_account)
    redirected = next(
        (
            a.token_error
            for a in facts.google_access.values()
            if isinstance(a.token_error, TokenEndpointRedirected)
        ),
        None,
    )
    if redirected is not None:
        # GOOGLE_TOKEN_URL itself: every account's refresh meets the same refused redirect, so
        # one row for the setting; reconnecting accounts cannot help.
        count = sum(len(sites) for sites in by_account.values())
        rows.append(
            Row(
                "problem",
                "GOOGLE_TOKEN_URL",
                "token endpoint",
                f"{_endpoint_reason(redirected)} ({_plural(count, 'site')} without Search "
                "Console data)",
                f"unset GOOGLE_TOKEN_URL (Google's is {default_of('GOOGLE_TOKEN_URL')}) or set "
                "it to the right server; redirects are refused by design (every request "
                "carries a secret); reconnecting accounts does not help",
            )
        )
        return len(by_account)
    checked = 0
    site_rows: list[Row] = []  # after every account's own row
    for account_id in sorted(by_account, key=lambda i: facts.accounts[i].email):
        info = facts.accounts[account_id]
        email = info.email
        sites = sorted(by_account[account_id], key=lambda s: s.domain)
        access = facts.google_access.get(account_id)
        if access is None:
            continue
        checked += 1
        health = info.health.after(access.refresh)
        rows.extend(_token_health_rows(email, health, facts.now))
        if access.token_error is not None:
            rows.append(
                Row(
                    "problem" if sites else "warning",
                    email,
                    "gsc token",
                    f"{_one_line(str(access.token_error))} ({_plural(len(sites), 'site')} "
                    f"without Search Console data; {token_health.summary(health, facts.now)})",
                    _token_fix(access.token_error, account_id, email),
                )
            )
            continue
        if access.list_error is not None or access.properties is None:
            rows.append(
                Row(
                    "problem",
                    email,
                    "gsc sites.list",
                    _one_line(access.list_error or "no answer"),
                    "run the check again; if it persists, reconnect with "
                    f"`aggregator accounts add {email}`",
                )
            )
            continue
        reachable = 0
        for site in sites:
            row = _property_row(site, email, access.properties)
            if row is None:
                reachable += 1
            else:
                site_rows.append(row)
        connected = (
            f" (connected {token_health.age(health.connected_at, facts.now)})"
            if health.connected_at
            else ""
        )
        verified.append(
            f"Google account {email}: token ok{connected}, "
            f"{reachable} of {_plural(len(sites), 'site')} reachable"
        )
    rows.extend(sorted(site_rows, key=lambda row: row.subject))
    return checked


def _token_health_rows(email: str, health: TokenHealth, now: datetime) -> list[Row]:
    """A warning when refreshes keep failing (with the likely cause), a note while a young
    token would still die of the Testing-mode expiry."""
    reconnect = f"`aggregator accounts add {email}`"
    if health.failing and health.failing_since is not None and health.failing_since < now:
        cause = token_health.failure_cause(health) or "Google's error above"
        return [
            Row(
                "warning",
                email,
                "token health",
                f"refreshes keep failing since {health.failing_since.date().isoformat()} "
                f"({token_health.age(health.failing_since, now)}): {cause}",
                f"{token_health.PUBLISH_ADVICE}; then {reconnect}"
                if "Testing" in cause
                else f"reconnect: {reconnect}",
            )
        ]
    dies = token_health.testing_deadline(health, now)
    if dies is None:
        return []
    return [
        Row(
            "note",
            email,
            "token health",
            f"connected {token_health.age(health.connected_at, now)}: if the OAuth consent "
            f"screen is in Testing, this token dies on {dies.isoformat()}",
            f"{token_health.PUBLISH_ADVICE}; then reconnect: {reconnect}",
        )
    ]


def resolve_property(
    site: Site, accessible: ReadableProperties
) -> tuple[str | None, tuple[str, ...]]:
    """The property a run would query for `site` (None if the account cannot read it) and
    what was tried: sites.gsc_property when set, else the contract's candidates in order."""
    if site.gsc_property:
        return accessible.spelled(site.gsc_property), (site.gsc_property,)
    return accessible.pick(site.domain), candidate_properties(site.domain)


def _property_row(site: Site, email: str, accessible: ReadableProperties) -> Row | None:
    prop, tried = resolve_property(site, accessible)
    if prop is not None:
        return None
    if site.gsc_property:
        return Row(
            "problem",
            site.domain,
            "gsc property",
            f"Google account {email} cannot access {tried[0]} (sites.gsc_property)",
            f"give {email} access to {tried[0]} in Search Console, or correct or clear "
            "sites.gsc_property",
        )
    first, second, third = tried
    return Row(
        "problem",
        site.domain,
        "gsc property",
        f"Google account {email} cannot access {first}, {second} or {third}",
        f"add or verify the property in Search Console for {email}, assign the site to the "
        "account that has it, or set sites.gsc_property",
    )


def _token_fix(error: Exception, account_id: int, email: str) -> str:
    reconnect = f"reconnect: `aggregator accounts add {email}`"
    if isinstance(error, MissingRefreshToken):
        return f"`aggregator accounts add {email}`, or set GSC_REFRESH_TOKEN_{account_id}"
    if isinstance(error, ClientMisconfigured):
        return (
            "set GOOGLE_CLIENT_ID/GOOGLE_CLIENT_SECRET to the client that issued the token, "
            f"or {reconnect}"
        )
    if isinstance(error, TokenEndpointUnavailable):
        return "check network access to GOOGLE_TOKEN_URL and run the check again"
    if isinstance(error, ReconnectRequired):
        return f"{reconnect} (publish the OAuth app if it is in Testing)"
    return reconnect


def _endpoint_reason(error: Exception) -> str:
    """The token endpoint's part of a refresh error, without the account the refresh was for
    (the row is about the setting, whichever account met it first)."""
    text = _one_line(str(error))
    account, separator, reason = text.partition(": ")
    return reason if separator and account.startswith("cannot refresh the token of") else text


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _listing(items: Sequence[str], shown: int = 3) -> str:
    head = ", ".join(items[:shown])
    return head if len(items) <= shown else f"{head}, … (+{len(items) - shown})"


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- rendering -------------------------------------------------------------------------------


def render(report: Report, *, problem_width: int = 64, fix_width: int = 52) -> str:
    """One aligned table (long problems and fixes wrap inside their column), the verified
    areas, and the summary line."""
    lines: list[str] = []
    if report.rows:
        cells: list[tuple[str, ...]] = []
        for r in report.rows:
            problem = _wrap(r.problem, problem_width)
            fix = _wrap(r.fix, fix_width)
            for n in range(max(len(problem), len(fix))):
                first = n == 0
                cells.append(
                    (
                        _LEVEL_SHOWN[r.level] if first else "",
                        r.subject if first else "",
                        r.check if first else "",
                        problem[n] if n < len(problem) else "",
                        fix[n] if n < len(fix) else "",
                    )
                )
        lines += table_lines(("level", "subject", "check", "problem", "how to fix"), cells)
        lines.append("")
    lines += [f"ok  {line}" for line in report.verified]
    lines.append(report.summary())
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    # Neither emails nor properties (sc-domain:…) are split: a too-long one gets its own line.
    return textwrap.wrap(
        _one_line(text), width, break_on_hyphens=False, break_long_words=False
    ) or [""]


def as_json(report: Report) -> dict[str, Any]:
    return {
        "ok": report.exit_code == EXIT_OK,
        "sites": report.sites,
        "accounts": report.accounts,
        "problems": report.count("problem"),
        "warnings": report.count("warning"),
        "notes": report.count("note"),
        "rows": [dataclasses.asdict(row) for row in report.rows],
        "verified": list(report.verified),
    }


# --- edges: database, Matomo, Google -------------------------------------------------------------


async def load_schema(conn: asyncpg.Connection) -> SchemaFacts:
    missing_tables = tuple(await storage.missing_tables(conn))
    missing_columns = tuple(await storage.missing_columns(conn, REQUIRED_COLUMNS))
    applied = None
    if await conn.fetchval("select to_regclass($1) is not null", migrations.MIGRATIONS_TABLE):
        versions = await conn.fetch(f"select version from {migrations.MIGRATIONS_TABLE}")
        applied = frozenset(row["version"] for row in versions)
    return SchemaFacts(
        missing_tables=missing_tables,
        missing_columns=missing_columns,
        migration_files=tuple(path.stem for path in migrations.migration_files()),
        applied=applied,
        key_conflicts=()
        if "daily_analytics" in missing_tables
        else _conflicts(await migrations.catalog_facts(conn)),
    )


def _conflicts(catalog: migrations.CatalogFacts) -> tuple[str, ...]:
    """What makes a migrated schema unfit: keys that defeat the upsert, refresh tokens the
    API roles can read."""
    return (
        *migrations.upsert_key_conflicts(catalog),
        *migrations.exposed_token_conflicts(catalog),
    )


async def load_accounts(conn: asyncpg.Connection) -> dict[int, AccountInfo]:
    return {
        a.id: AccountInfo(a.id, a.email, a.active, a.health)
        for a in await token_health.load_accounts(conn)
    }


def quick(settings: Settings) -> Settings:
    """The settings a check runs with: the job's, with retries and waits kept short."""
    return dataclasses.replace(
        settings,
        http_max_attempts=min(settings.http_max_attempts, CHECK_MAX_ATTEMPTS),
        matomo_timeout=min(settings.matomo_timeout, CHECK_TIMEOUT_SECONDS),
        gsc_timeout=min(settings.gsc_timeout, CHECK_TIMEOUT_SECONDS),
        gsc_quota_max_wait=min(settings.gsc_quota_max_wait, CHECK_QUOTA_MAX_WAIT_SECONDS),
    )


async def _ask_matomo(settings: Settings, session: aiohttp.ClientSession) -> MatomoFacts:
    try:
        return MatomoFacts(viewable=await matomo.viewable_site_ids(settings, session))
    except matomo.MatomoAccessRefused as refused:
        return MatomoFacts(error=str(refused), refused=True)
    except matomo.MatomoError as failed:
        return MatomoFacts(error=str(failed))


async def gather_facts(settings: Settings) -> Facts:
    """Read the database, then ask Matomo and Google concurrently; record token refreshes."""
    settings.require_database()
    database = storage.describe_dsn(settings.database_url.reveal())
    pool = await storage.connect(settings.database_url)
    try:
        async with pool.acquire() as conn:
            schema = await load_schema(conn)
            zone_refused = await storage.time_zone_refusal(conn, settings.timezone)
            if not schema.usable:
                return Facts(database=database, schema=schema, zone_refused=zone_refused)
            sites = tuple(await storage.load_sites(conn))
            accounts = await load_accounts(conn)
            active = await storage.load_active_accounts(conn, settings.gsc_refresh_tokens)
        facts = Facts(
            database=database,
            schema=schema,
            zone_refused=zone_refused,
            matomo_configured=settings.matomo_configured,
            gsc_configured=settings.gsc_configured,
            sites=sites,
            accounts=accounts,
            token_overrides=frozenset(settings.gsc_refresh_tokens),
        )
        ask_matomo = facts.matomo_configured and any(s.matomo_site_id is not None for s in sites)
        to_check = [active[i] for i in sorted(active)] if facts.gsc_configured else []
        if not ask_matomo and not to_check:
            return facts
        fast = quick(settings)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=fast.http_connect_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            matomo_facts, access = await asyncio.gather(
                _ask_matomo(fast, session) if ask_matomo else _nothing(),
                gsc.account_access(to_check, fast, session),
            )
        refreshes = [a.refresh for a in access if a.refresh is not None]
        async with pool.acquire() as conn:
            await storage.record_account_refreshes(conn, refreshes)
    finally:
        await pool.close()
    return dataclasses.replace(
        facts, matomo_answer=matomo_facts, google_access={a.account.id: a for a in access}
    )


async def _nothing() -> None:
    return None


async def run_check(settings: Settings) -> Report:
    return build_report(await gather_facts(settings))


def command(args: argparse.Namespace, settings: Settings, out: TextIO | None = None) -> int:
    report = asyncio.run(run_check(settings))
    if out is None and stdout_closed_at_start():
        return report.exit_code  # `check >&-`: the exit status is the whole answer
    out = out or sys.stdout
    if args.json:
        print(json.dumps(as_json(report), indent=2, ensure_ascii=False), file=out)
    else:
        print(render(report), end="", file=out)
    return report.exit_code
