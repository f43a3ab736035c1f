"""The floor: the least a Postgres job queue must do, written by hand on asyncpg.

One table with a partial index over runnable rows, bulk insert through
``unnest``, a statement-level NOTIFY trigger, and a worker that claims at most
its free slots in one ``UPDATE ... FOR UPDATE SKIP LOCKED`` statement and runs
each job once. Claims and acknowledgements go out on two connections, so two
backends work at once: the claim connection claims and LISTENs, and the ids of
finished jobs are deleted on the other, each ``DELETE`` taking all that
finished while the previous one ran. A claim commits without waiting for its
WAL to reach the disk (``synchronous_commit = off`` on the claim connection
only), as taskq's claims do: the acknowledgement of a claimed job commits
synchronously and comes later in the log, so its flush makes the claim durable
too; a crash can only forget the last claims, whose jobs are then queued again.
It has no leases, retries, results or history: what a real queue costs above
this is the price of those features, or overhead to remove. Enqueues and
acknowledgements keep the server's durability settings, like every system
measured here. docs/benchmarks.md ("The floor") says what each choice bought.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg
import orjson

SCHEMA = "minimal"
CHANNEL = "minimal_jobs"

INSTALL = f"""
CREATE SCHEMA {SCHEMA};
CREATE TABLE {SCHEMA}.jobs (
    id     bigserial   PRIMARY KEY,
    queue  text        NOT NULL,
    args   jsonb       NOT NULL,
    run_at timestamptz NOT NULL DEFAULT now(),
    state  text        NOT NULL DEFAULT 'queued'
);
-- Only runnable rows, in claim order: running rows never slow the claim down.
CREATE INDEX jobs_claim ON {SCHEMA}.jobs (queue, run_at, id) WHERE state = 'queued';
-- One notification per INSERT statement, however many rows it adds.
CREATE FUNCTION {SCHEMA}.notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('{CHANNEL}', ''); RETURN NULL; END $$;
CREATE TRIGGER jobs_notify AFTER INSERT ON {SCHEMA}.jobs
    FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.notify();
"""
INSERT_MANY = (
    f"INSERT INTO {SCHEMA}.jobs (queue, args) SELECT $1, a::jsonb FROM unnest($2::text[]) AS a"
)
# run_at defaults to now(): the enqueue time on the database clock.
INSERT_ONE = f"INSERT INTO {SCHEMA}.jobs (queue, args) VALUES ($1, $2::jsonb) RETURNING run_at"
# The oldest runnable jobs, locked; rows another worker holds are skipped. The
# locked rows are updated through their ctid (a TID scan): no second index lookup
# per row, and a locked row cannot move before the statement ends.
PICK = (
    f"SELECT ctid FROM {SCHEMA}.jobs WHERE state = 'queued' AND queue = $1 AND run_at <= now() "
    "ORDER BY run_at, id LIMIT $2 FOR UPDATE SKIP LOCKED"
)
CLAIM = (
    f"UPDATE {SCHEMA}.jobs SET state = 'running' WHERE ctid = ANY(ARRAY({PICK})) "
    "RETURNING id, args::text"
)
ACK = f"DELETE FROM {SCHEMA}.jobs WHERE id = ANY($1::bigint[])"
# The worker's connections plan each statement once. Left to itself, Postgres
# re-plans CLAIM on every call once the table has statistics: the generic plan's
# estimate for LIMIT $2 (a tenth of the table) makes it look dearer than a custom
# plan, though the two plans are the same.
WORKER_SETTINGS = {"plan_cache_mode": "force_generic_plan"}
# Claims commit asynchronously (see the module's docstring).
CLAIM_SETTINGS = {**WORKER_SETTINGS, "synchronous_commit": "off"}

Handler = Callable[[dict[str, Any]], Awaitable[None]]


async def install(conn: asyncpg.Connection) -> None:
    await conn.execute(INSTALL)


async def enqueue_many(
    conn: asyncpg.Connection, args: list[dict[str, Any]], queue: str = "default"
) -> None:
    await conn.execute(INSERT_MANY, queue, [orjson.dumps(a).decode() for a in args])


async def enqueue(
    conn: asyncpg.Connection, args: dict[str, Any], queue: str = "default"
) -> datetime:
    """Insert one job; return its enqueue time on the database clock."""
    at: datetime = await conn.fetchval(INSERT_ONE, queue, orjson.dumps(args).decode())
    return at


class Worker:
    """Runs at most ``concurrency`` jobs at once; a slot frees when its job returns.

    Two connections: one claims (as soon as a slot frees) and LISTENs, the
    other deletes the jobs that finished (as soon as the previous delete
    returns, taking all that finished meanwhile).
    """

    def __init__(
        self,
        dsn: str,
        handler: Handler,
        *,
        concurrency: int = 10,
        queue: str = "default",
        poll_interval: float = 1.0,
    ) -> None:
        self.dsn, self.handler, self.queue = dsn, handler, queue
        self.concurrency, self.poll_interval = concurrency, poll_interval
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()  # strong references only
        self._done: list[int] = []  # finished, not yet deleted
        self._slot_freed = asyncio.Event()
        self._notified = asyncio.Event()  # an INSERT notified, the poll timer fired, or stop()
        self._ack_wanted = asyncio.Event()  # some job finished
        self._stopping = self._closing = False

    def stop(self) -> None:
        self._stopping = True
        self._notified.set()
        self._slot_freed.set()

    async def run(self, ready: Callable[[], None] = lambda: None) -> None:
        """Claim and run jobs until stop(); then finish running jobs and acknowledge them."""
        conn = await asyncpg.connect(self.dsn, server_settings=CLAIM_SETTINGS)
        ack_conn = await asyncpg.connect(self.dsn, server_settings=WORKER_SETTINGS)
        acker = asyncio.create_task(self._ack_loop(ack_conn))
        try:
            await conn.add_listener(CHANNEL, lambda *_: self._notified.set())
            ready()
            await self._claim_loop(conn)
            while self._running:
                self._slot_freed.clear()
                await self._slot_freed.wait()
        finally:
            self._closing = True
            self._ack_wanted.set()
            await acker
            for c in (conn, ack_conn):
                await c.close()

    async def _claim_loop(self, conn: asyncpg.Connection) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            free = self.concurrency - self._running
            if not free:  # only a job that finishes frees a slot
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            # Cleared before the claim: an INSERT committed meanwhile wakes us again.
            self._notified.clear()
            rows = await conn.fetch(CLAIM, self.queue, free)
            for job_id, args in rows:
                self._running += 1
                task = asyncio.create_task(self._run(job_id, args))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if len(rows) < free:
                # The queue is empty: wait for a NOTIFY (or poll now and then, in
                # case one was missed).
                poll = loop.call_later(self.poll_interval, self._notified.set)
                try:
                    await self._notified.wait()
                finally:
                    poll.cancel()

    async def _ack_loop(self, conn: asyncpg.Connection) -> None:
        # Ids that finish while one DELETE is in flight go together in the next one.
        while not (self._closing and not self._done):
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            if self._done:
                ids, self._done = self._done, []
                await conn.execute(ACK, ids)

    async def _run(self, job_id: int, args: str) -> None:
        try:
            await self.handler(orjson.loads(args))
        finally:  # no retries in the floor: a job that raised is done too
            self._running -= 1
            self._done.append(job_id)
            self._slot_freed.set()
            self._ack_wanted.set()
