"""Requests in flight follow Little's law: the allowed rate times the measured latency.

The sizing is pure; the paced requests run on an event loop whose clock is virtual (a wait
advances it at once), so a 500 ms or 2 s API is measured exactly and instantly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import selectors
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from aggregator.model import LearnedRate
from aggregator.search_console import inflight
from aggregator.search_console.account_run import Paced, take_turn
from aggregator.search_console.inflight import (
    ACCOUNT_CEILING,
    InFlight,
    LatencyEstimate,
    in_flight_limit,
)
from aggregator.search_console.pacing import CATCH_UP, Pacer

T = TypeVar("T")


class _Clock:
    now = 0.0


class _InstantSelector(selectors.DefaultSelector):
    """Never blocks: a wait for the next timer moves the virtual clock there instead."""

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list:
        ready = super().select(0)
        if not ready and timeout:
            self._clock.now += timeout
        return ready


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._virtual = _Clock()
        super().__init__(_InstantSelector(self._virtual))

    def time(self) -> float:
        return self._virtual.now


def on_virtual_clock(main: Callable[[], Awaitable[T]]) -> T:
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


async def paced_requests(count: int, latency: float, account: Paced, client: Paced) -> float:
    """`count` requests through take_turn, each answered after `latency`; the seconds taken."""
    loop = asyncio.get_running_loop()
    began = loop.time()

    async def one() -> None:
        async with contextlib.AsyncExitStack() as places:
            await take_turn(account, client, places)
            sent = loop.time()
            account.throttle.sent(sent)
            client.throttle.sent(sent)
            await asyncio.sleep(latency)
            now = loop.time()
            for scope in (account, client):
                scope.took(now - sent)
                scope.answered(now, sent)

    await asyncio.gather(*(one() for _ in range(count)))
    return loop.time() - began


def test_the_limit_is_rate_times_latency_with_headroom_between_floor_and_ceiling() -> None:
    assert in_flight_limit(20, 0.1, ceiling=256) == math.ceil(20 * 0.1 * 1.5) + 2 == 5
    assert in_flight_limit(20, 0.5, ceiling=256) == 17
    assert in_flight_limit(20, 2.0, ceiling=256) == 62
    assert in_flight_limit(1, 0.1, ceiling=256) == inflight.FLOOR, "a slow start still overlaps"
    assert in_flight_limit(1000, 10.0, ceiling=256) == 256, "sockets are finite"


def test_the_latency_estimate_follows_a_latency_that_moves() -> None:
    estimate = LatencyEstimate()
    assert estimate.seconds() == inflight.ASSUMED_LATENCY
    for _ in range(40):
        estimate.add(0.1)
    assert estimate.seconds() == pytest.approx(0.1, abs=0.005)
    for _ in range(40):
        estimate.add(0.5)
    assert 0.5 <= estimate.seconds() <= 0.52
    estimate.add(3.0)  # one slow answer raises it for a while
    assert estimate.seconds() > 1.5
    for _ in range(40):
        estimate.add(0.5)
    assert estimate.seconds() < 0.55


@pytest.mark.parametrize("latency", [0.1, 0.5, 2.0])
def test_the_quota_not_a_connection_cap_bounds_a_paced_account_at_any_latency(
    latency: float,
) -> None:
    """An account allowed 20 queries/s sends 200 at 20/s whether answers take 100 ms or 2 s;
    the places it needed stay near rate x latency."""

    async def main() -> tuple[float, int]:
        account = Paced(LearnedRate(20.0, limit_shown=True), None, most_in_flight=ACCOUNT_CEILING)
        client = Paced(
            LearnedRate(600.0, limit_shown=True), None, most_in_flight=inflight.CLIENT_CEILING
        )
        seconds = await paced_requests(200, latency, account, client)
        return seconds, account.in_flight.peak

    seconds, peak = on_virtual_clock(main)
    assert seconds <= 1.01 * (200 / 20) + latency
    # Before the first answers the limit assumes a 2 s latency and the estimate's deviation
    # starts wide (half the first answer); then it follows the measured latency.
    assert peak <= in_flight_limit(20, 2 * max(latency, inflight.ASSUMED_LATENCY), ceiling=10**4)


def test_a_fixed_cap_would_have_bound_the_same_account_at_500_ms() -> None:
    """The control: with 8 places the same 200 requests at 500 ms take 200 x 0.5 / 8 s."""

    async def main() -> float:
        account = Paced(LearnedRate(20.0, limit_shown=True), None, most_in_flight=8)
        client = Paced(
            LearnedRate(600.0, limit_shown=True), None, most_in_flight=inflight.CLIENT_CEILING
        )
        return await paced_requests(200, 0.5, account, client)

    assert on_virtual_clock(main) >= 200 * 0.5 / 8


def test_the_clients_places_go_only_to_requests_their_account_let_go() -> None:
    """Two accounts share a client; one is allowed 1 query/s, the other 20/s. The slow one's
    queued requests hold no client place, so the fast one keeps its pace."""

    async def main() -> float:
        client = Paced(
            LearnedRate(100.0, limit_shown=True), None, most_in_flight=inflight.CLIENT_CEILING
        )
        slow = Paced(LearnedRate(1.0, limit_shown=True), None, most_in_flight=ACCOUNT_CEILING)
        fast = Paced(LearnedRate(20.0, limit_shown=True), None, most_in_flight=ACCOUNT_CEILING)
        slow_night = asyncio.ensure_future(paced_requests(50, 0.5, slow, client))
        seconds = await paced_requests(100, 0.5, fast, client)
        assert client.in_flight.peak <= client.in_flight.limit + 20
        slow_night.cancel()
        await asyncio.gather(slow_night, return_exceptions=True)
        return seconds

    assert on_virtual_clock(main) <= 1.01 * (100 / 20) + 0.5


def test_growing_lets_waiters_in_and_shrinking_takes_nothing_back() -> None:
    async def main() -> None:
        gate = InFlight(2)
        release = asyncio.Event()
        inside: list[int] = []

        async def hold(n: int) -> None:
            async with gate.place():
                inside.append(n)
                await release.wait()

        tasks = [asyncio.ensure_future(hold(n)) for n in range(5)]
        await asyncio.sleep(0)
        assert inside == [0, 1]
        gate.resize(4)
        await asyncio.sleep(0)
        assert inside == [0, 1, 2, 3], "first come, first served"
        gate.resize(1)
        assert gate.active == 4, "requests in flight keep their places"
        tasks[4].cancel()  # a waiter that gives up leaves no trace
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert gate.active == 0 and inside == [0, 1, 2, 3]

    on_virtual_clock(main)


def test_a_waiter_cancelled_just_after_being_let_in_passes_its_place_on() -> None:
    async def main() -> None:
        gate = InFlight(1)
        entered: list[str] = []

        async def take(name: str, hold: asyncio.Event) -> None:
            async with gate.place():
                entered.append(name)
                await hold.wait()

        first = asyncio.ensure_future(take("first", asyncio.Event()))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(take("second", asyncio.Event()))
        third = asyncio.ensure_future(take("third", asyncio.Event()))
        await asyncio.sleep(0)
        gate.resize(2)  # lets "second" in...
        second.cancel()  # ...which is cancelled before it runs
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert entered == ["first", "third"] and gate.active == 2
        first.cancel()
        third.cancel()
        await asyncio.gather(first, second, third, return_exceptions=True)
        assert gate.active == 0

    on_virtual_clock(main)


# --- pacing on the virtual clock ----------------------------------------------------------------


def released(pacer: Pacer, count: int, late: Callable[[int], float]) -> list[float]:
    """When `count` queued slots of `pacer` were released, each held `late(n)` seconds (as a
    busy loop or a wait inside the slot would delay it)."""

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        times: list[float] = []

        async def one(n: int) -> None:
            async with pacer.slot():
                await asyncio.sleep(late(n))
                times.append(loop.time())

        await asyncio.gather(*(one(n) for n in range(count)))
        return times

    return on_virtual_clock(main)


def test_slots_a_little_late_keep_the_rate() -> None:
    """Every slot released 8 ms late: 100 slots at 20/s still take 100 intervals, where
    measuring each from its late release would lose 8 ms a slot."""
    pacer = Pacer(20, headroom=1.0)
    times = released(pacer, 100, lambda _n: 0.008)
    assert times[-1] - times[0] == pytest.approx(99 * 0.05, abs=1e-6)


def test_a_stall_moves_the_grid_instead_of_bursting_after_it() -> None:
    """One slot released 300 ms late (a garbage collection): the next ones are spaced from it,
    less CATCH_UP at most, so with the pacing headroom no 1-second window holds more than the
    quota the pacer was given."""
    pacer = Pacer(20)
    times = released(pacer, 60, lambda n: 0.3 if n == 10 else 0.0)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= pacer.interval - CATCH_UP - 1e-9
    assert times[-1] - times[0] >= 59 * pacer.interval + 0.3 - CATCH_UP - 1e-9, "no catch-up"
    assert max(sum(1 for t in times if start <= t < start + 1.0) for start in times) <= 20


def test_turns_taken_at_a_slow_start_move_up_when_the_rate_rises() -> None:
    """Ten turns taken at 1/s would wait 9 s for the last; the rate rising to 100/s right
    after brings them all within a tenth of a second, in their order."""

    async def main() -> list[tuple[int, float]]:
        loop = asyncio.get_running_loop()
        pacer = Pacer(1.0, headroom=1.0)
        came: list[tuple[int, float]] = []

        async def one(n: int) -> None:
            await pacer.turn()
            came.append((n, loop.time()))

        tasks = [asyncio.ensure_future(one(n)) for n in range(10)]
        await asyncio.sleep(0)
        pacer.pace(100.0)
        await asyncio.gather(*tasks)
        return came

    came = on_virtual_clock(main)
    assert [n for n, _ in came] == list(range(10))
    assert came[-1][1] <= 0.1 + 1e-9
    assert all(b - a >= 0.01 - 1e-9 for (_, a), (_, b) in itertools.pairwise(came))


def test_a_slot_waiting_at_a_slow_start_moves_up_when_the_rate_rises() -> None:
    """A slot taken at 1/s waits a second for its turn; the rate rising to 20/s while it
    waits brings it in one new interval after the slot before, not at the old due time."""

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        pacer = Pacer(1.0, headroom=1.0)
        times: list[float] = []

        async def one() -> None:
            async with pacer.slot():
                times.append(loop.time())

        await one()
        waiting = asyncio.ensure_future(one())
        await asyncio.sleep(0.01)
        pacer.pace(20.0)
        await waiting
        return times

    first, second = on_virtual_clock(main)
    assert second - first == pytest.approx(0.05, abs=1e-6)


def test_a_hold_lets_no_slot_or_turn_out_before_it_ends() -> None:
    """After a refusal the scope is held until Google's window has drained: a slot and a turn
    waiting at 20/s both come at the hold's end, not one interval after the last."""

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        slots, turns = Pacer(20.0, headroom=1.0), Pacer(20.0, headroom=1.0)

        async def take_slot() -> float:
            async with slots.slot():
                return loop.time()

        async def take_turn() -> float:
            await turns.turn()
            return loop.time()

        await take_slot()
        await take_turn()
        waiting = asyncio.gather(take_slot(), take_turn())
        await asyncio.sleep(0.01)
        slots.hold(0.4)
        turns.hold(0.4)
        slot_at, turn_at = await waiting
        return slot_at, turn_at

    slot_at, turn_at = on_virtual_clock(main)
    assert slot_at == pytest.approx(0.4) and turn_at == pytest.approx(0.4)
