"""A small App that the CLI tests run with `python -m taskq worker workerapp:app`."""

from __future__ import annotations

import os

import anyio

import taskq

app = taskq.App()  # DSN and schema from $TASKQ_DSN and $TASKQ_SCHEMA


@app.task(name="cli.add", queue="math")
async def add(a: int, b: int) -> int:
    return a + b


@app.task(name="cli.pid")
async def pid() -> int:
    return os.getpid()


@app.task(name="cli.sleep", retry=taskq.Retry(attempts=1))
async def sleep(seconds: float) -> str:
    await anyio.sleep(seconds)
    return "slept"
