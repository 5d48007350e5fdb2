"""asyncio.run for a command that stops gracefully instead of dying mid-write.

SIGTERM (cron's `timeout`, systemd), SIGINT (Ctrl-C) and SIGHUP (the terminal of a run started
by hand closed) set an event the work watches: fetching ends, what was fetched is kept and the
run row is closed.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_until_stopped(work: Callable[[asyncio.Event], Coroutine[Any, Any, T]]) -> T:
    """Run `work(stop)` in a new event loop; SIGTERM, SIGINT and SIGHUP set `stop`."""

    async def runner() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        return await work(stop)

    return asyncio.run(runner())
