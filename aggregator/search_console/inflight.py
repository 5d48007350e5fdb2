"""How many requests may be in flight: Little's law over the measured latency and the rate.

A paced client sends `rate` requests a second and each stays out for the API's latency, so
`rate x latency` are in flight on average (Little's law). Allow fewer and the pacer waits for a
free place: the connection cap, not the quota, sets the speed, and a cap that suits 100 ms
starves the pacer at 500 ms. Allow many more and a stalled API collects thousands of open
sockets. So the limit follows both: the rate Google currently allows (see .rates) times a
latency estimate that covers most answers, with headroom for the requests queued at the pacer,
between a floor (a slow start still overlaps a few requests) and a ceiling (sockets are finite).

Sizing is pure (the latency estimate is fed samples, the clock is the caller's); InFlight is the
asyncio gate whose size the caller changes as rate and latency move.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator

# Before the first answer: real Search Analytics calls take 0.3-0.5 s; assuming 2 s errs towards
# more overlap (which the pacer still bounds), so a slow API does not leave the pacer waiting
# for the first answers before the limit learns the latency.
ASSUMED_LATENCY = 2.0
# Beyond rate x latency: requests queued at the pacer hold a place too, and answers slower
# than the estimate must not starve the pacer.
HEADROOM = 1.5
SPARE = 2
FLOOR = 4
ACCOUNT_CEILING = 256  # one Google account: 20 q/s at a 12 s latency
CLIENT_CEILING = 1024  # all accounts of one OAuth client together
_GAIN = 1 / 8  # smoothing of the mean latency, as TCP's RTT estimate (RFC 6298)
_DEVIATION_GAIN = 1 / 4
_DEVIATIONS = 2  # the estimate: mean + 2 mean deviations, above most answers


class LatencyEstimate:
    """A smoothed latency that covers most answers: mean plus two mean deviations, each an
    exponentially weighted average of the samples (RFC 6298's estimator), so it follows a
    latency that moves within a few dozen answers; a single slow answer raises it for a while."""

    def __init__(self) -> None:
        self.mean: float | None = None
        self.deviation = 0.0

    def add(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        if self.mean is None:
            self.mean, self.deviation = seconds, seconds / 2
            return
        self.deviation += _DEVIATION_GAIN * (abs(seconds - self.mean) - self.deviation)
        self.mean += _GAIN * (seconds - self.mean)

    def seconds(self) -> float:
        """The latency to plan with: ASSUMED_LATENCY until the first answer."""
        if self.mean is None:
            return ASSUMED_LATENCY
        return self.mean + _DEVIATIONS * self.deviation


def in_flight_limit(rate: float, latency: float, *, ceiling: int) -> int:
    """Requests that may be in flight at `rate` queries/s with answers taking `latency` s:
    Little's law with HEADROOM and SPARE places, between FLOOR and `ceiling`."""
    needed = math.ceil(rate * latency * HEADROOM) + SPARE
    return max(FLOOR, min(needed, ceiling))


class InFlight:
    """A gate of `limit` places that can be resized while requests hold them.

    Growing lets waiters in at once; shrinking takes nothing back from requests already in
    flight, it only makes new ones wait until fewer are out. First come, first served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.peak = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def resize(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._wake()

    @contextlib.asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        if self.active >= self.limit or self._waiters:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    # Let in, then cancelled before running: pass the place on.
                    self.active -= 1
                    self._wake()
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
        else:
            self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            yield
        finally:
            self.active -= 1
            self._wake()

    def _wake(self) -> None:
        while self._waiters and self.active < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)
