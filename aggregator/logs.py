"""Logging: JSON lines under cron, readable lines in a terminal, secrets masked in both.

The libraries' own standard-library logging (asyncpg after a pooler restart, aiohttp, asyncio,
google-auth), Python warnings, an uncaught exception and an exception Python cannot raise (a
finalizer's) all go through the same processors, so
cron sees one JSON line per event, tracebacks included, and nothing bypasses the masking.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from types import TracebackType
from typing import Any, TextIO

import structlog

from aggregator.redaction import redact, register_secret

log = structlog.get_logger(__name__)
_HANDLER_NAME = "aggregator"


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(item) for item in value]
    return value


def mask_secrets(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """Replace every registered secret (in any spelling) in the event's text with ***.

    Sources never log secrets on purpose; this is the net under them, so that an exception text
    echoing a URL or a request body cannot leak a token into cron mail or a log store. Access
    tokens are registered when Google issues them, so the set grows during a run.
    """
    return {key: _masked(value) for key, value in event.items()}


def _mask_rendered(_logger: Any, _name: str, line: str) -> str:
    """The rendered line once more: a renderer may have joined or escaped text into a spelling."""
    return redact(line)


class _CurrentStderr:
    """Whatever sys.stderr is at the moment of writing.

    A live progress display swaps sys.stderr for a proxy that prints above its bars; a logger
    bound to the original stream would draw through them instead.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _log_uncaught(
    kind: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> None:
    """An uncaught exception as one masked log event instead of a raw traceback on stderr."""
    log.critical("aggregator.crashed", exc_info=(kind, error, traceback))


def _log_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """An exception Python cannot raise (a finalizer's, say asyncpg's after a pooler restart)."""
    error = unraisable.exc_value
    log.error(
        "aggregator.unraisable",
        where=unraisable.err_msg or repr(unraisable.object),
        exc_info=(unraisable.exc_type, error, unraisable.exc_traceback) if error else None,
    )


def _console_renderer(*, colors: bool = True) -> structlog.dev.ConsoleRenderer:
    """structlog's terminal renderer with a plain traceback. Its default is rich's, which
    prints every frame's local variables: a flush's whole batch of rows, a DSN or a token held
    in some local, none of it masked."""
    return structlog.dev.ConsoleRenderer(
        colors=colors, exception_formatter=structlog.dev.plain_traceback
    )


def configure_logging(
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    verbose: bool = False,
    least: int = logging.INFO,
) -> None:
    """Route every log line through the masking to `stream` (stderr); `least` is the lowest
    level shown (DEBUG with `verbose`)."""
    for secret in secrets:
        register_secret(secret)
    as_json = not (stream or sys.stderr).isatty()
    renderer = structlog.processors.JSONRenderer() if as_json else _console_renderer()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        mask_secrets,
    ]
    level = logging.DEBUG if verbose else least
    output = stream or _CurrentStderr()
    structlog.configure(
        processors=[*shared, renderer, _mask_rendered],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(output),
        cache_logger_on_first_use=False,
    )
    _route_standard_logging(shared, renderer, output, level=level)
    sys.excepthook = _log_uncaught
    sys.unraisablehook = _log_unraisable


def _route_standard_logging(shared: list[Any], renderer: Any, output: Any, *, level: int) -> None:
    """Send every library's `logging` records through the same processors and stream."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            renderer,
            _mask_rendered,
        ],
    )
    handler = logging.StreamHandler(output)
    handler.setFormatter(formatter)
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for previous in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(previous)
    root.addHandler(handler)
    # Libraries' INFO is chatter (aiohttp access lines, asyncpg notices); their warnings count.
    root.setLevel(logging.INFO if level == logging.DEBUG else max(level, logging.WARNING))
    logging.captureWarnings(True)


def reset_logging() -> None:
    """Undo configure_logging (for a process that runs the CLI more than once, like tests).

    structlog's own defaults are restored but for their renderer, whose rich traceback would
    print every frame's locals (see _console_renderer)."""
    structlog.reset_defaults()
    defaults = structlog.get_config()["processors"]
    structlog.configure(
        processors=[
            _console_renderer(colors=False) if isinstance(p, structlog.dev.ConsoleRenderer) else p
            for p in defaults
        ]
    )
    root = logging.getLogger()
    for ours in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(ours)
    root.setLevel(logging.WARNING)
    logging.captureWarnings(False)
    sys.excepthook = sys.__excepthook__
    sys.unraisablehook = sys.__unraisablehook__
