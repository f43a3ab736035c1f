"""The process that runs one system's code: ``python -m benchmarks.agent SYSTEM COMMAND``.

The runner starts it with the system's own interpreter (a peer's virtualenv)
and passes the database in ``$TASKQ_BENCH_AGENT_DSN`` (not argv, where ``ps``
shows it). A worker prints ``OPEN`` once connected and waits for a ``GO`` line
on stdin (so that several worker processes start claiming together), then
``READY`` when it is about to claim; every command ends with one
``RESULT {json}`` line. A worker given ``--notify-after=N`` also prints
``REACHED`` as soon as it has run N jobs (workload Q times part of a backlog).
Everything runs on uvloop. This module imports only what every system's
virtualenv has: asyncpg, orjson and uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import platform
import signal
import sys
import time
from typing import Any

import asyncpg
import orjson
import uvloop

from . import systems

DSN_ENV = "TASKQ_BENCH_AGENT_DSN"
OPEN = "OPEN"
GO = "GO"
READY = "READY"
REACHED = "REACHED"
RESULT = "RESULT "
#: Longest a latency producer waits for its last job to start before giving up.
START_TIMEOUT = 60.0
#: Body of a workload E job.
SLEEP_SECONDS = 0.01


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Tally:
    """Counts job executions, to prove afterwards that each job ran exactly once."""

    def __init__(self, notify_after: int | None = None) -> None:
        self.executed = 0
        self.seen: set[int] = set()
        self.notify_after = notify_after

    def add(self, i: int) -> None:
        self.executed += 1
        self.seen.add(i)
        if self.executed == self.notify_after:
            emit(REACHED)


def versions(system: type[systems.System]) -> dict[str, Any]:
    found = {}
    for name in system.packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return {"python": platform.python_version(), "packages": found}


async def enqueue_bulk(system: systems.System, jobs: int, batch: int) -> dict[str, Any]:
    batches = [[{"i": n} for n in range(s, min(s + batch, jobs))] for s in range(0, jobs, batch)]
    started = time.perf_counter()
    for b in batches:
        await system.enqueue_bulk(b)
    return {"seconds": time.perf_counter() - started}


async def worker(
    system: systems.System,
    concurrency: int,
    mode: str,
    report_ids: bool,
    notify_after: int | None = None,
) -> dict[str, Any]:
    tally = Tally(notify_after)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    pool: asyncpg.Pool | None = None

    async def noop(i: int) -> None:
        tally.add(i)

    async def sleep(i: int) -> None:
        tally.add(i)
        await system.sleep(SLEEP_SECONDS)

    async def record_start(i: int) -> None:
        # clock_timestamp(): the start on the database clock, as close to the job's
        # start as one statement gets. Not durable on purpose: this is the
        # measurement's own write, it must not compete for WAL flushes.
        tally.add(i)
        assert pool is not None
        await pool.execute("INSERT INTO bench.started (i, at) VALUES ($1, clock_timestamp())", i)

    if mode == "latency":
        pool = await asyncpg.create_pool(
            system.dsn,
            min_size=concurrency,
            max_size=concurrency,
            server_settings={"synchronous_commit": "off", "application_name": "bench"},
        )
    try:
        emit(OPEN)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != GO:
            raise SystemExit(f"expected {GO!r} on stdin, got {line!r}")
        job = {"noop": noop, "sleep": sleep, "latency": record_start}[mode]
        await system.run_worker(concurrency, job, lambda: emit(READY), stop)
    finally:
        if pool is not None:
            await pool.close()
    result: dict[str, Any] = {"executed": tally.executed, "distinct": len(tally.seen)}
    if report_ids:
        result["ids"] = sorted(tally.seen)
    return result


async def produce(system: systems.System, rate: float, seconds: float) -> dict[str, Any]:
    """Enqueue one job per call: every 1/rate s (C), or back to back if rate is 0 (B).

    At a fixed rate, wait until all started and store their enqueue times; back
    to back, count the backlog (jobs enqueued but not finished) at the end.
    """
    conn = await asyncpg.connect(system.dsn)
    try:
        if rate:
            return await _produce_at_rate(system, conn, rate, seconds)
        n = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            await system.enqueue_one({"i": n})
            n += 1
        elapsed = time.perf_counter() - started
        backlog = await conn.fetchval(system.backlog_sql)
        return {"enqueued": n, "seconds": elapsed, "backlog": backlog}
    finally:
        await conn.close()


async def _produce_at_rate(
    system: systems.System, conn: asyncpg.Connection, rate: float, seconds: float
) -> dict[str, Any]:
    n = round(rate * seconds)
    interval = 1 / rate
    worst = 0.0
    started = time.perf_counter()
    for i in range(n):
        # An absolute schedule: a slow enqueue delays the next one, not all later ones.
        delay = started + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        worst = max(worst, -delay)
        await system.enqueue_one({"i": i})
    elapsed = time.perf_counter() - started
    deadline = time.monotonic() + START_TIMEOUT
    while await conn.fetchval("SELECT count(*) FROM bench.started") < n:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    times = await system.enqueue_times()
    await conn.copy_records_to_table("enqueued", schema_name="bench", records=list(times.items()))
    return {"enqueued": n, "seconds": elapsed, "rate": n / elapsed, "behind_max_s": worst}


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.agent")
    parser.add_argument("system", choices=sorted(systems.SYSTEMS))
    parser.add_argument("--variant", default="")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("versions")
    setup = commands.add_parser("setup")
    setup.add_argument("--concurrency", type=int, help="the run's worker concurrency")
    bulk = commands.add_parser("enqueue-bulk")
    bulk.add_argument("--setup", action="store_true", help="install the schema first")
    bulk.add_argument("--jobs", type=int, required=True)
    bulk.add_argument("--batch", type=int, required=True)
    work = commands.add_parser("worker")
    work.add_argument("--setup", action="store_true", help="install the schema first")
    work.add_argument("--concurrency", type=int, required=True)
    work.add_argument("--mode", choices=["noop", "sleep", "latency"], required=True)
    work.add_argument("--processes", type=int, default=1, help="worker processes in the run")
    work.add_argument("--ids", action="store_true", help="report the ids of the jobs run")
    work.add_argument("--notify-after", type=int, help=f"print {REACHED} after this many jobs")
    prod = commands.add_parser("produce")
    prod.add_argument("--rate", type=float, required=True, help="jobs/s; 0: back to back")
    prod.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)

    cls = systems.load(args.system)
    if args.command == "versions":
        emit(RESULT + orjson.dumps(versions(cls)).decode())
        return
    system = cls(os.environ[DSN_ENV], args.variant)
    if args.command == "worker":
        system.processes = args.processes
    system.concurrency = getattr(args, "concurrency", None)
    await system.open()
    try:
        result: dict[str, Any] = {}
        if args.command == "setup" or getattr(args, "setup", False):
            await system.setup()
        if args.command == "enqueue-bulk":
            result = await enqueue_bulk(system, args.jobs, args.batch)
        elif args.command == "worker":
            result = await worker(system, args.concurrency, args.mode, args.ids, args.notify_after)
        elif args.command == "produce":
            result = await produce(system, args.rate, args.seconds)
    finally:
        await system.close()
    emit(RESULT + orjson.dumps(result).decode())


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1:]))
