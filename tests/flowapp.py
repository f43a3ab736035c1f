"""The App that flow-control and cron tests run in worker processes.

`python -m taskq worker flowapp:app`; DSN and schema from $TASKQ_DSN and $TASKQ_SCHEMA.
"""

from __future__ import annotations

import os

import anyio

import taskq

app = taskq.App()


@app.task(name="flow.work", queue="limited", retry=False)
async def work(seconds: float = 0.0) -> int:
    await anyio.sleep(seconds)
    return os.getpid()


@app.task(name="flow.tick", queue="ticks", retry=False)
async def tick() -> int:
    return os.getpid()


if os.environ.get("FLOW_CRON"):
    app.add_cron(os.environ["FLOW_CRON"], tick, name="every-second")
