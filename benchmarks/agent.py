"""The process that runs one system's code: ``python -m benchmarks.agent SYSTEM COMMAND``.

The runner starts it with the system's own interpreter (``System.python``) and
passes the database in ``$TASKQ_BENCH_AGENT_DSN`` (not argv, where ``ps``
shows it). It prints ``READY`` when a worker is about to claim and, at the end,
one ``RESULT {json}`` line. Everything runs on uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from typing import Any

import asyncpg
import orjson
import uvloop

from . import systems

DSN_ENV = "TASKQ_BENCH_AGENT_DSN"
READY = "READY"
RESULT = "RESULT "
#: Longest a producer waits for its last job to start before giving up.
START_TIMEOUT = 60.0


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Tally:
    """Counts job executions, to prove afterwards that each job ran exactly once."""

    def __init__(self) -> None:
        self.executed = 0
        self.seen: set[int] = set()

    def add(self, i: int) -> None:
        self.executed += 1
        self.seen.add(i)


async def enqueue_bulk(system: systems.System, jobs: int, batch: int) -> dict[str, Any]:
    batches = [[{"i": n} for n in range(s, min(s + batch, jobs))] for s in range(0, jobs, batch)]
    started = time.perf_counter()
    for b in batches:
        await system.enqueue_bulk(b)
    return {"seconds": time.perf_counter() - started}


async def worker(system: systems.System, concurrency: int, mode: str) -> dict[str, Any]:
    tally = Tally()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    pool: asyncpg.Pool | None = None

    async def noop(i: int) -> None:
        tally.add(i)

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
        job = record_start if mode == "latency" else noop
        await system.run_worker(concurrency, job, lambda: emit(READY), stop)
    finally:
        if pool is not None:
            await pool.close()
    return {"executed": tally.executed, "distinct": len(tally.seen)}


async def produce(system: systems.System, rate: float, seconds: float) -> dict[str, Any]:
    """Enqueue one job every 1/rate s, wait until all started, store their enqueue times."""
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
    conn = await asyncpg.connect(system.dsn)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while await conn.fetchval("SELECT count(*) FROM bench.started") < n:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        times = await system.enqueue_times()
        await conn.copy_records_to_table(
            "enqueued", schema_name="bench", records=list(times.items())
        )
    finally:
        await conn.close()
    return {"enqueued": n, "seconds": elapsed, "rate": n / elapsed, "behind_max_s": worst}


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.agent")
    parser.add_argument("system", choices=sorted(systems.SYSTEMS))
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("setup")
    bulk = commands.add_parser("enqueue-bulk")
    bulk.add_argument("--jobs", type=int, required=True)
    bulk.add_argument("--batch", type=int, required=True)
    work = commands.add_parser("worker")
    work.add_argument("--concurrency", type=int, required=True)
    work.add_argument("--mode", choices=["noop", "latency"], required=True)
    prod = commands.add_parser("produce")
    prod.add_argument("--rate", type=float, required=True)
    prod.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)

    system = systems.load(args.system)(os.environ[DSN_ENV])
    await system.open()
    try:
        result: dict[str, Any] = {}
        if args.command == "setup":
            await system.setup()
        elif args.command == "enqueue-bulk":
            result = await enqueue_bulk(system, args.jobs, args.batch)
        elif args.command == "worker":
            result = await worker(system, args.concurrency, args.mode)
        else:
            result = await produce(system, args.rate, args.seconds)
    finally:
        await system.close()
    emit(RESULT + orjson.dumps(result).decode())


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1:]))
