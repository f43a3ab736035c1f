"""``python -m benchmarks.web``: web request latency while the app's own worker runs jobs.

Serves ``examples/fastapi_app`` with uvicorn in a child process (one server
process, its taskq worker inside it at the example's concurrency of 10) and
measures, from this process, the latency and rate of two requests:

- ``GET /health``: a handler that touches nothing, so it shows how long the
  event loop makes a request wait;
- ``POST /users/{id}/welcome``: one ``await send_welcome.enqueue(...)``.

Each is sent one at a time (sequential) and in bursts of 200 concurrent
requests, first with the worker idle, then while it drains a backlog of
``build_report(seconds=0)`` jobs (a no-op job: the heaviest load per second a
worker puts on its event loop). The ``emails`` queue that the POSTs fill is
paused, so the backlog is the only difference between the two phases. Each
round measures idle, then busy; the backlog left at the end of each busy phase
is reported (it must not reach zero, or the phase was not busy throughout).

Uses --dsn, else $TASKQ_DSN, else the embedded Postgres; works in a fresh
schema and drops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fastapi_app"


@dataclass
class Sample:
    """Latencies (seconds) of one kind of request in one phase, and the time they took."""

    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    def add(self, latencies: list[float], elapsed: float) -> None:
        self.latencies.extend(latencies)
        self.elapsed += elapsed

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] * 1000

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_search_path(dsn: str, schema: str) -> str:
    # The example creates its own table; this puts it in the benchmark's schema.
    return f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}"


async def timed(request: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await request()
    return time.perf_counter() - started


async def sequential(request: Callable[[], Awaitable[None]], n: int) -> tuple[list[float], float]:
    started = time.perf_counter()
    latencies = [await timed(request) for _ in range(n)]
    return latencies, time.perf_counter() - started


async def burst(request: Callable[[], Awaitable[None]], n: int) -> tuple[list[float], float]:
    started = time.perf_counter()
    latencies = await asyncio.gather(*(timed(request) for _ in range(n)))
    return list(latencies), time.perf_counter() - started


class Bench:
    def __init__(self, args: argparse.Namespace, base: str, conn: asyncpg.Connection) -> None:
        self.args = args
        self.base = base
        self.conn = conn
        self.user = 0
        self.samples: dict[tuple[str, str, str], Sample] = {}
        self.backlog_left: list[int] = []
        self.drain_rates: list[float] = []
        self.http: aiohttp.ClientSession

    async def get_health(self) -> None:
        async with self.http.get(f"{self.base}/health") as response:
            if response.status != 200:
                raise RuntimeError(f"GET /health: {response.status} {await response.text()}")
            await response.read()

    async def post_welcome(self) -> None:
        self.user += 1
        async with self.http.post(f"{self.base}/users/{self.user}/welcome") as response:
            if response.status != 200:
                raise RuntimeError(f"POST welcome: {response.status} {await response.text()}")
            await response.read()

    async def measure(self, phase: str) -> None:
        a = self.args
        for name, request in (
            ("GET /health", self.get_health),
            ("POST enqueue", self.post_welcome),
        ):
            seq = self.samples.setdefault((name, "sequential", phase), Sample())
            seq.add(*await sequential(request, a.requests))
            bursts = self.samples.setdefault((name, f"bursts of {a.burst}", phase), Sample())
            for _ in range(a.bursts):
                bursts.add(*await burst(request, a.burst))

    async def finished(self) -> int:
        return int(await self.conn.fetchval("SELECT count(*) FROM history"))

    async def backlog(self) -> int:
        return int(await self.conn.fetchval("SELECT count(*) FROM jobs WHERE queue = 'default'"))

    async def busy_round(self, build_report: Any) -> None:
        a = self.args
        batch = 5_000
        for start in range(0, a.backlog, batch):
            count = min(batch, a.backlog - start)
            await build_report.enqueue_many([{"seconds": 0}] * count)
        # Measure once the worker is at it.
        done_before, deadline = await self.finished(), time.monotonic() + 60
        while await self.finished() == done_before:
            if time.monotonic() > deadline:
                raise RuntimeError("the server's worker ran none of the backlog in 60 s")
            await asyncio.sleep(0.01)
        started, done_before = time.perf_counter(), await self.finished()
        await self.measure("busy")
        elapsed, done = time.perf_counter() - started, await self.finished() - done_before
        left = await self.backlog()
        self.backlog_left.append(left)
        self.drain_rates.append(done / elapsed)
        # Clear what is left so that the next idle phase is idle.
        await self.conn.execute("DELETE FROM jobs WHERE queue = 'default' AND state = 'queued'")
        while await self.backlog():
            await asyncio.sleep(0.01)
        await self.reset()

    async def reset(self) -> None:
        """Leave the jobs table as the round found it, so that rounds do not drift."""
        await self.conn.execute("DELETE FROM jobs WHERE queue = 'emails'")  # the paused POSTs'
        await self.conn.execute("VACUUM jobs")  # dead rows would slow the next claims


def fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def report(bench: Bench, facts: dict[str, str]) -> str:
    a = bench.args
    lines = [
        "| request | sent | phase | p50 ms | p95 ms | p99 ms | max ms | requests/s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for (name, mode, phase), s in bench.samples.items():
        cells = [s.percentile(50), s.percentile(95), s.percentile(99), s.percentile(100), s.rate]
        lines.append(f"| {name} | {mode} | {phase} | " + " | ".join(fmt(c) for c in cells) + " |")
    lines += [
        "",
        "| request | sent | p50 busy/idle | p95 busy/idle | p99 busy/idle | requests/s busy/idle |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (name, mode, phase), idle in bench.samples.items():
        if phase != "idle":
            continue
        busy = bench.samples[(name, mode, "busy")]
        ratios = [busy.percentile(p) / idle.percentile(p) for p in (50, 95, 99)]
        ratios.append(busy.rate / idle.rate)
        lines.append(f"| {name} | {mode} | " + " | ".join(f"{r:.2f}×" for r in ratios) + " |")
    lines += [
        "",
        f"- rounds: {a.rounds}; per round and phase: {a.requests} sequential requests and "
        f"{a.bursts} bursts of {a.burst} concurrent requests of each kind",
        f"- backlog per busy phase: {a.backlog:,} no-op jobs; left when each busy phase "
        f"ended: {', '.join(f'{n:,}' for n in bench.backlog_left)}",
        "- jobs finished per second by the in-process worker during the busy phases: "
        + ", ".join(f"{r:,.0f}" for r in bench.drain_rates),
    ]
    lines += [f"- {k}: {v}" for k, v in facts.items()]
    if min(bench.backlog_left) == 0:
        lines.append(
            "- WARNING: a busy phase outlasted its backlog; run again with a larger --backlog"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> str:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    dsn = args.dsn or os.environ.get("TASKQ_DSN")
    embedded = "no"
    if not dsn:
        from taskq import _embedded

        server = await asyncio.to_thread(_embedded.ensure_server)
        dsn, embedded = str(server.dsn), "yes"
    schema = f"bench_web_{secrets.token_hex(4)}"
    app_dsn = with_search_path(dsn, schema)
    # The example's tasks module reads these when it is imported, here and in the server.
    os.environ.update(TASKQ_DSN=app_dsn, TASKQ_SCHEMA=schema)
    sys.path.insert(0, str(EXAMPLE))
    import tasks  # the example's own module

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server_cmd = [
        sys.executable, "-m", "uvicorn", "main:api", "--app-dir", str(EXAMPLE),
        "--port", str(port), "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(*server_cmd, env=dict(os.environ))
    conn: asyncpg.Connection | None = None
    try:
        async with tasks.app, aiohttp.ClientSession() as probe:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with probe.get(f"{base}/health") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                if process.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError("the example server did not start")
                await asyncio.sleep(0.05)
            conn = await asyncpg.connect(app_dsn)
            await tasks.app.queue("emails").pause()
            bench = Bench(args, base, conn)
            connector = aiohttp.TCPConnector(limit=args.burst)
            async with aiohttp.ClientSession(connector=connector) as http:
                bench.http = http
                await burst(bench.get_health, args.burst)  # open the connections
                for _ in range(args.rounds):
                    await bench.measure("idle")
                    await bench.reset()
                    await bench.busy_round(tasks.build_report)
            version = await conn.fetchval("SHOW server_version")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await process.wait()
        if conn is None:
            conn = await asyncpg.connect(app_dsn)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
    facts = {
        "server": " ".join(["uvicorn", *server_cmd[3:]])
        .replace(str(ROOT) + "/", "")
        .replace(str(port), "<free port>"),
        "client": "aiohttp in the benchmark process, on the same machine",
        "Postgres": f"{version} (embedded: {embedded})",
        "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load average before the run (1 / 5 / 15 min)": load,
    }
    return report(bench, facts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.web", description=__doc__.split("\n")[0])
    p.add_argument("--dsn", help="Postgres to use (default $TASKQ_DSN, else the embedded one)")
    p.add_argument("--rounds", type=int, default=5, help="idle + busy rounds (default 5)")
    p.add_argument("--requests", type=int, default=500, help="sequential requests per phase")
    p.add_argument("--bursts", type=int, default=5, help="bursts per phase (default 5)")
    p.add_argument("--burst", type=int, default=200, help="concurrent requests per burst")
    p.add_argument("--backlog", type=int, default=20_000, help="no-op jobs per busy phase")
    args = p.parse_args(argv)
    started = time.monotonic()
    print(asyncio.run(run(args)))
    print(f"- wall time: {time.monotonic() - started:.0f} s")
    print(f"- command: python -m benchmarks.web {' '.join(argv or sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
