"""A task's default concurrency key: a text, or a function of each job's arguments,
applied where the job is enqueued, overridden by ``options(concurrency_key=...)``,
and enforced by a queue's ``per_key_limit`` like a key given per enqueue."""

from __future__ import annotations

import asyncio
import itertools
from datetime import date
from typing import Any

import asyncpg
import pytest

import taskq

from .conftest import until

pytestmark = pytest.mark.anyio


async def keys_of(conn: asyncpg.Connection, app: taskq.App, jobs: list[taskq.Job]) -> list[Any]:
    rows = await conn.fetch(
        f'SELECT id, concurrency_key FROM "{app.schema}".jobs WHERE id = ANY($1::bigint[])',
        [j.id for j in jobs],
    )
    by_id = {r["id"]: r["concurrency_key"] for r in rows}
    return [by_id[j.id] for j in jobs]


async def test_a_function_of_the_arguments_keys_every_enqueue_path(
    app: taskq.App, conn: asyncpg.Connection
) -> None:
    seen: list[Any] = []

    def tenant_key(tenant: int | None, day: date, **_: Any) -> str | None:
        seen.append(day)  # the task's own values, not their JSON form
        return None if tenant is None else f"tenant:{tenant}"

    @app.task(name="keys.report", queue="fair", concurrency_key=tenant_key)
    async def report(tenant: int | None, day: date, pages: int = 1) -> None:
        return None

    @app.task(name="keys.imports", queue="fair", concurrency_key="imports")
    async def imports(n: int) -> None:
        return None

    d = date(2026, 12, 1)
    async with app:
        one = await report.enqueue(42, d)
        many = await report.enqueue_many(
            [{"tenant": 1, "day": d}, {"tenant": None, "day": d}, {"tenant": 2, "day": d}]
        )
        by_name = await app.enqueue("keys.report", {"tenant": 7, "day": d.isoformat()})
        override = await report.options(concurrency_key="vip").enqueue(3, d)
        override_many = await report.options(concurrency_key="vip").enqueue_many(
            [{"tenant": 4, "day": d}]
        )
        static = [await imports.enqueue(1), *(await imports.enqueue_many([{"n": 2}, {"n": 3}]))]
        assert await keys_of(conn, app, [one, *many, by_name]) == [
            "tenant:42",
            "tenant:1",
            None,
            "tenant:2",
            "tenant:7",
        ]
        assert await keys_of(conn, app, [override, *override_many]) == ["vip", "vip"]
        assert await keys_of(conn, app, static) == ["imports"] * 3
    # Called with the values given to the enqueue (by name: their JSON form), and
    # not for an enqueue that names its key.
    assert seen == [d] * 4 + ["2026-12-01"]


async def test_a_bad_key_function_is_a_clear_error_and_writes_nothing(
    app: taskq.App, conn: asyncpg.Connection
) -> None:
    def broken(n: int) -> str:
        raise KeyError("tenant")

    @app.task(name="keys.broken", concurrency_key=broken)
    async def a(n: int) -> None:
        return None

    @app.task(name="keys.number", concurrency_key=lambda n: n)
    async def b(n: int) -> None:
        return None

    @app.task(name="keys.empty", concurrency_key=lambda n: "")
    async def c(n: int) -> None:
        return None

    with pytest.raises(taskq.ConfigurationError, match="concurrency_key"):
        app.task(name="keys.bad", concurrency_key=5)(lambda: None)  # type: ignore[arg-type]
    with pytest.raises(taskq.ConfigurationError, match="concurrency_key"):
        app.task(name="keys.long", concurrency_key="k" * 201)(lambda: None)
    async with app:
        with pytest.raises(taskq.ConfigurationError) as raised:
            await a.enqueue(1)
        assert "concurrency_key function of task 'keys.broken' raised KeyError" in str(raised.value)
        with pytest.raises(taskq.ConfigurationError, match=r"returned 1: .*non-empty string"):
            await b.enqueue(1)
        with pytest.raises(taskq.ConfigurationError, match="returned ''"):
            await c.enqueue_many([{"n": 1}, {"n": 2}])
        assert await conn.fetchval(f'SELECT count(*) FROM "{app.schema}".jobs') == 0


async def test_the_default_key_is_held_to_the_queues_per_key_limit(app: taskq.App) -> None:
    gate = asyncio.Event()
    started: list[str] = []

    @app.task(name="keys.block", queue="fair", concurrency_key=lambda tenant: f"t:{tenant}")
    async def block(tenant: str) -> None:
        started.append(tenant)
        await gate.wait()

    s = f'"{app.schema}"'

    async def running() -> dict[str, int]:
        async with app.pool.acquire() as c:
            rows = await c.fetch(
                f"SELECT concurrency_key, count(*) AS n FROM {s}.jobs "
                "WHERE state = 'running' GROUP BY 1"
            )
        return {r["concurrency_key"]: r["n"] for r in rows}

    async with app:
        await app.queue("fair").configure(per_key_limit=1)
        await block.enqueue_many([{"tenant": "a"}] * 3 + [{"tenant": "b"}])
        async with app.worker(concurrency=4):
            try:
                await until(running, 10, "jobs running")
                await until(lambda: _equal(running, {"t:a": 1, "t:b": 1}), 10, "one job per key")
                # Free slots, yet a's other jobs stay queued while one of a's runs.
                assert sorted(started) == ["a", "b"]
                assert await running() == {"t:a": 1, "t:b": 1}
            finally:
                gate.set()


async def _equal(read: Any, expected: dict[str, int]) -> bool:
    return bool(await read() == expected)


async def test_a_unique_job_keeps_its_key(app: taskq.App, conn: asyncpg.Connection) -> None:
    @app.task(name="keys.unique", queue="fair", concurrency_key=lambda n: f"t:{n}")
    async def unique(n: int) -> None:
        return None

    async with app:
        first = await unique.options(unique_key="u:1").enqueue(1)
        again = await unique.options(unique_key="u:1").enqueue(2)
        named = await unique.options(unique_key="u:2", concurrency_key="vip").enqueue(3)
        assert (first.duplicate, again.duplicate, again.id) == (False, True, first.id)
        assert await keys_of(conn, app, [first, named]) == ["t:1", "vip"]


async def test_workflow_steps_and_map_items_are_held_to_their_keys(
    app: taskq.App, conn: asyncpg.Connection
) -> None:
    @app.task(name="keys.split", queue="fair")
    async def split(n: int) -> list[int]:
        return list(range(n))

    @app.task(name="keys.work", queue="fair", concurrency_key=lambda x, tenant: f"t:{tenant}")
    async def work(x: int, tenant: str) -> int:
        await asyncio.sleep(0.02)
        return x

    @app.task(name="keys.total", queue="fair")
    async def total(parts: list[int]) -> int:
        return sum(parts)

    gate = asyncio.Event()

    @app.task(name="keys.hold", queue="fair")
    async def hold() -> None:
        await gate.wait()

    s = f'"{app.schema}"'
    async with app:
        await app.queue("fair").configure(per_key_limit=1)
        wf = taskq.Workflow(name="keyed")
        parts = wf.add(split.options(concurrency_key="t:split"), n=8)
        solo = wf.add(work, 100, "a")  # plain arguments: the task's key function applies
        items = wf.map(work.options(concurrency_key="t:map"), over=parts, arg="x", tenant="b")
        wf.add(total.options(concurrency_key="t:total"), parts=items, after=[solo])
        with pytest.raises(taskq.ConfigurationError, match="give the step"):
            wf.add(work, parts, "c")  # an argument known only when it runs
        with pytest.raises(taskq.ConfigurationError, match="give the step"):
            wf.map(work, over=parts, arg="x", tenant="c")
        # A job without a key holds the keyless share of the queue throughout: a
        # step that lost its key would wait behind it for ever.
        held = await hold.enqueue()
        async with app.worker(concurrency=8):
            try:
                await until(lambda: _running(held), 10, "the keyless job running")
                run = await wf.enqueue()
                assert await run.result(timeout=60) == sum(range(8))
            finally:
                gate.set()
        rows = await conn.fetch(
            f"SELECT j.step, j.started_at, j.finished_at FROM {s}.history AS j "
            "WHERE j.workflow_id = $1 AND j.step LIKE 'work%'",
            run.id,
        )
    # The solo step had its function's key, and the eight items the map's: with a
    # per-key limit of 1 they ran one at a time, though eight slots were free.
    items_run = sorted((r["started_at"], r["finished_at"]) for r in rows if "[" in r["step"])
    assert len(items_run) == 8
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(items_run)), items_run


async def _running(job: taskq.Job) -> bool:
    return str((await job.status()).state) == "running"
