"""The example's tasks, in a module that the views and the workers both import."""

import asyncio
import os

import taskq

app = taskq.App()  # $TASKQ_DSN, or the embedded Postgres when it is unset


@app.task(queue="emails", retry=taskq.Retry(attempts=3), timeout=30)
async def send_welcome(user_id: int) -> dict[str, int]:
    await asyncio.sleep(0.5)  # call your mail provider here
    return {"user_id": user_id, "pid": os.getpid()}
