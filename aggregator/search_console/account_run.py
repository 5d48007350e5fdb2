"""What one run knows about each Google account, and about the OAuth client as a whole.

Google's errors are not all about the request that met them: a load quota makes the whole
account rest, a daily limit ends the account's night, a deleted OAuth client or a Cloud project
without the API fails every account alike. These objects carry such verdicts from the request
that learned them to every other request, so each is paid for once, not once per site.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Literal

from aggregator.model import GscAccount
from aggregator.search_console.answers import ReadableProperties, readable
from aggregator.search_console.inflight import InFlight, LatencyEstimate, in_flight_limit
from aggregator.search_console.oauth import AccountToken, Sleep
from aggregator.search_console.pacing import PACING_HEADROOM, Pacer
from aggregator.search_console.rates import Throttle


class SiteFailure(Exception):
    """A site's GSC numbers could not be fetched; the message is safe to store."""


class PropertyUnreachable(SiteFailure):
    """The account can read none of the site's candidate properties: the site is skipped."""


class AccountStopped(SiteFailure):
    """The account is asked nothing more this run (daily limit, a load quota that outlasted
    its rest); its sites fail with the message that says why."""


class ClientBroken(Exception):
    """The OAuth client cannot be used at all (deleted, unknown, the API disabled in its Cloud
    project): reported once for the whole client, never per site."""


class Paced:
    """One quota scope (an account, the OAuth client): its learned rate, the pacer that
    spaces its queries evenly at that rate, and how many may be in flight at once, which
    follows that rate and the measured latency (see .inflight)."""

    def __init__(self, start: float | None, ceiling: float | None, *, most_in_flight: int) -> None:
        # A ceiling the operator set is kept with the pacer's headroom (see PACING_HEADROOM);
        # a learned rate already sits under the limit Google showed.
        self.throttle = Throttle(start, ceiling / PACING_HEADROOM if ceiling else None)
        self.pacer = Pacer(self.throttle.rate, headroom=1.0)
        self.latency = LatencyEstimate()
        self._most_in_flight = most_in_flight
        self.in_flight = InFlight(self._in_flight_limit())

    def answered(self, now: float, sent_at: float) -> None:
        self.throttle.answered(now, sent_at)
        self._follow()

    def refused(self, now: float, sent_at: float) -> None:
        self.throttle.refused(now, sent_at)
        self.pacer.hold(self.throttle.resume_at)
        self._follow()

    def took(self, seconds: float) -> None:
        """An answer came `seconds` after its request left."""
        self.latency.add(seconds)
        self.in_flight.resize(self._in_flight_limit())

    def _follow(self) -> None:
        self.pacer.pace(self.throttle.rate)
        self.in_flight.resize(self._in_flight_limit())

    def _in_flight_limit(self) -> int:
        return in_flight_limit(
            self.throttle.rate, self.latency.seconds(), ceiling=self._most_in_flight
        )


async def take_turn(account: Paced, client: Paced, places: contextlib.AsyncExitStack) -> None:
    """Wait until a request of `account` may go out: a place in flight for the account, its
    pacer's slot, then a place and a turn of the OAuth client. The places stay taken (in
    `places`) until the answer is in. The account's slot is held while the client's place and
    turn are awaited, so its spacing is kept; and only requests their account lets go take the
    client's places, so an account waiting for its own pace holds none of them."""
    await places.enter_async_context(account.in_flight.place())
    async with account.pacer.slot():
        await places.enter_async_context(client.in_flight.place())
        await client.pacer.turn()


class AccountRun:
    """Everything shared by one account's site tasks during one run."""

    def __init__(self, account: GscAccount, token: AccountToken, paced: Paced) -> None:
        self.account = account
        self.token = token
        self.paced = paced
        self._stopped: str | None = None
        self._rest_over: asyncio.Event | None = None
        self._listing_lock = asyncio.Lock()
        self._listing: Mapping[str, str] | SiteFailure | None = None
        self._readable: ReadableProperties | None = None

    def stop(self, message: str) -> AccountStopped:
        """Ask this account nothing more this run; the first reason given is the one kept."""
        if self._stopped is None:
            self._stopped = message
        return AccountStopped(self._stopped)

    def check(self) -> None:
        if self._stopped is not None:
            raise AccountStopped(self._stopped)

    @property
    def has_rested(self) -> bool:
        """Whether the account's one rest (after a load-quota refusal) has begun."""
        return self._rest_over is not None

    async def rest(self, seconds: float, sleep: Sleep) -> None:
        """The account's one rest: the first caller sleeps, the others wait for it to end."""
        if self._rest_over is None:
            self._rest_over = asyncio.Event()
            try:
                await sleep(seconds)
            finally:
                self._rest_over.set()
        else:
            await self._rest_over.wait()

    async def rested(self) -> None:
        """Return once the account is not resting (at once if it never rested)."""
        if self._rest_over is not None:
            await self._rest_over.wait()

    async def listing(
        self, list_sites: Callable[[], Awaitable[Mapping[str, str]]]
    ) -> Mapping[str, str]:
        """sites.list (property -> permission level) once per account and run; a failure is
        shared like an answer."""
        async with self._listing_lock:
            if self._listing is None:
                try:
                    self._listing = await list_sites()
                except SiteFailure as failure:
                    self._listing = failure
            if isinstance(self._listing, SiteFailure):
                raise type(self._listing)(str(self._listing))
            return self._listing

    async def readable(
        self, list_sites: Callable[[], Awaitable[Mapping[str, str]]]
    ) -> ReadableProperties:
        """The properties of listing() that return data, indexed once for all the sites."""
        listing = await self.listing(list_sites)
        if self._readable is None:
            self._readable = readable(listing)
        return self._readable


Stage = Literal["token", "api"]


class ClientGate:
    """Until Google has once accepted the OAuth client, its requests go one at a time.

    A deleted OAuth client or a Cloud project without the Search Console API fails every account
    alike; letting each account's first request race would cost one refused request (and one
    error line) per account. So the token endpoint and the API are each entered by one request
    until its outcome says the client is not broken there; from then on the gate costs nothing.
    Once the client is found broken, every request stops before it is sent.
    """

    def __init__(self) -> None:
        self.failure: str | None = None
        self._locks = {"token": asyncio.Lock(), "api": asyncio.Lock()}
        self._proven: set[Stage] = set()

    def check(self) -> None:
        if self.failure is not None:
            raise ClientBroken(self.failure)

    def broken(self, message: str) -> ClientBroken:
        if self.failure is None:
            self.failure = message
        return ClientBroken(self.failure)

    def proven(self, stage: Stage) -> None:
        self._proven.add(stage)

    @contextlib.asynccontextmanager
    async def passage(self, stage: Stage) -> AsyncIterator[None]:
        self.check()
        if stage not in self._proven:
            lock = self._locks[stage]
            await lock.acquire()
            try:
                # Whoever waited here while the first request proved the client goes on at
                # once, all together, instead of one by one behind the lock.
                if stage not in self._proven:
                    self.check()
                    yield
                    return
            finally:
                lock.release()
        self.check()
        yield
