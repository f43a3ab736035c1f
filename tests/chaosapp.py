"""The App that the chaos runs (tests/test_chaos.py, benchmarks/chaos.py) start as workers.

Every run of a job records itself in ``chaos_runs`` (job number, kind, worker
pid, start and end on the database clock) through a pool of its own, apart
from taskq's connections and never in the job's transaction, so that what
ran, where, and whether it got to its end can be counted whatever happens to
the worker or to Postgres. Two tasks:

- ``chaos.work``: at least once. Its end is recorded after its sleep; a run
  whose outcome is lost runs again, and the runs table shows it.
- ``chaos.effect``: exactly once. It writes its effect (a row of
  ``chaos_effects``) with ``async with ctx.transaction() as conn``, which
  commits together with the job's success.

``CHAOS_SLEEP`` ("min:max" seconds) sets how long a job sleeps. Recording
connections use the application name ``chaos-recorder``, so that the chaos
driver can tell them from taskq's own when it terminates backends.
"""

from __future__ import annotations

import asyncio
import os
import random

import asyncpg

import taskq

app = taskq.App()  # $TASKQ_DSN and $TASKQ_SCHEMA
RECORDER = "chaos-recorder"
_low, _, _high = os.environ.get("CHAOS_SLEEP", "0.05:0.2").partition(":")
SLEEP = (float(_low), float(_high or _low))
# Every attempt is counted at its claim, including the ones a kill or an
# outage cut short: a generous budget keeps those from failing a job.
RETRY = taskq.Retry(attempts=1000, wait=0.1)

_pool: asyncpg.Pool | None = None
_pool_lock = asyncio.Lock()


async def _recorder() -> asyncpg.Pool:
    global _pool
    async with _pool_lock:
        if _pool is None:
            _pool = await asyncpg.create_pool(
                os.environ["TASKQ_DSN"],
                min_size=1,
                max_size=20,
                server_settings={"application_name": RECORDER},
            )
    return _pool


async def _started(n: int, kind: str) -> int:
    pool = await _recorder()
    async with pool.acquire() as conn:
        return int(
            await conn.fetchval(
                f'INSERT INTO "{app.schema}".chaos_runs (n, kind, pid) VALUES ($1, $2, $3) '
                "RETURNING id",
                n,
                kind,
                os.getpid(),
            )
        )


async def _ended(run: int) -> None:
    pool = await _recorder()
    async with pool.acquire() as conn:
        await conn.execute(
            f'UPDATE "{app.schema}".chaos_runs SET ended_at = clock_timestamp() WHERE id = $1',
            run,
        )


@app.task(name="chaos.work", retry=RETRY)
async def work(n: int) -> int:
    run = await _started(n, "work")
    await asyncio.sleep(random.uniform(*SLEEP))
    await _ended(run)
    return n


@app.task(name="chaos.effect", retry=RETRY)
async def effect(n: int, ctx: taskq.JobContext) -> int:
    run = await _started(n, "effect")
    await asyncio.sleep(random.uniform(*SLEEP))
    async with ctx.transaction() as conn:
        await conn.execute(
            f'INSERT INTO "{app.schema}".chaos_effects (n, run) VALUES ($1, $2)', n, run
        )
    await _ended(run)
    return n


TABLES = """
CREATE TABLE {schema}.chaos_runs (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    n          integer     NOT NULL,
    kind       text        NOT NULL,
    pid        integer     NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at   timestamptz
);
-- No unique constraint on purpose: a second effect of a job must be countable.
CREATE TABLE {schema}.chaos_effects (
    n   integer     NOT NULL,
    run bigint      NOT NULL,
    at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""
