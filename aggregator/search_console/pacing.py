"""Even request spacing for asyncio clients that must stay under a per-second quota.

Generic: knows nothing of any API. Search Console's client paces each account and the whole
OAuth client with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

# Pacing runs this much slower than the configured rate, so that a request released up to
# CATCH_UP late (see Pacer) plus a server's own stamping delay still never makes a 1-second
# window hold more than the rate: at exactly 1/rate apart the (rate+1)-th request lands on the
# very edge of the window. 5% leaves 50 ms per second of requests: 20 for catching up, 30 for
# the server.
PACING_HEADROOM = 1.05
# How late (seconds) a slot may be released and still keep the even grid. A busy event loop
# wakes every slot a few milliseconds late; measuring the next slot from each late release
# would lose that every time (`make bench` saw 55 ms slots last 61 ms on average, 10% of the
# rate). Lateness beyond this (a garbage collection, a wait inside the slot) moves the grid
# instead of being caught up in a burst.
CATCH_UP = 0.020


class Pacer:
    """Spaces requests evenly at `per_second / headroom`: each slot is due one interval after
    the one before.

    Why not aiolimiter's AsyncLimiter(rate, 1): it is a leaky bucket of capacity `rate`, so
    `rate` requests go out at once and more follow as it drains: a 1-second window sees up to
    about 2 x rate and a server that counts per second answers the excess with 429. Even spacing
    keeps every 1-second window at `per_second` requests or fewer, for rates below 1/s too.

    A slot is held (`async with pacer.slot():`) until the request is about to go out. Released
    at most CATCH_UP after it was due, the next slot keeps the grid; released later (a stall,
    or waiting inside it for another pacer: the account's slot waits for the client's turn),
    the next slot is due one interval after the release (less CATCH_UP), so a late request is
    never followed by a bunch. Waiters are served first come, first served; the clock is the
    event loop's monotonic clock.

    `turn()` is a slot that is not held: it only waits for its place on the grid, taken at
    once, so any number of callers get their places without queueing behind each other (one
    loop iteration per slot would otherwise cap a busy loop at a few hundred slots a second).
    It suits the innermost pacer, the OAuth client's, inside the accounts' held slots.
    """

    def __init__(self, per_second: float, *, headroom: float = PACING_HEADROOM) -> None:
        self._headroom = headroom
        self.granted = 0
        self._next = -math.inf  # loop time before which no slot is due
        # Where the grid stood at the latest slot released or turn come.
        self._last_due = -math.inf
        self._held_until = -math.inf  # see hold()
        self._sleeper: asyncio.Future[None] | None = None  # the slot holder waiting for _next
        self._lock = asyncio.Lock()
        self._turns: list[_Turn] = []  # turns waiting for their time, in order
        self.interval = math.inf
        self.pace(per_second)

    def pace(self, per_second: float) -> None:
        """Change the rate; the next slot, and every turn still waiting, is spaced by the new
        interval (a turn taken at a slow start must not keep its far-off time)."""
        if not per_second > 0:
            raise ValueError(f"per_second must be > 0, got {per_second!r}")
        changed = self.interval != self._headroom / per_second
        self.per_second = per_second
        self.interval = self._headroom / per_second
        if changed:
            self._moved(self._last_due + self.interval)

    def hold(self, until: float) -> None:
        """Let nothing out before `until` (loop time): a quota that refused must first see
        its counting window drain, or what follows is refused too."""
        if until > self._held_until:
            self._held_until = until
            self._moved(max(self._next, until))

    def _moved(self, due: float) -> None:
        """The next slot is due at `due` (never before a hold): wake a slot holder waiting for
        the old time, and give every waiting turn its new time."""
        self._next = max(due, self._held_until)
        if self._sleeper is not None and not self._sleeper.done():
            self._sleeper.set_result(None)
        if self._turns:
            self._respace()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._lock:
            loop = asyncio.get_running_loop()
            entered = loop.time()
            # pace() and hold() may move the due time while this waits: they wake the wait.
            while (due := max(self._next, entered)) > loop.time():
                self._sleeper = loop.create_future()
                timer = loop.call_at(due, _wake, self._sleeper)
                try:
                    await self._sleeper
                finally:
                    timer.cancel()
                    self._sleeper = None
            self.granted += 1
            try:
                yield
            finally:
                self._last_due = max(due, loop.time() - CATCH_UP)
                self._next = max(self._last_due + self.interval, self._held_until)

    async def turn(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = max(self._next, now)
        self._next = due + self.interval
        self.granted += 1
        if due <= now:
            self._last_due = due
            return
        turn = _Turn(loop.create_future(), due)
        turn.timer = loop.call_at(due, self._come, turn)
        self._turns.append(turn)
        try:
            await turn.waiter
        finally:
            self._turns.remove(turn)
            turn.timer.cancel()

    def _come(self, turn: _Turn) -> None:
        self._last_due = turn.due
        if not turn.waiter.done():
            turn.waiter.set_result(None)

    def _respace(self) -> None:
        """Give the waiting turns, in their order, new times at the current interval."""
        loop = asyncio.get_running_loop()
        due = max(self._last_due + self.interval, loop.time(), self._held_until)
        for turn in self._turns:
            turn.timer.cancel()
            turn.due = due
            turn.timer = loop.call_at(due, self._come, turn)
            due += self.interval
        self._next = due


def _wake(sleeper: asyncio.Future[None]) -> None:
    if not sleeper.done():
        sleeper.set_result(None)


@dataclass(slots=True)
class _Turn:
    waiter: asyncio.Future[None]
    due: float
    timer: asyncio.TimerHandle | None = None
