"""Workflows in one process: building, passing results, failures, maps, cancel, retry.

Real Postgres, a real in-process worker. Ordering is checked on the
database's own clock (history's started_at / finished_at). The tests with
several worker processes and SIGKILL are in test_workflow_processes.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

import taskq

pytestmark = pytest.mark.anyio

NO_RETRY = taskq.Retry(attempts=1)


async def history(conn: asyncpg.Connection, schema: str, workflow_id: int) -> dict[str, Any]:
    rows = await conn.fetch(
        f"SELECT step, state, started_at, finished_at, attempts, error::text AS error, id "
        f'FROM "{schema}".history WHERE workflow_id = $1',
        workflow_id,
    )
    return {r["step"]: r for r in rows}


async def leftovers(conn: asyncpg.Connection, schema: str, workflow_id: int) -> int:
    return int(
        await conn.fetchval(
            f'SELECT count(*) FROM "{schema}".jobs WHERE workflow_id = $1', workflow_id
        )
    )


# -- passing values ------------------------------------------------------------------


async def test_fan_out_fan_in_passes_results_in_order(
    app: taskq.App, conn: asyncpg.Connection, schema: str
) -> None:
    @app.task
    async def fetch(url: str) -> str:
        await asyncio.sleep(random.random() / 100)
        return url.upper()

    @app.task
    async def merge(parts: list[str], sep: str) -> str:
        return sep.join(parts)

    async with app:
        wf = taskq.Workflow(name="report")
        pages = [wf.add(fetch, url=f"u{i}") for i in range(12)]
        merged = wf.add(merge, parts=pages, sep="+")
        assert merged.name == "merge" and [p.name for p in pages[:3]] == [
            "fetch",
            "fetch-2",
            "fetch-3",
        ]
        run = await wf.enqueue()
        async with app.worker(concurrency=8):
            value = await run.result(timeout=30)
        assert value == "+".join(f"U{i}" for i in range(12))
        status = await run.status()
        assert status.state is taskq.WorkflowState.SUCCEEDED
        assert status.total == 13 and status.counts["succeeded"] == 13
        assert status.step("merge").parents == tuple(p.name for p in pages)
        # Every step is an ordinary job.
        job = app.get_job(run.job_ids["merge"])
        info = await job.status()
        assert (info.workflow_id, info.step, info.state) == (run.id, "merge", "succeeded")
        assert await job.result() == value
        assert (await run.job("fetch-3")).id == run.job_ids["fetch-3"]
        rows = await history(conn, schema, run.id)
        assert all(rows[p.name]["finished_at"] <= rows["merge"]["started_at"] for p in pages)
        assert await leftovers(conn, schema, run.id) == 0


async def test_chain_of_five_and_after_ordering(
    app: taskq.App, conn: asyncpg.Connection, schema: str
) -> None:
    seen: list[str] = []

    @app.task
    async def inc(value: int) -> int:
        return value + 1

    @app.task
    async def note(tag: str) -> str:
        await asyncio.sleep(0.05)
        seen.append(tag)
        return tag

    async with app:
        wf = taskq.Workflow(name="chain")
        step = wf.add(inc, value=0)
        for _ in range(4):
            step = wf.add(inc, value=step)
        first = wf.add(note, tag="first")
        wf.add(note, tag="second", after=[first, step])
        run = await wf.enqueue()
        async with app.worker(concurrency=10):
            result = await run.result(timeout=30)
        assert result == "second"  # inc-5 has a child (after=): the one sink is note-2
        assert seen == ["first", "second"]
        rows = await history(conn, schema, run.id)
        chain = ["inc", "inc-2", "inc-3", "inc-4", "inc-5"]
        for a, b in itertools.pairwise(chain):
            assert rows[a]["finished_at"] <= rows[b]["started_at"]
        assert rows["note"]["finished_at"] <= rows["note-2"]["started_at"]
        assert rows["inc-5"]["finished_at"] <= rows["note-2"]["started_at"]


async def test_mixed_dag_of_20_steps_starts_in_topological_order(
    app: taskq.App, conn: asyncpg.Connection, schema: str
) -> None:
    @app.task
    async def node(name: str, inputs: list[str], extra: dict[str, Any]) -> str:
        await asyncio.sleep(random.random() / 50)
        return f"{name}({','.join(inputs)}|{','.join(sorted(extra))})"

    rng = random.Random(20)
    async with app:
        wf = taskq.Workflow(name="dag")
        refs: list[taskq.StepRef] = []
        parents_of: dict[str, set[str]] = {}
        for i in range(20):
            pool = refs[:]
            data = rng.sample(pool, k=min(len(pool), rng.randint(0, 3)))
            extra = rng.sample(pool, k=min(len(pool), rng.randint(0, 2)))
            order = rng.sample(pool, k=min(len(pool), rng.randint(0, 2)))
            ref = wf.add(
                node,
                name=f"n{i}",
                inputs=data,
                extra={r.name: r for r in extra},
                after=order,
                step_name=f"n{i}",
            )
            parents_of[ref.name] = {r.name for r in [*data, *extra, *order]}
            refs.append(ref)
        run = await wf.enqueue()
        async with app.worker(concurrency=6):
            await run.wait(timeout=60)
        rows = await history(conn, schema, run.id)
        assert {r["state"] for r in rows.values()} == {"succeeded"} and len(rows) == 20
        for child, parents in parents_of.items():
            for parent in parents:
                assert rows[parent]["finished_at"] <= rows[child]["started_at"], (parent, child)


@dataclasses.dataclass
class Reading:
    at: datetime
    value: float


async def test_typed_results_reach_children_as_their_annotated_types(app: taskq.App) -> None:
    @app.task
    async def measure(value: float) -> Reading:
        return Reading(datetime(2026, 12, 1, tzinfo=UTC), value)

    @app.task
    async def latest(readings: list[Reading]) -> datetime:
        assert all(isinstance(r, Reading) for r in readings)
        return max(r.at for r in readings)

    async with app:
        wf = taskq.Workflow()
        wf.add(latest, readings=[wf.add(measure, value=1.5), wf.add(measure, value=2.5)])
        run = await wf.enqueue()
        async with app.worker(concurrency=4):
            assert await run.result(timeout=30) == datetime(2026, 12, 1, tzinfo=UTC)


# -- failure ---------------------------------------------------------------------------


async def test_failure_cancels_every_descendant_naming_the_parent(
    app: taskq.App, conn: asyncpg.Connection, schema: str
) -> None:
    ran: list[str] = []

    @app.task(retry=NO_RETRY)
    async def boom() -> int:
        raise ValueError("boom")

    @app.task
    async def child(x: int) -> int:
        ran.append("child")
        return x

    @app.task
    async def fine() -> str:
        return "fine"

    async with app:
        wf = taskq.Workflow(name="cascade")
        b = wf.add(boom)
        c = wf.add(child, x=b)
        g = wf.add(child, x=c)
        wf.add(fine, after=[g])
        wf.add(fine)
        run = await wf.enqueue()
        async with app.worker(concurrency=4):
            with pytest.raises(taskq.WorkflowFailed) as raised:
                await run.result(timeout=30)
        assert ran == []
        assert "step 'boom' failed: ValueError: boom" in str(raised.value)
        assert {s["step"]: s["state"] for s in raised.value.steps} == {
            "boom": "failed",
            "child": "cancelled",
            "child-2": "cancelled",
            "fine": "cancelled",
        }
        status = await run.status()
        assert status.state is taskq.WorkflowState.FAILED
        assert (status.counts["failed"], status.counts["cancelled"]) == (1, 3)
        assert status.counts["succeeded"] == 1
        c_error = status.step("child").error or {}
        assert c_error["type"] == "taskq.ParentFailed"
        assert c_error["message"] == "not run: its parent step 'boom' failed"
        assert (status.step("child-2").error or {})["message"] == (
            "not run: its parent step 'child' was cancelled"
        )
        assert await leftovers(conn, schema, run.id) == 0


async def test_on_parent_failure_run_gets_step_failed_in_place_of_results(
    app: taskq.App,
) -> None:
    @app.task(retry=NO_RETRY)
    async def boom(n: int) -> int:
        raise KeyError(n)

    @app.task
    async def ok(n: int) -> int:
        return n

    @app.task
    async def join(parts: list[int]) -> dict[str, Any]:
        failed = [p for p in parts if isinstance(p, taskq.StepFailed)]
        return {
            "ok": [p for p in parts if not isinstance(p, taskq.StepFailed)],
            "failed": [(f.step, f.state, f.error_type, f.message) for f in failed],
        }

    async with app:
        wf = taskq.Workflow(name="partial")
        parts = [wf.add(ok, n=1), wf.add(boom, n=2), wf.add(ok, n=3)]
        wf.add(join, parts=parts, on_parent_failure="run")
        run = await wf.enqueue()
        async with app.worker(concurrency=4):
            value = await run.result(timeout=30)
        # The join (the only sink) succeeded: so did the workflow.
        assert value == {"ok": [1, 3], "failed": [["boom", "failed", "KeyError", "2"]]}
        assert (await run.status()).state is taskq.WorkflowState.SUCCEEDED


async def test_a_step_is_retried_by_its_own_policy_inside_a_workflow(app: taskq.App) -> None:
    calls: list[int] = []

    @app.task(retry=taskq.Retry(attempts=3, wait=0))
    async def flaky(ctx: taskq.JobContext) -> str:
        calls.append(ctx.attempt)
        if ctx.attempt < 2:
            raise RuntimeError("not yet")
        return "done"

    @app.task
    async def after_it(value: str) -> str:
        return value * 2

    async with app:
        wf = taskq.Workflow()
        wf.add(after_it, value=wf.add(flaky))
        run = await wf.enqueue()
        async with app.worker(concurrency=2):
            assert await run.result(timeout=30) == "donedone"
        assert calls == [1, 2]
        assert (await run.status()).step("flaky").attempts == 2


# -- maps --------------------------------------------------------------------------------


@pytest.mark.parametrize("items", [0, 1, 500])
async def test_map_over_a_runtime_list(app: taskq.App, items: int) -> None:
    @app.task
    async def split(n: int) -> list[int]:
        return list(range(n))

    @app.task
    async def square(x: int, k: int) -> int:
        return x * x * k

    @app.task
    async def reduce_all(parts: list[int]) -> list[int]:
        return parts

    async with app:
        wf = taskq.Workflow(name="mapreduce")
        chunks = wf.add(split, n=items)
        squares = wf.map(square, over=chunks, arg="x", k=2)
        wf.add(reduce_all, parts=squares)
        run = await wf.enqueue()
        async with app.worker(concurrency=50):
            value = await run.result(timeout=60)
        assert value == [x * x * 2 for x in range(items)]
        status = await run.status()
        assert status.total == 3 + items == status.counts["succeeded"]
        names = [s.name for s in status.steps if s.map_of is not None]
        assert names == [f"square[{i}]" for i in range(items)]
        assert status.step("square").kind == "map"


async def test_a_map_fails_when_an_item_fails_or_its_list_is_not_a_list(app: taskq.App) -> None:
    @app.task
    async def give(value: Any) -> Any:
        return value

    @app.task(retry=NO_RETRY)
    async def invert(x: int) -> float:
        return 1 / x

    @app.task
    async def keep(parts: list[float]) -> list[str]:
        return [str(p) if isinstance(p, taskq.StepFailed) else f"{p:.2f}" for p in parts]

    async with app:
        wf = taskq.Workflow()
        inverted = wf.map(invert, over=wf.add(give, value=[1, 0, 4]), arg="x")
        wf.add(keep, parts=inverted, on_parent_failure="run")
        strict = wf.add(keep, parts=inverted)
        bad = wf.map(invert, over=wf.add(give, value={"not": "a list"}), arg="x")
        run = await wf.enqueue()
        async with app.worker(concurrency=4):
            with pytest.raises(taskq.WorkflowFailed):
                await run.result(timeout=30)
        status = await run.status()
        assert status.step("invert").state is taskq.JobState.FAILED
        assert "1 of 3 items did not succeed" in (status.step("invert").error or {})["message"]
        assert status.step(strict.name).state is taskq.JobState.CANCELLED
        kept = await (await run.job("keep")).result()
        assert kept[0] == "1.00" and kept[2] == "0.25"
        assert kept[1].startswith("step 'invert[1]' failed: ZeroDivisionError")
        error = status.step(bad.name).error or {}
        assert error["type"] == "taskq.MapFailed" and "it is object, not a list" in error["message"]


# -- transactions, cancel, retry ---------------------------------------------------------


async def test_enqueue_in_a_transaction_that_rolls_back_leaves_nothing(
    app: taskq.App, conn: asyncpg.Connection, schema: str
) -> None:
    @app.task
    async def noop(x: int) -> int:
        return x

    async with app:
        wf = taskq.Workflow()
        wf.add(noop, x=wf.add(noop, x=1))
        tx = conn.transaction()
        await tx.start()
        run = await wf.enqueue(connection=conn)
        await tx.rollback()
        for table in ("workflows", "workflow_steps", "workflow_edges", "jobs", "history"):
            assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".{table}') == 0, table
        with pytest.raises(taskq.WorkflowNotFound):
            await run.status()


async def test_a_workflow_enqueued_in_a_transaction_starts_only_after_the_commit(
    app: taskq.App, conn: asyncpg.Connection, schema: str
) -> None:
    @app.task
    async def noop(x: int) -> int:
        return x

    async with app, app.worker(concurrency=4):
        wf = taskq.Workflow()
        wf.add(noop, x=wf.add(noop, x=1))
        async with conn.transaction():
            run = await wf.enqueue(connection=conn)
            await asyncio.sleep(0.5)  # the worker is idle: it sees nothing yet
            committed_at = await conn.fetchval("SELECT clock_timestamp()")
        assert await run.result(timeout=30) == 1
        rows = await history(conn, schema, run.id)
        assert all(r["started_at"] >= committed_at for r in rows.values())


async def test_cancel_a_running_workflow(
    app: taskq.App, conn: asyncpg.Connection, schema: str
) -> None:
    started: list[str] = []
    gate = asyncio.Event()

    @app.task
    async def slow(tag: str) -> str:
        started.append(tag)
        await gate.wait()
        return tag

    async with app:
        wf = taskq.Workflow(name="to-cancel")
        a = wf.add(slow, tag="a")
        b = wf.add(slow, tag="b", after=[a])
        wf.add(slow, tag="c", after=[b])
        run = await wf.enqueue()
        async with app.worker(concurrency=4):

            async def a_runs() -> bool:
                return started == ["a"]

            while not await a_runs():
                await asyncio.sleep(0.02)
            assert await run.cancel() is True
            with pytest.raises(taskq.WorkflowCancelled):
                await run.result(timeout=30)
            gate.set()
        assert started == ["a"]
        status = await run.status()
        assert status.state is taskq.WorkflowState.CANCELLED
        assert {s.name: str(s.state) for s in status.steps} == {
            "slow": "cancelled",
            "slow-2": "cancelled",
            "slow-3": "cancelled",
        }
        assert await run.cancel() is False  # over already
        assert await leftovers(conn, schema, run.id) == 0


async def test_retry_runs_again_only_what_did_not_succeed(
    app: taskq.App, conn: asyncpg.Connection, schema: str
) -> None:
    runs: dict[str, int] = {}
    broken = {"yes": True}

    @app.task(retry=NO_RETRY)
    async def part(n: int) -> int:
        runs[f"part{n}"] = runs.get(f"part{n}", 0) + 1
        if n == 2 and broken["yes"]:
            raise RuntimeError("source unavailable")
        return n

    @app.task
    async def total(parts: list[int]) -> int:
        runs["total"] = runs.get("total", 0) + 1
        return sum(parts)

    async with app:
        wf = taskq.Workflow(name="retry-me")
        wf.add(total, parts=[wf.add(part, n=n) for n in range(4)])
        run = await wf.enqueue()
        async with app.worker(concurrency=4):
            with pytest.raises(taskq.WorkflowFailed):
                await run.result(timeout=30)
        assert runs == {"part0": 1, "part1": 1, "part2": 1, "part3": 1}
        broken["yes"] = False
        assert await run.retry() == 2  # part-3 (failed) and total (cancelled)
        assert (await run.status(steps=False)).state is taskq.WorkflowState.RUNNING
        async with app.worker(concurrency=4):
            assert await run.result(timeout=30) == 6
        assert runs == {"part0": 1, "part1": 1, "part2": 2, "part3": 1, "total": 1}
        status = await run.status()
        assert status.counts == {
            "waiting": 0,
            "queued": 0,
            "running": 0,
            "succeeded": 5,
            "failed": 0,
            "cancelled": 0,
        }
        assert await run.retry() == 0  # nothing failed


async def test_cancelling_a_waiting_step_cancels_its_descendants(app: taskq.App) -> None:
    gate = asyncio.Event()

    @app.task
    async def hold() -> int:
        await gate.wait()
        return 1

    @app.task
    async def use(x: int) -> int:
        return x

    async with app:
        wf = taskq.Workflow()
        h = wf.add(hold)
        u = wf.add(use, x=h)
        wf.add(use, x=u)
        run = await wf.enqueue()
        step = await run.job(u.name)
        assert (await step.status()).state is taskq.JobState.WAITING
        with pytest.raises(TimeoutError, match="waiting for its parent step"):
            await step.result(timeout=0.3)
        assert await step.cancel() is True
        gate.set()
        async with app.worker(concurrency=2):
            with pytest.raises(taskq.WorkflowFailed):
                await run.result(timeout=30)
        states = {s.name: str(s.state) for s in (await run.status()).steps}
        assert states == {"hold": "succeeded", "use": "cancelled", "use-2": "cancelled"}
        with pytest.raises(taskq.ConfigurationError, match="retry\\(\\)"):
            await step.retry()


async def test_results_reach_a_child_when_the_parents_history_row_is_gone(
    app: taskq.App, conn: asyncpg.Connection, schema: str
) -> None:
    gate = asyncio.Event()

    @app.task
    async def quick() -> str:
        return "quick"

    @app.task
    async def slow() -> str:
        await gate.wait()
        return "slow"

    @app.task
    async def both(parts: list[str]) -> str:
        return "/".join(parts)

    async with app:
        wf = taskq.Workflow()
        q = wf.add(quick)
        wf.add(both, parts=[q, wf.add(slow)])
        run = await wf.enqueue()
        async with app.worker(concurrency=4):

            async def quick_done() -> Any:
                return await conn.fetchval(
                    f'SELECT id FROM "{schema}".history WHERE workflow_id = $1 AND step = $2',
                    run.id,
                    "quick",
                )

            while not await quick_done():
                await asyncio.sleep(0.02)
            # As retention would (an operator's purge, or a short retention).
            await conn.execute(
                f'DELETE FROM "{schema}".history WHERE id = $1', run.job_ids["quick"]
            )
            gate.set()
            assert await run.result(timeout=30) == "quick/slow"


# -- the builder refuses mistakes ---------------------------------------------------------


async def test_the_builder_refuses_mistakes_with_clear_errors(app: taskq.App) -> None:
    @app.task
    async def one(x: int) -> int:
        return x

    @app.task
    async def listy(items: list[int], x: int = 0) -> int:
        return x

    other_app = taskq.App("postgresql://nowhere/none")

    @other_app.task
    async def elsewhere() -> None:
        return None

    wf = taskq.Workflow(name="checks")
    first = wf.add(one, x=1)
    other = taskq.Workflow(name="other")
    foreign = other.add(one, x=2)
    with pytest.raises(taskq.ConfigurationError, match="belongs to workflow 'other'"):
        wf.add(one, x=foreign)
    with pytest.raises(taskq.ConfigurationError, match="belongs to workflow 'other'"):
        wf.add(one, x=1, after=[foreign])
    with pytest.raises(TypeError, match=r"decorated with @app\.task"):
        wf.add(print, x=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="missing a required argument: 'x'"):
        wf.add(one, y=first)
    with pytest.raises(taskq.SerializationError):
        wf.add(one, x=object())
    with pytest.raises(taskq.ConfigurationError, match="on_parent_failure"):
        wf.add(one, x=first, on_parent_failure="ignore")
    with pytest.raises(taskq.ConfigurationError, match="already has a step 'one'"):
        wf.add(one, x=2, step_name="one")
    with pytest.raises(taskq.ConfigurationError, match="kept for the items of a map"):
        wf.add(one, x=2, step_name="one[1]")
    with pytest.raises(taskq.ConfigurationError, match="another App"):
        wf.add(elsewhere)

    class FakeConnection:
        async def fetchval(self) -> None: ...

    with pytest.raises(taskq.ConfigurationError, match=r"wf\.enqueue\(connection"):
        wf.add(one.options(connection=FakeConnection()), x=1)
    with pytest.raises(taskq.ConfigurationError, match="do not pass it as well"):
        wf.map(listy, over=first, arg="x", x=3, items=[])
    with pytest.raises(taskq.ConfigurationError, match="what it maps over"):
        wf.map(listy, over=first, arg="x", items=[first])
    with pytest.raises(taskq.ConfigurationError, match="belongs to workflow 'other'"):
        wf.map(one, over=foreign, arg="x")
    with pytest.raises(taskq.ConfigurationError, match="has no steps"):
        await taskq.Workflow(name="empty").enqueue()
    with pytest.raises(taskq.ConfigurationError, match="non-empty"):
        taskq.Workflow(name="")
    # Nothing above was recorded.
    assert wf.steps == ["one"]


async def test_a_step_with_a_unique_key_a_live_job_holds_refuses_the_whole_workflow(
    app: taskq.App, conn: asyncpg.Connection, schema: str
) -> None:
    @app.task
    async def once(x: int) -> int:
        return x

    async with app:
        await once.options(unique_key="k").enqueue(x=0)
        wf = taskq.Workflow()
        wf.add(once, x=wf.add(once.options(unique_key="k"), x=1))
        with pytest.raises(taskq.DatabaseError):
            await wf.enqueue()
        assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".workflows') == 0
        assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".jobs') == 1


async def test_enqueue_middleware_sees_the_workflow_and_its_meta_reaches_every_step(
    app: taskq.App,
) -> None:
    seen: list[tuple[str, int, bool]] = []

    @app.enqueue_middleware
    async def tag(ctx: taskq.EnqueueContext, call_next: Any) -> Any:
        ctx.meta["trace"] = "t-1"
        result = await call_next()
        seen.append((ctx.task, ctx.count, len(ctx.job_ids) == ctx.count))
        return result

    @app.task
    async def meta_of(ctx: taskq.JobContext, x: int = 0) -> dict[str, Any]:
        return dict(ctx.meta)

    async with app:
        wf = taskq.Workflow(name="traced", meta={"team": "ops"})
        wf.add(meta_of, x=wf.add(meta_of.options(meta={"own": 1})))
        run = await wf.enqueue()
        assert seen == [("workflow:traced", 2, True)]
        async with app.worker(concurrency=2):
            assert await run.result(timeout=30) == {"team": "ops", "trace": "t-1"}
        first = await (await run.job("meta_of")).result()
        assert first == {"team": "ops", "trace": "t-1", "own": 1}
        assert (await run.status()).meta == {"team": "ops", "trace": "t-1"}


async def test_list_workflows_by_state_and_page(app: taskq.App) -> None:
    @app.task(retry=NO_RETRY)
    async def maybe(fail: bool) -> None:
        if fail:
            raise ValueError("no")

    async with app:
        runs = []
        for i in range(5):
            wf = taskq.Workflow(name=f"w{i % 2}")
            wf.add(maybe, fail=i == 3)
            runs.append(await wf.enqueue())
        await app.drain(concurrency=4)
        listed = await app.list_workflows()
        assert [w.id for w in listed] == [r.id for r in reversed(runs)]
        failed = await app.list_workflows(state="failed")
        assert [w.id for w in failed] == [runs[3].id]
        page = await app.list_workflows(limit=2, before_id=runs[3].id)
        assert [w.id for w in page] == [runs[2].id, runs[1].id]
        assert [w.id for w in await app.list_workflows(name="w1")] == [runs[3].id, runs[1].id]
        assert listed[0].counts["succeeded"] == 1 and listed[0].steps == []
        with pytest.raises(ValueError, match="bogus"):
            await app.list_workflows(state="bogus")
        with pytest.raises(ValueError, match="limit must be a positive int"):
            await app.list_workflows(limit=0)
        with pytest.raises(ValueError, match="before_id must be a workflow id"):
            await app.list_workflows(before_id="7")  # type: ignore[arg-type]
        with pytest.raises(taskq.WorkflowNotFound):
            await app.get_workflow(10**15).status()


async def test_a_step_the_rescue_ends_releases_its_children_the_same_way(
    app: taskq.App, conn: asyncpg.Connection, schema: str
) -> None:
    """A step whose worker died on its last attempt: the rescue fails it and its
    on_parent_failure="run" child runs with a StepFailed, its default child is cancelled."""

    @app.task(retry=NO_RETRY)
    async def lost() -> int:
        return 1

    @app.task
    async def report(value: int) -> str:
        return str(value)

    async with app:
        wf = taskq.Workflow()
        first = wf.add(lost)
        wf.add(report, value=first, on_parent_failure="run")
        wf.add(report, value=first)
        run = await wf.enqueue()
        # As if a worker had claimed it and died: running, lease long expired.
        await conn.execute(
            f"UPDATE \"{schema}\".jobs SET state = 'running', attempts = 1, "
            "lease_token = gen_random_uuid(), lease_expires_at = now() - interval '1 minute' "
            "WHERE id = $1",
            run.job_ids["lost"],
        )
        async with app.database.acquire("test") as c:
            requeued, ended = await app.store.rescue_expired(c)
        assert (requeued, ended) == ([], [run.job_ids["lost"]])
        async with app.worker(concurrency=2):
            with pytest.raises(taskq.WorkflowFailed):
                await run.result(timeout=30)
        status = await run.status()
        assert (status.step("lost").error or {})["type"] == "taskq.LeaseExpired"
        assert str(status.step("report-2").state) == "cancelled"
        shown = await (await run.job("report")).result()
        assert shown.startswith("step 'lost' failed: taskq.LeaseExpired")


async def test_cancelling_a_running_step_cancels_its_descendants(app: taskq.App) -> None:
    started = asyncio.Event()

    @app.task
    async def forever() -> int:
        started.set()
        await asyncio.sleep(3600)
        return 0

    @app.task
    async def use(x: int) -> int:
        return x

    async with app:
        wf = taskq.Workflow()
        wf.add(use, x=wf.add(use, x=wf.add(forever)))
        run = await wf.enqueue()
        async with app.worker(concurrency=2):
            await asyncio.wait_for(started.wait(), 30)
            assert await (await run.job("forever")).cancel() is True
            with pytest.raises(taskq.WorkflowFailed):
                await run.result(timeout=30)
        states = {s.name: str(s.state) for s in (await run.status()).steps}
        assert states == {"forever": "cancelled", "use": "cancelled", "use-2": "cancelled"}


async def test_ctx_transaction_in_a_step_whose_result_is_passed_on_is_refused(
    app: taskq.App, conn: asyncpg.Connection, schema: str
) -> None:
    """It would end the step at the commit, before the task returns its value."""

    @app.task(retry=NO_RETRY)
    async def write(ctx: taskq.JobContext, tag: str) -> str:
        async with ctx.transaction() as tx:
            await tx.execute(f'INSERT INTO "{schema}".effects VALUES ($1)', tag)
        return tag

    @app.task
    async def take(value: str) -> str:
        return value

    async with app:
        await conn.execute(f'CREATE TABLE "{schema}".effects (tag text)')
        wf = taskq.Workflow()
        wf.add(take, value=wf.add(write, tag="passed-on"))
        ordered = wf.add(write, tag="ordered-only")
        wf.add(take, value="after", after=[ordered])
        run = await wf.enqueue()
        async with app.worker(concurrency=2):
            with pytest.raises(taskq.WorkflowFailed):
                await run.result(timeout=30)
        status = await run.status()
        error = status.step("write").error or {}
        assert error["type"] == "RuntimeError"
        assert "later steps take it" in error["message"]
        # A step that later steps only wait for may use it: it ran, then its child.
        assert str(status.step("write-2").state) == "succeeded"
        assert str(status.step("take-2").state) == "succeeded"
        tags = [r[0] for r in await conn.fetch(f'SELECT tag FROM "{schema}".effects')]
        assert tags == ["ordered-only"]


async def test_cancelling_a_map_that_made_its_items_cancels_the_items(
    app: taskq.App, conn: asyncpg.Connection, schema: str
) -> None:
    ran: list[int] = []

    @app.task
    async def listing() -> list[int]:
        return [1, 2, 3]

    @app.task
    async def item(x: int) -> int:
        ran.append(x)
        return x

    @app.task
    async def total(parts: list[int]) -> int:
        return sum(parts)

    async with app:
        wf = taskq.Workflow()
        items = wf.map(item.options(queue="items"), over=wf.add(listing), arg="x")
        wf.add(total, parts=items)
        run = await wf.enqueue()
        await app.drain(queues=["default"])  # listing runs; the items wait in their queue
        listed = await app.list_workflows()
        assert listed[0].counts["queued"] == 3 and listed[0].counts["waiting"] == 2
        assert await (await run.job("item")).cancel() is True
        with pytest.raises(taskq.WorkflowFailed):
            await run.result(timeout=10)
        await app.drain()
        assert ran == []
        states = {s.name: str(s.state) for s in (await run.status()).steps}
        assert states == {
            "listing": "succeeded",
            "item": "cancelled",
            "total": "cancelled",
            "item[0]": "cancelled",
            "item[1]": "cancelled",
            "item[2]": "cancelled",
        }
        assert await leftovers(conn, schema, run.id) == 0
