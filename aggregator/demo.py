"""`aggregator demo`: the whole job on this machine with no accounts.

Starts the Matomo and Google simulators on 127.0.0.1, seeds a portfolio into a dedicated
`aggregator_demo` schema (of DATABASE_URL when set, else of an embedded Postgres kept under the
user's data directory), runs the real pipeline and prints what happened. `--status` runs
nothing and shows `aggregator status` on what the last demo stored: the embedded server runs
only while a demo command does, so plain `aggregator status` cannot reach it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo

import asyncpg

from aggregator import migrations, storage
from aggregator.arguments import DEMO_SCHEMA, default_report_path
from aggregator.config import Secret, Settings
from aggregator.dates import resolve_window, today_in
from aggregator.local_postgres import default_data_dir, dsn_with_search_path, embedded_postgres
from aggregator.pipeline import RunOutcome, RunRequest, run_job
from aggregator.progress import terminal_progress
from aggregator.simulators import portfolio as world
from aggregator.status import command as status_command
from aggregator.status import html, html_data
from aggregator.status import queries as status_queries
from aggregator.status import render as status_render
from aggregator.text_table import error_lines, table_lines
from aggregator.usage import UsageError


@dataclass(frozen=True, slots=True)
class DemoOptions:
    sites: int = 200
    accounts: int = 4
    lookback: int = 4
    revoked_account: bool = False
    report: Path | None = None  # the HTML report; None: default_report_path()


def command(args: argparse.Namespace, settings: Settings) -> int:
    """Run the demo on DATABASE_URL (in its own schema) or on the embedded Postgres."""
    report = (args.report or default_report_path()).resolve()
    report.parent.mkdir(parents=True, exist_ok=True)
    options = DemoOptions(args.sites, args.accounts, args.lookback, args.revoked_account, report)
    out = sys.stdout

    def work(server: str) -> int:
        if args.status:
            return asyncio.run(show_status(server, settings.timezone, out))
        return asyncio.run(run_demo(server, options, settings.timezone, out))

    if settings.database_url is not None:
        server = settings.database_url.reveal()
        print(f"database: {storage.describe_dsn(server)}, schema {DEMO_SCHEMA}", file=out)
        return work(server)
    print(f"database: embedded PostgreSQL in {default_data_dir()}, schema {DEMO_SCHEMA}", file=out)
    with embedded_postgres() as server:
        return work(server)


async def show_status(server_dsn: str, zone: ZoneInfo, out: TextIO) -> int:
    """`aggregator status` on the demo's schema, running nothing; its exit status."""
    conn = await asyncpg.connect(dsn_with_search_path(server_dsn, DEMO_SCHEMA))
    try:
        if await conn.fetchval("select to_regclass('daily_analytics')") is None:
            raise UsageError(f"no demo data in schema {DEMO_SCHEMA}: run `aggregator demo` first")
        now = datetime.now(tz=zone)
        report = await status_queries.gather(conn, today_in(zone, now), zone, now)
    finally:
        await conn.close()
    print(status_render.text(report, zone), end="", file=out)
    return status_command.exit_status(report)


def invocation() -> str:
    """This program as it was started (`.venv/bin/aggregator`, `python -m aggregator`), so the
    demo can say exactly what to type next; relative to the working directory when inside it."""
    script = Path(sys.argv[0])
    if script.name == "__main__.py":
        return f"{_from_here(Path(sys.executable))} -m aggregator"
    return _from_here(script)


def _from_here(path: Path) -> str:
    absolute = path.absolute()
    return str(absolute.relative_to(Path.cwd()) if absolute.is_relative_to(Path.cwd()) else path)


async def prepare_schema(server_dsn: str, schema: str = DEMO_SCHEMA) -> str:
    """Create the demo schema and its tables; return a DSN confined to it."""
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"create schema if not exists {schema}")
    finally:
        await admin.close()
    dsn = dsn_with_search_path(server_dsn, schema)
    conn = await asyncpg.connect(dsn)
    try:
        await migrations.apply_migrations(conn)
    finally:
        await conn.close()
    return dsn


def simulated_settings(dsn: str, matomo_url: str, google_url: str, **tuning: float) -> Settings:
    """Settings pointing the real clients at the simulators."""
    return Settings(
        database_url=Secret(dsn),
        matomo_url=matomo_url,
        matomo_token=Secret(world.MATOMO_TOKEN),
        google_client_id=world.CLIENT_ID,
        google_client_secret=Secret(world.CLIENT_SECRET),
        google_token_url=f"{google_url}/token",
        gsc_api_url=google_url,
        **tuning,
    )


async def run_demo(server_dsn: str, options: DemoOptions, zone: ZoneInfo, out: TextIO) -> int:
    """The job on a simulated portfolio. Its today is the date in `zone` (AGGREGATOR_TIMEZONE),
    as for a real run and for `demo --status`, so near midnight the demo and its status never
    disagree about which day is due."""
    dsn = await prepare_schema(server_dsn)
    portfolio = world.make_portfolio(
        options.sites, options.accounts, revoked_account=options.revoked_account
    )
    conn = await asyncpg.connect(dsn)
    try:
        await world.seed_portfolio(conn, portfolio)
    finally:
        await conn.close()
    print(
        f"simulating {options.sites} sites over {options.accounts} Google accounts "
        "(Matomo and Google servers on 127.0.0.1)...",
        file=out,
        flush=True,
    )
    async with (
        world.matomo_simulator(portfolio, latency=0.02) as matomo,
        world.google_simulator(portfolio, latency=0.02, qps_per_account=20) as google,
    ):
        # The simulated Cloud project has Google's standard quota: 20 queries/s per account.
        settings = dataclasses.replace(
            simulated_settings(
                dsn, matomo.url, google.url, gsc_max_qps_per_account=20, gsc_max_qps_per_client=600
            ),
            timezone=zone,
        )
        window = resolve_window(today_in(settings.timezone), lookback=options.lookback)
        began = time.monotonic()
        with terminal_progress(sys.stderr.isatty()) as progress:
            outcome = await run_job(settings, RunRequest(window), progress=progress)
        seconds = time.monotonic() - began
        requests = {
            "Matomo bulk requests": matomo.requests,
            "Google token refreshes": google.token_requests,
            "Search Console sites.list": google.sites_requests,
            "Search Console queries": google.query_requests,
        }
    conn = await asyncpg.connect(dsn)
    try:
        await print_report(conn, outcome, requests, seconds, out)
        await print_status(conn, settings.timezone, options.report or default_report_path(), out)
    finally:
        await conn.close()
    return outcome.exit_code


async def print_status(conn: asyncpg.Connection, zone: ZoneInfo, report: Path, out: TextIO) -> None:
    """What `aggregator status` says about the demo data, and its HTML report."""
    now = datetime.now(tz=zone)
    data = await html_data.gather(conn, today_in(zone, now), zone, now)
    size = html.write(data, report)
    lines = status_render.overview_lines(data.status, zone)
    print("\n" + "\n".join(lines), file=out)
    print(f"(the same later, without running anything: {invocation()} demo --status)", file=out)
    print(f"\nHTML report of the demo data ({html.size_text(size)}): {report}", file=out)


async def print_report(
    conn: asyncpg.Connection,
    outcome: RunOutcome,
    requests: dict[str, int],
    seconds: float,
    out: TextIO,
) -> None:
    accounts = await conn.fetch(
        """
        select a.email,
               count(distinct s.id) as sites,
               count(distinct d.site_id) filter (where d.gsc_final is not null) as stored,
               count(*) filter (where d.gsc_final) as final_days,
               count(*) filter (where d.gsc_final = false) as provisional_days,
               coalesce(a.last_error, case when a.last_refresh_at is not null then 'ok' end,
                        'not refreshed') as token
        from gsc_accounts a
        left join sites s on s.gsc_account_id = a.id
        left join daily_analytics d on d.site_id = s.id
        group by a.id order by a.id
        """
    )
    _table(
        out,
        "Google accounts",
        ("account", "sites", "sites stored", "final days", "provisional days", "token"),
        [
            (
                r["email"],
                r["sites"],
                r["stored"],
                r["final_days"],
                r["provisional_days"],
                _clip(r["token"], 60),
            )
            for r in accounts
        ],
    )
    totals = await conn.fetchrow(
        """
        select count(*) as rows, count(distinct site_id) as sites,
               coalesce(sum(matomo_visits), 0) as visits, coalesce(sum(gsc_clicks), 0) as clicks
        from daily_analytics
        """
    )
    sample = await conn.fetch(
        """
        select s.domain, d.date, d.matomo_visits, d.gsc_clicks, d.gsc_impressions,
               round(d.gsc_position::numeric, 1) as position, d.gsc_final
        from daily_analytics d join sites s on s.id = d.site_id
        order by d.date desc, s.domain limit 6
        """
    )
    _table(
        out,
        "Sample rows",
        ("site", "date", "visits", "clicks", "impressions", "position", "final"),
        [tuple(_cell(v) for v in row.values()) for row in sample],
    )
    _table(out, "HTTP requests", ("kind", "count"), list(requests.items()))
    windows = ", ".join(f"{name} {a}..{b}" for name, (a, b) in outcome.windows.items())
    print(
        f"\n{outcome.status}: {totals['rows']} rows for {totals['sites']} of "
        f"{outcome.sites_total} sites ({totals['visits']} visits, {totals['clicks']} clicks) "
        f"in {seconds:.1f}s; windows: {windows}; {len(outcome.errors)} errors",
        file=out,
    )
    for line in error_lines(outcome.errors)[:10]:
        print(f"  {line}", file=out)


def _cell(value: object) -> object:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(out: TextIO, title: str, header: tuple[str, ...], rows: list[tuple]) -> None:
    print(f"\n{title}", file=out)
    for line in table_lines(header, rows, rule=True):
        print(f"  {line}", file=out)
