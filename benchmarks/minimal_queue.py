"""The floor: the least a Postgres job queue must do, written by hand on asyncpg.

One table with a partial index over runnable rows, bulk insert through
``unnest``, a statement-level NOTIFY trigger, and a worker that claims at most
its free slots in one ``UPDATE ... FOR UPDATE SKIP LOCKED`` statement, runs the
coroutine and deletes finished jobs in batches. It has no leases, retries,
results or history: what a real queue costs above this is the price of those
features, or overhead to remove. It runs with the server's durability settings
(one committed transaction per statement), like every system measured here.
"""

from __future__ import annotations

import asyncio
import contextlib
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
CLAIM = (
    f"UPDATE {SCHEMA}.jobs SET state = 'running' WHERE id IN ("
    f"SELECT id FROM {SCHEMA}.jobs WHERE state = 'queued' AND queue = $1 AND run_at <= now() "
    "ORDER BY run_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id, args::text"
)
ACK = f"DELETE FROM {SCHEMA}.jobs WHERE id = ANY($1::bigint[])"

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
    """Runs at most ``concurrency`` jobs at once; a slot frees when its job returns."""

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
        self._jobs: set[asyncio.Task[None]] = set()
        self._done: list[int] = []
        self._wake = asyncio.Event()  # an INSERT notified, or stop()
        self._slot_free = asyncio.Event()
        self._ack_needed = asyncio.Event()
        self._stopping = False
        self._closing = False  # no job left to run: the ack loop flushes and returns

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._slot_free.set()

    async def run(self, ready: Callable[[], None] = lambda: None) -> None:
        """Claim and run jobs until stop(); then finish running jobs and acknowledge them."""
        # Separate connections, so that acknowledging never waits behind a claim.
        claim_conn, ack_conn, listen_conn = [await asyncpg.connect(self.dsn) for _ in range(3)]
        await listen_conn.add_listener(CHANNEL, lambda *_: self._wake.set())
        acker = asyncio.create_task(self._ack_loop(ack_conn))
        try:
            ready()
            await self._claim_loop(claim_conn)
            if self._jobs:
                await asyncio.wait(self._jobs)
        finally:
            self._closing = True
            self._ack_needed.set()
            await acker
            for conn in (claim_conn, ack_conn, listen_conn):
                await conn.close()

    async def _claim_loop(self, conn: asyncpg.Connection) -> None:
        while not self._stopping:
            self._slot_free.clear()
            free = self.concurrency - len(self._jobs)
            if free <= 0:
                await self._slot_free.wait()
                continue
            # Cleared before the claim: an INSERT committed meanwhile wakes us again.
            self._wake.clear()
            rows = await conn.fetch(CLAIM, self.queue, free)
            for job_id, args in rows:
                task = asyncio.create_task(self._run(job_id, args))
                self._jobs.add(task)
                task.add_done_callback(self._finished)
            if len(rows) < free:  # nothing more to claim: sleep until an INSERT notifies
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def _run(self, job_id: int, args: str) -> None:
        try:
            await self.handler(orjson.loads(args))
        finally:  # no retries in the floor: a job that raised is done too
            self._done.append(job_id)
            self._ack_needed.set()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._jobs.discard(task)
        self._slot_free.set()

    async def _ack_loop(self, conn: asyncpg.Connection) -> None:
        # Ids that finish while one DELETE is in flight go together in the next one.
        while not (self._closing and not self._done):
            await self._ack_needed.wait()
            self._ack_needed.clear()
            ids, self._done = self._done, []
            if ids:
                await conn.execute(ACK, ids)
