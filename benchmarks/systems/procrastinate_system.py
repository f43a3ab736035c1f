"""procrastinate 3.10.0 through its documented API, in its own virtualenv.

``App(connector=PsycopgConnector(conninfo=...))`` with the connector's default
pool; the schema from ``app.schema_manager.apply_schema_async()`` (what
``procrastinate schema --apply`` runs); ``task.batch_defer_async(...)`` for a
batch, ``task.defer_async(...)`` for one job; the worker is
``app.run_worker_async(concurrency=N)`` with every other option at its default
(jobs are kept as ``succeeded`` rows), stopped by cancelling it, which its docs
describe as a graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime
from typing import Any, ClassVar

import asyncpg

from .base import JobFn, System, Venv

TASK = "bench.job"
UNFINISHED = "FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"


class ProcrastinateSystem(System):
    name = "procrastinate"
    variants: ClassVar[dict[str, str]] = {"": "procrastinate"}
    # psycopg's C build, as its docs advise (the pure-Python one needs libpq on the host).
    venv = Venv("procrastinate", "3.10.0", ("procrastinate==3.10.0", "psycopg[binary]==3.3.9"))
    packages = ("procrastinate", "psycopg", "psycopg-binary", "psycopg-pool")
    unfinished_sql = f"SELECT EXISTS (SELECT {UNFINISHED})"
    backlog_sql = f"SELECT count(*) {UNFINISHED}"
    settings: ClassVar[dict[str, str]] = {
        "": "`run_worker_async(concurrency=N)`, every other option at its default "
        "(`PsycopgConnector` default pool, jobs kept as `succeeded`)"
    }

    @classmethod
    def jobs_share(cls, variant: str, workload: str) -> float:
        # About 30x slower than the floor at draining (one fetch and one finish
        # statement per job), and under 200 jobs/s at concurrency 1,000 (its
        # default pool has 4 connections): fewer jobs keep its runs within bounds.
        return 0.05 if workload == "E" else 0.25

    async def open(self) -> None:
        import procrastinate

        self._job: JobFn | None = None
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=self.dsn))

        async def bench_job(i: int) -> None:
            assert self._job is not None, "only workers run jobs"
            await self._job(i)

        self.task = self.app.task(name=TASK)(bench_job)
        await self.app.open_async()

    async def close(self) -> None:
        await self.app.close_async()

    async def setup(self) -> None:
        await self.app.schema_manager.apply_schema_async()

    async def enqueue_bulk(self, batch: list[dict[str, Any]]) -> None:
        await self.task.batch_defer_async(*batch)

    async def enqueue_one(self, args: dict[str, Any]) -> None:
        await self.task.defer_async(**args)

    async def enqueue_times(self) -> dict[int, datetime]:
        # The 'deferred' event row is written by a trigger on the job's INSERT;
        # its time defaults to now(), the enqueue statement's start.
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(
                "SELECT (j.args->>'i')::int, e.at FROM procrastinate_events AS e "
                "JOIN procrastinate_jobs AS j ON j.id = e.job_id WHERE e.type = 'deferred'"
            )
        finally:
            await conn.close()
        return {i: at for i, at in rows}

    async def run_worker(
        self, concurrency: int, job: JobFn, ready: Callable[[], None], stop: asyncio.Event
    ) -> None:
        self._job = job
        ready()
        running = asyncio.create_task(
            self.app.run_worker_async(concurrency=concurrency, install_signal_handlers=False)
        )
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([running, stopped], return_when=asyncio.FIRST_COMPLETED)
            running.cancel()  # procrastinate: a graceful stop (running jobs finish)
            with contextlib.suppress(asyncio.CancelledError):
                await running
        finally:
            stopped.cancel()

    async def check(self, conn: asyncpg.Connection, expected: int) -> list[str]:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded') "
            "AS succeeded, "
            "(SELECT count(DISTINCT args->>'i') FROM procrastinate_jobs "
            "WHERE status = 'succeeded') AS distinct_i, "
            "(SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded') AS other"
        )
        problems = []
        for key in ("succeeded", "distinct_i"):
            if row[key] != expected:
                problems.append(f"procrastinate_jobs {key} = {row[key]}, expected {expected}")
        if row["other"]:
            problems.append(f"procrastinate_jobs has {row['other']} job(s) not succeeded")
        return problems
