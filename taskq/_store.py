"""The Store: every query of the job path, as a method that takes a connection.

The worker, the App and the CLI never build SQL; they call these methods with
a connection. User values travel only as bind parameters; the schema name is
the one identifier in the text, validated and quoted by ``quote_schema``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg

from ._statements import Statements

#: An asyncpg Connection or a pool's connection proxy (asyncpg ships no types).
Conn: TypeAlias = Any


@dataclass(slots=True)
class ClaimedJob:
    """A job this worker holds a lease on."""

    id: int
    task: str
    queue: str
    args: str
    attempts: int
    max_attempts: int
    token: uuid.UUID
    priority: int
    #: The job's metadata as JSON text, None when it has none.
    meta: str | None = None
    #: For a workflow step: its parents' results by step name (JSON text),
    #: its workflow's id and its name.
    inputs: str | None = None
    workflow_id: int | None = None
    step: str | None = None


@dataclass(slots=True, eq=False)
class Outcome:
    """How one attempt ended, waiting to be written back in a batch.

    kind: ``succeeded`` / ``failed`` / ``cancelled`` move the job to history;
    ``retry`` puts it back in the queue after ``delay`` seconds and keeps its
    attempt; ``release`` puts it back at once and gives the attempt back
    (shutdown interrupted it, it did not fail). ``committed``, only from a
    task's ``ctx.transaction()``, is succeeded with its result still to come
    (:meth:`Store.set_result`).
    """

    job_id: int
    token: uuid.UUID
    kind: str
    result: str | None = None
    error: str | None = None
    delay: float = 0.0


@dataclass(slots=True)
class ClaimResult:
    """What one claim statement returned.

    ``held_back`` is true when a queue or task limit kept due jobs from being
    claimed; ``retry_in`` is then the seconds until a rate window frees a start
    (``None``: until a running job of a limited queue ends, which is announced).
    """

    jobs: list[ClaimedJob]
    held_back: bool = False
    retry_in: float | None = None


class Store:
    """The SQL of one taskq schema."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.enqueued_channel = f"taskq:{schema}:enqueued"
        self.finished_channel = f"taskq:{schema}:finished"
        self.cancel_channel = f"taskq:{schema}:cancel"
        self.workflow_channel = f"taskq:{schema}:workflow"
        #: Every channel taskq notifies on, for the one LISTEN connection.
        self.channels = [
            self.enqueued_channel,
            self.finished_channel,
            self.cancel_channel,
            self.workflow_channel,
        ]
        self._sql = Statements(schema)

    # -- enqueue ---------------------------------------------------------------

    async def insert_job(self, conn: Conn, **job: Any) -> int:
        """Insert one job (``args`` is its JSON text); return its id."""
        return int(await self._insert(conn, self._sql.insert_one, **job))

    async def insert_jobs(self, conn: Conn, **jobs: Any) -> list[int]:
        """Insert one job per element of ``args`` (a JSON array); ids in that order."""
        return list(await self._insert(conn, self._sql.insert_many, **jobs) or [])

    async def insert_unique_job(
        self, conn: Conn, *, unique_key: str, unique_for: float, **job: Any
    ) -> tuple[int, bool]:
        """Insert one job unless a live one (or one finished within ``unique_for``
        seconds) holds ``unique_key`` in its queue: (job id, created)."""
        row = await conn.fetchrow(
            self._sql.insert_unique,
            job["queue"],
            job["task"],
            job["args"],
            job["priority"],
            job["run_at"],
            job["delay"],
            job["max_attempts"],
            unique_key,
            unique_for,
            job.get("meta"),
            job.get("concurrency_key"),
        )
        return int(row[0]), bool(row[1])

    async def _insert(
        self,
        conn: Conn,
        sql: str,
        *,
        queue: str,
        task: str,
        args: str,
        priority: int,
        run_at: datetime | None,
        delay: float,
        max_attempts: int,
        meta: str | None = None,
        concurrency_key: str | list[str | None] | None = None,
    ) -> Any:
        return await conn.fetchval(
            sql,
            queue,
            task,
            args,
            priority,
            run_at,
            delay,
            max_attempts,
            self.enqueued_channel,
            meta,
            concurrency_key,
        )

    # -- worker ----------------------------------------------------------------

    async def claim(
        self,
        conn: Conn,
        *,
        queues: list[str] | None,
        tasks: list[str],
        limit: int,
        worker_id: str,
        lease_seconds: float,
    ) -> ClaimResult:
        """Claim up to ``limit`` jobs."""
        rows = await conn.fetch(self._sql.claim, queues, tasks, limit, worker_id, lease_seconds)
        result = ClaimResult([])
        for r in rows:
            if r[8] is False:
                result.jobs.append(
                    ClaimedJob(
                        r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[10], r[11], r[12], r[13]
                    )
                )
            elif r[8] is None:
                result.held_back = True
                result.retry_in = r[9]
        return result

    async def queued_queues(self, conn: Conn) -> list[str]:
        """The names of the queues that hold queued jobs."""
        return list(await conn.fetchval(self._sql.queued_queues))

    async def seconds_until_next_due(
        self, conn: Conn, *, queues: list[str] | None, tasks: list[str]
    ) -> float | None:
        """Seconds until the earliest queued job this worker could run is due."""
        gap = await conn.fetchval(self._sql.next_due, queues, tasks)
        return None if gap is None else gap.total_seconds()

    async def finish(self, conn: Conn, outcomes: list[Outcome]) -> list[int]:
        """Write back outcomes; return the ids for which nothing was written now.

        Their lease token no longer matched: the lease was lost, or (when the
        outcome is sent again) this very outcome was written before.
        :meth:`write_back` tells the two apart.
        """
        lost = await conn.fetchval(self._sql.finish, *_outcome_arrays(outcomes))
        return list(lost)

    async def write_back(self, conn: Conn, outcomes: list[Outcome]) -> tuple[list[int], list[int]]:
        """Write back outcomes: (ids whose lease was lost, ids written before).

        The second list holds outcomes that an earlier write of the same
        attempt had already committed: the connection broke after the commit
        and before the reply, and the worker sent them again. Nothing was lost
        for those; the rest of the batch was written now.
        """
        lost = await self.finish(conn, outcomes)
        if not lost:
            return [], []
        return await self._split_lost(conn, outcomes, lost)

    async def _split_lost(
        self, conn: Conn, outcomes: list[Outcome], lost: list[int]
    ) -> tuple[list[int], list[int]]:
        # Rare (a lease taken over, or a lost reply): one more round trip.
        gone = set(lost)
        sent = [o for o in outcomes if o.job_id in gone]
        rows = await conn.fetch(
            self._sql.committed_before, [o.job_id for o in sent], [o.token for o in sent]
        )
        before = {r[0] for r in rows}
        return [i for i in lost if i not in before], [i for i in lost if i in before]

    async def renew_leases(
        self, conn: Conn, leases: list[tuple[int, uuid.UUID]], lease_seconds: float
    ) -> dict[int, bool]:
        """Extend the leases this worker still holds: {renewed id: cancel requested}."""
        rows = await conn.fetch(
            self._sql.renew, [j for j, _ in leases], [t for _, t in leases], lease_seconds
        )
        return {r[0]: r[1] for r in rows}

    async def rescue_expired(self, conn: Conn, max_rescues: int = 3) -> tuple[list[int], list[int]]:
        """Re-queue jobs whose lease expired; return (re-queued ids, ended ids).

        Ended jobs went to history as failed (no attempts left, or poison after
        ``max_rescues`` rescues) or cancelled (a cancel was pending).
        """
        row = await conn.fetchrow(
            self._sql.rescue, self.finished_channel, self.enqueued_channel, max_rescues
        )
        return list(row["requeued"]), list(row["ended"])

    async def register_worker(
        self,
        conn: Conn,
        *,
        worker_id: str,
        hostname: str,
        pid: int,
        queues: list[str] | None,
        tasks: dict[str, tuple[str, int, int | None, float | None]],
        concurrency: int,
    ) -> None:
        """Record a live worker and its tasks: {name: (queue, attempts, rate limit, period)}."""
        async with conn.transaction():
            await conn.execute(
                self._sql.register_worker,
                worker_id,
                hostname,
                pid,
                queues,
                list(tasks),
                concurrency,
            )
            rows = list(tasks.values())
            await conn.execute(
                self._sql.register_tasks, list(tasks), *([row[i] for row in rows] for i in range(4))
            )

    async def heartbeat(self, conn: Conn, worker_id: str) -> None:
        await conn.execute(self._sql.heartbeat, worker_id)

    async def unregister_worker(self, conn: Conn, worker_id: str) -> None:
        await conn.execute(self._sql.unregister_worker, worker_id)

    async def forget_dead_workers(self, conn: Conn, older_than: float) -> None:
        await conn.execute(self._sql.forget_dead_workers, older_than)

    async def prune_history(
        self, conn: Conn, retention_seconds: float, batch: int = 5000, max_batches: int = 20
    ) -> int:
        """Delete history older than the retention, in batches; return rows deleted."""
        total = 0
        for _ in range(max_batches):
            deleted = int(await conn.fetchval(self._sql.prune, retention_seconds, batch))
            total += deleted
            if deleted < batch:
                break
        return total

    async def extend_history(self, conn: Conn, width: float, ahead: float) -> str | None:
        """Add history's next time partition if they do not reach ``ahead`` seconds past now."""
        name: str | None = await conn.fetchval(self._sql.history_extend, width, ahead)
        return name

    async def detach_history(self, conn: Conn, retention_seconds: float) -> tuple[Any, Any]:
        """Detach history's oldest partition past the retention: (its name, or None if there
        is none; the name of one it gave up on because a lock was held on history)."""
        row = await conn.fetchrow(self._sql.history_detach, retention_seconds)
        return row["detached"], row["busy"]

    async def drop_detached_history(self, conn: Conn) -> int:
        """Drop the detached partitions with their jobs' checkpoints; return how many."""
        return int(await conn.fetchval(self._sql.history_drop))

    # -- jobs ------------------------------------------------------------------

    async def get_job(self, conn: Conn, job_id: int) -> Any:
        """The job's row from the hot table or from history, or None."""
        return await conn.fetchrow(self._sql.get_job, job_id)

    async def cancel_queued(self, conn: Conn, job_id: int) -> bool:
        return (
            await conn.fetchrow(self._sql.cancel_queued, job_id, self.finished_channel) is not None
        )

    async def cancel_steps(
        self, conn: Conn, job_ids: list[int], reason: str
    ) -> tuple[list[int], list[int]]:
        """Cancel workflow steps: (ids cancelled now, running ids flagged now).

        Their descendants are cancelled with them (see ``cancel_steps()``).
        Rows another transaction held at that instant are in neither list.
        """
        row = await conn.fetchrow(self._sql.cancel_steps, job_ids, reason)
        return list(row[0]), list(row[1])

    async def mark_awaited(self, conn: Conn, job_id: int) -> bool:
        """Have the job's end announced on the finished channel; False if it has ended."""
        return bool(await conn.fetchval(self._sql.await_job, job_id, self.enqueued_channel))

    async def request_cancel(self, conn: Conn, job_id: int) -> bool:
        """Flag a running job for cancellation and tell its worker; False if not running."""
        return (
            await conn.fetchrow(self._sql.request_cancel, job_id, self.cancel_channel) is not None
        )

    async def rerun(self, conn: Conn, job_id: int) -> bool:
        try:
            return await conn.fetchrow(self._sql.rerun, job_id, self.enqueued_channel) is not None
        except asyncpg.UniqueViolationError:
            return False  # a producer gave the job's unique key to a new job meanwhile

    # -- queues ----------------------------------------------------------------

    async def configure_queue(
        self,
        conn: Conn,
        name: str,
        *,
        paused: bool | None = None,
        concurrency_limit: int | None = None,
        clear_concurrency_limit: bool = False,
        rate: tuple[int, float] | None = None,
        clear_rate: bool = False,
        per_key_limit: int | None = None,
        clear_per_key_limit: bool = False,
    ) -> Any:
        """Change a queue's settings (``None`` keeps one); return its settings row."""
        return await conn.fetchrow(
            self._sql.configure_queue,
            name,
            paused,
            concurrency_limit,
            rate[0] if rate else None,
            rate[1] if rate else None,
            clear_rate,
            clear_concurrency_limit,
            self.enqueued_channel,
            per_key_limit,
            clear_per_key_limit,
        )

    async def queue_settings(self, conn: Conn) -> list[Any]:
        return list(await conn.fetch(self._sql.queue_settings))

    async def queue_overview(self, conn: Conn) -> list[Any]:
        """Per queue: queued and running counts with its settings."""
        return list(await conn.fetch(self._sql.queue_overview))

    # -- cron ------------------------------------------------------------------

    async def register_cron(
        self,
        conn: Conn,
        *,
        name: str,
        expression: str,
        timezone: str,
        task: str,
        queue: str,
        args: str,
        priority: int,
        missed: str,
        newest_slot: datetime,
    ) -> datetime:
        """Record a cron entry; return the newest slot already handled."""
        value = await conn.fetchval(
            self._sql.register_cron,
            name,
            expression,
            timezone,
            task,
            queue,
            args,
            priority,
            missed,
            newest_slot,
        )
        return value  # type: ignore[no-any-return]

    async def cron_fire(
        self,
        conn: Conn,
        *,
        name: str,
        slot: datetime,
        make_job: bool,
        task: str,
        queue: str,
        args: str,
        priority: int,
        max_attempts: int,
    ) -> int | None:
        """Handle one slot: the new job's id, 0 if skipped, None if already handled,
        -1 if the entry is not recorded."""
        value = await conn.fetchval(
            self._sql.cron_fire, name, slot, make_job, task, queue, args, priority, max_attempts
        )
        return None if value is None else int(value)

    async def list_crons(self, conn: Conn) -> list[Any]:
        return list(await conn.fetch(self._sql.list_crons))

    async def task_names(self, conn: Conn) -> list[str]:
        """Every task name a worker has reported."""
        return [r[0] for r in await conn.fetch(self._sql.task_names)]

    async def stray_tasks(
        self, conn: Conn, *, queues: list[str] | None, tasks: list[str], scan: int
    ) -> list[tuple[str, str, int]]:
        """(task, queue, count) of due jobs whose task is not in ``tasks``."""
        rows = await conn.fetch(self._sql.stray_tasks, queues, tasks, scan)
        return [(r[0], r[1], r[2]) for r in rows]

    async def explain_wait(self, conn: Conn, job_id: int, live_seconds: float) -> Any:
        """A live job with its queue's pause flag and the live workers that could run it."""
        return await conn.fetchrow(self._sql.explain_wait, job_id, live_seconds)

    async def counts(self, conn: Conn) -> list[tuple[str, str, int]]:
        return [(r[0], r[1], r[2]) for r in await conn.fetch(self._sql.counts)]

    async def lookup_task(self, conn: Conn, name: str) -> tuple[str, int] | None:
        """(default queue, max attempts) of a task some worker reported, or None."""
        row = await conn.fetchrow(self._sql.lookup_task, name)
        return None if row is None else (str(row[0]), int(row[1]))

    # -- one job by id (taskq.testing.run_job) -----------------------------------

    async def claim_job(
        self,
        conn: Conn,
        job_id: int,
        *,
        tasks: list[str],
        worker_id: str,
        lease_seconds: float,
    ) -> ClaimedJob | None:
        """Claim the queued job ``job_id`` now; None if it is not claimable.

        The lease is the one ``claim()`` takes (attempts + 1, a new token, the
        same columns), so the run and its write-back are fenced like any
        other. Unlike ``claim()`` it ignores the job's due time, queue pauses
        and limits (and records no start in a rate window): it is for tests
        that run one chosen job inline, not for workers. Like ``claim()`` it
        takes only jobs of ``tasks``. None: no such job, not queued, or a task
        not in ``tasks``; nothing changed.
        """
        row = await conn.fetchrow(
            self._sql.claim_job,
            job_id,
            tasks,
            worker_id,
            lease_seconds,
        )
        if row is None:
            return None
        return ClaimedJob(*row)

    # -- the job inside the task (JobContext) --------------------------------------------

    async def report_progress(
        self,
        conn: Conn,
        job_id: int,
        token: uuid.UUID,
        fraction: float,
        message: str | None,
        age: float,
    ) -> bool:
        """Record a running job's progress, reported ``age`` seconds ago; False if not ours."""
        return bool(await conn.fetchval(self._sql.progress, job_id, token, fraction, message, age))

    async def step_result_used(self, conn: Conn, job_id: int) -> str | None:
        """Why a workflow step's result is needed (None: nothing takes it)."""
        value = await conn.fetchval(self._sql.step_result_used, job_id)
        return None if value is None else str(value)

    async def lock_for_commit(self, conn: Conn, job_id: int, token: uuid.UUID) -> bool | None:
        """In a task's transaction: lock the job if its lease is ours (None if not).

        Returns whether someone waited for its result: its end is announced by
        :meth:`set_result`, not by ``finish()`` (whose outcome kind is then
        ``committed``).
        """
        awaited = await conn.fetchval(self._sql.lock_for_commit, job_id, token)
        return None if awaited is None else bool(awaited)

    async def transaction_committed(
        self, conn: Conn, job_id: int, token: uuid.UUID, backend_pid: int
    ) -> bool:
        """Whether a task's transaction that finished the job committed, its reply lost.

        For a ``ctx.transaction()`` whose connection (to the backend
        ``backend_pid``) broke during COMMIT. Ends that backend if it still
        runs the transaction and waits for the transaction to end, so the
        answer is final. Only reads (and ends that one backend): safe to repeat.
        """
        await conn.execute(self._sql.end_commit_backend, job_id, backend_pid)
        await conn.execute(self._sql.commit_wait, job_id)
        return bool(await conn.fetchval(self._sql.committed_by, job_id, token))

    async def set_result(
        self, conn: Conn, job_id: int, token: uuid.UUID, result: str | None, awaited: bool
    ) -> None:
        """Store the result of a job its attempt's ctx.transaction() ended.

        ``None`` (the task returned None, or raised after the commit) stores
        no result but ends the wait for one all the same. The end is
        announced if the job was ``awaited`` at its commit, or a waiter asked
        since (:meth:`await_result`).
        """
        await conn.execute(
            self._sql.set_result, job_id, token, result, awaited, self.finished_channel
        )

    async def await_result(self, conn: Conn, job_id: int) -> bool:
        """Have the write of a pending result announced; False if it is written already."""
        return bool(await conn.fetchval(self._sql.await_result, job_id))


def _outcome_arrays(outcomes: list[Outcome]) -> tuple[list[Any], ...]:
    return (
        [o.job_id for o in outcomes],
        [o.token for o in outcomes],
        [o.kind for o in outcomes],
        [o.result for o in outcomes],
        [o.error for o in outcomes],
        [o.delay for o in outcomes],
    )
