"""ctx.transaction(): the task's writes and the job's success commit together.

In-process here; test_exactly_once.py kills real worker processes inside and
after the transaction.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
import uuid
from typing import Any

import anyio
import pytest

import taskq
from taskq import testing
from taskq._store import ClaimedJob
from taskq.worker.state import RunningJob

from .conftest import PYTHON, ROOT, subprocess_env

pytestmark = pytest.mark.anyio


async def sql(app: taskq.App, query: str, *args: Any) -> Any:
    async with app.pool.acquire() as c:
        return await c.fetchval(query.replace("{s}", f'"{app.schema}"'), *args)


async def effects(app: taskq.App) -> int:
    return int(await sql(app, "SELECT count(*) FROM {s}.effects"))


async def make_effects(app: taskq.App) -> None:
    await sql(app, "CREATE TABLE {s}.effects (job_id bigint NOT NULL, attempt int NOT NULL)")


def effect_sql(app: taskq.App) -> str:
    return f'INSERT INTO "{app.schema}".effects (job_id, attempt) VALUES ($1, $2)'


async def test_the_effect_and_the_success_commit_together(app: taskq.App) -> None:
    @app.task
    async def pay(order: int, ctx: taskq.JobContext) -> str:
        await ctx.progress(0.5, "charging")
        async with ctx.transaction() as conn:
            await conn.execute(effect_sql(app), ctx.id, ctx.attempt)
            # The same connection sees the job still running, under its lease.
            assert (
                await conn.fetchval(f'SELECT state FROM "{app.schema}".jobs WHERE id = $1', ctx.id)
                == "running"
            )
            await ctx.progress(0.9, "written, committing")
        return f"paid {order}"

    async with app:
        await make_effects(app)
        job = await pay.enqueue(order=3)
        stats = await app.drain()
        assert await job.result(timeout=5) == "paid 3"
        status = await job.status()
        assert await effects(app) == 1
        # Nothing else was written back for the job: the transaction finished it.
        assert (stats.succeeded, stats.lost, stats.writebacks) == (1, 0, 0)
        assert await sql(app, "SELECT count(*) FROM {s}.jobs") == 0
    assert (status.state, status.attempts) == (taskq.JobState.SUCCEEDED, 1)
    # The last progress, reported inside the block, went to history with the job.
    assert status.progress is not None
    assert status.progress["message"] == "written, committing"


async def test_an_error_in_the_block_rolls_back_and_the_job_runs_again(app: taskq.App) -> None:
    @app.task(retry=taskq.Retry(attempts=3, wait=0))
    async def flaky(ctx: taskq.JobContext) -> int:
        async with ctx.transaction() as conn:
            await conn.execute(effect_sql(app), ctx.id, ctx.attempt)
            if ctx.attempt == 1:
                raise RuntimeError("card declined")
        return ctx.attempt

    async with app:
        await make_effects(app)
        job = await flaky.enqueue()
        await app.drain()
        assert await job.result(timeout=5) == 2
        assert await sql(app, "SELECT array_agg(attempt) FROM {s}.effects") == [2]
        status = await job.status()
    assert status.attempts == 2
    assert status.errors[0]["message"] == "card declined"


async def test_an_error_after_the_commit_leaves_the_job_succeeded(
    app: taskq.App, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes: list[taskq.JobOutcome] = []

    @app.after_job
    def seen(ctx: taskq.JobContext, outcome: taskq.JobOutcome) -> None:
        outcomes.append(outcome)

    @app.task(retry=taskq.Retry(attempts=3, wait=0))
    async def mail_after(ctx: taskq.JobContext) -> str:
        async with ctx.transaction() as conn:
            await conn.execute(effect_sql(app), ctx.id, ctx.attempt)
        raise ConnectionError("mail server down")

    async with app:
        await make_effects(app)
        job = await mail_after.enqueue()
        stats = await app.drain()
        assert await job.result(timeout=5) is None
        status = await job.status()
        assert await effects(app) == 1
    assert (status.state, status.attempts) == (taskq.JobState.SUCCEEDED, 1)
    assert (stats.succeeded, stats.failed, stats.retried) == (1, 0, 0)
    assert [o.kind for o in outcomes] == ["succeeded"]
    assert isinstance(outcomes[0].exception, ConnectionError)
    assert any(
        "raised after its transaction committed; it stays succeeded" in r.getMessage()
        and r.levelno == logging.WARNING
        for r in caplog.records
    )


async def test_a_waiter_gets_the_result_the_task_returns_after_the_commit(
    app: taskq.App,
) -> None:
    committed = anyio.Event()
    go_on = anyio.Event()

    @app.task
    async def slow_return(ctx: taskq.JobContext) -> dict[str, int]:
        async with ctx.transaction() as conn:
            await conn.execute(effect_sql(app), ctx.id, ctx.attempt)
        committed.set()
        await go_on.wait()
        return {"receipt": 42}

    async with app:
        await make_effects(app)
        job = await slow_return.enqueue()
        # Waiting since before the commit (a waiter that starts between the
        # commit and the return: tests/test_transaction_results.py).
        waiter = asyncio.ensure_future(job.result(timeout=20))
        await asyncio.sleep(0.3)
        async with app.worker():
            await committed.wait()
            # Committed: succeeded already, but the waiter hears of it only
            # once the result is written.
            assert (await job.status()).state is taskq.JobState.SUCCEEDED
            await asyncio.sleep(0.3)
            assert not waiter.done()
            go_on.set()
            assert await waiter == {"receipt": 42}
        assert (await job.status()).result == {"receipt": 42}


async def test_a_lease_lost_before_the_commit_rolls_back_and_cancels_the_task(
    app: taskq.App, caplog: pytest.LogCaptureFixture
) -> None:
    inside = anyio.Event()
    taken = anyio.Event()
    seen: list[str] = []

    @app.task
    async def late(ctx: taskq.JobContext) -> None:
        try:
            async with ctx.transaction() as conn:
                await conn.execute(effect_sql(app), ctx.id, ctx.attempt)
                inside.set()
                await taken.wait()
        except asyncio.CancelledError as exc:
            seen.append(str(exc))
            raise

    async with app:
        await make_effects(app)
        job = await late.enqueue()
        async with app.worker() as worker:
            await inside.wait()
            # A rescue and another claim, as if this worker had been cut off.
            await sql(
                app, "UPDATE {s}.jobs SET lease_token = gen_random_uuid() WHERE id = $1", job.id
            )
            taken.set()
            with anyio.fail_after(10):
                while worker.running_jobs:
                    await anyio.sleep(0.02)
            assert worker.stats.lost == 1
        assert await effects(app) == 0  # rolled back
        status = await job.status()
    assert status.state is taskq.JobState.RUNNING  # the other lease's now
    assert seen == [f"job {job.id}: lease lost before its transaction committed"]
    assert any("lease was lost before ctx.transaction() committed" in r.getMessage()
               for r in caplog.records)  # fmt: skip


async def test_one_transaction_per_attempt(app: taskq.App) -> None:
    @app.task(retry=False)
    async def twice(ctx: taskq.JobContext) -> None:
        async with ctx.transaction():
            pass
        ctx.transaction()

    async with app:
        job = await twice.enqueue()
        await app.drain()
        # The first one committed: the job is succeeded; the misuse is logged.
        assert (await job.status()).state is taskq.JobState.SUCCEEDED


async def test_a_cancel_while_in_the_transaction_rolls_it_back(app: taskq.App) -> None:
    inside = anyio.Event()

    @app.task
    async def wait_inside(ctx: taskq.JobContext) -> None:
        async with ctx.transaction() as conn:
            await conn.execute(effect_sql(app), ctx.id, ctx.attempt)
            inside.set()
            await asyncio.sleep(60)

    async with app:
        await make_effects(app)
        job = await wait_inside.enqueue()
        async with app.worker():
            await inside.wait()
            assert await job.cancel() is True
            with pytest.raises(taskq.JobCancelled):
                await job.result(timeout=10)
        assert await effects(app) == 0


async def test_run_job_reports_a_job_its_transaction_finished(app: taskq.App) -> None:
    @app.task
    async def done_inside(ctx: taskq.JobContext) -> str:
        async with ctx.transaction() as conn:
            await conn.execute(effect_sql(app), ctx.id, ctx.attempt)
        return "done"

    async with app:
        await make_effects(app)
        job = await done_inside.enqueue()
        status = await testing.run_job(job, app=app)
        assert (status.state, status.result) == (taskq.JobState.SUCCEEDED, "done")
        assert await effects(app) == 1


def test_the_exactly_once_example_runs(pg_dsn: str, schema: str) -> None:
    done = subprocess.run(
        [PYTHON, "exactly_once.py"],
        cwd=ROOT / "examples",
        env=subprocess_env(pg_dsn, TASKQ_SCHEMA=schema),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "paid 49.90",
        "succeeded, 1 payment, progress: recording the payment",
    ]


async def test_a_lease_renewal_during_the_commit_leaves_the_task_running(
    app: taskq.App, caplog: pytest.LogCaptureFixture
) -> None:
    """A renewal that finds the job gone because its own commit ended it is no lost lease.

    The renewal can land on the commit: it waits for the job's row, which the
    commit deletes. If its answer is read before the commit's, the job looks
    taken over; cancelling the task then would leave its result unwritten.
    While the commit is under way (``committing``), the lease keeper and the
    watchdog leave the job to it; any other job missing from the answer is lost.
    """
    async with app:
        worker = taskq.Worker(app, taskq.WorkerConfig.make(lease_seconds=30))
        state, keeper = worker._state, worker._leases  # the worker's own parts

        def gone_job(job_id: int, committing: bool) -> RunningJob:
            job = ClaimedJob(job_id, "t", "default", "{}", 1, 1, uuid.uuid4(), 0)
            running = RunningJob(job, time.monotonic() + 30)
            running.committing = committing
            state.running[job_id] = running
            return running

        committing = gone_job(10**12, committing=True)
        other = gone_job(10**12 + 1, committing=False)
        with caplog.at_level(logging.WARNING, logger="taskq"):
            await keeper.renew()
        assert committing.stop_reason is None
        assert other.stop_reason == "lost"
        assert caplog.text.count("lost its lease") == 1


async def test_a_waiter_woken_between_the_commit_and_the_result_gets_the_result(
    app: taskq.App,
) -> None:
    """Between its commit and its return the job reads as succeeded with no result.

    A waiter that re-reads it then (here: woken as after a reconnect of the
    listener, when announcements may have been lost) waits for the result's
    announcement instead of taking None.
    """
    committed = asyncio.Event()

    @app.task
    async def pay(ctx: taskq.JobContext) -> str:
        async with ctx.transaction():
            pass
        committed.set()
        await asyncio.sleep(1.0)  # the gap: succeeded, result not written yet
        return "paid"

    async with app:
        job = await pay.enqueue()
        waiter = asyncio.create_task(job.result(timeout=30))
        await asyncio.sleep(0.3)  # the waiter asked for the announcement
        async with app.worker(concurrency=1):
            await asyncio.wait_for(committed.wait(), 30)
            await asyncio.sleep(0.1)
            app.results._wake_all()  # what a reconnect of the listener does
            assert await waiter == "paid"
