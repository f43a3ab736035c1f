"""pgqueuer 1.6.0 through its documented API, in its own virtualenv.

Producers use ``Queries(AsyncpgPoolDriver(pool)).enqueue(...)`` (lists for a
batch, scalars for one job); the worker is ``PgQueuer.run(...)`` with one
entrypoint. The schema is pgqueuer's own ``Queries.install()`` (what
``pgq install`` runs), at its default durability (every table logged).

A worker's concurrency is pgqueuer's per-process cap ``max_concurrent_tasks``
("a per-process safety ceiling on total asyncio tasks"; without it pgqueuer
keeps dequeuing while jobs are queued and runs them all at once). pgqueuer
refuses a ``batch_size`` above half of it. The two variants:

- ``defaults``: every setting at its default but that cap: ``batch_size`` 10
  (lowered to 5 at concurrency 10, where its rule requires), the worker on one
  asyncpg connection (``AsyncpgDriver``, as its performance guide advises for
  the QueueManager).
- ``tuned``: the fastest configuration measured at the same concurrency:
  ``batch_size`` half the concurrency (the most it allows: 5 at 10, 500 at
  1,000) and the worker on an ``AsyncpgPoolDriver`` (the guide's "for
  high-throughput deployments"), so that dequeues and write-backs overlap.
  Measured and rejected (20,000-job drains at concurrency 10, median of 3):
  the per-entrypoint ``concurrency_limit`` instead of the cap, which lifts the
  batch rule (1,000-1,550 jobs/s against 1,970-2,140; at ``batch_size`` 20 it
  falls to 97 jobs/s, since its status buffer then waits out its 0.1 s timer),
  ``pgq autovac``'s table settings (slower), and no periodic log aggregation
  (no change).

``$TASKQ_BENCH_PGQUEUER_TUNED`` (JSON, fields of :class:`Settings`) overrides
the tuned variant's settings, to try others; the report shows those used.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, ClassVar

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
    #: Fold the log into statistics every 30 s (its default), or only on reads.
    log_aggregation: bool = True

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

    def describe(self, concurrencies: tuple[int, ...]) -> str:
        if self.entrypoint_limit:
            cap = "the entrypoint's `concurrency_limit` = concurrency x worker processes"
        elif self.per_process_cap:
            cap = "`max_concurrent_tasks` = the worker's concurrency"
        else:
            cap = "no concurrency cap"
        batches = " and ".join(f"{self.batch(n)} at concurrency {n:,}" for n in concurrencies)
        driver = (
            "`AsyncpgPoolDriver` (pool of 10)" if self.pool else "`AsyncpgDriver` (one connection)"
        )
        extras = [", `pgq autovac`"] if self.autovac else []
        extras += [", no periodic log aggregation"] if not self.log_aggregation else []
        return (
            f"{cap}, `batch_size` {batches}, worker on {driver}{''.join(extras)}; "
            "durability `durable` (its default)"
        )


DEFAULTS = Settings()
TUNED = Settings(batch_size=0, pool=True)


def settings_for(variant: str) -> Settings:
    if variant == "defaults":
        return DEFAULTS
    tuned = TUNED
    if override := os.environ.get(TUNED_ENV):
        tuned = replace(tuned, **json.loads(override))
    return tuned


class PgqueuerSystem(System):
    name = "pgqueuer"
    variants: ClassVar[dict[str, str]] = {
        "defaults": "pgqueuer (defaults)",
        "tuned": "pgqueuer (tuned)",
    }
    venv = Venv("pgqueuer", "1.6.0", ("pgqueuer==1.6.0",))
    packages = ("pgqueuer", "asyncpg", "pydantic")
    unfinished_sql = "SELECT EXISTS (SELECT FROM pgqueuer)"
    backlog_sql = "SELECT count(*) FROM pgqueuer"

    @classmethod
    def describe(cls, variant: str, concurrencies: tuple[int, ...]) -> str:
        return settings_for(variant).describe(concurrencies)

    @classmethod
    def jobs_share(cls, variant: str, workload: str) -> float:
        # At concurrency 1,000 its default batch of 10 drains about 900 jobs/s.
        return 0.25 if variant == "defaults" and workload == "E" else 1.0

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

        async def bench(j: Job) -> None:
            assert j.payload is not None
            await job(orjson.loads(j.payload)["i"])

        pgq.entrypoint(ENTRYPOINT, concurrency_limit=limit, accepts_context=False)(bench)

        ready()
        running = asyncio.create_task(
            pgq.run(
                batch_size=cfg.batch(concurrency),
                max_concurrent_tasks=concurrency if cfg.per_process_cap else None,
                **({} if cfg.log_aggregation else {"log_aggregation_interval": timedelta(0)}),
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
            "(SELECT count(*) FROM pgqueuer_log "
            "WHERE status NOT IN ('queued', 'picked', 'successful')) AS other"
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
