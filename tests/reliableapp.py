"""The App that reliability tests run in real worker processes.

Every job writes ledger rows in their own transactions, so a test can count
what ran, what finished and what was cut short, whatever happened to the
worker process. RELIABLE_SLEEP sets how long each job runs in this process
("hang" = for ever).
"""

from __future__ import annotations

import os

import anyio

import taskq

app = taskq.App()  # $TASKQ_DSN and $TASKQ_SCHEMA
_SLEEP = os.environ.get("RELIABLE_SLEEP", "0")


async def ledger(n: int, event: str) -> None:
    async with app.pool.acquire() as conn:
        await conn.execute(
            f'INSERT INTO "{app.schema}".ledger (n, event, pid) VALUES ($1, $2, $3)',
            n,
            event,
            os.getpid(),
        )


@app.task(name="rel.work", retry=taskq.Retry(attempts=10, wait=0))
async def work(n: int) -> int:
    await ledger(n, "start")
    try:
        await anyio.sleep(3600 if _SLEEP == "hang" else float(_SLEEP))
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await ledger(n, "cancelled")
        raise
    await ledger(n, "done")
    return n


LEDGER_SQL = """
CREATE TABLE IF NOT EXISTS {schema}.ledger (
    n     integer     NOT NULL,
    event text        NOT NULL,
    pid   integer     NOT NULL,
    at    timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""
