"""The App that tests/test_workflow_processes.py runs in real worker processes.

``register(app)`` puts the workflow tasks on an App: the worker processes run
``workflowapp:app`` (DSN and schema from $TASKQ_DSN and $TASKQ_SCHEMA), the
test registers the same tasks on its own App to build workflows and decode
their results. Steps write ledger rows on the App's pool, each committed on
its own and stamped with the database's clock, so a test can count what ran
where and when whatever happened to the process that ran it.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass
from typing import Any

import taskq

LEDGER_SQL = """
CREATE TABLE IF NOT EXISTS {schema}.ledger (
    job_id  bigint      NOT NULL,
    tag     text        NOT NULL,
    event   text        NOT NULL,
    attempt integer     NOT NULL,
    pid     integer     NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


@dataclass(frozen=True)
class Tasks:
    part: taskq.Task[Any, Any]
    join: taskq.Task[Any, Any]
    node: taskq.Task[Any, Any]
    collect: taskq.Task[Any, Any]
    split: taskq.Task[Any, Any]
    square: taskq.Task[Any, Any]
    reduce: taskq.Task[Any, Any]


def register(app: taskq.App) -> Tasks:
    """Register the workflow tasks on ``app``."""

    async def ledger(ctx: taskq.JobContext, tag: str, event: str) -> None:
        async with app.pool.acquire() as conn:
            await conn.execute(
                f'INSERT INTO "{app.schema}".ledger (job_id, tag, event, attempt, pid) '
                "VALUES ($1, $2, $3, $4, $5)",
                ctx.id,
                tag,
                event,
                ctx.attempt,
                os.getpid(),
            )

    @app.task(name="wf.part")
    async def part(i: int, ctx: taskq.JobContext) -> int:
        """One branch of a fan-out: a ledger row, then 0-5 ms so that ends interleave."""
        await ledger(ctx, f"part {i}", "run")
        await asyncio.sleep(random.random() * 0.005)
        return i * i

    @app.task(name="wf.join")
    async def join(parts: list[int], ctx: taskq.JobContext) -> list[int]:
        await ledger(ctx, "join", "run")
        return parts

    @app.task(name="wf.node", retry=taskq.Retry(attempts=3, wait=0))
    async def node(
        tag: str, base: int, inputs: list[int], seconds: float, ctx: taskq.JobContext
    ) -> int:
        """A step that takes a while: "start" when it begins, "done" before it returns."""
        await ledger(ctx, tag, "start")
        await asyncio.sleep(seconds)
        await ledger(ctx, tag, "done")
        return base + sum(inputs)

    @app.task(name="wf.collect")
    async def collect(parts: list[int], ctx: taskq.JobContext) -> list[int]:
        await ledger(ctx, "collect", "start")
        return parts

    @app.task(name="wf.split")
    async def split(n: int) -> list[int]:
        return list(range(n))

    @app.task(name="wf.square")
    async def square(x: int) -> int:
        return x * x

    @app.task(name="wf.reduce")
    async def reduce(parts: list[int]) -> list[int]:
        return parts

    return Tasks(part, join, node, collect, split, square, reduce)


app = taskq.App()  # $TASKQ_DSN and $TASKQ_SCHEMA
tasks = register(app)
