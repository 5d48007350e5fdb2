"""The command line's grammar and help: every command's arguments, without importing the commands.

`aggregator run --help` (and a cron line's parse) must not pay for the simulators, the check,
the status report or the Google consent flow, so nothing here imports a command's module; the
CLI imports the one that runs (see aggregator.cli).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import NoReturn

from aggregator import __version__
from aggregator.config import default_of
from aggregator.dates import DEFAULT_LOOKBACK_DAYS as LOOKBACK_DAYS
from aggregator.dates import SOURCES
from aggregator.local_postgres import default_data_dir

EXIT_UNUSABLE = 2
STATUS_WINDOW_DAYS = 30  # status's figures; a test keeps it equal to status.WINDOW_DAYS
DEMO_SCHEMA = "aggregator_demo"
_CLOSED_PIPE = "141 its reader closed the output (`| head`): it stopped quietly"


class _Formatter(argparse.HelpFormatter):
    """Descriptions and epilogs as paragraphs (blank-line separated, each filled to the
    terminal's width); an indented line (an example, an exit status) stays a line of its
    own, its overflow indented under it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = []
        for paragraph in text.split("\n\n"):
            lines = paragraph.splitlines()
            if not any(line.startswith("  ") for line in lines):
                blocks.append(_fill(" ".join(lines), width, indent, indent))
                continue
            blocks.append(
                "\n".join(
                    _fill(line, width, indent, indent + " " * (_depth(line) + 4)) for line in lines
                )
            )
        return "\n\n".join(blocks)


def _fill(text: str, width: int, first: str, rest: str) -> str:
    return textwrap.fill(
        text, width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False
    )


def _depth(line: str) -> int:
    return len(line) - len(line.lstrip())


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit 2, as the contract asks."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_UNUSABLE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _epilog(examples: list[str], exits: list[str]) -> str:
    lines = ["examples:", *(f"  {line}" for line in examples), "", "exit status:"]
    return "\n".join([*lines, *(f"  {line}" for line in exits)])


def default_report_path() -> Path:
    """The demo's HTML report: next to the embedded server's data, never in the working
    directory (a repository)."""
    return default_data_dir().parent / "demo-report.html"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="aggregator",
        description=(
            "Fetch daily Matomo visits and Google Search Console performance for every active, "
            "deployed site and upsert one row per site per day into daily_analytics. "
            "With no command, `run` is meant: `aggregator --lookback 2` is `aggregator run "
            "--lookback 2`."
        ),
        epilog=(
            "Configuration comes from the environment or a .env file in the working directory "
            "(the environment wins): DATABASE_URL, MATOMO_URL, MATOMO_TOKEN, GOOGLE_CLIENT_ID, "
            "GOOGLE_CLIENT_SECRET, GSC_REFRESH_TOKEN_<ACCOUNT_ID> and the tuning variables of "
            "the README (`python -m aggregator.config` prints their table). Every setting is "
            "checked before anything runs: a bad one exits 2 with one line.\n\n"
            "`aggregator COMMAND --help` describes each command, its examples and exit status: "
            "0 all is well, 1 partial or something needs attention, 2 nothing could run (one "
            "line on stderr says what to fix), 141 the reader closed the output."
        ),
    )
    parser.add_argument("--version", action="version", version=f"aggregator {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    _add_run(commands)
    _add_migrate(commands)
    _add_status(commands)
    _add_check(commands)
    _add_accounts(commands)
    _add_demo(commands)
    return parser


def _add_run(commands: argparse._SubParsersAction) -> None:
    heal_days = default_of("AGGREGATOR_HEAL_DAYS")
    run = commands.add_parser(
        "run",
        help="fetch and upsert a window of days (the default command)",
        description=(
            "Fetch Matomo and Search Console numbers and upsert them into daily_analytics.\n\n"
            "With no dates given, each site and source gets its own window: the last "
            f"--lookback days (default {LOOKBACK_DAYS}) ending yesterday, widened back over "
            "that site's own missing days and (Search Console) provisional days, no further "
            f"than AGGREGATOR_HEAL_DAYS (default {heal_days}) before yesterday and never "
            "before its deployment. One site's gaps never widen another's. --from/--to and "
            "--date fetch exactly that range instead (still never before a site's "
            "deployment). Search Console keeps 16 months: older days are not asked of it. "
            "Yesterday is AGGREGATOR_TIMEZONE's; each date is then a calendar day of its "
            "source: Matomo's in the site's own Matomo timezone, Search Console's in Pacific "
            "time."
        ),
        epilog=_epilog(
            [
                "aggregator run                              # the nightly job (cron)",
                "aggregator run --dry-run --lookback 1       # fetch and print, write nothing",
                "aggregator run --from 2025-01-01 --to 2025-03-31 --source gsc   # backfill",
                "aggregator run --date 2025-06-01 --site example.com",
            ],
            [
                "0 every enabled source of every site stored",
                "1 partial: some site, source or account failed (the summary names each); "
                "everything else stored",
                "2 nothing could run: bad arguments or configuration, database unreachable, "
                "schema missing, another run kept the lock (one line on stderr)",
                "141 a dry run whose reader closed the output (`| head`): it stopped quietly "
                "(a real run stores everything and exits with its own status)",
            ],
        ),
    )
    when = run.add_argument_group(f"window (default: --lookback {LOOKBACK_DAYS}, self-healing)")
    when.add_argument(
        "--from",
        action=_Once,
        dest="date_from",
        metavar="YYYY-MM-DD",
        help="first day; without --to, up to yesterday",
    )
    when.add_argument(
        "--to",
        action=_Once,
        dest="date_to",
        metavar="YYYY-MM-DD",
        help="last day (inclusive); today is allowed: its numbers so far, completed by the "
        "next nightly run",
    )
    when.add_argument(
        "--date",
        action=_Once,
        metavar="YYYY-MM-DD",
        help="a single day; today is allowed: its numbers so far, completed by the next "
        "nightly run",
    )
    when.add_argument(
        "--lookback",
        action=_Once,
        type=int,
        metavar="N",
        help=f"with no dates: the last N full days ending yesterday (default {LOOKBACK_DAYS}), "
        "each site's window widened over its own missing and provisional days",
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
        choices=SOURCES,
        default=[],
        help="only this source (repeatable; default: both)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="fetch and print the rows it would write; write nothing to any table",
    )
    run.add_argument(
        "--gsc-final-only",
        action="store_true",
        help="ask Search Console for final data only (no provisional days)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_migrate(commands: argparse._SubParsersAction) -> None:
    migrate = commands.add_parser(
        "migrate",
        help="apply sql/ migrations to DATABASE_URL (idempotent)",
        description=(
            "Apply the pending sql/ migrations to DATABASE_URL in one transaction: all or "
            "nothing. An existing sites table is adopted (only missing columns are added; its "
            "row level security, grants and policies are left alone); tables created here get "
            "row level security and no access for Supabase's anon and authenticated roles. A "
            "database that does not fit changes nothing and exits 2 with one line naming the "
            "table, the column and the fix (the most fundamental conflict first: a key or "
            "type before a missing column)."
        ),
        epilog=_epilog(
            [
                "aggregator migrate                                # apply (idempotent)",
                "aggregator migrate --grant-read authenticated     # let the dashboard read",
                "aggregator migrate --sql > supabase/migrations/$(date -u +%Y%m%d%H%M%S)"
                "_aggregator.sql",
            ],
            [
                "0 applied, or already up to date (with stdout closed, `migrate >&-`, too)",
                "2 nothing was changed: configuration, database unreachable, or a conflict "
                "(one line naming the fix)",
            ],
        ),
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


def _add_status(commands: argparse._SubParsersAction) -> None:
    status = commands.add_parser(
        "status",
        help="is the data fresh? the verdict per source, then what needs attention",
        description=(
            "Per source: how many sites are fresh, behind, failing or new, the due day, "
            f"and over {STATUS_WINDOW_DAYS} days the completion rate, run durations and API "
            "error rate; then the sites that need attention, one line per cause. A source is "
            "fresh for a site when its numbers (provisional ones count for Search Console) "
            "reach its due day."
        ),
        epilog=_epilog(
            [
                "aggregator status                 # summary, then what needs attention",
                "aggregator status --all           # every site",
                "aggregator status --json | jq .   # for monitoring",
                "aggregator status --html report.html",
            ],
            [
                "0 nothing stale (a source failing with data still fresh is listed, exit 0)",
                "1 something is stale: behind, or failing with data that has aged too",
                "2 configuration or database unusable, or --html cannot be written",
                _CLOSED_PIPE,
                "(with stdout closed, `status >&-`, the exit status is still 0 or 1)",
            ],
        ),
    )
    status.add_argument("--json", action="store_true", help="one JSON document")
    status.add_argument("--all", action="store_true", help="list every site")
    status.add_argument(
        "--html",
        type=_report_file,
        metavar="FILE",
        help="also write a self-contained HTML report: sites x days per source, runs, accounts",
    )
    status.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_check(commands: argparse._SubParsersAction) -> None:
    check = commands.add_parser(
        "check",
        help="verify configuration, database, Matomo token and site ids, Google accounts",
        description=(
            "Verify configuration, the database and its schema, MATOMO_TOKEN and every "
            "monitored site's matomo_site_id (one Matomo request), and for every active "
            "Google account with sites its refresh token (refreshed and recorded in "
            "gsc_accounts) and which properties it can reach (one sites.list). Prints one "
            "table of what is wrong and how to fix it."
        ),
        epilog=_epilog(
            [
                "aggregator check          # after setup, and after connecting an account",
                "aggregator check --json   # for monitoring",
            ],
            [
                "0 no problem (warnings and notes allowed)",
                "1 some problem, a missing or outdated schema included",
                "2 configuration invalid or database unreachable",
                _CLOSED_PIPE,
                "(with stdout closed, `check >&-`, the exit status is still 0 or 1)",
            ],
        ),
    )
    check.add_argument("--json", action="store_true", help="one JSON document")
    check.add_argument("-v", "--verbose", action="store_true", help="show request logs")


def _add_accounts(commands: argparse._SubParsersAction) -> None:
    exits = [
        "0 done",
        "2 nothing could be done: configuration, database, an unknown account, a refused "
        "consent (one line)",
    ]
    accounts = commands.add_parser(
        "accounts",
        help="list, connect or deactivate Google accounts (gsc_accounts)",
        description="The Google accounts whose refresh tokens the job uses (never printed).",
        epilog=_epilog(
            [
                "aggregator accounts list",
                "aggregator accounts add seo@example.com --no-browser",
                "aggregator accounts deactivate old@example.com",
            ],
            exits,
        ),
    )
    actions = accounts.add_subparsers(
        dest="accounts_command", metavar="ACTION", required=True, parser_class=Parser
    )
    actions.add_parser(
        "list",
        help="accounts, where each token comes from, last refresh/error",
        description="Every account in gsc_accounts: active or not, where its refresh token "
        "comes from (GSC_REFRESH_TOKEN_<id>, the table, or missing), its sites, its last "
        "refresh and error.",
        epilog=_epilog(["aggregator accounts list"], exits),
    )
    add = actions.add_parser(
        "add",
        help="connect a Google account in the browser and store its refresh token",
        description="Run Google's consent flow (needs google-auth-oauthlib: pip install "
        "'aggregator[accounts]') and store the refresh token in gsc_accounts, reactivating "
        "the account. The account that signs in must be EMAIL.",
        epilog=_epilog(
            [
                "aggregator accounts add seo@example.com",
                "aggregator accounts add seo@example.com --no-browser   # on a server",
                "aggregator accounts add seo@example.com --client-secrets client.json",
            ],
            exits,
        ),
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
    deactivate = actions.add_parser(
        "deactivate",
        help="stop using an account (is_active=false)",
        description="Stop using an account: is_active=false. Its sites' Search Console "
        "numbers are then skipped, and each run names them, until the account is added "
        "again.",
        epilog=_epilog(["aggregator accounts deactivate old@example.com"], exits),
    )
    deactivate.add_argument("email", metavar="EMAIL")


def _add_demo(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="the whole job on this machine: simulators, seeded portfolio, embedded Postgres",
        description=(
            "Start local Matomo and Google simulators, seed a portfolio into the "
            f"{DEMO_SCHEMA} schema of DATABASE_URL (or of an embedded PostgreSQL when it is "
            "unset), run the real pipeline, print a summary and write an HTML status report. "
            "Needs no account. --status shows `aggregator status` on the demo's data again "
            "without running anything."
        ),
        epilog=_epilog(
            [
                "aggregator demo",
                "aggregator demo --revoked-account --sites 120   # a failure, isolated",
                "aggregator demo --status                        # status of the demo's data",
            ],
            [
                "0 every site stored (--status: all fresh)",
                "1 partial, as with --revoked-account (--status: something needs attention)",
                "2 no database could be used (--status: no demo data)",
            ],
        ),
    )
    demo.add_argument("--sites", type=_positive, default=200, metavar="N", help="default 200")
    demo.add_argument("--accounts", type=_positive, default=4, metavar="N", help="default 4")
    demo.add_argument(
        "--lookback", type=_positive, default=4, metavar="N", help="days ending yesterday"
    )
    demo.add_argument(
        "--report",
        type=_report_file,
        metavar="FILE",
        help="where to write the HTML status report of the demo data "
        f"(default {default_report_path()})",
    )
    demo.add_argument(
        "--revoked-account",
        action="store_true",
        help="revoke the last Google account's token to show how a failure is isolated",
    )
    demo.add_argument(
        "--status",
        action="store_true",
        help="run nothing: show `aggregator status` on the data the last demo left "
        "(the embedded PostgreSQL runs only while a demo command does)",
    )
    demo.add_argument("-v", "--verbose", action="store_true", help="show the job's logs")


class _Once(argparse.Action):
    """A window option given twice (`--date A --date B`) is refused: argparse would keep the
    last value silently, and the run would fetch a window the operator did not ask for."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, self.dest, None) is not None:
            raise argparse.ArgumentError(self, "given more than once: give it once")
        setattr(namespace, self.dest, values)


def _report_file(text: str) -> Path:
    """A path whose last part names the file to write: `''`, `.`, `/` and `..` name a
    directory, which the report's write-then-rename cannot replace."""
    path = Path(text)
    if path.name in ("", ".."):
        raise argparse.ArgumentTypeError(f"must name a file, got {text!r}")
    return path


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
