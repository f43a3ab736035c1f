"""Hooks and middleware around jobs and enqueues, job metadata, structured logs."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import threading
from typing import Any

import anyio
import pytest

import taskq

pytestmark = pytest.mark.anyio

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


async def test_meta_travels_with_the_job_into_hooks_status_and_history(app: taskq.App) -> None:
    seen: list[dict[str, Any]] = []

    @app.task(retry=taskq.Retry(attempts=2, wait=0))
    async def flaky(n: int) -> int:
        if n == 0:
            raise ValueError("first attempt fails")
        return n

    @app.before_job
    def remember(ctx: taskq.JobContext) -> None:
        seen.append(dict(ctx.meta))

    async with app:
        job = await flaky.options(meta={"tenant": "acme", "n": [1, 2]}).enqueue(n=0)
        assert (await job.status()).meta == {"tenant": "acme", "n": [1, 2]}
        plain = await flaky.enqueue(n=5)
        assert (await plain.status()).meta == {}
        await app.drain()
        # The retry carried it too, and history keeps it.
        assert seen.count({"tenant": "acme", "n": [1, 2]}) == 2
        done = await job.status()
        assert done.state is taskq.JobState.FAILED
        assert done.meta == {"tenant": "acme", "n": [1, 2]}
        # A re-run dead letter keeps its meta.
        assert await job.retry()
        assert (await job.status()).meta == {"tenant": "acme", "n": [1, 2]}
        by_name = await app.enqueue(flaky.name, {"n": 1}, meta={"via": "name"})
        many = await flaky.options(meta={"batch": 7}).enqueue_many([{"n": 1}, {"n": 2}])
        unique = await flaky.options(meta={"u": True}, unique_key="k").enqueue(n=3)
        assert (await by_name.status()).meta == {"via": "name"}
        assert [(await j.status()).meta for j in many] == [{"batch": 7}, {"batch": 7}]
        assert (await unique.status()).meta == {"u": True}
        assert (await app.get_job(job.id).status()).to_dict()["meta"] == {
            "tenant": "acme",
            "n": [1, 2],
        }


async def test_bad_meta_is_refused_and_nothing_is_written(app: taskq.App) -> None:
    @app.task
    async def noop() -> None:
        return None

    async with app:
        with pytest.raises(taskq.SerializationError, match="meta"):
            await noop.options(meta={"when": object()}).enqueue()
        with pytest.raises(taskq.ConfigurationError, match="meta must be a mapping"):
            noop.options(meta=["not", "a", "mapping"])  # type: ignore[arg-type]
        with pytest.raises(taskq.ConfigurationError, match="string keys"):
            noop.options(meta={1: "x"})  # type: ignore[dict-item]
        counts = await app.queue_counts()
        assert counts == []


async def test_before_job_context_reaches_async_and_sync_tasks(app: taskq.App) -> None:
    @app.task
    async def async_task() -> str:
        return request_id.get()

    @app.task
    def sync_task() -> list[str]:
        return [request_id.get(), threading.current_thread().name]

    @app.before_job
    async def set_request_id(ctx: taskq.JobContext) -> None:
        request_id.set(f"job-{ctx.id}")

    async with app:
        a = await async_task.enqueue()
        s = await sync_task.enqueue()
        await app.drain()
        assert await a.result(timeout=5) == f"job-{a.id}"
        value, thread = await s.result(timeout=5)
        # The sync task ran in a worker thread and still saw the context.
        assert value == f"job-{s.id}"
        assert thread != threading.main_thread().name
    # Nothing leaked into the test's own context.
    assert request_id.get() == "-"


async def test_middleware_wraps_the_call_in_order_and_may_change_the_result(
    app: taskq.App,
) -> None:
    trail: list[str] = []

    @app.task
    async def double(n: int) -> int:
        trail.append("task")
        return n * 2

    @app.middleware
    async def outer(ctx: taskq.JobContext, call_next: Any) -> Any:
        trail.append("outer in")
        value = await call_next()
        trail.append("outer out")
        return {"wrapped": value, "attempt": ctx.attempt, "args": ctx.args}

    @app.middleware
    async def inner(ctx: taskq.JobContext, call_next: Any) -> Any:
        trail.append("inner in")
        value = await call_next()
        trail.append("inner out")
        return value + 1

    async with app:
        job = await double.enqueue(n=20)
        await app.drain()
        assert await job.result(timeout=5) == {"wrapped": 41, "attempt": 1, "args": {"n": 20}}
    assert trail == ["outer in", "inner in", "task", "inner out", "outer out"]


async def test_a_raising_middleware_or_before_hook_fails_the_attempt(app: taskq.App) -> None:
    @app.task(retry=taskq.Retry(attempts=2, wait=0))
    async def guarded(tenant: str) -> str:
        return tenant

    @app.before_job
    def only_known_tenants(ctx: taskq.JobContext) -> None:
        if ctx.args["tenant"] == "evil":
            raise PermissionError("unknown tenant")

    @app.middleware
    async def refuse_second(ctx: taskq.JobContext, call_next: Any) -> Any:
        if ctx.args["tenant"] == "late" and ctx.attempt == 1:
            raise RuntimeError("not yet")
        return await call_next()

    async with app:
        evil = await guarded.enqueue(tenant="evil")
        late = await guarded.enqueue(tenant="late")
        await app.drain()
        with pytest.raises(taskq.JobFailed) as failed:
            await evil.result(timeout=5)
        assert "PermissionError" in str(failed.value)
        assert (await evil.status()).attempts == 2
        # The middleware refused attempt 1 only: the retry policy ran it again.
        assert await late.result(timeout=5) == "late"
        assert (await late.status()).attempts == 2


async def test_after_job_and_on_failure_see_every_outcome(app: taskq.App) -> None:
    outcomes: list[tuple[str, str, int]] = []
    failures: list[tuple[str, str, type[BaseException] | None, float | None]] = []
    started = anyio.Event()

    @app.task(retry=taskq.Retry(attempts=2, wait=0))
    async def work(kind: str) -> str:
        if kind == "boom":
            raise KeyError(kind)
        if kind == "slow":
            started.set()
            await anyio.sleep(30)
        return kind

    @app.after_job
    async def record(ctx: taskq.JobContext, outcome: taskq.JobOutcome) -> None:
        assert outcome.duration >= 0
        outcomes.append((ctx.args["kind"], outcome.kind, ctx.attempt))
        if outcome.kind == "succeeded":
            assert outcome.result == ctx.args["kind"]

    @app.on_failure
    def failed(ctx: taskq.JobContext, outcome: taskq.JobOutcome) -> None:
        assert outcome.error is not None and outcome.error["type"] == "KeyError"
        failures.append(
            (
                ctx.args["kind"],
                outcome.kind,
                type(outcome.exception) if outcome.exception else None,
                outcome.retry_in,
            )
        )

    async with app:
        await work.enqueue(kind="ok")
        await work.enqueue(kind="boom")
        await app.drain()
        assert sorted(outcomes) == [
            ("boom", "failed", 2),
            ("boom", "retried", 1),
            ("ok", "succeeded", 1),
        ]
        assert failures == [("boom", "retried", KeyError, 0.0), ("boom", "failed", KeyError, None)]

        outcomes.clear()
        slow = await work.enqueue(kind="slow")
        async with app.worker(concurrency=2):
            await started.wait()
            assert await slow.cancel()
            with pytest.raises(taskq.JobCancelled):
                await slow.result(timeout=10)
        assert outcomes == [("slow", "cancelled", 1)]

        # A job interrupted by shutdown goes back to the queue: "released".
        outcomes.clear()
        started = anyio.Event()
        again = await work.enqueue(kind="slow")
        async with app.worker(concurrency=2, shutdown_timeout=0):
            await started.wait()
        assert outcomes == [("slow", "released", 1)]
        assert (await again.status()).state is taskq.JobState.QUEUED


async def test_a_failing_after_hook_is_logged_and_the_outcome_stands(
    app: taskq.App, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task
    async def fine() -> int:
        return 1

    @app.after_job
    def broken(ctx: taskq.JobContext, outcome: taskq.JobOutcome) -> None:
        raise RuntimeError("hook bug")

    async with app:
        job = await fine.enqueue()
        with caplog.at_level(logging.ERROR, logger="taskq.hooks"):
            await app.drain()
        assert await job.result(timeout=5) == 1
    [record] = [r for r in caplog.records if r.name == "taskq.hooks"]
    assert "hook bug" in (record.exc_text or "") or record.exc_info is not None
    assert getattr(record, "job_id", None) == job.id


async def test_hooks_must_be_functions_and_middleware_async(app: taskq.App) -> None:
    with pytest.raises(TypeError, match="must be a function"):
        app.before_job("nope")  # type: ignore[type-var]
    with pytest.raises(TypeError, match="async function"):

        @app.middleware  # type: ignore[arg-type]
        def not_async(ctx: taskq.JobContext, call_next: Any) -> Any:
            return call_next()

    with pytest.raises(TypeError, match="async function"):
        app.enqueue_middleware(lambda ctx, call_next: None)  # type: ignore[arg-type,return-value]


async def test_enqueue_middleware_adds_meta_and_sees_the_new_ids(app: taskq.App) -> None:
    seen: list[tuple[str, str, int, bool, list[int]]] = []

    @app.task(queue="mail")
    async def send(to: str) -> str:
        return to

    @app.enqueue_middleware
    async def stamp(ctx: taskq.EnqueueContext, call_next: Any) -> Any:
        ctx.meta["request_id"] = request_id.get()
        result = await call_next()
        seen.append((ctx.task, ctx.queue, ctx.count, ctx.in_transaction, list(ctx.job_ids)))
        return result

    async with app:
        request_id.set("req-1")
        one = await send.enqueue(to="a")
        many = await send.enqueue_many([{"to": "b"}, {"to": "c"}])
        async with app.pool.acquire() as conn, conn.transaction():
            inside = await send.options(connection=conn).enqueue(to="d")
        first = await send.options(unique_key="u").enqueue(to="e")
        dup = await send.options(unique_key="u").enqueue(to="e")
        assert dup.duplicate and dup.id == first.id
        assert seen == [
            (send.name, "mail", 1, False, [one.id]),
            (send.name, "mail", 2, False, [j.id for j in many]),
            (send.name, "mail", 1, True, [inside.id]),
            (send.name, "mail", 1, False, [first.id]),
            (send.name, "mail", 1, False, [first.id]),
        ]
        assert (await many[1].status()).meta == {"request_id": "req-1"}


async def test_enqueue_middleware_that_skips_call_next_writes_nothing_and_says_so(
    app: taskq.App,
) -> None:
    @app.task
    async def noop() -> None:
        return None

    @app.enqueue_middleware
    async def swallow(ctx: taskq.EnqueueContext, call_next: Any) -> Any:
        return None

    async with app:
        with pytest.raises(taskq.TaskqError, match="did not call call_next"):
            await noop.enqueue()
        assert await app.queue_counts() == []


async def test_enqueue_middleware_errors_reach_the_producer(app: taskq.App) -> None:
    @app.task
    async def noop() -> None:
        return None

    @app.enqueue_middleware
    async def refuse(ctx: taskq.EnqueueContext, call_next: Any) -> Any:
        raise PermissionError("producers may not enqueue noop")

    async with app:
        with pytest.raises(PermissionError):
            await noop.enqueue()
        assert await app.queue_counts() == []


async def test_job_log_records_carry_attributes_and_format_as_json(
    app: taskq.App, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(retry=taskq.Retry(attempts=1))
    async def explode() -> None:
        raise RuntimeError("kaboom")

    async with app:
        job = await explode.enqueue()
        with caplog.at_level(logging.INFO, logger="taskq.worker"):
            await app.drain()
    [record] = [r for r in caplog.records if getattr(r, "job_id", None) == job.id]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(taskq.JsonFormatter())
    handler.emit(record)
    entry = json.loads(stream.getvalue())
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "taskq.worker"
    assert "kaboom" in entry["message"]
    assert entry["job_id"] == job.id
    assert entry["task"] == explode.name
    assert entry["queue"] == "default"
    assert entry["attempt"] == 1
    assert entry["outcome"] == "failed"
    assert isinstance(entry["duration"], float) and entry["duration"] >= 0
    assert entry["worker_id"].count(":") == 2
    assert entry["time"].endswith("+00:00")


async def test_upgrade_from_version_2_keeps_live_and_finished_jobs(
    pg_dsn: str, schema: str
) -> None:
    import asyncpg

    from taskq import _migrations

    conn = await asyncpg.connect(pg_dsn)
    try:
        async with conn.transaction():
            await conn.execute(_migrations._bootstrap(schema))
            for m in _migrations.all_migrations()[:2]:
                await conn.execute(m.sql(schema))
                await conn.execute(
                    f'INSERT INTO "{schema}".migrations VALUES ($1, $2, now())', m.version, m.name
                )
        await conn.execute(
            f'INSERT INTO "{schema}".jobs (queue, task, args, unique_key) '
            """VALUES ('default', 'up.add', '{"a": 1, "b": 2}', 'k1')"""
        )
        await conn.execute(
            f'INSERT INTO "{schema}".history (id, queue, task, args, state, attempts, '
            "max_attempts, priority, enqueued_at, error) VALUES (1000, 'default', 'up.add', "
            """'{"a": 5, "b": 5}', 'failed', 1, 1, 0, now(), '{"type": "X", "message": "m"}')"""
        )
    finally:
        await conn.close()
    app = taskq.App(pg_dsn, schema=schema)

    @app.task(name="up.add")
    async def add(a: int, b: int) -> int:
        return a + b

    async with app:  # applies migration 3 over live rows
        await app.drain()
        dead = app.get_job(1000)
        assert (await dead.status()).meta == {}
        assert await dead.retry()
        await app.drain()
        assert await dead.result(timeout=5) == 10
        job = await add.options(meta={"after": "upgrade"}).enqueue(a=2, b=3)
        await app.drain()
        assert await job.result(timeout=5) == 5
        assert (await job.status()).meta == {"after": "upgrade"}
        assert await app.queue_counts() == [("default", "succeeded", 3)]


async def test_a_result_that_is_not_json_fails_inside_the_middleware_chain(
    app: taskq.App,
) -> None:
    seen: list[str] = []

    @app.task(retry=False)
    async def bad_result() -> object:
        return object()

    @app.middleware
    async def watch(ctx: taskq.JobContext, call_next: Any) -> Any:
        try:
            return await call_next()
        except taskq.SerializationError:
            seen.append("serialization error seen by middleware")
            raise

    async with app:
        job = await bad_result.enqueue()
        await app.drain()
        with pytest.raises(taskq.JobFailed, match="SerializationError"):
            await job.result(timeout=5)
    assert seen == ["serialization error seen by middleware"]


async def test_enqueue_middleware_is_told_when_a_unique_key_was_taken(app: taskq.App) -> None:
    flags: list[bool] = []

    @app.task
    async def once() -> None:
        return None

    @app.enqueue_middleware
    async def note(ctx: taskq.EnqueueContext, call_next: Any) -> Any:
        result = await call_next()
        flags.append(ctx.duplicate)
        return result

    async with app:
        await once.options(unique_key="k").enqueue()
        await once.options(unique_key="k").enqueue()
        await once.enqueue()
    assert flags == [False, True, False]


async def test_after_job_hears_of_a_lost_lease(app: taskq.App) -> None:
    kinds: list[str] = []
    started = anyio.Event()

    @app.task
    async def long() -> None:
        started.set()
        await anyio.sleep(30)

    @app.after_job
    def record(ctx: taskq.JobContext, outcome: taskq.JobOutcome) -> None:
        kinds.append(outcome.kind)

    async with app:
        job = await long.enqueue()
        async with app.worker(concurrency=1, lease_seconds=0.6) as worker:
            await started.wait()
            # Another worker took the job over: the lease token changed.
            async with app.pool.acquire() as c:
                await c.execute(
                    f'UPDATE "{app.schema}".jobs SET lease_token = gen_random_uuid() WHERE id = $1',
                    job.id,
                )
            with anyio.fail_after(10):
                while not kinds:
                    await anyio.sleep(0.02)
            assert worker.stats.lost == 1
    assert kinds == ["lost"]


async def test_a_failing_worker_observer_disturbs_nothing(
    app: taskq.App, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def claimed(self, seconds: float, count: int) -> None:
            raise RuntimeError("metric backend down")

        def rescued(self, requeued: int, ended: int) -> None:
            raise RuntimeError("metric backend down")

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    app.registry.hooks.observers.append(Broken())
    async with app:
        jobs = await add.enqueue_many([{"a": i, "b": 1} for i in range(20)])
        with caplog.at_level(logging.ERROR, logger="taskq.worker"):
            stats = await app.drain()
        assert stats.succeeded == 20
        assert [await j.result(timeout=5) for j in jobs] == list(range(1, 21))
    assert any("observer" in r.getMessage() for r in caplog.records)


async def test_a_slow_async_after_hook_is_abandoned(
    app: taskq.App, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskq import _hooks

    monkeypatch.setattr(_hooks, "AFTER_HOOK_TIMEOUT_SECONDS", 0.2)

    @app.task
    async def fine() -> int:
        return 1

    @app.after_job
    async def hangs(ctx: taskq.JobContext, outcome: taskq.JobOutcome) -> None:
        await anyio.sleep(30)

    @app.after_job
    async def times_out_itself(ctx: taskq.JobContext, outcome: taskq.JobOutcome) -> None:
        raise TimeoutError("the hook's own timeout")

    async with app:
        job = await fine.enqueue()
        with caplog.at_level(logging.WARNING, logger="taskq.hooks"):
            await app.drain()
        assert await job.result(timeout=5) == 1
    messages = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "taskq.hooks"]
    assert messages == [
        ("WARNING", f"hook {hangs.__qualname__} took over 0s for job {job.id}; abandoned"),
        (
            "ERROR",
            f"hook {times_out_itself.__qualname__} failed for job {job.id} "
            "(the job's outcome stands)",
        ),
    ]
