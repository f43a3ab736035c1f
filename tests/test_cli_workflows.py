"""``python -m taskq workflows ...`` and the operator commands on workflow steps,
run as real subprocesses against a real Postgres.

Workflows run in the test's own process (``app.drain()``, or ``app.worker()``
while a command runs beside it); every command is a real ``python -m taskq``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import anyio
import asyncpg
import pytest

import taskq

from .conftest import PYTHON, subprocess_env, until

pytestmark = pytest.mark.anyio

NO_RETRY = taskq.Retry(attempts=1)


async def cli(pg_dsn: str, schema: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m taskq ARGS --dsn DSN --schema SCHEMA``, without blocking the event loop
    (a worker may be running in it)."""
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [PYTHON, "-m", "taskq", *args, "--dsn", pg_dsn, "--schema", schema],
            env=subprocess_env(pg_dsn),
            check=False,
            stdin=subprocess.DEVNULL,
        )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def step_line(stdout: str, name: str) -> str:
    """The line of step ``name`` in the tree of ``workflows show``."""
    for line in stdout.splitlines():
        cells = line.split()
        if cells and cells[0] == name:
            return line
    raise AssertionError(f"no line for step {name!r} in:\n{stdout}")


def indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


async def step_rows(conn: asyncpg.Connection, schema: str, workflow_id: int) -> dict[str, Any]:
    """{step: (state, attempts, started_at, error message)} from history and the live table."""
    rows = await conn.fetch(
        "SELECT step, state, attempts, started_at, error ->> 'message' AS message "
        f'FROM "{schema}".history WHERE workflow_id = $1 UNION ALL '
        f'SELECT step, state, attempts, started_at, NULL FROM "{schema}".jobs '
        "WHERE workflow_id = $1",
        workflow_id,
    )
    return {r["step"]: r for r in rows}


def report_tasks(app: taskq.App) -> dict[str, Any]:
    """fetch -> merge (fan-in), listing -> square (a map; item 7 fails) -> total."""

    @app.task(name="wf.fetch")
    async def fetch(n: int) -> int:
        return n

    @app.task(name="wf.merge")
    async def merge(parts: list[int]) -> int:
        return sum(parts)

    @app.task(name="wf.listing")
    async def listing(k: int) -> list[int]:
        return list(range(k))

    @app.task(name="wf.square", retry=NO_RETRY)
    async def square(x: int) -> int:
        if x == 7:
            raise ValueError("seven is unlucky")
        return x * x

    @app.task(name="wf.total")
    async def total(a: int, b: list[int]) -> int:
        return a + sum(b)

    return {"fetch": fetch, "merge": merge, "listing": listing, "square": square, "total": total}


def report_workflow(tasks: dict[str, Any], items: int = 20) -> taskq.Workflow:
    wf = taskq.Workflow(name="report")
    parts = [wf.add(tasks["fetch"], n=i) for i in range(3)]
    merged = wf.add(tasks["merge"], parts=parts)
    numbers = wf.add(tasks["listing"], k=items)
    squares = wf.map(tasks["square"], over=numbers, arg="x")
    wf.add(tasks["total"], a=merged, b=squares)
    return wf


# -- list ------------------------------------------------------------------------------


async def test_list_filters_pages_and_json(app: taskq.App, pg_dsn: str, schema: str) -> None:
    @app.task(name="wf.ok")
    async def ok(n: int) -> int:
        return n

    @app.task(name="wf.bad", retry=NO_RETRY)
    async def bad() -> None:
        raise RuntimeError("no")

    async with app:
        ids = []
        for i in range(3):
            wf = taskq.Workflow(name="alpha")
            wf.add(ok, n=wf.add(ok, n=i))
            ids.append((await wf.enqueue()).id)
        wf = taskq.Workflow(name="beta")
        wf.add(ok, n=wf.add(bad))
        failed = (await wf.enqueue()).id
        await app.drain()
        wf = taskq.Workflow(name="beta")
        first = wf.add(ok, n=1)
        wf.add(ok, n=first)
        wf.add(ok, n=2)
        running = (await wf.enqueue()).id  # never run: its steps stay queued and waiting

    done = await cli(pg_dsn, schema, "workflows", "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == [
        "id",
        "name",
        "state",
        "steps",
        "succeeded/failed/cancelled",
        "pending",
        "created",
        "finished",
    ]
    rows = {int(line.split()[0]): line.split() for line in lines[1:]}
    assert list(rows) == [running, failed, *reversed(ids)]  # newest first
    assert rows[running][1:6] == ["beta", "running", "3", "0/0/0", "3"]
    assert rows[running][-1] == "-"  # not finished
    assert rows[failed][1:6] == ["beta", "failed", "2", "0/1/1", "0"]
    assert rows[ids[0]][1:6] == ["alpha", "succeeded", "2", "2/0/0", "0"]
    assert "next page" not in done.stdout

    by_state = await cli(pg_dsn, schema, "workflows", "list", "--state", "failed")
    assert [int(line.split()[0]) for line in by_state.stdout.splitlines()[1:]] == [failed]
    by_name = await cli(pg_dsn, schema, "workflows", "list", "--name", "alpha")
    assert [int(line.split()[0]) for line in by_name.stdout.splitlines()[1:]] == ids[::-1]

    # Paging: a full page names the next one; --before takes it (keyset, by id).
    page = await cli(pg_dsn, schema, "workflows", "list", "--limit", "2")
    assert page.returncode == 0, page.stderr
    assert [int(line.split()[0]) for line in page.stdout.splitlines()[1:3]] == [running, failed]
    assert page.stdout.rstrip().endswith(f"next page: --before {failed}")
    rest = await cli(pg_dsn, schema, "workflows", "list", "--limit", "2", "--before", str(failed))
    assert [int(line.split()[0]) for line in rest.stdout.splitlines()[1:3]] == [ids[2], ids[1]]
    last = await cli(pg_dsn, schema, "workflows", "list", "--before", str(ids[0]))
    assert last.stdout.strip() == "no workflows before that id"

    as_json = await cli(pg_dsn, schema, "workflows", "list", "--json", "--name", "beta")
    assert as_json.returncode == 0, as_json.stderr
    items = json.loads(as_json.stdout)
    assert [w["id"] for w in items] == [running, failed]
    assert set(items[0]) == {
        "id",
        "name",
        "state",
        "total",
        "succeeded",
        "failed",
        "cancelled",
        "pending",
        "cancel_requested",
        "created_at",
        "finished_at",
        "meta",
    }
    assert {k: items[1][k] for k in ("state", "total", "succeeded", "failed", "cancelled")} == {
        "state": "failed",
        "total": 2,
        "succeeded": 0,
        "failed": 1,
        "cancelled": 1,
    }
    assert (items[0]["pending"], items[0]["finished_at"]) == (3, None)
    paged = await cli(
        pg_dsn, schema, "workflows", "list", "--json", "--before", str(running), "--limit", "1"
    )
    assert [w["id"] for w in json.loads(paged.stdout)] == [failed]

    wrong = await cli(pg_dsn, schema, "workflows", "list", "--state", "done")
    assert wrong.returncode == 2
    assert "invalid choice: 'done'" in wrong.stderr


# -- show ------------------------------------------------------------------------------


async def test_show_draws_the_tree_with_errors_and_folds_map_items(
    app: taskq.App, pg_dsn: str, schema: str
) -> None:
    tasks = report_tasks(app)
    async with app:
        run = await report_workflow(tasks).enqueue()
        await app.drain(concurrency=8)  # releases each waiting step as its parents end
        assert (await run.status()).state is taskq.WorkflowState.FAILED

    done = await cli(pg_dsn, schema, "workflows", "show", str(run.id))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith(f"workflow {run.id}\n")
    header = dict(line.split(None, 1) for line in out.split("\n\n")[0].splitlines()[1:])
    assert header["name"] == "report"
    assert header["state"] == "failed"
    # 3 fetch, merge, listing, the map, its 20 items, total.
    assert header["steps"] == "27: 24 succeeded, 2 failed, 1 cancelled"
    assert header["finished"].endswith(" UTC") and header["duration"].endswith("s")

    # Roots first; each step under its first parent, the others named.
    fetch, merge, total = (step_line(out, n) for n in ("fetch", "merge", "total"))
    assert indent(fetch) == 0 and indent(merge) == 2 and indent(total) == 4
    assert merge.split()[1:3] == ["succeeded", "1/5"]
    assert "(also after: fetch-2, fetch-3)" in merge
    assert indent(step_line(out, "fetch-2")) == 0
    # The cancelled descendant names the parent that failed.
    assert total.split()[1:3] == ["cancelled", "0/5"]
    assert "(also after: square)" in total
    assert "taskq.ParentFailed: not run: its parent step 'square' failed" in total
    # The map, its items under it, the failed item with its error.
    square = step_line(out, "square")
    assert indent(square) == 0 and "(map)" in square and "failed" in square
    assert "taskq.MapFailed: 1 of 20 items did not succeed (the first: square[7])" in square
    bad = step_line(out, "square[7]")
    assert indent(bad) == 2 and bad.split()[1:3] == ["failed", "1/1"]
    assert "ValueError: seven is unlucky" in bad
    # Runs of more than 5 alike items fold into one line after their first.
    assert indent(step_line(out, "square[0]")) == 2
    assert "  ... 6 more succeeded" in out and "(square[1] to square[6])" in out
    assert "  ... 11 more succeeded" in out and "(square[9] to square[19])" in out
    assert "square[3]" not in out.replace("(square[1] to square[6])", "")
    started, finished, took = step_line(out, "square[8]").split()[3:6]
    assert len(started) == len(finished) == 8 and took.endswith("s")

    everything = await cli(pg_dsn, schema, "workflows", "show", str(run.id), "--all")
    assert everything.returncode == 0, everything.stderr
    assert "more succeeded" not in everything.stdout
    assert all(f"square[{i}]" in everything.stdout for i in range(20))

    as_json = await cli(pg_dsn, schema, "workflows", "show", str(run.id), "--json")
    detail = json.loads(as_json.stdout)
    assert (detail["id"], detail["name"], detail["state"], detail["total"]) == (
        run.id,
        "report",
        "failed",
        27,
    )
    steps = {s["name"]: s for s in detail["steps"]}
    assert len(steps) == 27
    assert steps["square[7]"]["map_of"] == steps["square"]["job_id"] == run.job_ids["square"]
    assert steps["square[7]"]["position"] == 7
    assert steps["square[7]"]["error"]["message"] == "seven is unlucky"
    assert steps["merge"]["parents"] == ["fetch", "fetch-2", "fetch-3"]
    assert steps["total"]["error"]["type"] == "taskq.ParentFailed"


async def test_show_keeps_a_500_item_map_short(app: taskq.App, pg_dsn: str, schema: str) -> None:
    tasks = report_tasks(app)
    async with app:
        wf = taskq.Workflow(name="big")
        numbers = wf.add(tasks["listing"], k=500)
        wf.map(tasks["fetch"], over=numbers, arg="n")
        run = await wf.enqueue()
        await app.drain(concurrency=50)
        assert (await run.status()).state is taskq.WorkflowState.SUCCEEDED

    done = await cli(pg_dsn, schema, "workflows", "show", str(run.id))
    assert done.returncode == 0, done.stderr
    assert "steps      502: 502 succeeded" in done.stdout
    assert "... 499 more succeeded" in done.stdout
    assert "(fetch[1] to fetch[499])" in done.stdout
    assert len(done.stdout.splitlines()) < 15


# -- cancel ----------------------------------------------------------------------------


async def test_cancel_a_running_workflow_its_waiting_steps_never_run(
    app: taskq.App, pg_dsn: str, schema: str, conn: asyncpg.Connection
) -> None:
    ran: list[str] = []

    @app.task(name="wf.slow", retry=NO_RETRY)
    async def slow() -> int:
        ran.append("slow")
        await asyncio.sleep(60)
        return 1

    @app.task(name="wf.after")
    async def after(x: int) -> int:
        ran.append("after")
        return x

    async with app:
        wf = taskq.Workflow(name="to-cancel")
        wf.add(after, x=wf.add(after, x=wf.add(slow)))
        run = await wf.enqueue()
        async with app.worker(concurrency=2):
            slow_job = app.get_job(run.job_ids["slow"])

            async def started() -> bool:
                return (await slow_job.status()).state is taskq.JobState.RUNNING

            await until(started, 30, "the slow step to start")
            done = await cli(pg_dsn, schema, "workflows", "cancel", str(run.id))
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith(f"workflow {run.id} ('to-cancel')")
            status = await run.wait(timeout=30)
        assert status.state is taskq.WorkflowState.CANCELLED
        assert ran == ["slow"]  # the waiting steps never ran
        rows = await step_rows(conn, schema, run.id)
        assert {name: r["state"] for name, r in rows.items()} == dict.fromkeys(
            ("slow", "after", "after-2"), "cancelled"
        )
        assert rows["after"]["started_at"] is None and rows["after"]["attempts"] == 0

    again = await cli(pg_dsn, schema, "workflows", "cancel", str(run.id))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == (
        f"workflow {run.id} ('to-cancel'): not cancelled: it has already ended (cancelled)"
    )
    as_json = await cli(pg_dsn, schema, "workflows", "cancel", str(run.id), "--json")
    assert json.loads(as_json.stdout) == {"id": run.id, "cancelled": False, "state": "cancelled"}
    shown = await cli(pg_dsn, schema, "workflows", "show", str(run.id))
    assert "taskq.JobCancelled" in step_line(shown.stdout, "slow")


async def test_cancel_a_workflow_with_nothing_running_ends_it_at_once(
    app: taskq.App, pg_dsn: str, schema: str
) -> None:
    @app.task(name="wf.ok")
    async def ok(n: int) -> int:
        return n

    async with app:
        wf = taskq.Workflow(name="idle")
        wf.add(ok, n=wf.add(ok, n=1))
        run = await wf.enqueue()  # no worker: queued and waiting

    done = await cli(pg_dsn, schema, "workflows", "cancel", str(run.id))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"workflow {run.id} ('idle') cancelled: 0 succeeded, 0 failed, 2 cancelled"
    )


# -- retry -----------------------------------------------------------------------------


async def test_retry_runs_again_only_what_did_not_succeed(
    app: taskq.App, pg_dsn: str, schema: str, conn: asyncpg.Connection
) -> None:
    runs: list[str] = []

    @app.task(name="wf.step")
    async def step(name: str) -> str:
        runs.append(name)
        return name

    @app.task(name="wf.flaky", retry=NO_RETRY)
    async def flaky(name: str) -> str:
        # Fails on its first run, succeeds on every later one (a row remembers).
        runs.append(name)
        async with app.pool.acquire() as c:
            first = await c.fetchval(
                f'INSERT INTO "{schema}".flags VALUES ($1) ON CONFLICT DO NOTHING RETURNING 1',
                name,
            )
        if first:
            raise RuntimeError(f"{name}: first run fails")
        return name

    @app.task(name="wf.join")
    async def join(a: str, b: str) -> str:
        runs.append("join")
        return f"{a}+{b}"

    async with app:
        await conn.execute(f'CREATE TABLE "{schema}".flags (name text PRIMARY KEY)')
        wf = taskq.Workflow(name="flaky")
        first = wf.add(step, name="first")
        middle = wf.add(flaky, name="middle", after=[first])
        wf.add(join, a=middle, b=wf.add(step, name="side"))
        run = await wf.enqueue()

        # While it runs, retry puts nothing back and says so.
        running = await cli(pg_dsn, schema, "workflows", "retry", str(run.id))
        assert running.returncode == 0, running.stderr
        assert running.stdout.strip() == (
            f"workflow {run.id} ('flaky') is still running: nothing retried (retry takes an "
            "ended workflow: wait for it to end, or cancel it first)"
        )

        await app.drain()
        assert (await run.status()).state is taskq.WorkflowState.FAILED
        assert sorted(runs) == ["first", "middle", "side"]

        done = await cli(pg_dsn, schema, "workflows", "retry", str(run.id))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(
            f"workflow {run.id} ('flaky'): put 2 failed or cancelled steps back;"
        )
        runs.clear()
        await app.drain()
        assert await run.result(timeout=10) == "middle+side"
        assert runs == ["middle", "join"]  # what succeeded did not run again
        status = await run.status()
        assert status.counts["succeeded"] == 4 and status.state is taskq.WorkflowState.SUCCEEDED

    over = await cli(pg_dsn, schema, "workflows", "retry", str(run.id), "--json")
    assert json.loads(over.stdout) == {"id": run.id, "retried": 0, "state": "succeeded"}
    text = await cli(pg_dsn, schema, "workflows", "retry", str(run.id))
    assert text.stdout.strip() == (
        f"workflow {run.id} ('flaky') succeeded: no failed or cancelled step to run again"
    )


async def test_unknown_workflow_ids_exit_with_the_not_found_status(
    app: taskq.App, pg_dsn: str, schema: str
) -> None:
    async with app:
        pass  # the schema exists, no workflow in it

    for action in ("show", "cancel", "retry"):
        done = await cli(pg_dsn, schema, "workflows", action, "424242")
        assert done.returncode == 3, (action, done.stdout, done.stderr)
        assert done.stdout == ""
        assert done.stderr.strip() == (
            f"taskq: error: no workflow with id 424242 in schema {schema!r}"
        )
    empty = await cli(pg_dsn, schema, "workflows", "list")
    assert (empty.returncode, empty.stdout.strip()) == (0, "no workflows")
    bad = await cli(pg_dsn, schema, "workflows", "show", "0")
    assert bad.returncode == 2
    assert "expected a positive integer" in bad.stderr
    huge = await cli(pg_dsn, schema, "workflows", "show", str(2**63))
    assert huge.returncode == 2


# -- the job commands on workflow steps ------------------------------------------------


async def test_cancel_of_a_queued_step_cancels_its_descendants(
    app: taskq.App, pg_dsn: str, schema: str, conn: asyncpg.Connection
) -> None:
    @app.task(name="wf.ok", queue="wfq")
    async def ok(n: int) -> int:
        return n

    async with app:
        wf = taskq.Workflow(name="chain")
        a = wf.add(ok, n=1)
        b = wf.add(ok, n=a)
        wf.add(ok, n=b)
        wf.add(ok, n=9, step_name="other")
        run = await wf.enqueue()  # no worker: a and other queued, b and ok-3 waiting
    ids = run.job_ids

    # The waiting steps, as jobs: their state, their workflow, what they wait for.
    waiting = await cli(pg_dsn, schema, "jobs", "list", "--state", "waiting")
    assert waiting.returncode == 0, waiting.stderr
    rows = {line.split()[0]: line.split() for line in waiting.stdout.splitlines()}
    assert rows["id"][-2:] == ["workflow", "error"]
    assert rows[str(ids["ok-2"])][1] == "waiting"
    assert rows[str(ids["ok-2"])][-1] == f"{run.id}:ok-2"
    assert set(rows) == {"id", str(ids["ok-2"]), str(ids["ok-3"])}
    shown = await cli(pg_dsn, schema, "jobs", "show", str(ids["ok-3"]))
    assert f"  workflow     {run.id} (step 'ok-3')" in shown.stdout
    assert "  waiting for  'ok-2'" in shown.stdout
    detail = json.loads(
        (await cli(pg_dsn, schema, "jobs", "show", str(ids["ok-2"]), "--json")).stdout
    )
    assert (detail["workflow_id"], detail["step"], detail["waiting_for"]) == (
        run.id,
        "ok-2",
        ["ok"],
    )
    status = await cli(pg_dsn, schema, "status")
    header, line = status.stdout.splitlines()[:2]
    assert header.split() == [
        "queue",
        "state",
        "waiting",
        "queued",
        "scheduled",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    ]
    assert line.split()[:4] == ["wfq", "active", "2", "2"]

    dry = await cli(pg_dsn, schema, "cancel", str(ids["ok"]), "--dry-run", "--json")
    assert json.loads(dry.stdout) == {
        "dry_run": True,
        "queued": 1,
        "running": 0,
        "waiting": 0,
        "workflow_steps": 1,
    }

    done = await cli(pg_dsn, schema, "cancel", str(ids["ok"]), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["cancelled_ids"] == [ids["ok"]]
    assert result["descendants_ended_ids"] == [ids["ok-2"], ids["ok-3"]]
    steps = await step_rows(conn, schema, run.id)
    assert {n: r["state"] for n, r in steps.items()} == {
        "ok": "cancelled",
        "ok-2": "cancelled",
        "ok-3": "cancelled",
        "other": "queued",
    }
    assert steps["ok"]["message"] == "cancelled by an operator (taskq cancel) before it ran"
    assert steps["ok-2"]["message"] == "not run: its parent step 'ok' was cancelled"
    assert steps["ok-3"]["message"] == "not run: its parent step 'ok-2' was cancelled"

    # By filter: the last step; the workflow ends (failed: no sink succeeded;
    # only run.cancel() / `workflows cancel` makes it cancelled).
    by_queue = await cli(pg_dsn, schema, "cancel", "--queue", "wfq")
    assert by_queue.returncode == 0, by_queue.stderr
    assert by_queue.stdout.startswith("cancelled 1 queued job;")
    listed = await cli(pg_dsn, schema, "workflows", "list", "--json")
    [item] = json.loads(listed.stdout)
    assert {k: item[k] for k in ("state", "total", "cancelled", "pending")} == {
        "state": "failed",
        "total": 4,
        "cancelled": 4,
        "pending": 0,
    }
    assert item["finished_at"] is not None


async def test_cancel_by_filter_takes_waiting_steps_with_their_descendants(
    app: taskq.App, pg_dsn: str, schema: str, conn: asyncpg.Connection
) -> None:
    @app.task(name="wf.ok", queue="wfq")
    async def ok(n: int) -> int:
        return n

    @app.task(name="wf.elsewhere", queue="other")
    async def elsewhere(n: int) -> int:
        return n

    async with app:
        wf = taskq.Workflow(name="mixed")
        root = wf.add(elsewhere, n=1)
        mid = wf.add(ok, n=root)  # waiting, queue wfq
        wf.add(elsewhere, n=mid)  # waiting, queue other: a descendant of mid
        run = await wf.enqueue()
        plain = await ok.enqueue(n=5)

    dry = await cli(pg_dsn, schema, "cancel", "--queue", "wfq", "--dry-run", "--json")
    assert json.loads(dry.stdout) == {
        "dry_run": True,
        "queued": 2,
        "running": 0,
        "waiting": 1,
        "workflow_steps": 1,
    }
    done = await cli(pg_dsn, schema, "cancel", "--queue", "wfq", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert sorted(result["cancelled_ids"]) == sorted([plain.id, run.job_ids["ok"]])
    assert result["cancelled_waiting"] == 1
    assert result["descendants_ended_ids"] == [run.job_ids["elsewhere-2"]]
    steps = await step_rows(conn, schema, run.id)
    assert {n: r["state"] for n, r in steps.items()} == {
        "elsewhere": "queued",
        "ok": "cancelled",
        "elsewhere-2": "cancelled",
    }
    # The root still runs; the workflow then ends failed (its sink was cancelled).
    async with app:
        await app.drain()
        status = await app.get_workflow(run.id).status()
    assert status.state is taskq.WorkflowState.FAILED
    assert (status.counts["succeeded"], status.counts["cancelled"]) == (1, 2)


async def test_bulk_retry_skips_workflow_steps_and_says_why(
    app: taskq.App, pg_dsn: str, schema: str
) -> None:
    @app.task(name="wf.bad", retry=NO_RETRY)
    async def bad(n: int) -> int:
        raise RuntimeError(f"bad {n}")

    @app.task(name="wf.ok")
    async def ok(n: int) -> int:
        return n

    async with app:
        wf = taskq.Workflow(name="broken")
        wf.add(ok, n=wf.add(bad, n=1))
        run = await wf.enqueue()
        plain = await bad.enqueue(n=2)
        await app.drain()
        assert (await run.status()).state is taskq.WorkflowState.FAILED
    step_id = run.job_ids["bad"]

    dry = await cli(pg_dsn, schema, "retry", "--all", "--dry-run", "--json")
    # The plain job; the step is not counted there but apart.
    assert json.loads(dry.stdout) == {
        "dry_run": True,
        "matched": 1,
        "key_held": 0,
        "workflow_steps": 1,
    }

    named = await cli(pg_dsn, schema, "retry", str(step_id), "--json")
    assert named.returncode == 0, named.stderr
    result = json.loads(named.stdout)
    assert (result["retried"], result["skipped"]) == (0, [])
    assert result["workflow_steps"] == {"skipped": 1, "ids": [step_id], "workflows": [run.id]}

    everything = await cli(
        pg_dsn, schema, "retry", "--all", "--state", "failed", "--state", "cancelled", "--json"
    )
    assert everything.returncode == 0, everything.stderr
    result = json.loads(everything.stdout)
    assert result["retried_ids"] == [plain.id]
    assert result["workflow_steps"] == {"skipped": 2, "ids": [], "workflows": [run.id]}

    async with app:
        status = await app.get_workflow(run.id).status()
        assert status.state is taskq.WorkflowState.FAILED  # untouched
        assert (await app.get_job(step_id).status()).state is taskq.JobState.FAILED
        assert (await plain.status()).state is taskq.JobState.QUEUED


async def test_retry_and_cancel_texts_name_the_workflow_steps(
    app: taskq.App, pg_dsn: str, schema: str
) -> None:
    @app.task(name="wf.bad", retry=NO_RETRY)
    async def bad(n: int) -> int:
        raise RuntimeError(f"bad {n}")

    @app.task(name="wf.ok")
    async def ok(n: int) -> int:
        return n

    async with app:
        wf = taskq.Workflow(name="broken")
        wf.add(ok, n=wf.add(bad, n=1))
        run = await wf.enqueue()
        await app.drain()
        wf = taskq.Workflow(name="idle")
        first = wf.add(ok, n=1)
        wf.add(ok, n=wf.add(ok, n=first))
        idle = await wf.enqueue()

    note = (
        "(a step runs again with its workflow, which also runs the steps that depend on it: "
        f"python -m taskq workflows retry ID; workflow {run.id})"
    )
    dry = await cli(pg_dsn, schema, "retry", "--all", "--dry-run")
    assert dry.stdout.splitlines() == [
        "would retry 0 jobs (failed jobs)",
        f"would be skipped: 1 workflow step {note}",
    ]
    bulk = await cli(pg_dsn, schema, "retry", "--all")
    assert bulk.stdout.splitlines() == [
        "no failed jobs to retry",
        f"skipped: 1 workflow step {note}",
    ]
    named = await cli(pg_dsn, schema, "retry", str(run.job_ids["bad"]), str(run.job_ids["ok"]))
    assert named.stdout.splitlines() == [
        "retried 0 jobs",
        f"skipped: 2 workflow steps {note}",
    ]

    dry_cancel = await cli(pg_dsn, schema, "cancel", "--task", "wf.ok", "--dry-run")
    assert dry_cancel.stdout.splitlines() == [
        "would cancel 3 queued jobs and ask the workers of 0 running jobs to stop them",
        "3 workflow steps of the queued ones (2 waiting for their parents) would be cancelled "
        "with the steps that depend on them",
    ]
    cancel = await cli(pg_dsn, schema, "cancel", str(idle.job_ids["ok"]))
    assert cancel.stdout.splitlines() == [
        "cancelled 1 queued job; asked the workers of 0 running jobs to stop them",
        "2 workflow steps that depended on them ended with them "
        "(see python -m taskq workflows show ID)",
    ]
