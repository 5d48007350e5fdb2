"""Logging: JSON lines under cron, readable lines in a terminal, secrets masked in both."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog

from aggregator.redaction import Redactor


def _masking_processor(secrets: Iterable[str]):
    """Replace any known secret value (in any spelling) found in a string field with ***.

    Sources never log secrets on purpose; this is the net under them, so that an exception text
    echoing a URL or a request body cannot leak a token into cron mail or a log store.
    """
    redact = Redactor(*(s for s in secrets if len(s) >= 4))

    def mask(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = redact(value)
        return event

    return mask


class _CurrentStderr:
    """Whatever sys.stderr is at the moment of writing.

    A live progress display swaps sys.stderr for a proxy that prints above its bars; a logger
    bound to the original stream would draw through them instead.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    verbose: bool = False,
    quiet: bool = False,
) -> None:
    as_json = not (stream or sys.stderr).isatty()
    renderer = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=True)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _masking_processor(secrets),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or _CurrentStderr()),
        cache_logger_on_first_use=False,
    )
