"""CPU-bound tasks: jobs/s of a 20 ms pure-Python task in threads and in processes.

One worker process (``python -m taskq worker``) at concurrency 2 x cores
runs N jobs of the same function, registered twice: ``executor="thread"``
(the GIL lets one thread compute at a time) and ``executor="process"`` (the
worker's pool, one process per core). Each run enqueues the N jobs in one
statement and times until the last result is in; the figure is the median of
the runs. Before the runs, as many jobs as the worker has slots warm it up
(the process pool starts when a process task first needs it)::

    python -m benchmarks.cpu                      # a throwaway embedded Postgres
    python -m benchmarks.cpu --dsn postgresql://... --jobs 200 --runs 3

The loop is calibrated here, single-threaded, to about ``--ms`` of CPU per
call. "Cores busy" is the CPU time of the worker and its processes during a
run over the run's duration: on a machine that runs nothing else, threads
stay near 1 and processes approach the number of cores.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

import taskq

from .environment import server
from .rescue_bound import terminate

ROOT = Path(__file__).resolve().parent.parent

app = taskq.App()  # the worker's App: $TASKQ_DSN and $TASKQ_SCHEMA


def burn(n: int) -> int:
    """Pure-Python CPU work: ``n`` rounds of integer arithmetic."""
    x = 0
    for i in range(n):
        x = (x + i * i) % 1_000_003
    return x


app.task(name="cpu.thread", executor="thread")(burn)
app.task(name="cpu.process", executor="process")(burn)


def calibrate(ms: float) -> tuple[int, float]:
    """Rounds of ``burn`` that take about ``ms`` of CPU here, and the measured milliseconds.

    CPU time, not wall time: on a busy machine the wall time counts the
    moments other processes had the core.
    """
    n = 10_000
    while True:
        started = time.process_time()
        burn(n)
        took = time.process_time() - started
        if took > 0.05:
            break
        n *= 2
    n = int(n * ms / 1000 / took)
    samples = []
    for _ in range(5):
        started = time.process_time()
        burn(n)
        samples.append((time.process_time() - started) * 1000)
    return n, statistics.median(samples)


def _loop_for(rounds: int, seconds: float, results: Any) -> None:
    started, done = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        burn(rounds)
        done += 1
    results.put(done / (time.perf_counter() - started))


def ceiling(rounds: int, processes: int, seconds: float = 3.0) -> float:
    """Calls/s of the bare loop in ``processes`` processes at once: what the machine gives now.

    No taskq, no Postgres: on an idle machine this grows with the processes
    up to the cores; on a busy one (other sessions' work) it may not.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    procs = [
        context.Process(target=_loop_for, args=(rounds, seconds, results)) for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    total = sum(results.get() for _ in procs)
    for proc in procs:
        proc.join()
    return total


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def spawn(dsn: str, schema: str, concurrency: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, TASKQ_DSN=dsn, TASKQ_SCHEMA=schema, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "taskq", "worker", "benchmarks.cpu:app"),
            *("--concurrency", str(concurrency), "--shutdown-timeout", "5"),
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )


def cpu_seconds(pid: int) -> float:
    """CPU time of the worker process and of its pool's processes, so far."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


class Side:
    """One executor's schema, worker process and task handle."""

    def __init__(self, dsn: str, executor: str, concurrency: int) -> None:
        self.executor = executor
        self.schema = f"bench_cpu_{executor}_{secrets.token_hex(4)}"
        self.producer = taskq.App(dsn, schema=self.schema)
        # The worker runs the job by this name, with the executor of benchmarks.cpu:app.
        self.task = self.producer.task(name=f"cpu.{executor}")(burn)
        self.worker: subprocess.Popen[bytes] | None = None
        self.found: list[tuple[float, float]] = []

    async def run(self, count: int, rounds: int) -> tuple[float, float]:
        """Jobs/s and cores busy (the worker and its processes) of ``count`` jobs."""
        assert self.worker is not None
        started, cpu = time.perf_counter(), cpu_seconds(self.worker.pid)
        handles = await self.task.enqueue_many([{"n": rounds}] * count)
        await asyncio.gather(*(h.result(timeout=600) for h in handles))
        took = time.perf_counter() - started
        return count / took, (cpu_seconds(self.worker.pid) - cpu) / took


async def measure(dsn: str, jobs: int, runs: int, rounds: int) -> list[Side]:
    """Both executors, their runs taking turns, so that both see the same machine."""
    concurrency = 2 * cores()
    sides = [Side(dsn, executor, concurrency) for executor in ("thread", "process")]
    try:
        for side in sides:
            await side.producer.open()  # creates the schema before the worker starts
            side.worker = spawn(dsn, side.schema, concurrency)
        for side in sides:
            await side.run(concurrency, rounds)  # warm-up: the pool starts
        for _ in range(runs):
            for side in sides:
                side.found.append(await side.run(jobs, rounds))
        return sides
    finally:
        for side in sides:
            if side.worker is not None:
                await asyncio.to_thread(terminate, side.worker)
            if side.producer.is_open:
                async with side.producer.pool.acquire() as c:
                    await c.execute(f'DROP SCHEMA "{side.schema}" CASCADE')
                await side.producer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=None, help="Postgres DSN (default: embedded)")
    parser.add_argument("--jobs", type=int, default=200, help="jobs per run (200)")
    parser.add_argument("--runs", type=int, default=3, help="runs per executor (3)")
    parser.add_argument("--ms", type=float, default=20.0, help="CPU time per job (20)")
    args = parser.parse_args()
    rounds, took = calibrate(args.ms)
    print(f"{cores()} cores; burn({rounds}) takes {took:.1f} ms here; {args.jobs} jobs a run")
    alone, together = ceiling(rounds, 1), ceiling(rounds, cores())
    print(
        f"the bare loop, no taskq: {alone:.1f} calls/s in 1 process, {together:.1f} in "
        f"{cores()} at once (what this machine gives now)"
    )
    print(f"worker: concurrency {2 * cores()}, median of {args.runs} runs\n")
    print("| executor | jobs/s (median) | runs | x threads | cores busy (median) |")
    print("| --- | --- | --- | --- | --- |")
    with server(args.dsn) as srv:
        sides = asyncio.run(measure(srv.dsn, args.jobs, args.runs, rounds))
    medians: dict[str, float] = {}
    for side in sides:
        medians[side.executor] = rate = statistics.median(r for r, _ in side.found)
        busy = statistics.median(c for _, c in side.found)
        runs = ", ".join(f"{r:.1f}" for r, _ in side.found)
        ratio = rate / medians["thread"]
        print(f"| {side.executor} | {rate:.1f} | {runs} | {ratio:.2f} | {busy:.2f} |")
    ideal = 1000 / took * cores()
    print(f"\n(every core busy with nothing but the loop: {ideal:.0f} jobs/s)")
    print(f"load average after the runs: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
