"""The App that the fair-sharing tests run in worker processes.

`python -m taskq worker fairapp:app`; DSN and schema from $TASKQ_DSN and $TASKQ_SCHEMA.
"""

from __future__ import annotations

import anyio

import taskq

app = taskq.App()


@app.task(name="fair.work", queue="fair", retry=False)
async def work(tenant: str, seconds: float = 0.0) -> str:
    await anyio.sleep(seconds)
    return tenant
