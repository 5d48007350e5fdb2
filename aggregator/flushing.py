"""Store while fetching: the DailyTable is flushed whenever it is full, at least every
AGGREGATOR_FLUSH_SECONDS, and every EAGER_SECONDS while it has rows to store; each flush is one
transaction that first re-checks the run's lease.

So a killed run loses at most the last flush interval, memory is bounded by the flush size
(a full table is flushed in the background while the sources go on; one twice full makes
them wait), and a run that lost its lease writes nothing more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import structlog

from aggregator import storage
from aggregator.daily_table import Batch, DailyTable
from aggregator.lease import TRANSIENT_ERRORS, LeaseLost, RunLease

log = structlog.get_logger(__name__)

ATTEMPTS = 5  # a dropped connection or a pooler restart: retried with a fresh connection
FIRST_BACKOFF_SECONDS = 0.25
# A flush attempt also ends on the client side a little after its statements' own bound, in
# case the connection itself hangs (a black-holed network, a pooler that stopped answering).
CLIENT_MARGIN_SECONDS = 5.0
# Rows ready to store are stored within about a second, not held until AGGREGATOR_FLUSH_SECONDS:
# a run shorter than that interval otherwise wrote everything after its last answer (`make
# bench`: 0.6 s of a 17 s run spent storing 20,000 rows after the fetching was done), and the
# dashboard sees a night's numbers as they come.
EAGER_SECONDS = 1.0


class StoreFailed(Exception):
    """The database refused a flush (a trigger, a timeout, a constraint); one line, no secret."""


class Flusher:
    """Moves the table's rows and refresh outcomes into the database, one batch at a time.

    The table's `limit` is the flush size. `bound()` gives the seconds any statement may take right now (the run's remaining
    deadline, or a short grace once the run is stopping). The first failure (StoreFailed,
    LeaseLost, or any other exception a flush meets) is kept in `failure`, `on_failure` is
    called so the run stops fetching, and no flush writes after it: a storage that refuses
    once is not hammered for the rest of the run.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        lease: RunLease,
        table: DailyTable,
        *,
        bound: Callable[[], float],
        on_failure: Callable[[], None],
    ) -> None:
        self._pool = pool
        self._lease = lease
        self._table = table
        self._bound = bound
        self._on_failure = on_failure
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        # Resolved (and replaced) each time a flush takes the table's rows in.
        self._took: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_started = time.monotonic()
        self._last_eager = self.last_started
        self._errors_stored = 0  # how many of the table's errors the run row holds
        self.rows_sent = 0
        self.failure: str | None = None

    async def make_room(self) -> None:
        """Called when the table is full. It starts a flush in the background, so the database
        writes while the sources fetch. A table twice full waits until a flush has taken its
        rows in (not until they are stored: the sources fill the next batch while the database
        writes this one), so memory stays bounded by a few flushes' rows."""
        table = self._table
        if not table.full:
            return
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(self.flush(), name="flush")
        if not table.overfull:
            table.quiet_until_overfull()  # the flush under way takes these rows
            return
        while table.overfull and self.failure is None:
            if self._background.done():
                self._background = asyncio.create_task(self.flush(), name="flush")
            # wait() rather than await: a source cancelled here must not cancel the flush.
            await asyncio.wait({self._background, self._took}, return_when=asyncio.FIRST_COMPLETED)

    async def stop_background(self) -> None:
        """Cancel a flush started by make_room (its batch goes back to the table): once the
        run is stopping, the last flush stores everything under the stop grace instead."""
        if self._background is not None:
            self._background.cancel()
            await asyncio.gather(self._background, return_exceptions=True)

    async def flush_every(self, seconds: float) -> None:
        """Flush at least every `seconds` until cancelled (a flush for fullness resets it), and
        when a row held for its other half has waited `seconds`: nothing fetched waits longer.
        In between, every EAGER_SECONDS, store what is ready (rows not held), if anything."""
        while True:
            due = self._due(seconds)
            await asyncio.sleep(max(0.0, min(due, self._eager_due()) - time.monotonic()))
            await self.flush(eager=time.monotonic() < self._due(seconds))

    def _eager_due(self) -> float:
        return max(self.last_started, self._last_eager) + EAGER_SECONDS

    def _due(self, seconds: float) -> float:
        held = self._table.oldest_held
        since = self.last_started if held is None else min(held, self.last_started)
        return since + seconds

    async def flush(self, *, last: bool = False, eager: bool = False) -> None:
        """Store what the table holds now (`last`: everything, no row held for its other
        half). A batch that could not be stored goes back to the table (cancelled mid-way, or
        failed), so a later flush may still store it. An `eager` flush with nothing to store
        writes nothing, and leaves the periodic one (which renews the run row) due."""
        async with self._lock:
            if self.failure is not None:
                return
            now = time.monotonic()
            batch = self._table.take(now, hold=not last, bounded=not eager)
            if eager:
                self._last_eager = now
                if not batch:
                    return
            self.last_started = now
            took, self._took = self._took, asyncio.get_running_loop().create_future()
            took.set_result(None)
            try:
                await self._write(batch)
            except (StoreFailed, LeaseLost) as exc:
                self._fail(batch, str(exc))
            except Exception as exc:
                # Not the database's refusal but a fault of ours (a bug, data the staging
                # cannot take): in a background flush nobody awaits it, so it must stop the
                # run here like a refused flush rather than die unseen in its task.
                self._fail(batch, _failed(batch, exc), unexpected=True)
            except BaseException:
                self._table.give_back(batch)
                raise

    def _fail(self, batch: Batch, failure: str, *, unexpected: bool = False) -> None:
        self._table.give_back(batch)
        self.failure = failure
        log.error("store.failed", error=failure, exc_info=unexpected)
        self._on_failure()

    async def _write(self, batch: Batch) -> None:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                seconds = self._bound()
                async with asyncio.timeout(seconds + CLIENT_MARGIN_SECONDS):
                    await self._transaction(batch, seconds)
                return
            except TRANSIENT_ERRORS as exc:
                if attempt == ATTEMPTS:
                    raise StoreFailed(_failed(batch, exc)) from None
                log.warning("store.retry", attempt=attempt, error=type(exc).__name__)
                await asyncio.sleep(FIRST_BACKOFF_SECONDS * 2 ** (attempt - 1))
            except asyncpg.PostgresError as exc:
                raise StoreFailed(_failed(batch, exc)) from None

    async def _transaction(self, batch: Batch, seconds: float) -> None:
        # The run's errors only grow: rewrite them into the run row only when some came since
        # the last flush, not every second (a night with Matomo down holds thousands).
        errors = len(self._table.errors)
        async with self._pool.acquire() as conn, conn.transaction():
            await storage.bound_statements(conn, seconds)
            # First: the lease (and the run row's lock until commit), then the data.
            held = await storage.renew_lease(
                conn,
                self._lease.run_id,
                self._lease.seconds,
                add_rows=len(batch.rows),
                errors=self._table.errors if errors != self._errors_stored else None,
                stats={name: figures.as_json() for name, figures in self._table.stats.items()},
            )
            if not held:
                raise LeaseLost()
            flushed = await storage.stage_and_upsert(conn, batch.rows.values())
            await storage.record_account_refreshes(conn, batch.refreshes)
        self._errors_stored = errors
        self.rows_sent += flushed.rows
        log.info(
            "store.flushed",
            rows=flushed.rows,
            matomo=flushed.matomo,
            gsc=flushed.gsc,
            refreshes=len(batch.refreshes),
            at=flushed.at.isoformat(),
        )


def _failed(batch: Batch, exc: BaseException) -> str:
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return f"could not store {len(batch.rows)} fetched rows: {type(exc).__name__}: {first_line}"
