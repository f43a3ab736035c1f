"""The App of tests/test_multihost.py: what three worker "hosts" run.

Each host is a worker process in a network namespace and a UTS namespace of
its own, so ``socket.gethostname()`` names the host, and each job returns it:
the test reads from history which host ran what.

- ``mh.spread``: a short job (the spread over the hosts);
- ``mh.limited``: on a queue with a cluster-wide concurrency limit; it reads
  the database clock (``clock_timestamp()``) when its body starts and ends,
  so overlaps are measured on one clock for all hosts;
- ``mh.hold``: runs until the file ``$MH_FLAG`` exists (the test creates it
  after cutting a host off, so that host finishes its jobs while cut off);
- ``mh.tick``: a cron entry firing every second, on every host's scheduler;
  its job returns its slot (its due time).
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import taskq

app = taskq.App()  # $TASKQ_DSN and $TASKQ_SCHEMA
FLAG = Path(os.environ.get("MH_FLAG", "/nonexistent/mh-flag"))


@app.task(name="mh.spread", queue="mh-spread")
async def spread(n: int) -> str:
    await asyncio.sleep(0.1)
    return socket.gethostname()


async def _db_now() -> float:
    return float(await app.pool.fetchval("SELECT extract(epoch FROM clock_timestamp())"))


@app.task(name="mh.limited", queue="mh-limited")
async def limited(n: int) -> dict[str, Any]:
    start = await _db_now()
    await asyncio.sleep(0.3)
    return {"host": socket.gethostname(), "start": start, "end": await _db_now()}


@app.task(name="mh.hold", queue="mh-hold")
async def hold(n: int) -> str:
    while not await asyncio.to_thread(FLAG.exists):
        await asyncio.sleep(0.02)
    return socket.gethostname()


@app.cron("* * * * * *", name="mh.tick")
@app.task(name="mh.tick", queue="mh-cron")
async def tick(ctx: taskq.JobContext) -> dict[str, Any]:
    # A cron job is due at its slot; history does not keep the due time.
    slot = await app.pool.fetchval(
        f'SELECT extract(epoch FROM run_at) FROM "{app.schema}".jobs WHERE id = $1', ctx.id
    )
    return {"host": socket.gethostname(), "slot": float(slot)}
