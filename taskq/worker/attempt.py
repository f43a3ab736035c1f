"""What a running attempt asks of its worker through its JobContext.

Progress (coalesced, fenced by the lease), the lease and cancellation as the
worker sees them, the transaction that records the job as succeeded
together with the task's own writes, and recorded steps (``ctx.step()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

from .._checkpoints import Recorded, checkpoints_for, decode_result, encode_result, result_converter
from .._database import Database, commit_outcome_unknown, terminate_quietly, translate_errors
from .._errors import DatabaseError
from .._serialization import DEFAULT_MAX_PAYLOAD_BYTES
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
        "_max_payload_bytes",
        "_pending",
        "_recorded",
        "_recorded_lock",
        "_running",
        "_step_names",
        "_store",
        "_timer",
        "_tx_conn",
        "_writing",
        "awaited",
        "committed",
        "stopped",
    )

    def __init__(
        self,
        database: Database,
        store: Store,
        running: RunningJob,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self._database = database
        self._store = store
        self._running = running
        self._max_payload_bytes = max_payload_bytes
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        #: Set by the runner once it stopped waiting for the task (timeout,
        #: cancel, shutdown, lost lease): a sync task's thread may run on.
        self.stopped = False
        #: The job was recorded as succeeded by ``transaction()``, committed.
        self.committed = False
        #: Someone waited for the job's result when it committed: they are
        #: told once the result is written (see ``write_result``), as are
        #: waiters that found the result pending since.
        self.awaited = False
        self._in_transaction = False
        self._pending: _Progress | None = None
        self._last_write = float("-inf")
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None
        self._closed = False
        #: The connection of the open ctx.transaction(), while its block runs.
        self._tx_conn: Any = None
        #: Recorded steps of the job (name -> result as JSON text), read at
        #: the attempt's first ctx.step(); names of this attempt's steps.
        self._recorded: dict[str, str | None] | None = None
        self._recorded_lock: asyncio.Lock | None = None
        self._step_names: set[str] = set()

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
            if job.workflow_id is not None:
                await self._check_step_may_commit(conn)
            backend_pid = conn.get_server_pid()
            tx = conn.transaction()
            with translate_errors("opening the job's transaction"):
                await tx.start()
            # Steps of the block record on its connection (see step()).
            self._tx_conn = conn
            try:
                yield conn
            except BaseException:
                self._tx_conn = None
                await _shielded(_rollback(conn, tx))
                raise
            self._tx_conn = None
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

    async def _check_step_may_commit(self, conn: Any) -> None:
        """Refuse ctx.transaction() in a workflow step whose result is passed on.

        The transaction ends the step when it commits, before the task returns
        its value: the steps that take the result (and the workflow's result,
        for a step without children) would get None.
        """
        job = self._running.job
        with translate_errors("opening the job's transaction"):
            used = await self._store.step_result_used(conn, job.id)
        if used:
            raise RuntimeError(
                f"ctx.transaction() cannot be used in workflow step {job.step!r} (workflow "
                f"{job.workflow_id}): the step's result is passed on ({used}) when the step "
                "ends, and with ctx.transaction() it ends at the commit, before the task "
                "returns. Do the database work in a step whose result nothing takes (later "
                "steps can wait for it with after=[...])"
            )

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
        # While the commit is under way, a lease renewal that finds the job
        # gone (it was this commit that ended it) must not cancel the task.
        self._running.committing = True
        try:
            await self._commit_job(conn, tx, backend_pid)
        finally:
            self._running.committing = False

    async def _commit_job(self, conn: Any, tx: Any, backend_pid: int) -> None:
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
            # Succeeded, its result pending until the task returns it
            # (write_result); announced then, not at the commit.
            if await self._store.finish(conn, [Outcome(job.id, job.token, "committed")]):
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

    # -- recorded steps (ctx.step) ---------------------------------------------------------

    def step(
        self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Awaitable[Any]:
        # Checked when called, not when awaited: a sync task that calls it
        # learns at once (and could not await it anyway).
        if threading.get_ident() != self._loop_thread:
            raise RuntimeError(
                "ctx.step() is for async def tasks: a sync task runs in a thread, which cannot "
                "await it; make the task async def (a blocking function can still be a step: "
                "await ctx.step(name, asyncio.to_thread, fn, ...))"
            )
        # Taken now, so that two steps of one name started together are told apart.
        if name in self._step_names:
            raise RuntimeError(
                f"job {self._running.job.id}: ctx.step({name!r}) was already called in this "
                "attempt; every step needs a name of its own (the second call would get the "
                "first one's result)"
            )
        self._step_names.add(name)
        return self._step(name, fn, args, kwargs)

    async def _step(
        self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        job = self._running.job
        returned = False
        try:
            conv = result_converter(fn)
            if self.committed:
                # The job is succeeded for good and never runs again: nothing
                # to replay, nothing to record.
                value = await _call(fn, args, kwargs)
                returned = True
                return value
            recorded = await self._recorded_steps()
            if name in recorded:
                value = decode_result(conv, recorded[name], name)
                returned = True
                log.debug("job %s: step %r was recorded before; not run again", job.id, name)
                return value
            value = await _call(fn, args, kwargs)
            text = encode_result(conv, value, name, self._max_payload_bytes)
            found = await self._record_step(name, text)
            if not found.held:
                self._step_lease_lost(name)
            if not found.inserted:
                # Another attempt of the job (one that lost its lease, still
                # running) recorded it first, or this record was tried again
                # after its connection broke: the recorded result is the step's.
                log.info(
                    "job %s: step %r was recorded meanwhile (by another attempt of the job, or "
                    "by a first try of this record whose reply was lost); the recorded result "
                    "is returned",
                    job.id,
                    name,
                    extra={"job_id": job.id, "task": job.task, "queue": job.queue},
                )
                value = decode_result(conv, found.result, name)
            returned = True
            return value
        finally:
            if not returned:  # nothing recorded by this call: the name may be used again
                self._step_names.discard(name)

    async def _recorded_steps(self) -> dict[str, str | None]:
        """The job's recorded steps, read once per attempt (one query)."""
        if self._recorded is not None:
            return self._recorded
        if self._recorded_lock is None:
            self._recorded_lock = asyncio.Lock()
        async with self._recorded_lock:
            if self._recorded is None:
                job_id = self._running.job.id
                checkpoints = checkpoints_for(self._store.schema)
                conn = self._tx_conn
                if conn is not None:
                    with translate_errors("reading the job's recorded steps"):
                        self._recorded = await checkpoints.load(conn, job_id)
                else:

                    async def load(conn: Any) -> dict[str, str | None]:
                        return await checkpoints.load(conn, job_id)

                    self._recorded = await self._database.run_retrying(
                        "reading the job's recorded steps", load
                    )
            return self._recorded

    async def _record_step(self, name: str, text: str | None) -> Recorded:
        job = self._running.job
        checkpoints = checkpoints_for(self._store.schema)
        conn = self._tx_conn
        if conn is not None:
            # In the task's transaction: the record commits with the step's
            # writes there, or not at all.
            with translate_errors("recording a step of the job", in_flight=True):
                return await checkpoints.record(
                    conn, job.id, job.token, name, text, job.attempts, in_transaction=True
                )

        async def record(conn: Any) -> Recorded:
            return await checkpoints.record(
                conn, job.id, job.token, name, text, job.attempts, in_transaction=False
            )

        # Tried again while Postgres is briefly away: a repeat finds its own row.
        return await self._database.run_retrying("recording a step of the job", record)

    def _step_lease_lost(self, name: str) -> NoReturn:
        job = self._running.job
        log.warning(
            "job %s: its lease was lost before step %r was recorded; not recorded, and the "
            "job's task is cancelled (it may run again elsewhere)",
            job.id,
            name,
            extra={"job_id": job.id, "task": job.task, "queue": job.queue},
        )
        # As for a lease lost before ctx.transaction() commits: the worker
        # writes nothing for the job, and the cancellation unwinds the task.
        self._running.stop_reason = self._running.stop_reason or "lost"
        raise asyncio.CancelledError(f"job {job.id}: lease lost before step {name!r} was recorded")

    async def write_result(self, result: str | None) -> None:
        """After a committed transaction: store the task's result, then tell waiters.

        Written for every such job, None too: until then the job reads as
        succeeded with its result pending, and result waiters wait for it.
        On a connection of its own (the transaction's may be gone), tried
        again while Postgres is briefly away: the write names the attempt's
        token, so a repeat changes nothing.
        """
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


async def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    value = fn(*args, **kwargs)
    if inspect.isawaitable(value):
        value = await value
    return value


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
