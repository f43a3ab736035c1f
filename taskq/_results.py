"""Results: job handles, waiting for outcomes through the notifier, status, cancel, re-run.

``Job`` handles talk to :class:`Results`; a waiter subscribes to the
``finished`` channel of the database's one LISTEN connection, so a result
arrives as a notification, with a periodic re-read as the fallback.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio

from ._database import Database
from ._errors import ConfigurationError, JobNotFound
from ._job import Job, JobState, JobStatus, outcome_of, status_from_row
from ._names import suggest_task
from ._notifier import Notifier
from ._registry import Registry
from ._serialization import decode
from ._store import Store

log = logging.getLogger("taskq")

#: While waiting for a result, re-read the job this often in case a
#: notification was lost (the wake-up itself comes from LISTEN).
RESULT_RECHECK_SECONDS = 5.0
#: A job a ctx.transaction() ended reads as succeeded from its commit, with
#: its result pending (history.result_pending) until its task returns and the
#: result is written; that write announces the end. A waiter that finds the
#: result pending waits for the announcement until this long after the commit,
#: then takes None for the result (a worker killed after the commit, or a task
#: that is still busy after its block). Jobs that did not use ctx.transaction()
#: are never pending, nor are those that ended before schema version 9.
RESULT_WRITE_GRACE_SECONDS = 5.0
#: A worker whose heartbeat is older than this counts as gone when a timed-out
#: ``job.result()`` explains the wait (workers beat every lease/3, 10 s by default).
LIVE_WORKER_SECONDS = 60.0
#: How long a timed-out ``job.result()`` spends finding out why, at most.
EXPLAIN_TIMEOUT_SECONDS = 2.0
#: Job ids are Postgres bigints.
MIN_JOB_ID, MAX_JOB_ID = -(2**63), 2**63 - 1


def is_bigint(job_id: int) -> bool:
    """Whether ``job_id`` fits a Postgres bigint (a larger one names no job)."""
    return MIN_JOB_ID <= job_id <= MAX_JOB_ID


class Results:
    """Job handles and what they ask of the database."""

    def __init__(self, database: Database, store: Store, registry: Registry, schema: str) -> None:
        self._db = database
        self._store = store
        self._registry = registry
        self._schema = schema
        # A waiter's future is set True by the job's announcement, False by a
        # reconnect of the listener (announcements may have been lost).
        self._waiters: dict[int, list[asyncio.Future[bool]]] = {}
        self._notifier: Notifier | None = None

    async def _listen(self) -> Notifier:
        notifier = await self._db.listener()
        if notifier is not self._notifier:  # a new one after the App was reopened
            self._notifier = notifier
            notifier.subscribe(self._store.finished_channel, self._on_finished)
            notifier.on_reconnect(self._wake_all)
        return notifier

    async def result(self, job_id: int, timeout: float | None) -> Any:
        """Wait for the job's end; its value decoded by the task's return annotation."""
        status = await self.wait_finished(job_id, timeout)
        value = outcome_of(status)
        # The task's return annotation, where this process has the task,
        # turns the stored JSON back into a datetime, a dataclass...
        task = self._registry.tasks.get(status.task)
        return value if task is None else task.codec.decode_result(value)

    def _on_finished(self, payload: str) -> None:
        if not self._waiters:
            return
        for part in payload.split(","):
            try:
                job_id = int(part)
            except ValueError:
                continue
            for fut in self._waiters.get(job_id, ()):
                if not fut.done():
                    fut.set_result(True)

    def _wake_all(self) -> None:
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_result(False)

    def job(self, job_id: int) -> Job:
        """A handle on an existing job, e.g. from an id sent in an earlier request."""
        if not isinstance(job_id, int) or isinstance(job_id, bool):
            raise TypeError(f"job id must be an int, got {type(job_id).__name__}")
        return Job(self, job_id)

    def _check_id(self, job_id: int) -> None:
        # Ids are Postgres bigints: a larger one (e.g. from a URL) names no
        # job, and sending it would fail as a driver error instead.
        if not is_bigint(job_id):
            raise JobNotFound(f"no job with id {job_id} in schema {self._schema!r}")

    async def status(self, job_id: int) -> JobStatus:
        return status_from_row(await self._read(job_id))

    async def _read(self, job_id: int) -> Any:
        self._check_id(job_id)
        async with self._db.acquire("reading a job") as conn:
            row = await self._store.get_job(conn, job_id)
        if row is None:
            raise JobNotFound(f"no job with id {job_id} in schema {self._schema!r}")
        return row

    async def wait_finished(self, job_id: int, timeout: float | None) -> JobStatus:
        self._check_id(job_id)
        await self._listen()
        loop = asyncio.get_running_loop()
        futures = self._waiters.setdefault(job_id, [])
        fut: asyncio.Future[bool] = loop.create_future()
        futures.append(fut)
        pending = False  # the last read found the job succeeded, its result not written yet
        told = False  # the result's write will be announced to this waiter
        try:
            with anyio.fail_after(timeout):
                # Ask for the announcement, then read: a finish landing between
                # the two is seen by the read, one landing after is announced.
                async with self._db.acquire("waiting for a job") as conn:
                    announced = await self._store.mark_awaited(conn, job_id)
                while True:
                    row = await self._read(job_id)
                    status = status_from_row(row)
                    # Seconds since a ctx.transaction() ended the job, while
                    # its result is not written (None otherwise).
                    pending_for = row["result_pending_for"]
                    pending = pending_for is not None and pending_for < RESULT_WRITE_GRACE_SECONDS
                    if pending and not (told or announced):
                        # The job ended before the request above took effect:
                        # it waited for the lock of the committing transaction
                        # and found the job gone, or came after the commit. So
                        # ask the result's write to announce itself; it was
                        # written already if it no longer is pending.
                        async with self._db.acquire("waiting for a job") as conn:
                            told = await self._store.await_result(conn, job_id)
                        if not told:
                            continue
                    if status.state.finished and not pending:
                        if pending_for is not None:
                            log.debug(
                                "job %s: its result was not written within %g s of its "
                                "commit; it reads as None",
                                job_id,
                                RESULT_WRITE_GRACE_SECONDS,
                            )
                        return status
                    if pending:
                        wait = RESULT_WRITE_GRACE_SECONDS - pending_for
                    else:
                        wait = RESULT_RECHECK_SECONDS
                    with anyio.move_on_after(wait):
                        await asyncio.shield(fut)
                    if fut.done():
                        futures.remove(fut)
                        fut = loop.create_future()
                        futures.append(fut)
        except TimeoutError:
            if pending:
                raise TimeoutError(
                    f"job {job_id} succeeded (its ctx.transaction() committed), but its task had "
                    f"not returned its result within {timeout:g} s"
                ) from None
            # A bare timeout leaves the user guessing; say what the job is
            # waiting for (a paused queue, no worker with its task...).
            raise TimeoutError(await self._why_not_finished(job_id, timeout)) from None
        finally:
            if fut in futures:
                futures.remove(fut)
            if not futures:
                self._waiters.pop(job_id, None)

    async def _why_not_finished(self, job_id: int, timeout: float | None) -> str:
        head = f"job {job_id} did not finish within {timeout:g} s"
        try:
            with anyio.fail_after(EXPLAIN_TIMEOUT_SECONDS):
                async with self._db.acquire("reading a job") as conn:
                    row = await self._store.explain_wait(conn, job_id, LIVE_WORKER_SECONDS)
        except Exception as exc:  # the explanation is a courtesy; the timeout stands
            return f"{head} (and its state could not be read: {exc})"
        if row is None:
            return f"{head}; it has finished since"
        task, queue = row["task"], row["queue"]
        head = f"{head} (task {task!r}, queue {queue!r})"
        if row["state"] == "waiting":
            parents = list(row["waiting_for"] or [])
            shown = ", ".join(repr(p) for p in parents[:5]) + (" ..." if len(parents) > 5 else "")
            return (
                f"{head}: it is step {row['step']!r} of workflow {row['workflow_id']}, waiting "
                f"for its parent step(s) {shown or '(its map items)'} to end"
            )
        if row["state"] == "running":
            return (
                f"{head}: it is running, attempt {row['attempts']} of {row['max_attempts']}, "
                f"on worker {row['worker_id']}"
            )
        reasons: list[str] = []
        if row["due_in"] > 0:
            waiting = f"it is queued, due in {row['due_in']:.1f} s"
            if row["error"]:
                error = decode(row["error"]) or {}
                waiting += (
                    f" (a retry: attempt {row['attempts']} failed with "
                    f"{error.get('type')}: {str(error.get('message'))[:200]})"
                )
            reasons.append(waiting)
        else:
            reasons.append("it is still queued")
        if row["paused"]:
            reasons.append(f"queue {queue!r} is paused (app.queue({queue!r}).resume())")
        known: list[str] = list(row["known"] or [])
        if row["serving"]:
            reasons.append(
                f"{row['serving']} live worker(s) can run it, so they are busy, limited "
                "or it is not due yet"
            )
        elif not row["live"]:
            reasons.append(
                f"no worker is running on schema {self._schema!r} "
                "(start one: python -m taskq worker module:app)"
            )
        elif task in known:
            reasons.append(f"the live workers that have task {task!r} do not serve queue {queue!r}")
        else:
            guess = suggest_task(task, known)
            hint = (
                f"; they have {guess!r}: was the job enqueued under another name?" if guess else ""
            )
            reasons.append(f"none of the {row['live']} live worker(s) has task {task!r}{hint}")
        return f"{head}: " + "; ".join(reasons)

    async def cancel(self, job_id: int) -> bool:
        self._check_id(job_id)
        async with self._db.acquire("cancelling a job") as conn:
            for _ in range(3):  # the job may move between queued and running meanwhile
                if await self._store.cancel_queued(conn, job_id):
                    return True
                if await self._store.request_cancel(conn, job_id):
                    return True
                row = await self._store.get_job(conn, job_id)
                if row is None:
                    raise JobNotFound(f"no job with id {job_id} in schema {self._schema!r}")
                if row["workflow_id"] is not None and row["state"] in ("waiting", "queued"):
                    # A step: its descendants are cancelled with it.
                    cancelled, _ = await self._store.cancel_steps(
                        conn, [job_id], "cancelled with job.cancel()"
                    )
                    if cancelled:
                        return True
                    continue
                if JobState(row["state"]).finished:
                    log.info("job %s is already %s; nothing to cancel", job_id, row["state"])
                    return False
            return False

    async def rerun(self, job_id: int) -> bool:
        if not is_bigint(job_id):
            return False  # no such job to run again
        async with self._db.acquire("re-running a job") as conn:
            if await self._store.rerun(conn, job_id):
                return True
            row = await self._store.get_job(conn, job_id)
        if row is not None and row["workflow_id"] is not None and row["state"] != "succeeded":
            raise ConfigurationError(
                f"job {job_id} is step {row['step']!r} of workflow {row['workflow_id']}: run it "
                f"again with its workflow, app.get_workflow({row['workflow_id']}).retry() "
                f"(or: python -m taskq workflows retry {row['workflow_id']}), which also runs "
                "the steps that depend on it"
            )
        return False

    async def counts(self) -> list[tuple[str, str, int]]:
        """(queue, state, count) rows over live jobs and history."""
        async with self._db.acquire("counting jobs") as conn:
            return await self._store.counts(conn)
