"""Every SQL statement taskq runs, in one place.

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

from ._names import quote_schema

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


@dataclass(slots=True, eq=False)
class Outcome:
    """How one attempt ended, waiting to be written back in a batch.

    kind: ``succeeded`` / ``failed`` / ``cancelled`` move the job to history;
    ``retry`` puts it back in the queue after ``delay`` seconds and keeps its
    attempt; ``release`` puts it back at once and gives the attempt back
    (shutdown interrupted it, it did not fail).
    """

    job_id: int
    token: uuid.UUID
    kind: str
    result: str | None = None
    error: str | None = None
    delay: float = 0.0


_JOB_COLUMNS = (
    "id, queue, task, args::text AS args, state, priority, attempts, max_attempts, "
    "enqueued_at, run_at, started_at, unique_key"
)

_QUEUE_COLUMNS = (
    "name, paused, concurrency_limit, rate_limit, rate_period, updated_at, "
    "coalesce(cardinality(rate_log_at), 0) AS rate_log_len"
)


@dataclass(slots=True)
class ClaimResult:
    """What one claim statement returned.

    ``held_back`` is true when a queue or task limit kept due jobs from being
    claimed; ``retry_in`` is then the seconds until a rate window frees a start
    (``None``: until a running job of a limited queue ends, which is announced).
    """

    jobs: list[ClaimedJob]
    lost: list[int]
    held_back: bool = False
    retry_in: float | None = None


class Store:
    """The SQL of one taskq schema."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        s = quote_schema(schema)
        self.enqueued_channel = f"taskq:{schema}:enqueued"
        self.finished_channel = f"taskq:{schema}:finished"
        self.cancel_channel = f"taskq:{schema}:cancel"
        #: Every channel taskq notifies on, for the one LISTEN connection.
        self.channels = [self.enqueued_channel, self.finished_channel, self.cancel_channel]

        # Enqueue. Each statement also sends the wake-up (see the migration for
        # the payload): "queue" when the jobs are due now, "queue@epoch" when
        # they are due later. All jobs of one statement share queue and start.
        wake = (
            "pg_notify($8, CASE WHEN w.at <= now() THEN $1::text "
            "ELSE $1::text || '@' || extract(epoch FROM w.at)::text END)"
        )
        start = "coalesce($5::timestamptz, now()) + make_interval(secs => $6::float8)"
        self._insert_one = (
            f"WITH w AS (SELECT {start} AS at), "
            f"ins AS (INSERT INTO {s}.jobs "
            "(queue, task, args, priority, run_at, max_attempts, meta) "
            "SELECT $1, $2, $3::text::jsonb, $4, w.at, $7, $9::text::jsonb FROM w RETURNING id) "
            f"SELECT ins.id, {wake} FROM ins, w"
        )
        # A bulk enqueue sends all arguments as one JSON array: one parse in
        # Postgres instead of one per job, and one text value over the wire.
        self._insert_many = (
            f"WITH w AS (SELECT {start} AS at), "
            f"ins AS (INSERT INTO {s}.jobs "
            "(queue, task, args, priority, run_at, max_attempts, meta) "
            "SELECT $1, $2, a, $4, w.at, $7, $9::text::jsonb "
            "FROM w, jsonb_array_elements($3::text::jsonb) AS a "
            "RETURNING id) "
            f"SELECT (SELECT array_agg(id ORDER BY id) FROM ins) AS ids, {wake} FROM w"
        )
        # The claim lives in a function (see the migration) so that its plan
        # does not depend on the table's statistics.
        self._claim = f"SELECT * FROM {s}.claim($1, $2, $3, $4, $5)"
        self._claim_finishing = (
            f"SELECT * FROM {s}.claim($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        )
        # A unique job: see enqueue_unique() in migrations 2 and 3.
        self._insert_unique = (
            f"SELECT id, created FROM {s}.enqueue_unique($1, $2, $3, $4, "
            "coalesce($5::timestamptz, now()) + make_interval(secs => $6::float8), $7, $8, $9, "
            "$10)"
        )
        self._next_due = (
            f"SELECT min(run_at) - now() FROM {s}.jobs "
            "WHERE state = 'queued' AND task = ANY($2::text[]) "
            "AND ($1::text[] IS NULL OR queue = ANY($1::text[])) "
            f"AND queue NOT IN (SELECT name FROM {s}.queues WHERE paused)"
        )
        # Queue settings. NULL arguments leave a setting as it is; $6 clears
        # the rate limit. Resuming wakes the workers.
        self._configure_queue = (
            f"WITH up AS (INSERT INTO {s}.queues AS q (name, paused, concurrency_limit, "
            "rate_limit, rate_period) VALUES ($1, coalesce($2, false), $3, $4, $5) "
            "ON CONFLICT (name) DO UPDATE SET paused = coalesce($2, q.paused), "
            "concurrency_limit = CASE WHEN $7 THEN NULL "
            "ELSE coalesce($3, q.concurrency_limit) END, "
            "rate_limit = CASE WHEN $6 THEN NULL ELSE coalesce($4, q.rate_limit) END, "
            "rate_period = CASE WHEN $6 THEN NULL ELSE coalesce($5, q.rate_period) END, "
            "rate_log_at = CASE WHEN $6 THEN '{}' ELSE q.rate_log_at END, "
            "rate_log_n = CASE WHEN $6 THEN '{}' ELSE q.rate_log_n END, "
            f"updated_at = now() RETURNING {_QUEUE_COLUMNS}) "
            "SELECT up.*, CASE WHEN NOT up.paused THEN pg_notify($8, up.name) END AS woken "
            "FROM up"
        )
        self._queue_settings = f"SELECT {_QUEUE_COLUMNS} FROM {s}.queues ORDER BY name"
        self._queue_overview = (
            "SELECT n.queue, coalesce(sum(n.queued), 0)::bigint AS queued, "
            "coalesce(sum(n.running), 0)::bigint AS running, bool_or(q.paused) AS paused, "
            "max(q.concurrency_limit) AS concurrency_limit, max(q.rate_limit) AS rate_limit, "
            "max(q.rate_period) AS rate_period FROM ("
            "SELECT queue, count(*) FILTER (WHERE state = 'queued') AS queued, "
            f"count(*) FILTER (WHERE state = 'running') AS running FROM {s}.jobs GROUP BY queue "
            f"UNION ALL SELECT name, 0, 0 FROM {s}.queues) AS n "
            f"LEFT JOIN {s}.queues AS q ON q.name = n.queue GROUP BY n.queue ORDER BY n.queue"
        )
        # Cron entries (see cron_fire() in migration 2). A changed expression
        # or time zone starts the entry afresh from $9, the newest slot at or
        # before now: its old slots say nothing about the new schedule.
        self._register_cron = (
            f"INSERT INTO {s}.crons AS c (name, expression, timezone, task, queue, args, "
            "priority, missed, last_slot) VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $9) "
            "ON CONFLICT (name) DO UPDATE SET expression = excluded.expression, "
            "timezone = excluded.timezone, task = excluded.task, queue = excluded.queue, "
            "args = excluded.args, priority = excluded.priority, missed = excluded.missed, "
            "registered_at = now(), last_slot = CASE WHEN (c.expression, c.timezone) "
            "IS DISTINCT FROM (excluded.expression, excluded.timezone) THEN excluded.last_slot "
            "ELSE c.last_slot END RETURNING last_slot"
        )
        self._cron_fire = f"SELECT {s}.cron_fire($1, $2, $3, $4, $5, $6, $7, $8)"
        self._list_crons = (
            "SELECT name, expression, timezone, task, queue, args::text AS args, priority, "
            f"missed, last_slot, last_job_id, registered_at FROM {s}.crons ORDER BY name"
        )
        # Write back a batch of outcomes (see finish() in the migration).
        self._finish = f"SELECT {s}.finish($1, $2, $3, $4, $5, $6)"
        self._renew = (
            f"UPDATE {s}.jobs AS j SET lease_expires_at = now() + make_interval(secs => $3) "
            "FROM unnest($1::bigint[], $2::uuid[]) AS u(id, token) "
            "WHERE j.id = u.id AND j.lease_token = u.token RETURNING j.id, j.cancel_requested"
        )
        # Rescue: a running job whose lease ran out belongs to a dead or
        # partitioned worker. The rows are locked and re-checked in the same
        # statement (FOR UPDATE re-evaluates the condition on the newest row
        # version, and SKIP LOCKED passes over a row that a completion is
        # writing), so a completion or renewal that lands first wins and
        # nothing is re-queued behind its back. A job is not queued again when
        # its attempts are used up, when it was rescued too often (poison: it
        # takes its worker down every time), or when it was being cancelled.
        self._rescue = (
            f"WITH expired AS (SELECT id FROM {s}.jobs WHERE state = 'running' "
            "AND lease_expires_at < now() LIMIT 1000 FOR UPDATE SKIP LOCKED), "
            f"requeued AS (UPDATE {s}.jobs AS j SET state = 'queued', run_at = now(), "
            "worker_id = NULL, lease_token = NULL, lease_expires_at = NULL, "
            "rescues = j.rescues + 1, last_error = jsonb_build_object('type', "
            "'taskq.LeaseExpired', 'message', 'the worker running this job stopped renewing "
            "its lease (it crashed, was killed or lost its database connection)', "
            "'traceback', '') FROM expired AS e "
            "WHERE j.id = e.id AND NOT j.cancel_requested AND j.attempts < j.max_attempts "
            "AND j.rescues + 1 < $3 RETURNING j.id, j.queue), "
            f"ended AS (DELETE FROM {s}.jobs AS j USING expired AS e "
            "WHERE j.id = e.id AND (j.cancel_requested OR j.attempts >= j.max_attempts "
            "OR j.rescues + 1 >= $3) RETURNING j.*), "
            f"archived AS (INSERT INTO {s}.history (id, queue, task, args, state, priority, "
            "attempts, max_attempts, rescues, enqueued_at, started_at, worker_id, error, "
            "unique_key, meta) "
            "SELECT id, queue, task, args, "
            "CASE WHEN cancel_requested THEN 'cancelled' ELSE 'failed' END, priority, attempts, "
            "max_attempts, rescues + 1, enqueued_at, started_at, worker_id, CASE "
            "WHEN cancel_requested THEN jsonb_build_object('type', 'taskq.JobCancelled', "
            "'message', 'cancelled; its worker stopped renewing the lease', 'traceback', '') "
            "WHEN rescues + 1 >= $3 THEN jsonb_build_object('type', 'taskq.PoisonJob', "
            "'message', format('its worker stopped renewing the lease %s times in a row (it "
            "crashed, was killed or was cut off each time it ran this job); not run again', "
            "rescues + 1), 'traceback', '') "
            "ELSE jsonb_build_object('type', 'taskq.LeaseExpired', 'message', 'the worker "
            "running its last attempt stopped renewing the lease; no attempts left', "
            "'traceback', '') END, unique_key, meta FROM ended RETURNING id, state) "
            "SELECT (SELECT coalesce(array_agg(id), '{}') FROM requeued) AS requeued, "
            "(SELECT coalesce(array_agg(id), '{}') FROM archived) AS ended, "
            "(SELECT count(pg_notify($1, ids)) FROM (SELECT string_agg(id::text, ',') AS ids "
            "FROM (SELECT id, (row_number() OVER ()) / 300 AS chunk FROM archived) AS c "
            "GROUP BY chunk) AS n) AS notified, "
            "(SELECT count(pg_notify($2, queue)) FROM (SELECT DISTINCT queue FROM requeued) AS q) "
            "AS woken"
        )
        self._get_job = (
            f"SELECT {_JOB_COLUMNS}, NULL::timestamptz AS finished_at, last_error AS error, "
            f"NULL::text AS result, worker_id, meta::text AS meta FROM {s}.jobs WHERE id = $1 "
            "UNION ALL "
            "SELECT id, queue, task, args::text AS args, state, priority, attempts, max_attempts, "
            "enqueued_at, NULL::timestamptz AS run_at, started_at, unique_key, finished_at, "
            "error, result::text AS result, "
            f"worker_id, meta::text AS meta FROM {s}.history WHERE id = $1"
        )
        self._cancel_queued = (
            f"WITH c AS (DELETE FROM {s}.jobs WHERE id = $1 AND state = 'queued' RETURNING *), "
            f"h AS (INSERT INTO {s}.history (id, queue, task, args, state, priority, attempts, "
            "max_attempts, rescues, enqueued_at, started_at, error, unique_key, meta) "
            "SELECT id, queue, task, args, 'cancelled', priority, attempts, max_attempts, "
            "rescues, enqueued_at, started_at, jsonb_build_object('type', 'taskq.JobCancelled', "
            "'message', 'cancelled while queued', 'traceback', ''), unique_key, meta FROM c "
            "RETURNING id) "
            "SELECT id, pg_notify($2, id::text) FROM h"
        )
        # Ask the write-back to announce this job's end. Zero rows: it has
        # already finished (or never existed), and the caller reads it.
        # This UPDATE locks a queued job's row for a moment; a claim running
        # then passes over it (SKIP LOCKED) and its worker may go back to sleep
        # until the next poll. So a job that is due is announced again.
        self._await_job = (
            f"WITH a AS (UPDATE {s}.jobs SET awaited = true WHERE id = $1 AND NOT awaited "
            "RETURNING queue, state, run_at) "
            "SELECT pg_notify($2, queue) FROM a WHERE state = 'queued' AND run_at <= now()"
        )
        self._request_cancel = (
            f"UPDATE {s}.jobs SET cancel_requested = true WHERE id = $1 AND state = 'running' "
            "RETURNING id, pg_notify($2, id::text)"
        )
        # A unique job goes back only while no other live job holds its key;
        # the unique index settles a race with a producer (the caller reports it).
        self._rerun = (
            f"WITH h AS (DELETE FROM {s}.history AS h WHERE h.id = $1 "
            "AND h.state IN ('failed', 'cancelled') AND (h.unique_key IS NULL OR NOT EXISTS "
            f"(SELECT 1 FROM {s}.jobs AS j WHERE j.queue = h.queue "
            "AND j.unique_key = h.unique_key)) RETURNING *), "
            f"ins AS (INSERT INTO {s}.jobs (id, queue, task, args, priority, run_at, attempts, "
            "max_attempts, enqueued_at, last_error, unique_key, meta) "
            "SELECT id, queue, task, args, priority, now(), 0, max_attempts, enqueued_at, error, "
            "unique_key, meta FROM h RETURNING id, queue) "
            "SELECT id, pg_notify($2, queue) FROM ins"
        )
        self._counts = (
            f"SELECT queue, state, count(*) AS n FROM {s}.jobs GROUP BY queue, state "
            "UNION ALL "
            f"SELECT queue, state, count(*) AS n FROM {s}.history GROUP BY queue, state "
            "ORDER BY queue, state"
        )
        self._prune = f"SELECT {s}.prune($1, $2)"
        self._register_worker = (
            f"INSERT INTO {s}.workers (id, hostname, pid, queues, tasks, concurrency) "
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()"
        )
        self._register_tasks = (
            f"INSERT INTO {s}.tasks AS t (name, queue, max_attempts, rate_limit, rate_period) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::int[], $5::float8[]) "
            "ON CONFLICT (name) DO UPDATE SET queue = excluded.queue, "
            "max_attempts = excluded.max_attempts, last_seen_at = now(), "
            "rate_limit = excluded.rate_limit, rate_period = excluded.rate_period, "
            "rate_log_at = CASE WHEN t.rate_period IS NOT DISTINCT FROM excluded.rate_period "
            "THEN t.rate_log_at ELSE '{}' END, "
            "rate_log_n = CASE WHEN t.rate_period IS NOT DISTINCT FROM excluded.rate_period "
            "THEN t.rate_log_n ELSE '{}' END"
        )
        self._heartbeat = f"UPDATE {s}.workers SET heartbeat_at = now() WHERE id = $1"
        self._unregister_worker = f"DELETE FROM {s}.workers WHERE id = $1"
        self._forget_dead_workers = (
            f"DELETE FROM {s}.workers WHERE heartbeat_at < now() - make_interval(secs => $1)"
        )
        self._lookup_task = f"SELECT queue, max_attempts FROM {s}.tasks WHERE name = $1"
        self._task_names = f"SELECT name FROM {s}.tasks ORDER BY name"
        # Due jobs of tasks a worker does not have, counted over at most
        # $3 rows so that a huge backlog costs a bounded scan.
        self._stray_tasks = (
            "SELECT task, queue, count(*) AS n FROM ("
            f"SELECT task, queue FROM {s}.jobs WHERE state = 'queued' AND run_at <= now() "
            "AND ($1::text[] IS NULL OR queue = ANY($1::text[])) AND NOT task = ANY($2::text[]) "
            "LIMIT $3) AS j GROUP BY task, queue ORDER BY n DESC, task"
        )
        # What a result waiter that timed out tells: the job, whether its queue
        # is paused, and which live workers (a heartbeat within $2 s) serve it.
        self._explain_wait = (
            "SELECT j.state, j.task, j.queue, j.attempts, j.max_attempts, j.worker_id, "
            "extract(epoch FROM j.run_at - now())::float8 AS due_in, j.last_error::text AS error, "
            f"coalesce((SELECT paused FROM {s}.queues WHERE name = j.queue), false) AS paused, "
            "(SELECT count(*) FROM "
            f"{s}.workers w WHERE w.heartbeat_at > now() - make_interval(secs => $2)) AS live, "
            f"(SELECT count(*) FROM {s}.workers w "
            "WHERE w.heartbeat_at > now() - make_interval(secs => $2) AND j.task = ANY(w.tasks) "
            "AND (w.queues IS NULL OR j.queue = ANY(w.queues))) AS serving, "
            f"(SELECT array_agg(DISTINCT t) FROM {s}.workers w, unnest(w.tasks) AS t "
            "WHERE w.heartbeat_at > now() - make_interval(secs => $2)) AS known "
            f"FROM {s}.jobs j WHERE j.id = $1"
        )

    # -- enqueue ---------------------------------------------------------------

    async def insert_job(self, conn: Conn, **job: Any) -> int:
        """Insert one job (``args`` is its JSON text); return its id."""
        return int(await self._insert(conn, self._insert_one, **job))

    async def insert_jobs(self, conn: Conn, **jobs: Any) -> list[int]:
        """Insert one job per element of ``args`` (a JSON array); ids in that order."""
        return list(await self._insert(conn, self._insert_many, **jobs) or [])

    async def insert_unique_job(
        self, conn: Conn, *, unique_key: str, unique_for: float, **job: Any
    ) -> tuple[int, bool]:
        """Insert one job unless a live one (or one finished within ``unique_for``
        seconds) holds ``unique_key`` in its queue: (job id, created)."""
        row = await conn.fetchrow(
            self._insert_unique,
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
        outcomes: list[Outcome] | None = None,
    ) -> ClaimResult:
        """Claim up to ``limit`` jobs, first writing back ``outcomes`` if any."""
        if outcomes:
            rows = await conn.fetch(
                self._claim_finishing,
                queues,
                tasks,
                limit,
                worker_id,
                lease_seconds,
                *_outcome_arrays(outcomes),
            )
        else:
            rows = await conn.fetch(self._claim, queues, tasks, limit, worker_id, lease_seconds)
        result = ClaimResult([], [])
        for r in rows:
            if r[8] is False:
                result.jobs.append(
                    ClaimedJob(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], meta=r[10])
                )
            elif r[8]:
                result.lost.append(r[0])
            else:
                result.held_back = True
                result.retry_in = r[9]
        return result

    async def seconds_until_next_due(
        self, conn: Conn, *, queues: list[str] | None, tasks: list[str]
    ) -> float | None:
        """Seconds until the earliest queued job this worker could run is due."""
        gap = await conn.fetchval(self._next_due, queues, tasks)
        return None if gap is None else gap.total_seconds()

    async def finish(self, conn: Conn, outcomes: list[Outcome]) -> list[int]:
        """Write back outcomes; return the ids whose lease was lost (nothing written)."""
        lost = await conn.fetchval(self._finish, *_outcome_arrays(outcomes))
        return list(lost)

    async def renew_leases(
        self, conn: Conn, leases: list[tuple[int, uuid.UUID]], lease_seconds: float
    ) -> dict[int, bool]:
        """Extend the leases this worker still holds: {renewed id: cancel requested}."""
        rows = await conn.fetch(
            self._renew, [j for j, _ in leases], [t for _, t in leases], lease_seconds
        )
        return {r[0]: r[1] for r in rows}

    async def rescue_expired(self, conn: Conn, max_rescues: int = 3) -> tuple[list[int], list[int]]:
        """Re-queue jobs whose lease expired; return (re-queued ids, ended ids).

        Ended jobs went to history as failed (no attempts left, or poison after
        ``max_rescues`` rescues) or cancelled (a cancel was pending).
        """
        row = await conn.fetchrow(
            self._rescue, self.finished_channel, self.enqueued_channel, max_rescues
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
                self._register_worker, worker_id, hostname, pid, queues, list(tasks), concurrency
            )
            rows = list(tasks.values())
            await conn.execute(
                self._register_tasks, list(tasks), *([row[i] for row in rows] for i in range(4))
            )

    async def heartbeat(self, conn: Conn, worker_id: str) -> None:
        await conn.execute(self._heartbeat, worker_id)

    async def unregister_worker(self, conn: Conn, worker_id: str) -> None:
        await conn.execute(self._unregister_worker, worker_id)

    async def forget_dead_workers(self, conn: Conn, older_than: float) -> None:
        await conn.execute(self._forget_dead_workers, older_than)

    async def prune_history(
        self, conn: Conn, retention_seconds: float, batch: int = 5000, max_batches: int = 20
    ) -> int:
        """Delete history older than the retention, in batches; return rows deleted."""
        total = 0
        for _ in range(max_batches):
            deleted = int(await conn.fetchval(self._prune, retention_seconds, batch))
            total += deleted
            if deleted < batch:
                break
        return total

    # -- jobs ------------------------------------------------------------------

    async def get_job(self, conn: Conn, job_id: int) -> Any:
        """The job's row from the hot table or from history, or None."""
        return await conn.fetchrow(self._get_job, job_id)

    async def cancel_queued(self, conn: Conn, job_id: int) -> bool:
        return await conn.fetchrow(self._cancel_queued, job_id, self.finished_channel) is not None

    async def mark_awaited(self, conn: Conn, job_id: int) -> None:
        """Have the job's end announced on the finished channel."""
        await conn.execute(self._await_job, job_id, self.enqueued_channel)

    async def request_cancel(self, conn: Conn, job_id: int) -> bool:
        """Flag a running job for cancellation and tell its worker; False if not running."""
        return await conn.fetchrow(self._request_cancel, job_id, self.cancel_channel) is not None

    async def rerun(self, conn: Conn, job_id: int) -> bool:
        try:
            return await conn.fetchrow(self._rerun, job_id, self.enqueued_channel) is not None
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
    ) -> Any:
        """Change a queue's settings (``None`` keeps one); return its settings row."""
        return await conn.fetchrow(
            self._configure_queue,
            name,
            paused,
            concurrency_limit,
            rate[0] if rate else None,
            rate[1] if rate else None,
            clear_rate,
            clear_concurrency_limit,
            self.enqueued_channel,
        )

    async def queue_settings(self, conn: Conn) -> list[Any]:
        return list(await conn.fetch(self._queue_settings))

    async def queue_overview(self, conn: Conn) -> list[Any]:
        """Per queue: queued and running counts with its settings."""
        return list(await conn.fetch(self._queue_overview))

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
            self._register_cron,
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
            self._cron_fire, name, slot, make_job, task, queue, args, priority, max_attempts
        )
        return None if value is None else int(value)

    async def list_crons(self, conn: Conn) -> list[Any]:
        return list(await conn.fetch(self._list_crons))

    async def task_names(self, conn: Conn) -> list[str]:
        """Every task name a worker has reported."""
        return [r[0] for r in await conn.fetch(self._task_names)]

    async def stray_tasks(
        self, conn: Conn, *, queues: list[str] | None, tasks: list[str], scan: int
    ) -> list[tuple[str, str, int]]:
        """(task, queue, count) of due jobs whose task is not in ``tasks``."""
        rows = await conn.fetch(self._stray_tasks, queues, tasks, scan)
        return [(r[0], r[1], r[2]) for r in rows]

    async def explain_wait(self, conn: Conn, job_id: int, live_seconds: float) -> Any:
        """A live job with its queue's pause flag and the live workers that could run it."""
        return await conn.fetchrow(self._explain_wait, job_id, live_seconds)

    async def counts(self, conn: Conn) -> list[tuple[str, str, int]]:
        return [(r[0], r[1], r[2]) for r in await conn.fetch(self._counts)]

    async def lookup_task(self, conn: Conn, name: str) -> tuple[str, int] | None:
        """(default queue, max attempts) of a task some worker reported, or None."""
        row = await conn.fetchrow(self._lookup_task, name)
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
        s = quote_schema(self.schema)
        row = await conn.fetchrow(
            f"UPDATE {s}.jobs AS j SET state = 'running', attempts = j.attempts + 1, "
            "worker_id = $3, lease_token = gen_random_uuid(), "
            "lease_expires_at = now() + make_interval(secs => $4), started_at = now() "
            "WHERE j.id = $1 AND j.state = 'queued' AND j.task = ANY($2::text[]) "
            "RETURNING j.id, j.task, j.queue, j.args::text, j.attempts, j.max_attempts, "
            "j.lease_token, j.priority, j.meta::text",
            job_id,
            tasks,
            worker_id,
            lease_seconds,
        )
        if row is None:
            return None
        return ClaimedJob(
            row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], meta=row[8]
        )


def _outcome_arrays(outcomes: list[Outcome]) -> tuple[list[Any], ...]:
    return (
        [o.job_id for o in outcomes],
        [o.token for o in outcomes],
        [o.kind for o in outcomes],
        [o.result for o in outcomes],
        [o.error for o in outcomes],
        [o.delay for o in outcomes],
    )
