"""Even request spacing for asyncio clients that must stay under a per-second quota.

Generic: knows nothing of any API. Search Console's client paces each account and the whole
OAuth client with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator

# Pacing runs this much slower than the configured rate. Requests leave exactly evenly spaced,
# but a server stamps them on arrival, a little later and not all equally late; at exactly
# 1/rate apart the (rate+1)-th request lands on the very edge of a 1-second window, so any
# jitter would tip it over. 10% leaves 100 ms of slack per second of requests: loop stalls of
# 30-45 ms were seen while Matomo bulk answers were being parsed (`make bench`).
PACING_HEADROOM = 1.10


class Pacer:
    """Spaces requests evenly: consecutive slots are at least `headroom / per_second` apart.

    Why not aiolimiter's AsyncLimiter(rate, 1): it is a leaky bucket of capacity `rate`, so
    `rate` requests go out at once and more follow as it drains: a 1-second window sees up to
    about 2 x rate and a server that counts per second answers the excess with 429. Even spacing
    keeps every 1-second window at `per_second` requests or fewer, for rates below 1/s too.

    A slot is held (`async with pacer.slot():`) until the request is about to go out, and the
    next slot is measured from then, so waiting inside one slot for another pacer (the
    account's slot waits for the client's) never bunches this pacer's requests. Waiters are
    served first come, first served; the clock is the event loop's monotonic clock.
    """

    def __init__(self, per_second: float, *, headroom: float = PACING_HEADROOM) -> None:
        self._headroom = headroom
        self.pace(per_second)
        self.granted = 0
        self._next = -math.inf  # loop time before which no slot starts
        self._lock = asyncio.Lock()

    def pace(self, per_second: float) -> None:
        """Change the rate; the next slot is spaced by the new interval."""
        if not per_second > 0:
            raise ValueError(f"per_second must be > 0, got {per_second!r}")
        self.per_second = per_second
        self.interval = self._headroom / per_second

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._lock:
            loop = asyncio.get_running_loop()
            delay = self._next - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.granted += 1
            try:
                yield
            finally:
                self._next = loop.time() + self.interval
