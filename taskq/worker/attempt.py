"""What a running attempt asks of its worker through its JobContext.

Progress (coalesced, fenced by the lease), the lease and cancellation as the
worker sees them, and the transaction that records the job as succeeded
together with the task's own writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from .._database import Database, commit_outcome_unknown, terminate_quietly, translate_errors
from .._errors import DatabaseError
from .._store import Outcome, Store
from .state import RunningJob

log = logging.getLogger("taskq.worker")

#: At most one progress write per job in this many seconds: the latest value
#: reported meanwhile wins, so a task may report in a tight loop.
PROGRESS_INTERVAL_SECONDS = 1.0
#: Longest the last progress write may hold up an attempt's outcome.
PROGRESS_FLUSH_TIMEOUT_SECONDS = 10.0
#: Longest the worker looks for the outcome of a ctx.transaction() whose
#: connection broke during COMMIT (on top of the database's ``connect_retry``).
COMMIT_CHECK_TIMEOUT_SECONDS = 10.0

# A progress value waiting to be written: (fraction, message, monotonic time reported).
_Progress = tuple[float, str | None, float]


class _LeaseLost(Exception):
    """The job's lease token no longer matched when its transaction was to commit."""


class AttemptControl:
    """One attempt's side of its :class:`taskq.JobContext` (see ``taskq._hooks.JobControl``)."""

    __slots__ = (
        "_closed",
        "_database",
        "_in_transaction",
        "_last_write",
        "_loop",
        "_loop_thread",
        "_pending",
        "_running",
        "_store",
        "_timer",
        "_writing",
        "awaited",
        "committed",
        "stopped",
    )

    def __init__(self, database: Database, store: Store, running: RunningJob) -> None:
        self._database = database
        self._store = store
        self._running = running
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        #: Set by the runner once it stopped waiting for the task (timeout,
        #: cancel, shutdown, lost lease): a sync task's thread may run on.
        self.stopped = False
        #: The job was recorded as succeeded by ``transaction()``, committed.
        self.committed = False
        #: Someone waited for the job's result when it committed: they are
        #: told once the result is written (see ``write_result``).
        self.awaited = False
        self._in_transaction = False
        self._pending: _Progress | None = None
        self._last_write = float("-inf")
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None
        self._closed = False

    # -- what the context reads ------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        return self.stopped or self._running.stop_reason in ("cancel", "release", "lost")

    @property
    def lease_deadline(self) -> float:
        return self._running.lease_deadline

    # -- progress --------------------------------------------------------------------

    def report(self, fraction: float, message: str | None) -> None:
        value = (fraction, message, time.monotonic())
        if threading.get_ident() == self._loop_thread:
            self._set_pending(value)
            return
        # A sync task's thread: hand the value to the event loop (unless it is
        # closed: the worker is gone).
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._set_pending, value)

    def _set_pending(self, value: _Progress) -> None:
        if self._closed:
            return  # the outcome is being written: too late for this value
        self._pending = value
        if self._writing is None and self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        delay = self._last_write + PROGRESS_INTERVAL_SECONDS - time.monotonic()
        if delay <= 0:
            self._start_write()
        else:
            self._timer = self._loop.call_later(delay, self._start_write)

    def _start_write(self) -> None:
        self._timer = None
        value, self._pending = self._pending, None
        if value is None or self._closed:
            return
        self._last_write = time.monotonic()
        self._writing = self._loop.create_task(self._write(value))

    async def _write(self, value: _Progress) -> None:
        job = self._running.job
        try:
            async with self._database.acquire("recording a job's progress") as conn:
                held = await self._store.report_progress(
                    conn, job.id, job.token, value[0], value[1], time.monotonic() - value[2]
                )
            if not held:
                log.debug("job %s: progress not recorded, the lease is no longer held", job.id)
        except Exception as exc:  # progress is informative: never fail the job for it
            log.warning("job %s: could not record its progress: %s", job.id, exc)
        finally:
            if asyncio.current_task() is self._writing:
                self._writing = None
                if self._pending is not None and not self._closed:
                    self._schedule()

    async def _close_progress(self) -> _Progress | None:
        """Stop writing progress; return the value still waiting, if any."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is not None:
            await asyncio.wait({self._writing})
        value, self._pending = self._pending, None
        return value

    @property
    def progress_unwritten(self) -> bool:
        """Whether progress was reported and not all of it written yet."""
        return not self._closed and (
            self._pending is not None or self._writing is not None or self._timer is not None
        )

    def close(self) -> None:
        """The attempt is over: progress reported from now on (a thread that runs on) is dropped."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def flush_progress(self) -> None:
        """Write the last reported progress, before the attempt's outcome is written."""
        if not self.progress_unwritten:
            self._closed = True
            return
        try:
            async with asyncio.timeout(PROGRESS_FLUSH_TIMEOUT_SECONDS):
                value = await self._close_progress()
                if value is not None:
                    await self._write(value)
        except TimeoutError:
            log.warning("job %s: gave up writing its last progress", self._running.job.id)
        except asyncio.CancelledError:
            # A forced shutdown while the attempt ends: its outcome matters more.
            log.warning(
                "job %s: its last progress was not written (shutdown)", self._running.job.id
            )

    # -- the transaction that finishes the job -------------------------------------------

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        # Checked when called, not when entered: a sync task that calls it
        # learns at once.
        if threading.get_ident() != self._loop_thread:
            raise RuntimeError(
                "ctx.transaction() is for async def tasks: its connection is asyncpg's; a sync "
                "task runs in a thread"
            )
        if self._in_transaction or self.committed:
            raise RuntimeError(
                f"job {self._running.job.id}: ctx.transaction() can be used once per attempt"
            )
        self._in_transaction = True
        return self._transaction()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        job = self._running.job
        pool = self._database.pool
        with translate_errors("opening the job's transaction"):
            conn = await pool.acquire()
        try:
            backend_pid = conn.get_server_pid()
            tx = conn.transaction()
            with translate_errors("opening the job's transaction"):
                await tx.start()
            try:
                yield conn
            except BaseException:
                await _shielded(_rollback(conn, tx))
                raise
            # The block ended well: record the job as succeeded in the same
            # transaction and commit. Seen through even if the task is
            # cancelled meanwhile, so that what happened is known.
            commit = self._loop.create_task(self._commit(conn, tx, backend_pid))
            try:
                await _shielded(commit)
            except _LeaseLost:
                await _shielded(_rollback(conn, tx))
                log.warning(
                    "job %s: its lease was lost before ctx.transaction() committed; rolled "
                    "back, and the job's task is cancelled (it may run again elsewhere)",
                    job.id,
                    extra={"job_id": job.id, "task": job.task, "queue": job.queue},
                )
                # The worker writes nothing for a lost job; the cancellation
                # unwinds the task as for any lease lost while running.
                self._running.stop_reason = self._running.stop_reason or "lost"
                raise asyncio.CancelledError(
                    f"job {job.id}: lease lost before its transaction committed"
                ) from None
            except BaseException:
                if not commit.done() or commit.exception() is not None:
                    await _shielded(_rollback(conn, tx))
                raise
        finally:
            await _shielded(self._release(conn))

    async def _release(self, conn: Any) -> None:
        """Hand the transaction's connection back to the pool; one that broke is discarded.

        Whatever happens to the connection once the transaction ended (its
        backend terminated, the server restarting) is not the task's concern:
        the transaction has committed or rolled back, and the job's outcome
        does not depend on the connection any more.
        """
        pool = self._database.pool
        try:
            await pool.release(conn)
        except Exception as exc:
            terminate_quietly(conn)
            pool.note_trouble()
            job = self._running.job
            log.info(
                "job %s: the connection of its ctx.transaction() broke after the transaction "
                "ended (%r); discarded",
                job.id,
                exc,
                extra={"job_id": job.id, "task": job.task, "queue": job.queue},
            )

    async def _commit(self, conn: Any, tx: Any, backend_pid: int) -> None:
        job = self._running.job
        pending = await self._close_progress()
        with translate_errors("committing the job's transaction", in_flight=True):
            # Locks the job's row: a rescue waits for this transaction, or
            # got there first and the token no longer matches.
            awaited = await self._store.lock_for_commit(conn, job.id, job.token)
            if awaited is None:
                raise _LeaseLost
            if pending is not None:
                fraction, message, at = pending
                await self._store.report_progress(
                    conn, job.id, job.token, fraction, message, time.monotonic() - at
                )
            if await self._store.finish(conn, [Outcome(job.id, job.token, "succeeded")]):
                raise _LeaseLost  # cannot happen while the row is locked
        try:
            await tx.commit()
        except Exception as exc:
            if not commit_outcome_unknown(exc):
                # Postgres refused the commit: the transaction rolled back.
                with translate_errors("committing the job's transaction"):
                    raise
            # The connection broke while COMMIT was under way (or its backend
            # ended): the transaction may have committed, or not. Ask.
            terminate_quietly(conn)
            await self._commit_in_doubt(backend_pid, exc)
        self.committed = True
        self.awaited = bool(awaited)
        # The job is done: the lease keeper and the watchdog leave it alone
        # from now on, and the runner writes no other outcome for it.
        self._running.stop_reason = "committed"
        log.info(
            "job %s %s: transaction committed; the job is succeeded",
            job.id,
            job.task,
            extra={"job_id": job.id, "task": job.task, "queue": job.queue},
        )

    async def _commit_in_doubt(self, backend_pid: int, error: Exception) -> None:
        """The connection broke during COMMIT: return if the transaction committed, else raise.

        Found out on another connection (see ``Store.transaction_committed``),
        tried again while Postgres is briefly away. The transaction committed
        if and only if the job ended under this attempt's token.
        """
        job = self._running.job
        extra = {"job_id": job.id, "task": job.task, "queue": job.queue}

        async def check(conn: Any) -> bool:
            return await self._store.transaction_committed(conn, job.id, job.token, backend_pid)

        try:
            async with asyncio.timeout(COMMIT_CHECK_TIMEOUT_SECONDS + self._database.connect_retry):
                committed = await self._database.run_retrying(
                    "finding out whether the job's transaction committed", check
                )
        except Exception as exc:
            # Neither outcome can be told. The task sees the error; the
            # outcome the worker then writes is fenced by the lease token, so
            # it changes nothing if the transaction did commit.
            log.warning(
                "job %s: the connection broke during the commit of its ctx.transaction() (%r), "
                "and whether it committed could not be found out: %r",
                job.id,
                error,
                exc,
                extra=extra,
            )
            raise DatabaseError(
                f"committing the job's transaction failed: the connection to Postgres broke "
                f"during COMMIT ({error!r}); whether it committed is unknown"
            ) from error
        if not committed:
            raise DatabaseError(
                f"committing the job's transaction failed: the connection to Postgres broke "
                f"during COMMIT ({error!r}); the transaction did not commit"
            ) from error
        log.info(
            "job %s: the connection broke during the commit of its ctx.transaction() (%r), "
            "and the transaction did commit",
            job.id,
            error,
            extra=extra,
        )

    async def write_result(self, result: str | None) -> None:
        """After a committed transaction: store the task's result, then tell waiters.

        On a connection of its own (the transaction's may be gone), tried
        again while Postgres is briefly away: the write names the attempt's
        token, so a repeat changes nothing.
        """
        if result is None and not self.awaited:
            return
        job = self._running.job

        async def write(conn: Any) -> None:
            await self._store.set_result(conn, job.id, job.token, result, self.awaited)

        try:
            async with asyncio.timeout(
                PROGRESS_FLUSH_TIMEOUT_SECONDS + self._database.connect_retry
            ):
                await self._database.run_retrying("recording a job's result", write)
        except (Exception, asyncio.CancelledError) as exc:  # the job succeeded all the same
            log.warning(
                "job %s: succeeded, but its result could not be recorded: %s",
                job.id,
                "shutdown" if isinstance(exc, asyncio.CancelledError) else exc,
            )


async def _rollback(conn: Any, tx: Any) -> None:
    try:
        await tx.rollback()
    except Exception:
        # Postgres rolls back the transaction of a connection that closes.
        terminate_quietly(conn)


async def _shielded(awaitable: Any) -> Any:
    """Await to the end even if the caller is cancelled meanwhile, then raise that."""
    inner = asyncio.ensure_future(awaitable)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(inner)
        except asyncio.CancelledError:
            if inner.done():
                raise
            cancelled = True
            continue
        break
    if cancelled:
        raise asyncio.CancelledError
    return result
