"""The tasks of the aiohttp example, in a module that the web app and workers both import.

The web app (``main.py``) enqueues them and runs a worker in its own process;
``python -m taskq worker tasks:app`` run from this directory serves them too.
Every result carries the id of the process that ran the job.
"""

import asyncio
import os

import taskq

app = taskq.App()  # $TASKQ_DSN, or the embedded Postgres when it is unset


@app.task(queue="emails", retry=taskq.Retry(attempts=3), timeout=30)
async def send_welcome(user_id: int) -> dict[str, int]:
    await asyncio.sleep(0.01)  # call your mail provider here
    return {"user_id": user_id, "pid": os.getpid()}


@app.task(timeout=120)
async def build_report(seconds: float) -> dict[str, float]:
    await asyncio.sleep(seconds)  # stands in for slow work
    return {"seconds": seconds, "pid": os.getpid()}
