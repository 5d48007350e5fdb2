"""The `aggregator status` command: read the report, print it as asked (`--html FILE` also
writes the page), choose the exit status.

Exit status: 0 nothing stale (a source that failed last night but whose numbers still reach
its due day is listed as failing, yet fresh), 1 something is stale, 2 configuration or database
unusable (raised as ConfigError/StorageError for cli.main).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime

from aggregator.config import Settings
from aggregator.output import stdout_closed_at_start
from aggregator.status import html, html_data, queries, render
from aggregator.status.verdict import StatusReport

EXIT_FRESH, EXIT_ATTENTION = 0, 1


def command(args: argparse.Namespace, settings: Settings) -> int:
    now = datetime.now(tz=settings.timezone)
    if args.html is None:
        return show(args, asyncio.run(queries.collect(settings, now)), settings)
    data = asyncio.run(html_data.collect(settings, now))
    size = html.write(data, args.html)
    print(f"report: {args.html.resolve()} ({html.size_text(size)})", file=sys.stderr)
    return show(args, data.status, settings)


def show(args: argparse.Namespace, report: StatusReport, settings: Settings) -> int:
    """Print the report as asked (`--json`, `--all`); return the exit status.

    With stdout closed (`status >&-`, a monitor that wants only the verdict) the exit status
    is the whole answer, so it is given as if the report had been read, not 141."""
    if stdout_closed_at_start():
        return exit_status(report)
    if args.json:
        print(json.dumps(render.as_json(report, every_site=args.all), indent=2))
    else:
        print(render.text(report, settings.timezone, every_site=args.all), end="")
    return exit_status(report)


def exit_status(report: StatusReport) -> int:
    return EXIT_FRESH if report.fresh else EXIT_ATTENTION
