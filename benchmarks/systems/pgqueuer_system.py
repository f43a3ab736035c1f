"""pgqueuer 1.6.0 through its documented API, in its own virtualenv.

Producers use ``Queries(AsyncpgPoolDriver(pool)).enqueue(...)`` (lists for a
batch, scalars for one job); the worker is ``PgQueuer.run(...)`` with one
entrypoint. The schema is pgqueuer's own ``Queries.install()`` (what
``pgq install`` runs), at its default durability (every table logged).

A worker's concurrency is pgqueuer's per-process cap ``max_concurrent_tasks``
("a per-process safety ceiling on total asyncio tasks"; without it pgqueuer
keeps dequeuing until the queue is empty and runs everything at once). pgqueuer
refuses a ``batch_size`` above half of it, so at concurrency 10 a dequeue takes
at most 5 jobs. The two variants:

- ``defaults``: every setting at its default except that cap; ``batch_size`` is
  its default 10, lowered to half the concurrency where its rule requires
  (5 at concurrency 10); the worker on one asyncpg connection, as its
  performance guide advises for the QueueManager.
- ``tuned``: the best configuration found for a worker at concurrency N (see
  TUNED below and the report): the concurrency as a per-entrypoint
  ``concurrency_limit`` (N per worker process), which lifts the batch rule, so
  one dequeue claims every free slot (``batch_size`` = N) and outcomes are
  written back N at a time; the worker on an asyncpg pool (the guide's
  "for high-throughput deployments"); ``pgq autovac``'s table settings.

``$TASKQ_BENCH_PGQUEUER_TUNED`` (JSON, keys of :class:`Settings`) overrides the
tuned variant's settings, to try others.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from .base import JobFn, System, Venv

ENTRYPOINT = "bench"
TUNED_ENV = "TASKQ_BENCH_PGQUEUER_TUNED"


@dataclass(frozen=True)
class Settings:
    #: Jobs per dequeue, and outcomes per write-back (pgqueuer sizes its status
    #: buffer by it). 0: half the concurrency (the most pgqueuer allows under
    #: ``max_concurrent_tasks``); -1: the concurrency.
    batch_size: int = 10
    #: Cap the worker with ``max_concurrent_tasks`` (per process) ...
    per_process_cap: bool = True
    #: ... or with the entrypoint's ``concurrency_limit`` (enforced in SQL for all
    #: workers together: set to concurrency x worker processes).
    entrypoint_limit: bool = False
    #: Worker on an ``AsyncpgPoolDriver`` (else one connection, ``AsyncpgDriver``).
    pool: bool = False
    #: Apply ``pgq autovac`` (``Queries.optimize_autovacuum``) after install.
    autovac: bool = False

    def batch(self, concurrency: int) -> int:
        if self.batch_size == -1:
            size = concurrency
        elif self.batch_size == 0:
            size = concurrency // 2
        else:
            size = self.batch_size
        if self.per_process_cap:  # pgqueuer: max_concurrent_tasks >= 2 x batch_size
            size = min(size, concurrency // 2)
        return max(1, size)

    def describe(self, concurrency: int) -> str:
        cap = (
            f"`concurrency_limit={concurrency}` x processes on the entrypoint"
            if self.entrypoint_limit
            else f"`max_concurrent_tasks={concurrency}`"
        )
        return (
            f"{cap}, `batch_size={self.batch(concurrency)}`, "
            f"{'`AsyncpgPoolDriver` (pool of 10)' if self.pool else '`AsyncpgDriver` (one connection)'}"
            f"{', `pgq autovac`' if self.autovac else ''}; durability `durable` (default)"
        )


DEFAULTS = Settings()
TUNED = Settings(batch_size=-1, per_process_cap=False, entrypoint_limit=True, pool=True)


def settings_for(variant: str) -> Settings:
    if variant == "defaults":
        return DEFAULTS
    tuned = TUNED
    if override := os.environ.get(TUNED_ENV):
        tuned = replace(tuned, **json.loads(override))
    return tuned


class PgqueuerSystem(System):
    name = "pgqueuer"
    variants = {"defaults": "pgqueuer (defaults)", "tuned": "pgqueuer (tuned)"}
    venv = Venv("pgqueuer", "1.6.0", ("pgqueuer==1.6.0",))
    packages = ("pgqueuer", "asyncpg", "pydantic")
    unfinished_sql = "SELECT EXISTS (SELECT FROM pgqueuer)"
    backlog_sql = "SELECT count(*) FROM pgqueuer"

    @classmethod
    def describe(cls, variant: str, concurrency: int) -> str:
        return settings_for(variant).describe(concurrency)

    async def open(self) -> None:
        from pgqueuer.db import AsyncpgPoolDriver
        from pgqueuer.queries import Queries

        self.config = settings_for(self.variant)
        # Producers on a pool, as pgqueuer's performance guide advises.
        self._pool: asyncpg.Pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=10)
        self.queries = Queries(AsyncpgPoolDriver(self._pool))
        self._ids: dict[int, int] = {}  # job id -> i, for enqueue_times

    async def close(self) -> None:
        await self._pool.close()

    async def setup(self) -> None:
        await self.queries.install()
        if self.config.autovac:
            await self.queries.optimize_autovacuum()

    async def enqueue_bulk(self, batch: list[dict[str, Any]]) -> None:
        n = len(batch)
        await self.queries.enqueue([ENTRYPOINT] * n, [orjson.dumps(a) for a in batch], [0] * n)

    async def enqueue_one(self, args: dict[str, Any]) -> None:
        (job_id,) = await self.queries.enqueue(ENTRYPOINT, orjson.dumps(args))
        self._ids[job_id] = args["i"]

    async def enqueue_times(self) -> dict[int, datetime]:
        # The 'queued' log row is written by the enqueue statement itself; its
        # created defaults to now(), that statement's start on the database clock.
        rows = await self._pool.fetch(
            "SELECT job_id, created FROM pgqueuer_log WHERE status = 'queued'"
        )
        return {self._ids[job_id]: at for job_id, at in rows if job_id in self._ids}

    async def run_worker(
        self, concurrency: int, job: JobFn, ready: Callable[[], None], stop: asyncio.Event
    ) -> None:
        from pgqueuer import PgQueuer
        from pgqueuer.db import AsyncpgDriver, AsyncpgPoolDriver
        from pgqueuer.models import Job

        cfg = self.config
        pool: asyncpg.Pool | None = None
        conn: asyncpg.Connection | None = None
        if cfg.pool:
            pool = await asyncpg.create_pool(self.dsn, min_size=2, max_size=10)
            pgq = PgQueuer(AsyncpgPoolDriver(pool))
        else:
            conn = await asyncpg.connect(self.dsn)
            pgq = PgQueuer(AsyncpgDriver(conn))

        limit = concurrency * self.processes if cfg.entrypoint_limit else 0

        @pgq.entrypoint(ENTRYPOINT, concurrency_limit=limit, accepts_context=False)
        async def bench(j: Job) -> None:
            assert j.payload is not None
            await job(orjson.loads(j.payload)["i"])

        ready()
        running = asyncio.create_task(
            pgq.run(
                batch_size=cfg.batch(concurrency),
                max_concurrent_tasks=concurrency if cfg.per_process_cap else None,
            )
        )
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([running, stopped], return_when=asyncio.FIRST_COMPLETED)
            pgq.shutdown.set()  # stops dequeuing, lets running jobs finish, flushes
            await running
        finally:
            stopped.cancel()
            if pool is not None:
                await pool.close()
            if conn is not None:
                await conn.close()

    async def check(self, conn: asyncpg.Connection, expected: int) -> list[str]:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM pgqueuer) AS live, "
            "(SELECT count(*) FROM pgqueuer_log WHERE status = 'successful') AS succeeded, "
            "(SELECT count(DISTINCT job_id) FROM pgqueuer_log WHERE status = 'successful') "
            "AS distinct_jobs, "
            "(SELECT count(*) FROM pgqueuer_log WHERE status NOT IN ('queued', 'successful')) "
            "AS other"
        )
        problems = []
        if row["live"]:
            problems.append(f"pgqueuer still holds {row['live']} job(s)")
        for key in ("succeeded", "distinct_jobs"):
            if row[key] != expected:
                problems.append(f"pgqueuer_log {key} = {row[key]}, expected {expected}")
        if row["other"]:
            problems.append(f"pgqueuer_log has {row['other']} entries of other statuses")
        return problems

    @staticmethod
    def settings_json(variant: str) -> dict[str, Any]:
        return asdict(settings_for(variant))
