"""taskq through its public API: ``enqueue_many``, ``enqueue``, ``app.worker(...)``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from .base import JobFn, System

if TYPE_CHECKING:
    import taskq

SCHEMA = "taskq"


class TaskqSystem(System):
    name = "taskq"
    unfinished_sql = f"SELECT EXISTS (SELECT FROM {SCHEMA}.jobs)"

    async def open(self) -> None:
        import taskq

        self._job: JobFn | None = None
        self.app = taskq.App(self.dsn, schema=SCHEMA)

        @self.app.task(name="bench.job")
        async def bench_job(i: int) -> None:
            assert self._job is not None, "only workers run jobs"
            await self._job(i)

        self.task: taskq.Task[Any, Any] = bench_job
        await self.app.open()  # applies migrations on a fresh database

    async def close(self) -> None:
        await self.app.close()

    async def setup(self) -> None:
        await self.app.migrate()

    async def enqueue_bulk(self, batch: list[dict[str, Any]]) -> None:
        await self.task.enqueue_many(batch)

    async def enqueue_one(self, args: dict[str, Any]) -> None:
        await self.task.enqueue(**args)

    async def enqueue_times(self) -> dict[int, datetime]:
        # enqueued_at defaults to now() in taskq's INSERT: the statement's start on
        # the database clock. One statement, one snapshot: each job is counted in
        # exactly one of the two tables even while workers move it.
        sql = (
            f"SELECT (args->>'i')::int, enqueued_at FROM {SCHEMA}.jobs UNION ALL "
            f"SELECT (args->>'i')::int, enqueued_at FROM {SCHEMA}.history"
        )
        async with self.app.pool.acquire() as conn:
            return {i: at for i, at in await conn.fetch(sql)}

    async def run_worker(
        self, concurrency: int, job: JobFn, ready: Callable[[], None], stop: asyncio.Event
    ) -> None:
        self._job = job
        async with self.app.worker(concurrency=concurrency):
            ready()
            await stop.wait()

    async def check(self, conn: asyncpg.Connection, expected: int) -> list[str]:
        row = await conn.fetchrow(
            f"SELECT (SELECT count(*) FROM {SCHEMA}.jobs) AS live, "
            f"(SELECT count(*) FROM {SCHEMA}.history WHERE state = 'succeeded') AS succeeded, "
            f"(SELECT count(*) FROM {SCHEMA}.history) AS history, "
            f"(SELECT count(DISTINCT args->>'i') FROM {SCHEMA}.history) AS distinct_i"
        )
        problems = []
        if row["live"]:
            problems.append(f"taskq.jobs still holds {row['live']} job(s)")
        for key in ("succeeded", "history", "distinct_i"):
            if row[key] != expected:
                problems.append(f"taskq.history {key} = {row[key]}, expected {expected}")
        return problems
