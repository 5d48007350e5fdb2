"""Command line: argument parsing, exit codes and one-line errors; the work lives elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO
from urllib.parse import unquote, urlsplit

from aggregator import (
    __version__,
    accounts,
    check,
    demo,
    migrations,
    report_data,
    report_html,
    storage,
)
from aggregator.config import ConfigError, Settings, load_settings, read_environment
from aggregator.dates import DateError, parse_day, resolve_window, today_in
from aggregator.logs import configure_logging
from aggregator.pipeline import ALL_SOURCES, RunOutcome, RunRequest, UsageError, run_job
from aggregator.progress import terminal_progress
from aggregator.redaction import masked_output
from aggregator.status import command as status_command
from aggregator.status.verdict import WINDOW_DAYS as STATUS_WINDOW_DAYS
from aggregator.text_table import error_lines, table_lines

EXIT_OK, EXIT_PARTIAL, EXIT_UNUSABLE = 0, 1, 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a process killed by SIGPIPE
COMMANDS = ("run", "migrate", "status", "accounts", "demo", "check")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit 2, as the contract asks."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_UNUSABLE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="aggregator",
        description=(
            "Fetch daily Matomo visits and Google Search Console performance for every active, "
            "deployed site and upsert one row per site per day into daily_analytics."
        ),
        epilog=(
            "Configuration comes from the environment or a .env file: DATABASE_URL, MATOMO_URL, "
            "MATOMO_TOKEN, GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET (see README). Exit status: "
            "0 all stored, 1 partial (some site, source or account failed), 2 nothing could run."
        ),
    )
    parser.add_argument("--version", action="version", version=f"aggregator {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = commands.add_parser(
        "run",
        help="fetch and upsert a window of days (the default command)",
        description="Fetch and upsert a window of days. With no dates: the last --lookback "
        "full days ending yesterday, reaching back further for GSC days still provisional.",
    )
    when = run.add_argument_group("window (default: --lookback 4)")
    when.add_argument("--from", dest="date_from", metavar="YYYY-MM-DD", help="first day")
    when.add_argument("--to", dest="date_to", metavar="YYYY-MM-DD", help="last day (inclusive)")
    when.add_argument("--date", metavar="YYYY-MM-DD", help="a single day")
    when.add_argument(
        "--lookback",
        type=int,
        metavar="N",
        help="the last N full days ending yesterday in AGGREGATOR_TIMEZONE (default 4)",
    )
    run.add_argument(
        "--site",
        dest="sites",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="only this site (repeatable)",
    )
    run.add_argument(
        "--source",
        dest="sources",
        action="append",
        choices=ALL_SOURCES,
        default=[],
        help="only this source (repeatable; default: both)",
    )
    run.add_argument(
        "--dry-run", action="store_true", help="fetch and print the rows; write nothing"
    )
    run.add_argument(
        "--gsc-final-only",
        action="store_true",
        help="ask Search Console for final data only (no provisional days)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    migrate = commands.add_parser(
        "migrate",
        help="apply sql/ migrations to DATABASE_URL (idempotent)",
        description="Apply the pending sql/ migrations to DATABASE_URL in one transaction: all "
        "or nothing. An existing sites table is adopted (only missing columns are added; its "
        "row level security, grants and policies are left alone); tables created here get row "
        "level security and no access for Supabase's anon and authenticated roles. A database "
        "that does not fit exits 2 with one line naming the table, the column and the fix.",
    )
    migrate.add_argument(
        "--sql",
        action="store_true",
        help="print the SQL it would apply to this database instead (for supabase/migrations/)",
    )
    migrate.add_argument(
        "--grant-read",
        dest="readers",
        action="append",
        default=[],
        metavar="ROLE",
        help="let ROLE (e.g. authenticated, for the dashboard) read daily_analytics: the rows "
        "of the sites it can read in sites (repeatable)",
    )
    migrate.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    status_parser = commands.add_parser(
        "status",
        help="is the data fresh? the verdict per source, then what needs attention",
        description="Per source: how many sites are fresh, behind, failing or new, the due "
        f"day, completion, run durations and API error rate over {STATUS_WINDOW_DAYS} days; "
        "then the sites that need attention, one line per cause. Exit status: 0 nothing "
        "behind or failing, 1 something is, 2 configuration or database unusable.",
    )
    status_parser.add_argument("--json", action="store_true", help="one JSON document")
    status_parser.add_argument("--all", action="store_true", help="list every site")
    status_parser.add_argument(
        "--html",
        type=Path,
        metavar="FILE",
        help="also write a self-contained HTML report: sites x days per source, runs, accounts",
    )

    check_parser = commands.add_parser(
        "check",
        help="verify configuration, database, Matomo token and site ids, Google accounts",
        description="Verify configuration, the database and its schema, MATOMO_TOKEN and every "
        "monitored site's matomo_site_id (one Matomo request), and for every active Google "
        "account with sites its refresh token (refreshed and recorded in gsc_accounts) and "
        "which properties it can reach (one sites.list). Prints one table of what is wrong "
        "and how to fix it. Exit status: 0 no problem (warnings and notes allowed), 1 some "
        "problem, a missing or outdated schema included, 2 configuration invalid or database "
        "unreachable.",
    )
    check_parser.add_argument("--json", action="store_true", help="one JSON document")
    check_parser.add_argument("-v", "--verbose", action="store_true", help="show request logs")

    accounts_parser = commands.add_parser(
        "accounts", help="list, connect or deactivate Google accounts (gsc_accounts)"
    )
    actions = accounts_parser.add_subparsers(
        dest="accounts_command", metavar="ACTION", required=True
    )
    actions.add_parser("list", help="accounts, where each token comes from, last refresh/error")
    add = actions.add_parser(
        "add",
        help="connect a Google account in the browser and store its refresh token",
        description="Run Google's consent flow (needs google-auth-oauthlib) and store the "
        "refresh token in gsc_accounts, reactivating the account.",
    )
    add.add_argument("email", metavar="EMAIL")
    add.add_argument(
        "--client-secrets",
        type=Path,
        metavar="FILE",
        help="Desktop app client JSON (default: GOOGLE_CLIENT_ID and GOOGLE_CLIENT_SECRET)",
    )
    add.add_argument(
        "--no-browser", action="store_true", help="print the consent URL instead of opening it"
    )
    deactivate = actions.add_parser("deactivate", help="stop using an account (is_active=false)")
    deactivate.add_argument("email", metavar="EMAIL")

    demo_parser = commands.add_parser(
        "demo",
        help="the whole job on this machine: simulators, seeded portfolio, embedded Postgres",
        description="Start local Matomo and Google simulators, seed a portfolio into the "
        f"{demo.DEMO_SCHEMA} schema of DATABASE_URL (or of an embedded PostgreSQL when it is "
        "unset), run the real pipeline and print a summary. Needs no account.",
    )
    demo.add_arguments(demo_parser)
    demo_parser.add_argument("-v", "--verbose", action="store_true", help="show the job's logs")
    return parser


def _with_default_command(argv: Sequence[str]) -> list[str]:
    """`aggregator --lookback 2` means `aggregator run --lookback 2`: cron lines stay short."""
    args = list(argv)
    if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help", "--version")):
        return ["run", *args]
    return args


def _secrets_of(settings: Settings) -> list[str]:
    secrets = [s.reveal() for s in settings.gsc_refresh_tokens.values()]
    for secret in (settings.matomo_token, settings.google_client_secret):
        if secret is not None:
            secrets.append(secret.reveal())
    if settings.database_url is not None:
        password = urlsplit(settings.database_url.reveal()).password
        if password:
            secrets.extend((password, unquote(password)))
    return secrets


def _fail(message: str, stream: TextIO) -> int:
    print(f"aggregator: error: {message}", file=stream)
    return EXIT_UNUSABLE


def main(argv: Sequence[str] | None = None) -> int:
    with masked_output():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(_with_default_command(sys.argv[1:] if argv is None else argv))
    try:
        settings = load_settings(read_environment())
    except ConfigError as exc:
        return _fail(str(exc), sys.stderr)
    configure_logging(
        secrets=_secrets_of(settings),
        verbose=getattr(args, "verbose", False),
        # The demo prints its own report; its per-request logs are noise unless asked for.
        quiet=args.command in ("demo", "check") and not args.verbose,
    )
    handlers: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
        "run": _run_command,
        "migrate": _migrate_command,
        "status": _status_command,
        "accounts": accounts.command,
        "demo": demo.command,
        "check": check.command,
    }
    try:
        code = handlers[args.command](args, settings)
        sys.stdout.flush()  # a full disk shows here, while we can still say so in one line
        return code
    except (ConfigError, DateError, UsageError, storage.StorageError) as exc:
        return _fail(str(exc), sys.stderr)
    except BrokenPipeError:
        return _reader_went_away()
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRNOS:
            raise
        _silence_stdout()
        return _fail(f"cannot write the output: {os.strerror(exc.errno)}", sys.stderr)


# Failures of writing stdout itself (`> /dev/full`, a dead terminal, a full quota): the
# output is lost, so the command fails in one line instead of a crash report.
_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EDQUOT})


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _reader_went_away() -> int:
    """`aggregator status --json | head`: the reader closed the pipe. End quietly, as `cat`
    does, with stdout silenced."""
    _silence_stdout()
    return EXIT_BROKEN_PIPE


def _status_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.html is None:
        return status_command.run(args, settings)
    data = asyncio.run(report_data.collect(settings, datetime.now(tz=settings.timezone)))
    size = report_html.write(data, args.html)
    print(f"report: {args.html.resolve()} ({report_html.size_text(size)})", file=sys.stderr)
    return status_command.show(args, data.status, settings)


def _run_async(coro_factory: Callable[[asyncio.Event], Coroutine[Any, Any, int]]) -> int:
    """Run with SIGTERM/SIGINT turned into a graceful stop: fetching ends, fetched data is kept."""

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await coro_factory(stop)

    return asyncio.run(runner())


def _run_command(args: argparse.Namespace, settings: Settings) -> int:
    def day(value: str | None, flag: str) -> date | None:
        return parse_day(value, flag) if value is not None else None

    window = resolve_window(
        today_in(settings.timezone),
        start=day(args.date_from, "--from"),
        end=day(args.date_to, "--to"),
        day=day(args.date, "--date"),
        lookback=args.lookback,
    )
    request = RunRequest(
        window=window,
        sources=tuple(dict.fromkeys(args.sources)) or ALL_SOURCES,
        domains=tuple(args.sites),
        dry_run=args.dry_run,
        final_only=args.gsc_final_only,
    )
    settings.require_database()  # fail with one line before any progress display is drawn
    with terminal_progress(sys.stderr.isatty()) as progress:
        outcome = _run_async(lambda stop: run_job(settings, request, stop=stop, progress=progress))
    if request.dry_run:
        print_rows(outcome, sys.stdout)
    print_summary(outcome, sys.stdout)
    if outcome.fatal:
        # The store refused the run or its lease was lost: the one line cron mail shows.
        print(f"aggregator: error: {outcome.fatal}", file=sys.stderr)
    return outcome.exit_code


def print_rows(outcome: RunOutcome, out: TextIO) -> None:
    """The rows a dry run would write; '-' marks a source whose columns would be left alone."""
    header = (
        "site",
        "date",
        "visits",
        "actions",
        "clicks",
        "impressions",
        "ctr",
        "position",
        "final",
    )
    lines = []
    for row in sorted(outcome.rows, key=lambda r: (outcome.sites.get(r.site_id, ""), r.day)):
        visits, actions = row.matomo or ("-", "-")
        clicks, impressions, ctr, position, final = row.gsc or ("-",) * 5
        lines.append(
            (
                outcome.sites.get(row.site_id, str(row.site_id)),
                row.day.isoformat(),
                str(visits),
                str(actions),
                str(clicks),
                str(impressions),
                _number(ctr, 4),
                _number(position, 1),
                {True: "yes", False: "no"}.get(final, "-") if row.gsc else "-",
            )
        )
    for line in table_lines(header, lines):
        print(line, file=out)


def _number(value: object, digits: int) -> str:
    return (
        f"{value:.{digits}f}" if isinstance(value, float) else str("-" if value is None else value)
    )


def print_summary(outcome: RunOutcome, out: TextIO) -> None:
    verb = "would write" if not outcome.rows_upserted and outcome.rows else "stored"
    count = outcome.rows_upserted or len(outcome.rows)
    windows = ", ".join(f"{name} {a}..{b}" for name, (a, b) in outcome.windows.items()) or "none"
    print(
        f"{outcome.status}: {outcome.sites_total} sites, {verb} {count} rows, "
        f"{len(outcome.errors)} errors in {outcome.seconds:.1f}s ({windows})",
        file=out,
    )
    for line in error_lines(outcome.errors):
        print(f"  {line}", file=out)


def _migrate_command(args: argparse.Namespace, settings: Settings) -> int:
    readers = tuple(dict.fromkeys(args.readers))

    async def migrate(_stop: asyncio.Event) -> int:
        pool = await storage.connect(settings.database_url)
        try:
            async with pool.acquire() as conn:
                if args.sql:
                    print(await migrations.pending_sql(conn, readers=readers), end="")
                    return EXIT_OK
                applied = await migrations.apply_migrations(conn, readers=readers)
        finally:
            await pool.close()
        where = storage.describe_dsn(settings.database_url.reveal())
        if applied:
            print(f"applied {', '.join(applied)} to {where}")
        else:
            print(f"schema of {where} is up to date")
        for role in readers:
            print(f"{role} may read daily_analytics (the rows of the sites it can read)")
        return EXIT_OK

    settings.require_database()
    return _run_async(migrate)
