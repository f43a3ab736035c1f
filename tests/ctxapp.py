"""The App that tests of the job's context run in real worker processes.

CTXAPP_MODE says where ``ctx.pay`` stops for ever so that a test can kill its
worker there: ``in-transaction`` (inside ``ctx.transaction()``, its effect
written but not committed) or ``after-commit`` (the job committed, the task
not returned). CTXAPP_NAP overrides how long ``ctx.nap`` sleeps.
"""

from __future__ import annotations

import asyncio
import os
import time

import taskq

app = taskq.App()  # $TASKQ_DSN and $TASKQ_SCHEMA
_MODE = os.environ.get("CTXAPP_MODE", "")

EFFECTS_SQL = """
CREATE TABLE IF NOT EXISTS {schema}.effects (
    order_id integer NOT NULL,
    job_id   bigint  NOT NULL,
    attempt  integer NOT NULL,
    pid      integer NOT NULL
)
"""


@app.task(name="ctx.pay", retry=taskq.Retry(attempts=5, wait=0))
async def pay(order: int, ctx: taskq.JobContext) -> str:
    async with ctx.transaction() as conn:
        await conn.execute(
            f'INSERT INTO "{app.schema}".effects (order_id, job_id, attempt, pid) '
            "VALUES ($1, $2, $3, $4)",
            order,
            ctx.id,
            ctx.attempt,
            os.getpid(),
        )
        if _MODE == "in-transaction":
            print(f"in transaction: job {ctx.id}", flush=True)
            await asyncio.sleep(3600)
    if _MODE == "after-commit":
        print(f"committed: job {ctx.id}", flush=True)
        await asyncio.sleep(3600)
    return f"paid order {order}"


@app.task(name="ctx.nap")
def nap(seconds: float) -> float:
    """A sync task: it sleeps in its thread, which nothing can interrupt."""
    print(f"nap started: pid {os.getpid()}", flush=True)
    time.sleep(float(os.environ.get("CTXAPP_NAP", seconds)))
    print("nap done", flush=True)
    return seconds


@app.task(name="ctx.stubborn")
async def stubborn() -> None:
    """Ignores every cancellation: only the process's exit ends it."""
    print("stubborn started", flush=True)
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            print("stubborn ignores its cancellation", flush=True)
