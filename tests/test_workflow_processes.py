"""Workflows run by real worker processes: fan-in races, a SIGKILL mid-workflow, maps, cancel.

The steps run in ``python -m taskq worker workflowapp:app`` processes
(tests/workflowapp.py) and write ledger rows stamped with the database's
clock. Exactly-once is asserted on what the database keeps (history rows,
attempts, rescues, the workflow's counts); a ledger row is exact only where no
process was killed. The in-process workflow tests are in test_workflows.py.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import taskq

from .conftest import until
from .worker_process import WorkerProcess
from .workflowapp import LEDGER_SQL, Tasks, register

pytestmark = pytest.mark.anyio

LEASE = 2.0  # seconds: a killed worker's steps are rescued a few seconds later


@pytest.fixture
async def wapp(pg_dsn: str, schema: str) -> AsyncIterator[tuple[taskq.App, Tasks]]:
    """The test's App (migrated, with the ledger) and the tasks the workers run."""
    app = taskq.App(pg_dsn, schema=schema)
    tasks = register(app)
    async with app:
        await execute(app, LEDGER_SQL.format(schema=f'"{schema}"'))
        yield app, tasks


@pytest.fixture
def workers(pg_dsn: str, schema: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes of workflowapp:app; all stopped at the end, by PID."""
    started: list[WorkerProcess] = []

    def start(concurrency: int = 10) -> WorkerProcess:
        w = WorkerProcess(
            pg_dsn,
            schema,
            "workflowapp:app",
            tmp_path / f"worker{len(started)}.log",
            "--concurrency",
            str(concurrency),
            "--lease-seconds",
            str(LEASE),
            "--poll-interval",
            "0.5",
            "--shutdown-timeout",
            "1",
        )
        started.append(w)
        return w

    try:
        yield start
    finally:
        for w in started:
            w.signal(signal.SIGTERM)
        for w in started:
            w.stop()


async def execute(app: taskq.App, query: str, *args: Any) -> None:
    async with app.pool.acquire() as c:
        await c.execute(query.replace("{s}", f'"{app.schema}"'), *args)


async def val(app: taskq.App, query: str, *args: Any) -> Any:
    async with app.pool.acquire() as c:
        return await c.fetchval(query.replace("{s}", f'"{app.schema}"'), *args)


async def rows(app: taskq.App, query: str, *args: Any) -> list[Any]:
    async with app.pool.acquire() as c:
        return list(await c.fetch(query.replace("{s}", f'"{app.schema}"'), *args))


async def all_registered(app: taskq.App, procs: list[WorkerProcess]) -> None:
    """Wait until every process has registered (so that none gets all the first steps)."""
    pids = [w.proc.pid for w in procs]

    async def check() -> bool:
        for w in procs:
            if w.proc.poll() is not None:
                raise AssertionError(f"worker exited at start:\n{w.text()}")
        n = await val(app, "SELECT count(*) FROM {s}.workers WHERE pid = ANY($1)", pids)
        return bool(n == len(pids))

    await until(check, 60, f"{len(pids)} worker processes to start")


async def kill(w: WorkerProcess) -> None:
    w.proc.send_signal(signal.SIGKILL)
    await anyio.to_thread.run_sync(w.proc.wait, 10)


# -- fan-in ------------------------------------------------------------------------------


async def test_100_way_fan_in_releases_its_join_once_under_4_processes(
    wapp: tuple[taskq.App, Tasks], workers: Callable[..., WorkerProcess]
) -> None:
    """20 workflows of 100 parts and a join, at once: parts of one workflow end at
    the same instant in different processes; exactly one of those ends releases
    the join, with all 100 results."""
    app, t = wapp
    procs = [workers(concurrency=16) for _ in range(4)]
    await all_registered(app, procs)

    def build(n: int) -> taskq.Workflow:
        wf = taskq.Workflow(name=f"fan-{n}")
        parts = [wf.add(t.part, i=i, step_name=f"part-{i}") for i in range(100)]
        wf.add(t.join, parts=parts, step_name="join")
        return wf

    runs = await asyncio.gather(*(build(n).enqueue() for n in range(20)))
    results = await asyncio.gather(*(run.result(timeout=60) for run in runs))
    expected = [i * i for i in range(100)]
    assert all(r == expected for r in results)

    ids = [run.id for run in runs]
    history = await rows(
        app,
        "SELECT workflow_id, step, state, attempts, rescues, result::text AS result, "
        "(SELECT count(*) FROM jsonb_object_keys(inputs)) AS inputs, worker_id "
        "FROM {s}.history WHERE workflow_id = ANY($1)",
        ids,
    )
    ran = await rows(
        app,
        "SELECT h.workflow_id, h.step, count(*) AS n FROM {s}.ledger AS l "
        "JOIN {s}.history AS h ON h.id = l.job_id GROUP BY 1, 2",
    )
    runs_of = {(r["workflow_id"], r["step"]): r["n"] for r in ran}
    for run in runs:
        steps = {r["step"]: r for r in history if r["workflow_id"] == run.id}
        assert len(steps) == 101, run
        assert all(r["state"] == "succeeded" and r["attempts"] == 1 for r in steps.values())
        assert steps["join"]["inputs"] == 100
        assert all(runs_of.get((run.id, name)) == 1 for name in steps), run
        status = await run.status(steps=False)
        assert status.state is taskq.WorkflowState.SUCCEEDED
        assert (status.total, status.counts["succeeded"]) == (101, 101)
        assert status.counts["failed"] == status.counts["cancelled"] == 0
    # The parts really were spread over the processes.
    assert len({r["worker_id"] for r in history}) == 4
    assert await val(app, "SELECT count(*) FROM {s}.jobs") == 0


# -- a worker SIGKILLed while it holds steps ------------------------------------------------


async def test_steps_of_a_sigkilled_worker_run_again_and_the_workflow_succeeds(
    wapp: tuple[taskq.App, Tasks], workers: Callable[..., WorkerProcess]
) -> None:
    """10 steps -> 10 steps -> a join on 2 processes; the one holding middle steps is
    SIGKILLed. Its steps are rescued and run again elsewhere, each step ends
    succeeded exactly once (one history row) and the join gets every result."""
    app, t = wapp
    doomed, other = workers(concurrency=5), workers(concurrency=5)
    await all_registered(app, [doomed, other])
    doomed_id = await val(app, "SELECT id FROM {s}.workers WHERE pid = $1", doomed.proc.pid)

    rng = random.Random(7)
    wf = taskq.Workflow(name="killed")
    first = [
        wf.add(t.node, tag=f"first-{i}", base=i, inputs=[], seconds=0.3 + rng.random() * 0.3,
               step_name=f"first-{i}")
        for i in range(10)
    ]  # fmt: skip
    mid = [
        wf.add(t.node, tag=f"mid-{i}", base=100 * i, inputs=[first[i], first[(i + 1) % 10]],
               seconds=1.0 + rng.random() * 0.5, step_name=f"mid-{i}")
        for i in range(10)
    ]  # fmt: skip
    wf.add(t.collect, parts=mid, step_name="collect")
    run = await wf.enqueue()

    async def doomed_holds_fresh_middle_steps() -> bool:
        # Some middle step of the doomed worker started well within its sleep
        # (so it is still running at the kill), and every step it holds has
        # started (so the kill cuts steps that ran, not just claims).
        row = await rows(
            app,
            "SELECT count(*) FILTER (WHERE j.step LIKE 'mid-%' AND EXISTS ("
            "    SELECT 1 FROM {s}.ledger AS l WHERE l.job_id = j.id AND l.event = 'start'"
            "    AND l.at > clock_timestamp() - interval '0.5 s')) AS fresh, "
            "count(*) FILTER (WHERE NOT EXISTS ("
            "    SELECT 1 FROM {s}.ledger AS l WHERE l.job_id = j.id AND l.event = 'start'"
            "    AND l.attempt = j.attempts)) AS unstarted "
            "FROM {s}.jobs AS j WHERE j.state = 'running' AND j.worker_id = $1",
            doomed_id,
        )
        return bool(row[0]["fresh"] >= 1 and row[0]["unstarted"] == 0)

    await until(doomed_holds_fresh_middle_steps, 30, "middle steps running on the doomed worker")
    await kill(doomed)
    workers(concurrency=5)  # the replacement
    await anyio.sleep(0.3)  # a statement the killed process had sent has been answered
    held = {
        r["step"]
        for r in await rows(
            app,
            "SELECT step FROM {s}.jobs WHERE state = 'running' AND worker_id = $1",
            doomed_id,
        )
    }
    assert any(s.startswith("mid-") for s in held), held

    value = await run.result(timeout=60)
    firsts = list(range(10))
    assert value == [100 * i + firsts[i] + firsts[(i + 1) % 10] for i in range(10)]
    status = await run.status()
    assert status.state is taskq.WorkflowState.SUCCEEDED
    assert (status.total, status.counts["succeeded"]) == (21, 21)

    history = await rows(
        app,
        "SELECT id, step, state, attempts, rescues FROM {s}.history WHERE workflow_id = $1",
        run.id,
    )
    steps = {r["step"]: r for r in history}
    assert len(history) == len(steps) == 21  # one history row per step
    assert all(r["state"] == "succeeded" for r in history)
    starts = await rows(
        app,
        "SELECT h.step, l.pid, l.attempt FROM {s}.ledger AS l "
        "JOIN {s}.history AS h ON h.id = l.job_id WHERE l.event = 'start'",
    )
    pid = doomed.proc.pid
    by_doomed = {s: [r for r in starts if r["step"] == s and r["pid"] == pid] for s in steps}
    by_others = {s: [r for r in starts if r["step"] == s and r["pid"] != pid] for s in steps}
    for name, r in steps.items():
        if name in held:
            # Rescued once, started once more elsewhere (at most once on the
            # doomed worker: a claim it had not started yet was cut too).
            assert (r["rescues"], r["attempts"]) == (1, 2), (name, dict(r))
            assert len(by_doomed[name]) <= 1 and len(by_others[name]) == 1, name
            assert by_others[name][0]["attempt"] == 2
        else:
            assert (r["rescues"], r["attempts"]) == (0, 1), (name, dict(r))
            assert len(by_doomed[name]) + len(by_others[name]) == 1, name
    # The kill cut steps that were running: those started twice.
    assert any(len(by_doomed[s]) == 1 for s in held), held
    assert await val(app, "SELECT count(*) FROM {s}.jobs") == 0


# -- a map ---------------------------------------------------------------------------------


async def test_a_map_of_500_items_over_3_processes_reduces_in_order(
    wapp: tuple[taskq.App, Tasks], workers: Callable[..., WorkerProcess]
) -> None:
    """A map expanded at run time into 500 items that 3 processes share; the
    reducer is released once, by the last item to end, with all 500 in order."""
    app, t = wapp
    procs = [workers(concurrency=20) for _ in range(3)]
    await all_registered(app, procs)

    wf = taskq.Workflow(name="mapreduce")
    items = wf.add(t.split, n=500)
    squares = wf.map(t.square, over=items, arg="x")
    wf.add(t.reduce, parts=squares)
    run = await wf.enqueue()
    assert await run.result(timeout=60) == [x * x for x in range(500)]

    status = await run.status()
    assert status.state is taskq.WorkflowState.SUCCEEDED
    assert (status.total, status.counts["succeeded"]) == (503, 503)
    assert [s.name for s in status.steps if s.map_of is not None] == [
        f"square[{i}]" for i in range(500)
    ]
    spread = await rows(
        app,
        "SELECT worker_id, count(*) AS n, bool_and(attempts = 1) AS once FROM {s}.history "
        "WHERE workflow_id = $1 AND step LIKE 'square[%' GROUP BY 1",
        run.id,
    )
    assert sum(r["n"] for r in spread) == 500 and all(r["once"] for r in spread)
    assert len(spread) >= 2  # the items ran in more than one process
    assert await val(app, "SELECT count(*) FROM {s}.jobs") == 0


# -- cancel --------------------------------------------------------------------------------


async def test_cancel_under_load_starts_nothing_after_it_returns(
    wapp: tuple[taskq.App, Tasks], workers: Callable[..., WorkerProcess]
) -> None:
    """200 steps in 4 layers on 2 processes, cancelled while the second layer runs:
    nothing is claimed after cancel() returns (on the database's clock), what had
    not started never does, the workflow ends cancelled and leaves no job."""
    app, t = wapp
    procs = [workers(concurrency=10) for _ in range(2)]
    await all_registered(app, procs)

    rng = random.Random(4)
    wf = taskq.Workflow(name="cancel-under-load")
    layer: list[taskq.StepRef] = []
    for k in range(4):
        layer = [
            wf.add(t.node, tag=f"l{k}-{j}", base=j,
                   inputs=[layer[j], layer[(j + 1) % 50]] if layer else [],
                   seconds=0.05 + rng.random() * 0.1, step_name=f"l{k}-{j}")
            for j in range(50)
        ]  # fmt: skip
    run = await wf.enqueue()

    async def layer_1_runs() -> bool:
        n = await val(
            app, "SELECT count(*) FROM {s}.ledger WHERE tag LIKE 'l1-%' AND event = 'start'"
        )
        return bool(n >= 5)

    await until(layer_1_runs, 30, "the second layer to run")
    assert await run.cancel() is True
    cancelled_at = await val(app, "SELECT clock_timestamp()")
    status = await run.wait(timeout=30)
    assert status.state is taskq.WorkflowState.CANCELLED
    assert status.total == 200
    assert await val(app, "SELECT count(*) FROM {s}.jobs") == 0

    history = await rows(
        app,
        "SELECT h.step, h.state, h.attempts, h.started_at AS claimed_at, "
        "    (SELECT min(l.at) FROM {s}.ledger AS l WHERE l.job_id = h.id "
        "        AND l.event = 'start') AS started_at, "
        "    (SELECT count(*) FROM {s}.ledger AS l WHERE l.job_id = h.id "
        "        AND l.event = 'start') AS starts "
        "FROM {s}.history AS h WHERE h.workflow_id = $1",
        run.id,
    )
    assert len(history) == 200
    assert all(r["starts"] <= 1 for r in history)  # no kill, no retry: exact
    assert {r["state"] for r in history} <= {"succeeded", "cancelled"}
    # No step was claimed after cancel() returned (the claim's started_at is
    # the database's clock too): nothing of the workflow was left to claim.
    claimed_late = [r["step"] for r in history if (r["claimed_at"] or cancelled_at) > cancelled_at]
    assert claimed_late == [], claimed_late
    # So no step started after it either, except one that was already running
    # (claimed, flagged by the cancel) whose body sent its first statement
    # before its worker read the cancel notification: that is no new start.
    late = {
        r["step"]: r["started_at"] - cancelled_at
        for r in history
        if r["started_at"] is not None and r["started_at"] > cancelled_at
    }
    assert all(r["claimed_at"] is not None for r in history if r["step"] in late), late
    # The steps that had not started by then never did, and were cancelled.
    unstarted = [
        r
        for r in history
        if r["step"] not in late and (r["started_at"] or cancelled_at) >= cancelled_at
    ]
    assert all(r["state"] == "cancelled" and r["starts"] == 0 for r in unstarted)
    # Most of them were not even claimed: cancelled in the database, never run.
    never = [r for r in unstarted if r["claimed_at"] is None]
    assert all(r["attempts"] == 0 for r in never)
    assert len(never) >= 50, len(never)  # at least the last layer
    assert status.counts["cancelled"] == sum(r["state"] == "cancelled" for r in history)
    assert status.counts["succeeded"] == sum(r["state"] == "succeeded" for r in history)
