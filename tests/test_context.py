"""The job inside the task: a parameter annotated taskq.JobContext, progress, cancellation.

``ctx.transaction()`` is tested in test_transaction.py, and with real worker
processes killed inside and after it in test_exactly_once.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import date
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import taskq

from .conftest import PYTHON, subprocess_env

if TYPE_CHECKING:
    from taskq import JobContext

pytestmark = pytest.mark.anyio


async def sql(app: taskq.App, query: str, *args: Any) -> Any:
    async with app.pool.acquire() as c:
        return await c.fetchval(query.replace("{s}", f'"{app.schema}"'), *args)


async def wait_until(predicate: Any, timeout: float = 10.0) -> Any:
    with anyio.fail_after(timeout):
        while not (value := await predicate()):
            await anyio.sleep(0.02)
    return value


async def test_a_task_receives_its_jobs_context(app: taskq.App) -> None:
    @app.task(queue="books", retry=taskq.Retry(attempts=4))
    async def look(n: int, ctx: taskq.JobContext) -> dict[str, Any]:
        assert ctx.lease_deadline is not None
        return {
            "n": n,
            "id": ctx.id,
            "task": ctx.task,
            "queue": ctx.queue,
            "attempt": ctx.attempt,
            "max_attempts": ctx.max_attempts,
            "meta": ctx.meta,
            "args": ctx.args,
            "cancelled": ctx.cancelled,
            "lease_left": ctx.lease_deadline - time.monotonic(),
        }

    async with app:
        job = await look.options(meta={"trace": "abc"}).enqueue(n=7)
        await app.drain(lease_seconds=20)
        seen = await job.result(timeout=5)
    assert seen["n"] == 7
    assert (seen["id"], seen["task"], seen["queue"]) == (job.id, look.name, "books")
    assert (seen["attempt"], seen["max_attempts"]) == (1, 4)
    assert seen["meta"] == {"trace": "abc"}
    assert seen["args"] == {"n": 7}  # the job's arguments, without the context
    assert seen["cancelled"] is False
    assert 0 < seen["lease_left"] <= 20


async def test_the_context_parameter_is_found_under_any_name_and_spelling(
    app: taskq.App,
) -> None:
    # This module has `from __future__ import annotations`: every annotation
    # below is a string, and JobContext itself is imported for type checkers only.
    @app.task
    async def a(job: JobContext, n: int) -> int:
        return job.attempt + n

    @app.task
    def b(n: int, context: taskq.JobContext | None = None) -> int:
        assert context is not None
        return context.attempt + n

    @app.task
    async def c(n: int) -> int:
        return n

    assert (a.context_parameter, b.context_parameter, c.context_parameter) == (
        "job",
        "context",
        None,
    )
    async with app:
        jobs = [await a.enqueue(1), await b.enqueue(n=2), await c.enqueue(3)]
        await app.drain()
        assert [await j.result(timeout=5) for j in jobs] == [2, 3, 3]


async def test_the_context_is_not_an_argument_of_the_job(app: taskq.App) -> None:
    @app.task
    async def ship(when: date, ctx: taskq.JobContext, copies: int = 1) -> date:
        assert isinstance(when, date)  # typed arguments still decoded around it
        return when

    async with app:
        job = await ship.enqueue(date(2027, 3, 2))
        assert (await job.status()).args == {"when": "2027-03-02"}
        with pytest.raises(TypeError, match="'ctx' receives the job's context"):
            await ship.enqueue(date(2027, 3, 2), ctx=None)
        with pytest.raises(TypeError, match="'ctx' receives the job's context"):
            await ship.enqueue_many([{"when": date(2027, 3, 2), "ctx": None}])
        with pytest.raises(TypeError, match="'ctx' receives the job's context"):
            await app.enqueue(ship.name, {"when": "2027-03-02", "ctx": 1})
        with pytest.raises(TypeError, match="too many positional arguments"):
            await ship.enqueue(date(2027, 3, 2), 2, 3)
        await app.drain()
        assert await job.result(timeout=5) == date(2027, 3, 2)


def test_a_task_called_directly_is_the_plain_function(app: taskq.App) -> None:
    @app.task
    def greet(name: str, ctx: taskq.JobContext | None = None) -> str:
        return f"hello {name}" + ("" if ctx is None else f" from job {ctx.id}")

    @app.task
    def needs(name: str, ctx: taskq.JobContext) -> str:
        ctx.progress(0.5)  # a context made by hand checks, and records nothing
        return f"{name} {ctx.id} {ctx.cancelled} {ctx.lease_deadline}"

    hand_made = taskq.JobContext(
        id=1, task="t", queue="q", attempt=1, max_attempts=1, priority=0, args={}, meta={},
        worker_id="test",
    )  # fmt: skip
    assert greet("ada") == "hello ada"
    assert greet("ada", ctx=hand_made) == "hello ada from job 1"
    assert needs("ada", hand_made) == "ada 1 False None"
    with pytest.raises(TypeError):
        needs("ada")  # type: ignore[call-arg]
    with pytest.raises(RuntimeError, match="made by hand"):
        hand_made.transaction()


def test_two_context_parameters_are_refused(app: taskq.App) -> None:
    with pytest.raises(taskq.ConfigurationError, match="a task receives one context"):

        @app.task
        async def twice(a: taskq.JobContext, b: taskq.JobContext) -> None: ...


async def test_hooks_middleware_and_the_task_see_one_context(app: taskq.App) -> None:
    contexts: list[taskq.JobContext] = []

    @app.middleware
    async def around(ctx: taskq.JobContext, call_next: Any) -> Any:
        contexts.append(ctx)
        ctx.state["from middleware"] = True
        return await call_next()

    @app.after_job
    def after(ctx: taskq.JobContext, outcome: taskq.JobOutcome) -> None:
        contexts.append(ctx)

    @app.task
    async def inside(ctx: taskq.JobContext) -> bool:
        contexts.append(ctx)
        return bool(ctx.state["from middleware"])

    async with app:
        job = await inside.enqueue()
        await app.drain()
        assert await job.result(timeout=5) is True
    assert len(contexts) == 3
    assert contexts[0] is contexts[1] is contexts[2]


async def test_progress_is_visible_coalesced_and_flushed_before_the_outcome(
    app: taskq.App,
) -> None:
    release = anyio.Event()

    @app.task
    async def crunch(steps: int, ctx: taskq.JobContext) -> int:
        await ctx.progress(0.25, "warming up")
        await release.wait()
        for i in range(1, steps + 1):  # a tight loop: one write a second at most
            await ctx.progress(i / steps, f"step {i} of {steps}")
        return steps

    async with app:
        # Count the writes of progress that reach the job's row.
        await sql(app, "CREATE TABLE {s}.progress_writes (at timestamptz)")
        await sql(
            app,
            "CREATE FUNCTION {s}.count_progress() RETURNS trigger LANGUAGE plpgsql AS "
            "$$BEGIN INSERT INTO {s}.progress_writes VALUES (clock_timestamp()); "
            "RETURN NEW; END$$",
        )
        await sql(
            app,
            "CREATE TRIGGER count_progress BEFORE UPDATE OF progress ON {s}.jobs "
            "FOR EACH ROW EXECUTE FUNCTION {s}.count_progress()",
        )
        job = await crunch.enqueue(steps=50_000)
        async with app.worker():
            # Visible while the job runs.
            running = await wait_until(lambda: _status_with_progress(job), timeout=10)
            assert running.state is taskq.JobState.RUNNING
            assert running.progress["fraction"] == 0.25
            assert running.progress["message"] == "warming up"
            assert running.progress["at"]
            started = time.monotonic()
            release.set()
            assert await job.result(timeout=30) == 50_000
            elapsed = time.monotonic() - started
        status = await job.status()
        writes = await sql(app, "SELECT count(*) FROM {s}.progress_writes")
    # The last value reported was written before the outcome, and went to history.
    assert status.progress is not None
    assert status.progress["fraction"] == 1.0
    assert status.progress["message"] == "step 50000 of 50000"
    # 50,001 reports; at most one write a second, plus the first and the last.
    assert 2 <= writes <= 3 + elapsed, (writes, elapsed)


async def _status_with_progress(job: taskq.Job) -> taskq.JobStatus | None:
    status = await job.status()
    return status if status.progress else None


async def test_progress_is_fenced_by_the_lease(
    app: taskq.App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="taskq.worker")
    taken = anyio.Event()
    done = anyio.Event()

    @app.task
    async def report(ctx: taskq.JobContext) -> None:
        await ctx.progress(0.1, "mine")
        await taken.wait()
        await ctx.progress(0.9, "no longer mine")
        await done.wait()

    async with app:
        job = await report.enqueue()
        async with app.worker(shutdown_timeout=5):
            await wait_until(lambda: _status_with_progress(job))
            # Another worker's lease now (as after a rescue and a new claim).
            await sql(
                app, "UPDATE {s}.jobs SET lease_token = gen_random_uuid() WHERE id = $1", job.id
            )
            taken.set()
            await wait_until(
                lambda: _logged(caplog, "progress not recorded, the lease is no longer held")
            )
            done.set()
        status = await job.status()
    assert status.state is taskq.JobState.RUNNING  # still the other lease's
    assert status.progress is not None
    assert (status.progress["fraction"], status.progress["message"]) == (0.1, "mine")


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def test_a_sync_task_gets_the_same_context_and_sees_its_cancellation(
    app: taskq.App,
) -> None:
    started = threading.Event()
    saw: list[str] = []

    @app.task
    def long_loop(ctx: taskq.JobContext) -> str:
        ctx.progress(0.5, "half way, from a thread")
        started.set()
        deadline = time.monotonic() + 20
        while not ctx.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        saw.append(f"cancelled={ctx.cancelled}")
        try:
            ctx.transaction()
        except RuntimeError as exc:
            saw.append(str(exc))
        return "ended"

    async with app:
        job = await long_loop.enqueue()
        async with app.worker():
            await anyio.to_thread.run_sync(started.wait, 10)
            await wait_until(lambda: _status_with_progress(job))
            assert await job.cancel() is True
            with pytest.raises(taskq.JobCancelled):
                await job.result(timeout=10)
            await wait_until(lambda: _true(len(saw) == 2))
        status = await job.status()
    assert saw[0] == "cancelled=True"
    assert "ctx.transaction() is for async def tasks" in saw[1]
    assert status.progress is not None
    assert status.progress["message"] == "half way, from a thread"


async def _true(value: bool) -> bool:
    return value


async def test_a_timeout_marks_the_context_cancelled(app: taskq.App) -> None:
    seen = threading.Event()

    @app.task(timeout=0.2, retry=False)
    def slow(ctx: taskq.JobContext) -> None:
        deadline = time.monotonic() + 10
        while not ctx.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        if ctx.cancelled:
            seen.set()

    async with app:
        job = await slow.enqueue()
        await app.drain()
        with pytest.raises(taskq.JobFailed, match="TimeoutError"):
            await job.result(timeout=5)
        assert await anyio.to_thread.run_sync(seen.wait, 10)


async def test_bad_progress_values_are_refused_in_the_task(app: taskq.App) -> None:
    @app.task(retry=False)
    async def bad(fraction: float, ctx: taskq.JobContext) -> None:
        await ctx.progress(fraction)

    async with app:
        jobs = [await bad.enqueue(1.5), await bad.enqueue(-0.1)]
        await app.drain()
        for job in jobs:
            with pytest.raises(taskq.JobFailed, match="fraction must be a number from 0 to 1"):
                await job.result(timeout=5)


async def test_sync_tasks_keep_their_context_variables(app: taskq.App) -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    @app.middleware
    async def set_var(ctx: taskq.JobContext, call_next: Any) -> Any:
        var.set(f"job {ctx.id}")
        return await call_next()

    @app.task
    def read() -> str:
        return var.get()

    async with app:
        job = await read.enqueue()
        await app.drain()
        assert await job.result(timeout=5) == f"job {job.id}"


async def test_an_abandoned_thread_does_not_hold_up_the_event_loop(app: taskq.App) -> None:
    # A sync task that times out keeps running in its daemon thread; the
    # worker goes on, and a later job reuses no busy thread.
    gate = threading.Event()

    @app.task(timeout=0.1, retry=False)
    def stuck() -> None:
        gate.wait(10)

    @app.task
    def quick() -> int:
        return threading.current_thread().daemon

    async with app:
        a = await stuck.enqueue()
        b = await quick.enqueue()
        await app.drain(concurrency=1)
        with pytest.raises(taskq.JobFailed):
            await a.result(timeout=5)
        assert await b.result(timeout=5) == 1  # daemon threads: the process never waits
        gate.set()
        await asyncio.sleep(0)


async def test_jobs_show_prints_the_progress_a_task_reported(
    app: taskq.App, pg_dsn: str, schema: str
) -> None:
    @app.task
    def copy(files: int, ctx: taskq.JobContext) -> int:
        for n in range(1, files + 1):
            ctx.progress(n / files, f"copied {n} of {files} files")
        return files

    async with app:
        job = await copy.enqueue(files=5)
        await app.drain()
    shown = await anyio.run_process(
        [PYTHON, "-m", "taskq", "jobs", "show", str(job.id)],
        env=subprocess_env(pg_dsn, TASKQ_SCHEMA=schema),
    )
    out = shown.stdout.decode()
    assert "100% copied 5 of 5 files (at " in out, out
