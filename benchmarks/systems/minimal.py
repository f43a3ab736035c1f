"""The hand-written floor (benchmarks/minimal_queue.py) as a system under test."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any, ClassVar

import asyncpg

from .. import minimal_queue as mq
from .base import JobFn, System


class MinimalSystem(System):
    name = "minimal"
    variants: ClassVar[dict[str, str]] = {"": "minimal"}
    unfinished_sql = f"SELECT EXISTS (SELECT FROM {mq.SCHEMA}.jobs)"
    backlog_sql = f"SELECT count(*) FROM {mq.SCHEMA}.jobs"
    settings: ClassVar[dict[str, str]] = {
        "": "claims up to its free slots on one connection (committed asynchronously); "
        "deletes finished jobs in batches on a second one"
    }

    async def open(self) -> None:
        # A producer holds its connection, as a minimal app would.
        self._conn: asyncpg.Connection = await asyncpg.connect(self.dsn)
        self._times: dict[int, datetime] = {}

    async def close(self) -> None:
        await self._conn.close()

    async def setup(self) -> None:
        await mq.install(self._conn)

    async def enqueue_bulk(self, batch: list[dict[str, Any]]) -> None:
        await mq.enqueue_many(self._conn, batch)

    async def enqueue_one(self, args: dict[str, Any]) -> None:
        self._times[args["i"]] = await mq.enqueue(self._conn, args)

    async def enqueue_times(self) -> dict[int, datetime]:
        return dict(self._times)

    async def run_worker(
        self, concurrency: int, job: JobFn, ready: Callable[[], None], stop: asyncio.Event
    ) -> None:
        async def handler(args: dict[str, Any]) -> None:
            await job(args["i"])

        worker = mq.Worker(self.dsn, handler, concurrency=concurrency)
        running = asyncio.create_task(worker.run(ready))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([running, stopped], return_when=asyncio.FIRST_COMPLETED)
        worker.stop()
        stopped.cancel()
        await running
