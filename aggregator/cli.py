"""Command line: dispatch, exit codes and one-line errors; the work lives elsewhere.

Each command's module is imported only when that command runs (the grammar and help are in
aggregator.arguments, which imports none of them): the nightly `run` does not pay for the
simulators, the check, the status report or the consent flow.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TextIO
from urllib.parse import unquote, urlsplit

from aggregator.arguments import EXIT_UNUSABLE, build_parser
from aggregator.config import ConfigError, Settings, load_settings, read_environment
from aggregator.dates import DateError
from aggregator.output import guard_closed_stdout, silence_stdout
from aggregator.redaction import masked_output
from aggregator.usage import UsageError

EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a process killed by SIGPIPE
COMMANDS = ("run", "migrate", "status", "accounts", "demo", "check")

Handler = Callable[[argparse.Namespace, Settings], int]


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
    guard_closed_stdout()
    with masked_output():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(_with_default_command(sys.argv[1:] if argv is None else argv))
    try:
        settings = load_settings(read_environment())
    except ConfigError as exc:
        return _fail(str(exc), sys.stderr)
    from aggregator.logs import configure_logging

    configure_logging(
        secrets=_secrets_of(settings),
        verbose=getattr(args, "verbose", False),
        least=_LEAST_LOG_LEVEL.get(args.command, logging.INFO),
    )
    try:
        code = _handler(args.command)(args, settings)
        sys.stdout.flush()  # a full disk shows here, while we can still say so in one line
        return code
    except _one_line_errors() as exc:
        return _fail(str(exc), sys.stderr)
    except BrokenPipeError:
        return _reader_went_away()
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRNOS:
            raise
        silence_stdout()
        return _fail(f"cannot write the output: {os.strerror(exc.errno)}", sys.stderr)


# Commands that print a report of their own log less unless asked for (-v): the demo's
# per-request logs are noise beside its report, and the check's findings, warnings such as a
# refused token included, are its table's rows (its log keeps only the check's own failures).
_LEAST_LOG_LEVEL = {"demo": logging.WARNING, "check": logging.ERROR}

# Failures of writing stdout itself (`> /dev/full`, a dead terminal, a full quota): the
# output is lost, so the command fails in one line instead of a crash report.
_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EDQUOT})


def _reader_went_away() -> int:
    """`aggregator status --json | head`: the reader closed the pipe. End quietly, as `cat`
    does, with stdout silenced."""
    silence_stdout()
    return EXIT_BROKEN_PIPE


def _handler(command: str) -> Handler:
    """The function that runs `command`, its module imported now and not before."""
    module = {
        "run": "aggregator.run_command",
        "migrate": "aggregator.migrations",
        "status": "aggregator.status.command",
        "accounts": "aggregator.accounts",
        "demo": "aggregator.demo",
        "check": "aggregator.check",
    }[command]
    return importlib.import_module(module).command


def _one_line_errors() -> tuple[type[Exception], ...]:
    """The errors whose message is the whole story (exit 2). Looked up when one is raised, so
    parsing the arguments does not import the database driver."""
    from aggregator.storage import StorageError

    return (ConfigError, DateError, UsageError, StorageError)
