"""Workload W (taskq only): a workflow's steps against the same jobs enqueued plainly.

Both halves run on the runner's Postgres, each in a fresh database with one
worker process (``python -m benchmarks.workflows worker``: ``app.worker
(concurrency=C)`` on uvloop, the ``--concurrency`` of the other workloads):

- **Throughput.** One workflow of N steps (``--workflow-steps``, default
  10,000): a root step, N - 2 parallel steps that each take the root's result,
  and one join that takes the list of all of theirs; against N no-op jobs
  enqueued with one ``enqueue_many()`` call. Jobs/s from the enqueue to the
  last job finished, both ends on the database clock: ``clock_timestamp()``
  read just before the workflow is built (or the jobs' arguments are bound),
  and the newest ``finished_at`` in history.
- **Pickup.** An idle worker; every 10 ms the producer submits, in turn, a
  plain no-op job or a two-step workflow A -> B (B takes A's result), K of
  each (``--workflow-chains``, default 500). From history (database clock):
  a plain job's ``started_at - enqueued_at`` against B's ``started_at`` minus
  A's ``finished_at``. The tasks also write ``clock_timestamp()`` into an
  unlogged table as their bodies start (plain job, B) and as A's body
  returns, for the same two gaps as the code inside the tasks sees them.

Runs as part of ``python -m benchmarks`` (workload ``W``); ``--quick`` uses
1,000 steps and 100 chains.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import psutil

from . import agent, runner
from .environment import ROOT, BenchmarkError, Server, cpu_seconds, postmaster

SCHEMA = "taskq"
#: One submission every this many seconds in the pickup half: the worker is idle at each.
PICKUP_INTERVAL = 0.01
MARKS = "CREATE UNLOGGED TABLE bench.marks (kind text NOT NULL, i int NOT NULL, at timestamptz)"

Record = Callable[[str, int], Awaitable[None]]


class Tasks:
    """The benchmark's tasks on one App (the worker's or the producer's)."""

    def __init__(self, dsn: str, executed: list[tuple[str, int]], record: Record | None) -> None:
        import taskq

        self.app = app = taskq.App(dsn, schema=SCHEMA)

        @app.task(name="wf.leaf")
        async def leaf(i: int, seed: int | None = None) -> None:
            if record is not None:
                await record("plain_start", i)
            executed.append(("leaf", i))

        @app.task(name="wf.root")
        async def root(n: int) -> int:
            executed.append(("root", 0))
            return n

        @app.task(name="wf.join")
        async def join(parts: list[None]) -> int:
            executed.append(("join", 0))
            return len(parts)

        @app.task(name="wf.first")
        async def first(i: int) -> int:
            executed.append(("first", i))
            if record is not None:
                await record("first_end", i)
            return i

        @app.task(name="wf.second")
        async def second(x: int, i: int) -> None:
            if record is not None:
                await record("second_start", i)
            executed.append(("second", x))

        self.leaf, self.root, self.join, self.first, self.second = leaf, root, join, first, second


# -- the worker process ---------------------------------------------------------------


async def worker_main(concurrency: int, marks: bool) -> dict[str, Any]:
    dsn = os.environ[agent.DSN_ENV]
    executed: list[tuple[str, int]] = []
    pool: asyncpg.Pool | None = None
    record: Record | None = None
    if marks:
        # The measurement's own writes: not durable, no WAL flush to wait for.
        pool = await asyncpg.create_pool(
            dsn, min_size=2, max_size=concurrency,
            server_settings={"synchronous_commit": "off", "application_name": "bench"},
        )  # fmt: skip

        async def record(kind: str, i: int) -> None:
            assert pool is not None
            await pool.execute(
                "INSERT INTO bench.marks (kind, i, at) VALUES ($1, $2, clock_timestamp())", kind, i
            )

    tasks = Tasks(dsn, executed, record)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        async with tasks.app:  # migrates the fresh database
            agent.emit(agent.OPEN)
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if line.strip() != agent.GO:
                raise SystemExit(f"expected {agent.GO!r} on stdin, got {line!r}")
            async with tasks.app.worker(concurrency=concurrency):
                agent.emit(agent.READY)
                await stop.wait()
    finally:
        if pool is not None:
            await pool.close()
    return {"executed": len(executed), "distinct": len(set(executed))}


@contextlib.asynccontextmanager
async def worker_process(dsn: str, concurrency: int, *, marks: bool) -> AsyncIterator[runner.Agent]:
    """One worker process on ``dsn``, migrated, claiming, idle."""
    with tempfile.TemporaryFile() as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.workflows", "worker",
            f"--concurrency={concurrency}", *(["--marks"] if marks else []),
            cwd=ROOT, env={**os.environ, agent.DSN_ENV: dsn},
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )  # fmt: skip
        worker = runner.Agent(proc, stderr, "taskq workflows worker")
        try:
            await worker.expect(agent.OPEN)
            worker.send(agent.GO)
            await worker.expect(agent.READY)
            await asyncio.sleep(runner.IDLE_SECONDS)
            yield worker
        finally:
            await worker.kill()


async def stopped(worker: runner.Agent, expected: int) -> None:
    """Stop the worker; fail the run unless it ran each of ``expected`` jobs once."""
    worker.stop()
    result = await worker.result()
    if result["executed"] != expected or result["distinct"] != expected:
        raise BenchmarkError(
            f"workflows: the worker ran {result['executed']} job(s), {result['distinct']} "
            f"distinct, expected {expected} once each"
        )


async def wait_done(conn: asyncpg.Connection, started: float) -> None:
    """Poll until no job is live and no workflow is running."""
    sql = (
        f"SELECT EXISTS (SELECT FROM {SCHEMA}.jobs) "
        f"OR EXISTS (SELECT FROM {SCHEMA}.workflows WHERE finished_at IS NULL)"
    )
    while await conn.fetchval(sql):
        if time.perf_counter() - started > runner.TIMEOUT_SECONDS:
            raise BenchmarkError("workflows: not done after the timeout")
        await asyncio.sleep(runner.POLL_SECONDS)


async def check_history(conn: asyncpg.Connection, expected: int) -> None:
    row = await conn.fetchrow(
        f"SELECT count(*) AS n, count(*) FILTER (WHERE state = 'succeeded') AS ok, "
        f"count(DISTINCT id) AS ids FROM {SCHEMA}.history"
    )
    if not row["n"] == row["ok"] == row["ids"] == expected:
        raise BenchmarkError(
            f"workflows: history holds {row['n']} job(s), {row['ok']} succeeded, "
            f"{row['ids']} distinct; expected {expected}"
        )


# -- throughput -----------------------------------------------------------------------


async def throughput(
    cfg: runner.Config, srv: Server, subject: runner.Subject, rep: int, mode: str
) -> dict[str, Any]:
    """N no-op jobs as one fan-out/fan-in workflow (``mode="workflow"``) or plainly."""
    n = cfg.workflow_steps
    name = runner.db_name(subject, "w", rep, f"_{mode}")
    async with runner.fresh_database(srv, name) as (dsn, conn):
        async with worker_process(dsn, cfg.concurrency, marks=False) as worker:
            tasks = Tasks(dsn, [], None)
            async with tasks.app:
                main, server = psutil.Process(worker.proc.pid), postmaster(srv)
                worker0, server0 = cpu_seconds(main), cpu_seconds(server, children=True)
                began = await conn.fetchval("SELECT clock_timestamp()")
                clock = time.perf_counter()
                built = clock
                if mode == "plain":
                    await tasks.leaf.enqueue_many([{"i": i} for i in range(n)])
                else:
                    import taskq

                    wf = taskq.Workflow(name="fan-out")
                    root = wf.add(tasks.root, n=n)
                    # Named here: the builder's default names cost time quadratic in
                    # the number of steps of one task (see docs/benchmarks.md).
                    leaves = [
                        wf.add(tasks.leaf, i=i, seed=root, step_name=f"leaf{i}")
                        for i in range(1, n - 1)
                    ]
                    wf.add(tasks.join, parts=leaves)
                    built = time.perf_counter()
                    run = await wf.enqueue()
                enqueued = time.perf_counter()
                await wait_done(conn, clock)
                worker1, server1 = cpu_seconds(main), cpu_seconds(server, children=True)
                ended = await conn.fetchval(f"SELECT max(finished_at) FROM {SCHEMA}.history")
                if mode == "workflow":
                    value = await run.result(timeout=10)
                    if value != n - 2:
                        raise BenchmarkError(f"workflows: the join returned {value}, not {n - 2}")
            await stopped(worker, n)
        await check_history(conn, n)
    seconds = (ended - began).total_seconds()
    return {
        "jobs_per_s": n / seconds,
        "seconds": seconds,
        "build_seconds": built - clock,
        "enqueue_seconds": enqueued - built,
        "worker_cpu_us_per_job": _per_job(worker0, worker1, n),
        "server_cpu_us_per_job": _per_job(server0, server1, n),
    }


def _per_job(before: float | None, after: float | None, n: int) -> float | None:
    return None if before is None or after is None else (after - before) / n * 1e6


# -- pickup latency -------------------------------------------------------------------


async def pickup(
    cfg: runner.Config, srv: Server, subject: runner.Subject, rep: int
) -> dict[str, Any]:
    """Released child B of A -> B against a plain job, on an idle worker."""
    import taskq

    k = cfg.workflow_chains
    async with runner.fresh_database(srv, runner.db_name(subject, "w", rep, "_pickup")) as (
        dsn,
        conn,
    ):
        await conn.execute(MARKS)
        async with worker_process(dsn, cfg.concurrency, marks=True) as worker:
            tasks = Tasks(dsn, [], None)
            async with tasks.app:
                started = time.perf_counter()
                for s in range(2 * k):
                    delay = started + s * PICKUP_INTERVAL - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    i = s // 2
                    if s % 2 == 0:
                        await tasks.leaf.enqueue(i=i)
                    else:
                        wf = taskq.Workflow(name="chain")
                        wf.add(tasks.second, x=wf.add(tasks.first, i=i), i=i)
                        await wf.enqueue()
                await wait_done(conn, started)
            await stopped(worker, 3 * k)
        await check_history(conn, 3 * k)
        ms = "(extract(epoch FROM {}) * 1000)::float8"
        plain = await conn.fetchval(
            f"SELECT array_agg({ms.format('h.started_at - h.enqueued_at')}) "
            f"FROM {SCHEMA}.history AS h WHERE h.workflow_id IS NULL"
        )
        child = await conn.fetchval(
            f"SELECT array_agg({ms.format('b.started_at - a.finished_at')}) "
            f"FROM {SCHEMA}.history AS a JOIN {SCHEMA}.history AS b "
            "ON b.workflow_id = a.workflow_id AND a.step = 'first' AND b.step = 'second'"
        )
        same_tx = await conn.fetchval(
            f"SELECT count(*) FROM {SCHEMA}.history AS a JOIN {SCHEMA}.history AS b "
            "ON b.workflow_id = a.workflow_id AND a.step = 'first' AND b.step = 'second' "
            "WHERE b.started_at = a.finished_at"
        )
        body_plain = await conn.fetchval(
            f"SELECT array_agg({ms.format('m.at - h.enqueued_at')}) FROM bench.marks AS m "
            f"JOIN {SCHEMA}.history AS h ON h.workflow_id IS NULL AND (h.args->>'i')::int = m.i "
            "WHERE m.kind = 'plain_start'"
        )
        body_child = await conn.fetchval(
            f"SELECT array_agg({ms.format('b.at - a.at')}) FROM bench.marks AS a "
            "JOIN bench.marks AS b ON b.i = a.i AND a.kind = 'first_end' "
            "AND b.kind = 'second_start'"
        )
    out: dict[str, Any] = {"chains": k, "child_in_parents_transaction": same_tx}
    for key, values in (
        ("plain", plain),
        ("child", child),
        ("body_plain", body_plain),
        ("body_child", body_child),
    ):
        if not values or len(values) != k:
            raise BenchmarkError(f"workflows: {len(values or [])} {key} times, expected {k}")
        values = sorted(values)
        for q in (50, 95):
            out[f"{key}_p{q}_ms"] = runner._percentile(values, q)
    return out


# -- the workload ---------------------------------------------------------------------


async def workload(
    cfg: runner.Config, srv: Server, subject: runner.Subject, rep: int
) -> dict[str, Any]:
    """W: throughput (plain and workflow, in alternating order) then pickup."""
    modes = ("plain", "workflow") if rep % 2 else ("workflow", "plain")
    out: dict[str, Any] = {"steps": cfg.workflow_steps}
    for mode in modes:
        res = await throughput(cfg, srv, subject, rep, mode)
        out |= {f"{mode}_{key}": value for key, value in res.items()}
    out["ratio"] = out["workflow_jobs_per_s"] / out["plain_jobs_per_s"]
    out |= await pickup(cfg, srv, subject, rep)
    out["pickup_p50_delta_ms"] = out["child_p50_ms"] - out["plain_p50_ms"]
    out["body_p50_delta_ms"] = out["body_child_p50_ms"] - out["body_plain_p50_ms"]
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workflows")
    commands = parser.add_subparsers(dest="command", required=True)
    work = commands.add_parser("worker", help="the worker process (started by the runner)")
    work.add_argument("--concurrency", type=int, required=True)
    work.add_argument("--marks", action="store_true", help="tasks write their times")
    args = parser.parse_args(argv)
    import uvloop

    result = uvloop.run(worker_main(args.concurrency, args.marks))
    agent.emit(agent.RESULT + orjson.dumps(result).decode())


if __name__ == "__main__":
    main(sys.argv[1:])
