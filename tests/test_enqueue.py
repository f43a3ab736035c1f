"""Enqueue paths: single, options, bulk, by name, transactional, bad input."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import asyncpg
import pytest

import taskq

pytestmark = pytest.mark.anyio


async def count_jobs(app: taskq.App) -> int:
    async with app.pool.acquire() as c:
        return int(await c.fetchval(f'SELECT count(*) FROM "{app.schema}".jobs'))


async def test_enqueue_returns_a_queued_job(app: taskq.App) -> None:
    @app.task(queue="emails")
    async def send_welcome(user_id: int) -> dict[str, int]:
        return {"sent": user_id}

    async with app:
        job = await send_welcome.enqueue(user_id=42)
        assert isinstance(job, taskq.Job)
        status = await job.status()
    assert status.state is taskq.JobState.QUEUED
    assert status.queue == "emails"
    assert status.task.endswith("send_welcome")
    assert status.args == {"user_id": 42}
    assert status.attempts == 0
    assert status.max_attempts == taskq.Retry().attempts


async def test_task_called_directly_runs_inline(app: taskq.App) -> None:
    @app.task
    async def double(x: int) -> int:
        return 2 * x

    @app.task
    def triple(x: int) -> int:
        return 3 * x

    assert await double(4) == 8
    assert triple(4) == 12


async def test_positional_arguments_are_bound_by_name(app: taskq.App) -> None:
    @app.task
    async def add(a: int, b: int = 1) -> int:
        return a + b

    async with app:
        job = await add.enqueue(5)
        assert (await job.status()).args == {"a": 5}
        await app.drain()
        assert await job.result(timeout=5) == 6


async def test_wrong_arguments_raise_type_error_and_write_nothing(app: taskq.App) -> None:
    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    async with app:
        with pytest.raises(TypeError, match="missing a required argument: 'b'"):
            await add.enqueue(a=1)
        with pytest.raises(TypeError, match="unexpected keyword argument 'c'"):
            await add.enqueue(a=1, b=2, c=3)
        with pytest.raises(TypeError):
            await add.enqueue_many([{"a": 1, "b": 2}, {"a": 1}])
        assert await count_jobs(app) == 0


@pytest.mark.parametrize(
    ("kwargs", "path"),
    [
        ({"payload": {"when": dt.datetime.now()}}, "payload.when"),
        ({"payload": [1, 2, {1, 2}]}, "payload[2]"),
        ({"payload": float("nan")}, "payload"),
        ({"payload": {"x": float("inf")}}, "payload.x"),
        ({"payload": "nul\x00inside"}, "payload"),
        ({"payload": {1: "int key"}}, "payload[1]"),
        ({"payload": 2**70}, "payload"),
    ],
)
async def test_non_json_argument_is_refused_with_its_name(
    app: taskq.App, kwargs: dict[str, Any], path: str
) -> None:
    @app.task
    async def store(payload: Any) -> None:
        return None

    async with app:
        with pytest.raises(taskq.SerializationError) as info:
            await store.enqueue(**kwargs)
        assert info.value.path == path
        assert f"argument {path!r}" in str(info.value)
        with pytest.raises(taskq.SerializationError, match="item 1") as many:
            await store.enqueue_many([{"payload": 1}, kwargs])
        assert many.value.path == path
        assert await count_jobs(app) == 0
    assert isinstance(info.value, taskq.TaskqError)
    assert isinstance(info.value, TypeError)


async def test_payload_size_limit(pg_dsn: str, schema: str) -> None:
    app = taskq.App(pg_dsn, schema=schema, max_payload_bytes=1000)

    @app.task
    async def big(blob: str) -> None:
        return None

    async with app:
        await big.enqueue(blob="x" * 900)
        with pytest.raises(taskq.SerializationError, match="1,000-byte limit"):
            await big.enqueue(blob="x" * 1000)
        assert await count_jobs(app) == 1


async def test_options_priority_delay_and_run_at(app: taskq.App) -> None:
    @app.task(queue="q1", priority=3)
    async def job(n: int) -> None:
        return None

    async with app:
        plain = await (await job.enqueue(n=1)).status()
        assert (plain.queue, plain.priority) == ("q1", 3)
        other = await (await job.options(queue="q2", priority=-5).enqueue(n=2)).status()
        assert (other.queue, other.priority) == ("q2", -5)
        delayed = await (await job.options(delay=60).enqueue(n=3)).status()
        assert delayed.run_at is not None
        gap = (delayed.run_at - delayed.enqueued_at).total_seconds()
        assert 59.9 < gap < 60.1
        when = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
        at = await (await job.options(run_at=when).enqueue(n=4)).status()
        assert at.run_at == when


async def test_invalid_options_are_refused(app: taskq.App) -> None:
    @app.task
    async def job() -> None:
        return None

    with pytest.raises(taskq.ConfigurationError, match="timezone-aware"):
        job.options(run_at=dt.datetime.now())
    with pytest.raises(taskq.ConfigurationError, match="delay must be >= 0"):
        job.options(delay=-1)
    with pytest.raises(taskq.ConfigurationError, match="priority"):
        job.options(priority="high")  # type: ignore[arg-type]
    with pytest.raises(taskq.ConfigurationError, match="out of range"):
        job.options(priority=10**6)
    with pytest.raises(taskq.ConfigurationError, match="queue name"):
        job.options(queue="bad queue; drop table")
    with pytest.raises(taskq.ConfigurationError, match="either delay or run_at"):
        job.options(delay=5, run_at=dt.datetime.now(dt.UTC))


async def test_enqueue_many_is_one_statement(app: taskq.App) -> None:
    @app.task
    async def job(i: int) -> None:
        return None

    async with app, app.pool.acquire() as conn:
        # Warm up: asyncpg introspects result types once per connection.
        await job.options(connection=conn).enqueue_many([{"i": -1}])
        await conn.execute(f'DELETE FROM "{app.schema}".jobs')
        statements: list[str] = []
        conn.add_query_logger(lambda record: statements.append(record.query))
        jobs = await job.options(connection=conn).enqueue_many([{"i": i} for i in range(5000)])
        await asyncio.sleep(0.05)  # query loggers are called soon after, not inline
        assert len(statements) == 1
        assert len(jobs) == 5000
        assert len({j.id for j in jobs}) == 5000
        # Ids come back in input order.
        first = await jobs[0].status()
        last = await jobs[-1].status()
        assert (first.args, last.args) == ({"i": 0}, {"i": 4999})
        assert await count_jobs(app) == 5000


async def test_enqueue_by_name(app: taskq.App) -> None:
    @app.task(name="mail.send", queue="mail")
    async def send(to: str) -> str:
        return to

    async with app:
        job = await app.enqueue("mail.send", {"to": "a@b.c"})
        status = await job.status()
        assert (status.task, status.queue, status.args) == ("mail.send", "mail", {"to": "a@b.c"})
        with pytest.raises(taskq.UnknownTaskError, match=r"no task named 'mail\.sned'"):
            await app.enqueue("mail.sned", {"to": "x"})
        with pytest.raises(TypeError):
            await app.enqueue("mail.send", {"too": "x"})


async def test_enqueue_by_name_from_a_producer_without_the_task(pg_dsn: str, schema: str) -> None:
    """A producer that does not import the task can enqueue it once a worker has reported it."""
    worker_app = taskq.App(pg_dsn, schema=schema)

    @worker_app.task(name="reports.build", queue="reports")
    async def build(month: str) -> str:
        return f"report {month}"

    producer = taskq.App(pg_dsn, schema=schema)
    async with producer:
        with pytest.raises(taskq.UnknownTaskError):
            await producer.enqueue("reports.build", {"month": "2026-10"})
        await worker_app.drain()  # registers its tasks
        job = await producer.enqueue("reports.build", {"month": "2026-10"})
        assert (await job.status()).queue == "reports"
        await worker_app.drain()
        assert await job.result(timeout=5) == "report 2026-10"
    assert not worker_app.is_open


async def test_transactional_enqueue_commits_with_the_caller(app: taskq.App) -> None:
    @app.task
    async def job(n: int) -> None:
        return None

    async with app:
        listener = await asyncpg.connect(app.dsn)
        seen: list[str] = []
        await listener.add_listener(app.store.enqueued_channel, lambda *a: seen.append(a[3]))
        try:
            async with app.pool.acquire() as conn:
                tx = conn.transaction()
                await tx.start()
                committed = await job.options(connection=conn).enqueue(n=1)
                # Not visible outside the transaction, and nobody woken yet.
                assert await count_jobs(app) == 0
                await asyncio.sleep(0.2)
                assert seen == []
                await tx.commit()
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.02)
            assert seen == ["default"]
            assert (await committed.status()).state is taskq.JobState.QUEUED
        finally:
            await listener.close()


async def test_transactional_enqueue_rolls_back_with_the_caller(app: taskq.App) -> None:
    @app.task
    async def job(n: int) -> None:
        return None

    class Boom(Exception):
        pass

    async with app:
        with pytest.raises(Boom):
            async with app.pool.acquire() as conn, conn.transaction():
                rolled_back = await job.options(connection=conn).enqueue(n=1)
                await job.options(connection=conn).enqueue_many([{"n": 2}, {"n": 3}])
                raise Boom
        assert await count_jobs(app) == 0
        with pytest.raises(taskq.JobNotFound):
            await rolled_back.status()


async def test_get_job_handle(app: taskq.App) -> None:
    @app.task
    async def job() -> int:
        return 7

    async with app:
        job_id = (await job.enqueue()).id
        handle = app.get_job(job_id)
        assert (await handle.status()).id == job_id
        with pytest.raises(taskq.JobNotFound):
            await app.get_job(10**12).status()
        # Beyond Postgres's bigint (e.g. an id from a URL): no such job either.
        beyond = app.get_job(2**63)
        with pytest.raises(taskq.JobNotFound):
            await beyond.status()
        with pytest.raises(taskq.JobNotFound):
            await beyond.result(timeout=1)
        with pytest.raises(taskq.JobNotFound):
            await beyond.cancel()
        assert await beyond.retry() is False
        with pytest.raises(TypeError):
            app.get_job("12")  # type: ignore[arg-type]


async def test_dead_database_gives_a_taskq_error(schema: str) -> None:
    app = taskq.App("postgresql://nobody@127.0.0.1:1/none", schema=schema)
    with pytest.raises(taskq.DatabaseError, match="cannot reach Postgres"):
        await app.open()


async def test_using_a_closed_app_is_a_clear_error(app: taskq.App) -> None:
    @app.task
    async def job() -> None:
        return None

    with pytest.raises(taskq.ConfigurationError, match="async with app"):
        await job.enqueue()
