"""What observability costs a worker: drain rate with and without hooks, metrics, tracing.

    python -m benchmarks.observability [--jobs 20000] [--rounds 3]

Each round drains the same number of no-op jobs (the worst case: the jobs
themselves cost nothing, so any per-job overhead shows in full) in every mode,
the modes taking turns so that a noisy neighbour hurts them alike:

- ``plain``: no hook registered;
- ``hook``: one plain ``after_job`` hook that does nothing (the cost of the
  hook machinery itself);
- ``metrics``: ``taskq.contrib.prometheus.TaskqMetrics``;
- ``tracing``: ``taskq.contrib.opentelemetry.instrument`` with an SDK tracer
  provider that records every span and exports none.

Uses ``$TASKQ_DSN`` when set, else the embedded Postgres. Prints medians,
ratios to ``plain`` and the worker's CPU time per job as a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import time
from typing import Any

import asyncpg

import taskq

MODES = ("plain", "hook", "metrics", "tracing")


async def _dsn() -> str:
    dsn = os.environ.get("TASKQ_DSN")
    if dsn:
        return dsn
    from taskq import _embedded

    server = await asyncio.to_thread(_embedded.ensure_server)
    return str(server.dsn)


async def drain_once(dsn: str, mode: str, jobs: int) -> tuple[float, float]:
    """Drain ``jobs`` no-op jobs in ``mode``: (jobs per second, worker CPU µs per job)."""
    schema = f"bench_obs_{secrets.token_hex(4)}"
    app = taskq.App(dsn, schema=schema)

    @app.task(name="noop")
    async def noop(i: int) -> None:
        return None

    keep: Any = None
    if mode == "hook":
        app.after_job(lambda ctx, outcome: None)
    elif mode == "metrics":
        from taskq.contrib.prometheus import TaskqMetrics

        keep = TaskqMetrics(app)
    elif mode == "tracing":
        from opentelemetry.sdk.trace import TracerProvider

        from taskq.contrib.opentelemetry import instrument

        keep = instrument(app, tracer_provider=TracerProvider())
    try:
        async with app:
            await noop.enqueue_many([{"i": i} for i in range(jobs)])
            wall, cpu = time.perf_counter(), time.process_time()
            stats = await app.drain(concurrency=10)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if stats.succeeded != jobs:
                raise RuntimeError(f"{mode}: {stats.succeeded} of {jobs} jobs succeeded")
    finally:
        del keep
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    return jobs / wall, cpu / jobs * 1e6


async def main(jobs: int, rounds: int) -> None:
    dsn = await _dsn()
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(rounds):
        for mode in MODES:
            rate, per_job = await drain_once(dsn, mode, jobs)
            rates[mode].append(rate)
            cpu[mode].append(per_job)
    base = statistics.median(rates["plain"])
    print(f"Drain of {jobs:,} no-op jobs at concurrency 10, median of {rounds} rounds\n")
    print("| Mode | jobs/s | vs plain | worker CPU per job |")
    print("|---|---:|---:|---:|")
    for mode in MODES:
        rate = statistics.median(rates[mode])
        print(
            f"| {mode} | {rate:,.0f} | {rate / base:.2f}× | {statistics.median(cpu[mode]):.0f} µs |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    asyncio.run(main(options.jobs, options.rounds))
