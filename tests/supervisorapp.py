"""The App that `worker --processes` tests run: jobs write a ledger row with their pid.

SUP_CRASH=1 makes every supervised child (one that has $TASKQ_WORKER_INDEX)
fail at import, while the supervisor itself imports this module fine.
"""

from __future__ import annotations

import os

import anyio

import taskq

if os.environ.get("SUP_CRASH") == "1" and os.environ.get("TASKQ_WORKER_INDEX"):
    raise RuntimeError("supervisorapp: crashing at import, as asked")

app = taskq.App()  # $TASKQ_DSN and $TASKQ_SCHEMA


async def ledger(n: int, event: str) -> None:
    async with app.pool.acquire() as conn:
        await conn.execute(
            f'INSERT INTO "{app.schema}".ledger (n, event, pid) VALUES ($1, $2, $3)',
            n,
            event,
            os.getpid(),
        )


@app.task(name="sup.work", retry=taskq.Retry(attempts=5, wait=0))
async def work(n: int, seconds: float = 0.0) -> int:
    await ledger(n, "start")
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await ledger(n, "cancelled")
        raise
    await ledger(n, "done")
    return os.getpid()


if os.environ.get("TASKQ_WORKER_INDEX") == "1":
    # Only the child in slot 1 has this task, so only it claims these jobs
    # (the slot an autoscaler's shrink drains first when there are two).
    app.task(name="sup.hold", retry=taskq.Retry(attempts=5, wait=0))(work.fn)


LEDGER_SQL = """
CREATE TABLE IF NOT EXISTS {schema}.ledger (
    n     integer     NOT NULL,
    event text        NOT NULL,
    pid   integer     NOT NULL,
    at    timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""
