"""One run at a time per database (per schema): the run row is a lease, renewed by a heartbeat.

Why not a Postgres lock: a session advisory lock does not survive Supabase's transaction
pooler, and a lock held in an idle transaction is silently lost to
`idle_in_transaction_session_timeout`, `pg_terminate_backend` or a pooler restart. A lease is
plain rows: it is taken with one conditional insert (only one `running` row may exist),
renewed by a heartbeat every third of its length, and checked again inside every flush
transaction (storage.renew_lease locks the run row), so a run can only write while it holds
it. A run whose heartbeats stop (killed, frozen, cut off) loses the lease when it expires;
the next run closes that row as `failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

import asyncpg
import structlog

from aggregator import storage

log = structlog.get_logger(__name__)

# Failures that a fresh connection may cure (a dropped connection, a pooler or server
# restart); anything else the database says is an answer, not an accident.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    # A connection whose backend was killed mid-statement ("cannot switch to state ...;
    # another operation is in progress"): the next attempt gets another connection.
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
# Statements that take or renew the lease are tiny; waiting longer means something is wrong.
LEASE_STATEMENT_SECONDS = 5.0
POLL_SECONDS = 1.0
MIN_POLL_SECONDS = 0.02

DIED = (
    "the process running this run stopped renewing its lease (killed, out of memory, power "
    "loss or cut off from the database); rows it stored before are kept"
)
LOST = (
    "this run lost its lease: its heartbeats did not reach the database for longer than "
    "AGGREGATOR_LEASE_SECONDS and another run took over; it stopped writing"
)


class LeaseLost(Exception):
    """Another run closed this run's row after its lease expired: stop writing."""

    def __init__(self) -> None:
        super().__init__(LOST)


def heartbeat_failed(exc: BaseException) -> str:
    """Why a run stopped when renewing its lease failed for a reason a retry cannot cure."""
    return (
        f"this run's lease heartbeat failed ({type(exc).__name__}): without renewals another "
        "run could take over, so it stopped writing; rows it stored before are kept"
    )


@dataclass(frozen=True, slots=True)
class RunLease:
    """A held lease: the run row's id and the lease length this run renews it by."""

    run_id: int
    seconds: float

    @property
    def beat(self) -> float:
        """A third of the lease: two beats may fail before another run may take over."""
        return self.seconds / 3


def owner_name() -> str:
    """Who holds a lease, for the operator reading a "waited for another run" line."""
    return f"{socket.gethostname()}:{os.getpid()}"


async def take_lease(
    pool: asyncpg.Pool,
    start: date,
    end: date,
    sites_total: int,
    *,
    lease_seconds: float,
    wait_seconds: float,
    stop: asyncio.Event | None = None,
) -> RunLease:
    """Open this run's row as the lease holder, waiting up to `wait_seconds` for a live run
    to finish (polling: a waiter holds nothing). Rows of dead runs are closed on the way.

    Raises storage.RunLocked when the wait is over, or at once when `stop` is set (a signal)
    before the lease is taken: a run that never held the lease fetched and wrote nothing, so
    it leaves no run row behind and says so instead of pretending it ran."""
    began = time.monotonic()
    give_up = began + wait_seconds
    stop = stop or asyncio.Event()
    waiting_logged = False
    while True:
        if stop.is_set():
            raise storage.RunLocked(_interrupted_message(time.monotonic() - began))
        closed, run_id, holder = 0, None, None
        try:
            async with pool.acquire() as conn, conn.transaction():
                # Within the wait (a busy holder's locked row must not stretch it much).
                seconds = min(LEASE_STATEMENT_SECONDS, max(give_up - time.monotonic(), 0.5))
                await storage.bound_statements(conn, seconds)
                closed = await storage.close_dead_runs(conn, DIED)
                run_id = await storage.start_run(
                    conn, start, end, sites_total, lease_seconds=lease_seconds, owner=owner_name()
                )
                holder = await storage.lease_holder(conn) if run_id is None else None
        except (asyncpg.LockNotAvailableError, asyncpg.QueryCanceledError):
            # The holder's row is locked by its flush in progress: it is alive.
            closed, run_id, holder = 0, None, None
        if closed:
            log.warning("run.closed_dead_runs", runs=closed)
        if run_id is not None:
            return RunLease(run_id, lease_seconds)
        remaining = give_up - time.monotonic()
        if remaining <= 0:
            raise storage.RunLocked(_locked_message(holder, wait_seconds))
        if not waiting_logged:
            waiting_logged = True
            # Debug only: a wait that ends in giving up must leave one line on stderr, its
            # error, which names the holder and how long this run waited.
            log.debug(
                "run.waiting_for_lease",
                holder=holder.run_id if holder else None,
                owner=holder.owner if holder else None,
                wait_seconds=wait_seconds,
            )
        # Look again when the holder's lease would run out (a dead holder is replaced at
        # once), or after a poll interval if it is being renewed; a signal ends the wait.
        expires = holder.expires_in if holder is not None else 0.0
        pause = min(POLL_SECONDS, remaining, max(expires, MIN_POLL_SECONDS))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)


def _locked_message(holder: storage.LeaseHolder | None, waited: float) -> str:
    who = ""
    if holder is not None:
        who = f" (run {holder.run_id}"
        who += f" on {holder.owner}" if holder.owner else ""
        who += f", started {holder.started_at:%Y-%m-%d %H:%M:%S %Z})"
    return (
        f"another aggregator run{who} is still writing to this database (waited "
        f"{seconds_text(waited)}): let it finish, or raise AGGREGATOR_LOCK_WAIT_SECONDS"
    )


def _interrupted_message(waited: float) -> str:
    return (
        f"interrupted by a signal after waiting {seconds_text(waited)} for another aggregator "
        "run to finish: nothing was fetched or written"
    )


def seconds_text(seconds: float) -> str:
    """A wait as people read it: to the millisecond, no exponent (a setting of 1e-300 s is
    "0s", not "1e-300s")."""
    return f"{round(seconds, 3):g}s"


async def keep_alive(pool: asyncpg.Pool, lease: RunLease, on_lost: Callable[[str], None]) -> None:
    """Renew the lease every beat until cancelled; call `on_lost` with why and return if it
    was lost or cannot be renewed.

    A beat that cannot reach the database (a dropped connection, a pooler restart) is only
    logged: the next beat tries with a fresh connection, and every flush checks the lease
    itself, so a run never writes without it. Any other failure (the database refusing the
    renewal, a bug) stops the run: left to die in this task, its exception would be dropped
    at cancellation and the run would go on without renewing until its lease ran out."""
    while True:
        await asyncio.sleep(lease.beat)
        try:
            async with asyncio.timeout(lease.beat):
                async with pool.acquire() as conn, conn.transaction():
                    await storage.bound_statements(conn, lease.beat)
                    held = await storage.renew_lease(conn, lease.run_id, lease.seconds)
        except TRANSIENT_ERRORS as exc:
            log.warning("lease.heartbeat_failed", error=type(exc).__name__)
            continue
        except Exception as exc:
            # The database's refusal is named; a bug's traceback is needed to fix it.
            refused = isinstance(exc, asyncpg.PostgresError)
            log.error(
                "lease.heartbeat_died",
                run=lease.run_id,
                error=type(exc).__name__,
                exc_info=not refused,
            )
            on_lost(heartbeat_failed(exc))
            return
        if not held:
            log.error("lease.lost", run=lease.run_id)
            on_lost(str(LeaseLost()))
            return
