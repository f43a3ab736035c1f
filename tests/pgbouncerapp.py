"""The App that tests/test_pgbouncer.py runs in worker processes behind PgBouncer.

The worker processes run ``pgbouncerapp:app`` (DSN, listen DSN and schema
from $TASKQ_DSN, $TASKQ_LISTEN_DSN and $TASKQ_SCHEMA); the test registers the
same tasks on its own App with ``register(app)`` to enqueue them and decode
their results. asyncpg's statement cache is off unless $PGBAPP_STATEMENT_CACHE
is set: behind transaction pooling a statement prepared on one server
connection would be executed on another.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import taskq

#: What every App behind PgBouncer needs (see docs/guides/pgbouncer.md).
CONNECT_KWARGS = {"statement_cache_size": 0}

EFFECTS_SQL = 'CREATE TABLE IF NOT EXISTS "{schema}".effects (order_id integer, job_id bigint)'


@dataclass(frozen=True)
class Tasks:
    add: taskq.Task[Any, Any]
    flaky: taskq.Task[Any, Any]
    nap: taskq.Task[Any, Any]
    pay: taskq.Task[Any, Any]
    square: taskq.Task[Any, Any]
    total: taskq.Task[Any, Any]
    tick: taskq.Task[Any, Any]


def register(app: taskq.App) -> Tasks:
    """Register the tasks, and a cron entry firing every second, on ``app``."""

    @app.task(name="pgb.add")
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task(name="pgb.flaky", retry=taskq.Retry(attempts=3, wait=0))
    async def flaky(ctx: taskq.JobContext) -> int:
        if ctx.attempt < 2:
            raise RuntimeError(f"attempt {ctx.attempt} fails")
        return ctx.attempt

    @app.task(name="pgb.nap", retry=taskq.Retry(attempts=1))
    async def nap(seconds: float, ctx: taskq.JobContext) -> float:
        print(f"nap started: job {ctx.id}", flush=True)
        await asyncio.sleep(seconds)
        return seconds

    @app.task(name="pgb.pay")
    async def pay(order: int, ctx: taskq.JobContext) -> str:
        async with ctx.transaction() as conn:
            await conn.execute(
                f'INSERT INTO "{app.schema}".effects (order_id, job_id) VALUES ($1, $2)',
                order,
                ctx.id,
            )
        return f"paid order {order}"

    @app.task(name="pgb.square")
    async def square(x: int) -> int:
        return x * x

    @app.task(name="pgb.total")
    async def total(parts: list[int]) -> int:
        return sum(parts)

    @app.cron("* * * * * *", name="pgb.tick")
    @app.task(name="pgb.tick", queue="cron")
    async def tick() -> int:
        return os.getpid()

    return Tasks(add, flaky, nap, pay, square, total, tick)


# PGBAPP_STATEMENT_CACHE=on: asyncpg's cache as by default (session mode allows it).
app = taskq.App(connect_kwargs={} if os.environ.get("PGBAPP_STATEMENT_CACHE") else CONNECT_KWARGS)
register(app)
