"""`aggregator run`: the window the arguments ask for, the job, and what it prints.

A dry run's output is its whole purpose: when its reader goes away (`run --dry-run | head`
closed early) the run stops fetching at once and ends quietly, rather than fetching for an
hour to write into a closed pipe. A real run's purpose is the table, so it goes on, and ends
with its own exit status: its summary going nowhere is no failure of the job.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
import sys
from datetime import date
from typing import TextIO

from aggregator.collector import tune_for_a_long_run
from aggregator.config import Settings
from aggregator.dates import parse_day, resolve_window, today_in
from aggregator.graceful import run_until_stopped
from aggregator.output import silence_stdout
from aggregator.pipeline import ALL_SOURCES, RunOutcome, RunRequest, run_job
from aggregator.progress import terminal_progress
from aggregator.text_table import error_lines, table_lines


def command(args: argparse.Namespace, settings: Settings) -> int:
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
    reader = _ReaderWatch(sys.stdout) if request.dry_run else None

    with terminal_progress(sys.stderr.isatty()) as progress:

        async def job(stop: asyncio.Event) -> RunOutcome:
            if reader is not None:
                reader.watch(stop)
            return await run_job(settings, request, stop=stop, progress=progress)

        tune_for_a_long_run()
        outcome = run_until_stopped(job)
    if reader is not None and reader.gone:
        raise BrokenPipeError("the reader of the dry run's output went away")
    try:
        if request.dry_run:
            print_rows(outcome, sys.stdout)
        print_summary(outcome, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        if request.dry_run:
            raise
        # The rows are stored: a reader gone before the summary (`run | head -0`, stdout
        # closed) costs only the summary, not the exit status cron acts on.
        silence_stdout()
    if outcome.fatal:
        # The store refused the run or its lease was lost: the one line cron mail shows.
        print(f"aggregator: error: {outcome.fatal}", file=sys.stderr)
    return outcome.exit_code


class _ReaderWatch:
    """Notices, without writing, that the reader of a pipe on stdout has closed it.

    The write end of a pipe whose readers are all gone polls as an error condition, which
    asyncio's selector reports as readable; a write end is never readable otherwise. Only a
    pipe is watched: a terminal's descriptor is readable when someone types, and a file has
    no reader to lose.
    """

    def __init__(self, stream: TextIO) -> None:
        self.gone = False
        try:
            fd = stream.fileno()
            self._fd: int | None = fd if stat.S_ISFIFO(os.fstat(fd).st_mode) else None
        except (OSError, ValueError):  # no descriptor (a test's StringIO) or a closed one
            self._fd = None

    def watch(self, stop: asyncio.Event) -> None:
        """From now on, a closed pipe sets `stop` (call inside the running loop)."""
        if self._fd is None:
            return
        loop = asyncio.get_running_loop()
        fd = self._fd

        def closed() -> None:
            loop.remove_reader(fd)
            self.gone = True
            stop.set()

        loop.add_reader(fd, closed)


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
