"""Exactly-once effects with ctx.transaction(), with real worker processes SIGKILLed.

The task (tests/ctxapp.py, ``ctx.pay``) writes one effect row per run inside
``ctx.transaction()``. A worker is killed while its jobs sit inside the
transaction (written, not committed), or after the commit (the task not
returned); a second worker then runs whatever is left. In the end every
order has exactly one effect, and a committed job never runs again.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import taskq

from .conftest import until
from .ctxapp import EFFECTS_SQL
from .worker_process import WorkerProcess

pytestmark = pytest.mark.anyio

LEASE = "2"  # seconds: a killed worker's jobs are rescued a few seconds later
ORDERS = 5


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(dsn: str, schema: str, mode: str = "") -> WorkerProcess:
        w = WorkerProcess(
            dsn,
            schema,
            "ctxapp:app",
            tmp_path / f"worker{len(started)}.log",
            "--concurrency",
            str(ORDERS),
            "--lease-seconds",
            LEASE,
            "--poll-interval",
            "0.5",
            CTXAPP_MODE=mode,
        )
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


async def prepare(dsn: str, schema: str) -> tuple[taskq.App, list[taskq.Job]]:
    app = taskq.App(dsn, schema=schema)
    app.task(name="ctx.pay", retry=taskq.Retry(attempts=5, wait=0))(lambda order: order)
    await app.open()
    async with app.pool.acquire() as c:
        await c.execute(EFFECTS_SQL.format(schema=f'"{schema}"'))
    jobs = await app.tasks["ctx.pay"].enqueue_many([{"order": n} for n in range(ORDERS)])
    return app, jobs


async def rows(app: taskq.App, query: str, *args: Any) -> list[Any]:
    async with app.pool.acquire() as c:
        return list(await c.fetch(query.replace("{s}", f'"{app.schema}"'), *args))


async def effects_per_order(app: taskq.App) -> dict[int, int]:
    found = await rows(app, "SELECT order_id, count(*) AS n FROM {s}.effects GROUP BY order_id")
    return {r["order_id"]: r["n"] for r in found}


async def wait_for_all(app: taskq.App, jobs: list[taskq.Job], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for job in jobs:
        await job.result(timeout=max(0.1, deadline - time.monotonic()))


async def test_a_worker_killed_inside_the_transaction_did_nothing_and_the_jobs_run_again(
    pg_dsn: str, schema: str, workers: Callable[..., WorkerProcess]
) -> None:
    app, jobs = await prepare(pg_dsn, schema)
    try:
        doomed = workers(pg_dsn, schema, mode="in-transaction")
        for job in jobs:  # each wrote its effect and waits before the commit
            doomed.wait_for_output(f"in transaction: job {job.id}")
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(10)
        # Killed before the commit: no effect happened, the jobs are still
        # running under the dead worker's leases.
        assert await effects_per_order(app) == {}
        states = await rows(app, "SELECT state FROM {s}.jobs")
        assert [r["state"] for r in states] == ["running"] * ORDERS

        workers(pg_dsn, schema)  # rescues them once their leases expire, and runs them
        await wait_for_all(app, jobs, timeout=60)
        assert await effects_per_order(app) == dict.fromkeys(range(ORDERS), 1)

        async def results_written() -> bool:
            # A job reads as succeeded from its commit on; its result is
            # written a moment later, when the task returns (docs/guarantees.md).
            return all([(await job.status()).result is not None for job in jobs])

        await until(results_written, 30, "the results written after the commits")
        for job in jobs:
            status = await job.status()
            assert (status.state, status.attempts) == (taskq.JobState.SUCCEEDED, 2)
            assert status.result == f"paid order {status.args['order']}"
            assert status.errors[-1]["type"] == "taskq.LeaseExpired"
        # Each effect is the second attempt's, in the second process.
        attempts = await rows(app, "SELECT DISTINCT attempt, pid FROM {s}.effects")
        assert [r["attempt"] for r in attempts] == [2]
        assert attempts[0]["pid"] != doomed.proc.pid
    finally:
        await app.close()


async def test_a_worker_killed_after_the_commit_leaves_the_jobs_done_for_good(
    pg_dsn: str, schema: str, workers: Callable[..., WorkerProcess]
) -> None:
    app, jobs = await prepare(pg_dsn, schema)
    try:
        doomed = workers(pg_dsn, schema, mode="after-commit")
        for job in jobs:  # each committed and waits before returning
            doomed.wait_for_output(f"committed: job {job.id}")
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(10)
        assert await effects_per_order(app) == dict.fromkeys(range(ORDERS), 1)
        for job in jobs:
            status = await job.status()
            assert (status.state, status.attempts) == (taskq.JobState.SUCCEEDED, 1)
            assert status.result is None  # the task never returned a value
        assert await rows(app, "SELECT id FROM {s}.jobs") == []

        # A live worker for longer than the dead one's leases and several
        # rescues: nothing to rescue, nothing runs again.
        survivor = workers(pg_dsn, schema)
        survivor.wait_for_output("started: concurrency")
        await asyncio.sleep(3 * float(LEASE))
        assert survivor.proc.poll() is None
        assert await effects_per_order(app) == dict.fromkeys(range(ORDERS), 1)
        for job in jobs:
            status = await job.status()
            assert (status.state, status.attempts) == (taskq.JobState.SUCCEEDED, 1)
        # Every effect is the first attempt's, committed by the killed process.
        attempts = await rows(app, "SELECT DISTINCT attempt, pid FROM {s}.effects")
        assert [(r["attempt"], r["pid"]) for r in attempts] == [(1, doomed.proc.pid)]
    finally:
        await app.close()
