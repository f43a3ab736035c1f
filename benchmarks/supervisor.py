"""``worker --processes`` and ``--autoscale``: drains with 1 and 2 processes, and a burst.

Two measurements, each against ``python -m taskq worker`` started here:

1. **Drain**: N no-op jobs enqueued in one statement while a supervisor with
   ``--processes 1`` (no supervisor: the worker itself) and ``--processes 2``
   waits; jobs/s from the first claim to the last finish (history times, so
   the processes' start-up does not count).
2. **Burst**: M jobs that each sleep ``--sleep-ms`` (I/O-like: the CPU stays
   idle) under ``--processes MIN``, ``--processes MAX`` and
   ``--autoscale MIN:MAX`` with its default clocks; the seconds from the
   enqueue to the last finish, and for the autoscaler the time series of its
   children (live workers) and the backlog every second, on until it has
   shrunk back to MIN (or ``--after`` seconds)::

    python -m benchmarks.supervisor                       # a throwaway embedded Postgres
    python -m benchmarks.supervisor --dsn postgresql://... --drain 20000 --burst 5000
    python -m benchmarks.supervisor --json burst.json --plot docs/images/autoscale-burst.svg
    TASKQ_SUPERVISOR_TIMINGS=idle_cpu=0 python -m benchmarks.supervisor --drain 0

The autoscaler grows only while the CPU is at least 20% idle; on a machine
that something else keeps busy it rightly holds back, and the last form
(the CPU gate off) shows its clocks alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

import taskq
from taskq.cli.supervisor import TIMINGS_ENV

from .environment import server
from .rescue_bound import terminate
from .svgplot import Line, line_chart

ROOT = Path(__file__).resolve().parent.parent

app = taskq.App()  # the workers' App: $TASKQ_DSN and $TASKQ_SCHEMA


@app.task(name="bench.noop")
async def noop() -> None:
    return None


@app.task(name="bench.sleep")
async def sleep(ms: float) -> None:
    await anyio.sleep(ms / 1000)


def spawn(dsn: str, schema: str, *options: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, TASKQ_DSN=dsn, TASKQ_SCHEMA=schema, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "taskq", "worker", "benchmarks.supervisor:app", *options],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )


async def fresh(dsn: str) -> taskq.App:
    bench = taskq.App(dsn, schema=f"bench_{secrets.token_hex(4)}")
    bench.task(name="bench.noop")(lambda: None)
    bench.task(name="bench.sleep")(lambda ms: None)
    await bench.open()
    return bench


async def fetchval(bench: taskq.App, sql: str) -> Any:
    async with bench.pool.acquire() as c:
        return await c.fetchval(sql.replace("{s}", f'"{bench.schema}"'))


async def wait_workers(bench: taskq.App, n: int) -> None:
    while await fetchval(bench, "SELECT count(*) FROM {s}.workers") != n:
        await asyncio.sleep(0.1)


async def drain(dsn: str, jobs: int, processes: int) -> float:
    bench = await fresh(dsn)
    proc = spawn(dsn, bench.schema, "--processes", str(processes))
    try:
        await wait_workers(bench, processes)
        await bench.tasks["bench.noop"].enqueue_many([{}] * jobs)
        while await fetchval(bench, "SELECT count(*) FROM {s}.history") != jobs:
            await asyncio.sleep(0.1)
        span = await fetchval(
            bench, "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM {s}.history"
        )
        return jobs / float(span)
    finally:
        terminate(proc)
        await drop(bench)


async def drop(bench: taskq.App) -> None:
    async with bench.pool.acquire() as c:
        await c.execute(f'DROP SCHEMA "{bench.schema}" CASCADE')
    await bench.close()


async def burst(
    dsn: str, jobs: int, ms: float, *options: str, after: float = 0.0
) -> tuple[float, list[tuple[float, int, int]]]:
    """Seconds to finish the burst, and (t, live workers, jobs not finished) each second.

    With ``after``, the series goes on once the burst is done, until the
    workers are back to the first count or ``after`` seconds have passed:
    the autoscaler's shrink.
    """
    bench = await fresh(dsn)
    proc = spawn(dsn, bench.schema, "--shutdown-timeout", "60", *options)
    series: list[tuple[float, int, int]] = []
    try:
        first = int(options[1].split(":")[0])
        await wait_workers(bench, first)
        start = time.monotonic()
        await bench.tasks["bench.sleep"].enqueue_many([{"ms": ms}] * jobs)
        drained = None
        while True:
            left = int(await fetchval(bench, "SELECT count(*) FROM {s}.jobs"))
            workers = int(await fetchval(bench, "SELECT count(*) FROM {s}.workers"))
            now = time.monotonic() - start
            series.append((now, workers, left))
            if not left and drained is None:
                drained = now
            if drained is not None and (workers <= first or now - drained >= after):
                return drained, series
            await asyncio.sleep(1.0)
    finally:
        terminate(proc)
        await drop(bench)


async def measure(args: argparse.Namespace, dsn: str) -> None:
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} before the runs\n")
    timings = os.environ.get(TIMINGS_ENV)
    if timings:
        print(f"${TIMINGS_ENV}={timings}\n")
    if args.drain:
        print(f"Drain of {args.drain:,} no-op jobs (concurrency 10 per process)\n")
        print("| processes | jobs/s |")
        print("| --- | --- |")
        for n in (1, 2):
            print(f"| {n} | {await drain(dsn, args.drain, n):,.0f} |", flush=True)
    low, high = args.autoscale.split(":")
    print(f"\nBurst of {args.burst:,} jobs of {args.sleep_ms:g} ms (concurrency 10 per process)\n")
    print("| workers | seconds to drain |")
    print("| --- | --- |")
    runs: dict[str, Any] = {}
    for label, opts in (
        (f"--processes {low}", ("--processes", low)),
        (f"--processes {high}", ("--processes", high)),
        (f"--autoscale {low}:{high}", ("--autoscale", f"{low}:{high}")),
    ):
        after = args.after if label.startswith("--autoscale") else 0.0
        seconds, series = await burst(dsn, args.burst, args.sleep_ms, *opts, after=after)
        print(f"| {label} | {seconds:.1f} |", flush=True)
        runs[label] = {"seconds": seconds, "series": series}
    data = {"burst": args.burst, "sleep_ms": args.sleep_ms, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(data))
    if args.plot:
        args.plot.write_text(plot(data))
    print(f"\nTime series under --autoscale {low}:{high} (t s: children, jobs left)\n")
    print("| t (s) | children | jobs left |")
    print("| --- | --- | --- |")
    shown = -1
    for n, (t, workers, left) in enumerate(series):
        # After the burst, only the changes: the shrink is minutes of the same row.
        if left or series[n - 1][2] or workers != shown or n == len(series) - 1:
            print(f"| {t:.0f} | {workers} | {left:,} |")
        shown = workers
    print(f"\nload average after the runs: {os.getloadavg()[0]:.2f}")


def plot(data: dict[str, Any]) -> str:
    """The bursts' backlogs, and the autoscaler's children, as an SVG chart."""
    lines = [
        Line(f"jobs left, {label}", [(t, left) for t, _, left in run["series"]])
        for label, run in data["runs"].items()
    ]
    label, run = next((k, v) for k, v in data["runs"].items() if k.startswith("--autoscale"))
    lines.append(
        Line(
            f"children, {label}",
            [(t, workers) for t, workers, _ in run["series"]],
            right=True,
            steps=True,
            dashed=True,
        )
    )
    high = int(label.split(":")[1])
    return line_chart(
        f"A burst of {data['burst']:,} jobs of {data['sleep_ms']:g} ms",
        "seconds since the enqueue",
        "jobs left",
        lines,
        right_label="worker processes (autoscale)",
        right_top=float(high),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=None, help="Postgres DSN (default: embedded)")
    parser.add_argument("--drain", type=int, default=20_000, help="no-op jobs (20000; 0: no drain)")
    parser.add_argument("--burst", type=int, default=5_000, help="jobs of the burst (5000)")
    parser.add_argument("--sleep-ms", type=float, default=50.0, help="each burst job (50)")
    parser.add_argument("--autoscale", default="1:4", help="MIN:MAX of the burst (1:4)")
    parser.add_argument(
        "--after", type=float, default=180.0, help="autoscale: watch the shrink for up to (180 s)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the bursts' series here")
    parser.add_argument("--plot", type=Path, default=None, help="write the bursts' SVG chart here")
    parser.add_argument("--replot", type=Path, default=None, help="only draw --plot from this JSON")
    args = parser.parse_args()
    if args.replot:
        (args.plot or args.replot.with_suffix(".svg")).write_text(
            plot(json.loads(args.replot.read_text()))
        )
        return
    with server(args.dsn) as srv:
        asyncio.run(measure(args, srv.dsn))


if __name__ == "__main__":
    main()
