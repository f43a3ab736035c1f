"""The workloads: each run gets a fresh database and the system's own processes."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import asyncpg
import orjson
import psutil

from . import agent, systems
from .environment import ROOT, BenchmarkError, Server, cpu_seconds, database_dsn, postmaster

#: How often the runner asks Postgres whether a drain is over.
POLL_SECONDS = 0.02
#: A drain or a process that takes longer than this is stuck, not slow.
TIMEOUT_SECONDS = 300.0
#: Lets the worker settle into its idle wait before the latency producer starts.
IDLE_SECONDS = 0.5

BENCH_SCHEMA = """
CREATE SCHEMA bench;
-- The measurement's own tables: unlogged, so they add no WAL flushes.
CREATE UNLOGGED TABLE bench.started (i int NOT NULL, at timestamptz NOT NULL);
CREATE UNLOGGED TABLE bench.enqueued (i int NOT NULL, at timestamptz NOT NULL);
"""

AUTOANALYZE_COUNT = (
    "SELECT coalesce(sum(autoanalyze_count), 0)::bigint FROM pg_stat_user_tables "
    "WHERE schemaname <> 'bench'"
)


@dataclass(frozen=True)
class Config:
    systems: list[str]
    workloads: list[str]
    repeat: int
    jobs: int
    batch: int
    concurrency: int
    rate: float
    latency_seconds: float
    analyze: bool = False
    profile_dir: Path | None = None


class Agent:
    """One process of a system under test (``python -m benchmarks.agent``)."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: IO[bytes], what: str) -> None:
        self.proc, self._stderr, self.what = proc, stderr, what

    @classmethod
    async def start(
        cls, system: type[systems.System], dsn: str, stderr: IO[bytes], *args: str
    ) -> Agent:
        proc = await asyncio.create_subprocess_exec(
            system.python,
            "-m",
            "benchmarks.agent",
            system.name,
            *args,
            cwd=ROOT,
            env={**os.environ, agent.DSN_ENV: dsn},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
        return cls(proc, stderr, f"{system.name} {args[0]}")

    async def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise self.failed(f"no output within {timeout:.0f}s") from None
        if not line:
            await self.proc.wait()
            raise self.failed(f"exited with code {self.proc.returncode}")
        return line.decode().rstrip("\n")

    async def ready(self, timeout: float = 60.0) -> None:
        while (line := await self._line(timeout)) != agent.READY:
            print(f"[{self.what}] {line}", file=sys.stderr)

    async def result(self, timeout: float = TIMEOUT_SECONDS) -> dict[str, Any]:
        while not (line := await self._line(timeout)).startswith(agent.RESULT):
            print(f"[{self.what}] {line}", file=sys.stderr)
        await asyncio.wait_for(self.proc.wait(), timeout)
        if self.proc.returncode:
            raise self.failed(f"exited with code {self.proc.returncode}")
        value: dict[str, Any] = orjson.loads(line.removeprefix(agent.RESULT))
        return value

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()

    def failed(self, why: str) -> BenchmarkError:
        self._stderr.seek(0)
        tail = self._stderr.read().decode(errors="replace")[-4000:]
        return BenchmarkError(f"{self.what} process {why}; its stderr:\n{tail}")


@contextlib.asynccontextmanager
async def agent_process(system: type[systems.System], dsn: str, *args: str) -> AsyncIterator[Agent]:
    # stderr goes to a file: a pipe nobody reads could fill up and stall the process.
    with tempfile.TemporaryFile() as stderr:
        proc = await Agent.start(system, dsn, stderr, *args)
        try:
            yield proc
        finally:
            await proc.kill()


async def run_agent(system: type[systems.System], dsn: str, *args: str) -> dict[str, Any]:
    async with agent_process(system, dsn, *args) as proc:
        return await proc.result()


@contextlib.asynccontextmanager
async def fresh_database(srv: Server, name: str) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """A new database (dropped afterwards), so that runs never see each other's rows."""
    admin = await asyncpg.connect(srv.dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
        # Restart the checkpoint timer, so that no timed checkpoint lands inside a run.
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await admin.execute("CHECKPOINT")
        dsn = database_dsn(srv.dsn, name)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(BENCH_SCHEMA)
            yield dsn, conn
        finally:
            await conn.close()
    finally:
        with contextlib.suppress(asyncpg.PostgresError):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@contextlib.contextmanager
def profiled(pid: int, out: Path | None) -> Iterator[None]:
    """py-spy flame graph of a process's busy time while the block runs.

    Busy versus waiting is better read from the CPU columns: under uvloop, py-spy
    counts time in the loop's C code (including asyncpg's protocol) as busy.
    """
    exe = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if out is None or exe is None:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        [exe, "record", "--pid", str(pid), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes the graph on SIGINT
        spy.wait(30)


async def bulk(cfg: Config, srv: Server, system: type[systems.System], rep: int) -> dict[str, Any]:
    """A: enqueue cfg.jobs in batches, then one worker process drains them."""
    n = cfg.jobs
    async with fresh_database(srv, f"bench_{system.name}_bulk_{rep}") as (dsn, conn):
        await run_agent(system, dsn, "setup")
        enq = await run_agent(system, dsn, "enqueue-bulk", f"--jobs={n}", f"--batch={cfg.batch}")
        if cfg.analyze:
            await conn.execute("ANALYZE")
        # Whether autovacuum refreshed the planner's statistics mid-drain: a claim
        # query whose plan depends on them can change speed at that moment.
        analyzed0 = await conn.fetchval(AUTOANALYZE_COUNT)
        server = postmaster(srv)
        args = (f"--concurrency={cfg.concurrency}", "--mode=noop")
        async with agent_process(system, dsn, "worker", *args) as worker:
            await worker.ready()
            proc = psutil.Process(worker.proc.pid)
            worker0, server0 = cpu_seconds(proc), cpu_seconds(server, children=True)
            started = time.perf_counter()
            out = cfg.profile_dir and cfg.profile_dir / f"{system.name}-bulk-{rep}.svg"
            with profiled(proc.pid, out):
                # The end is the start of the first poll that sees no job left: the
                # snapshot it reads is taken then. Resolution: POLL_SECONDS.
                while True:
                    now = time.perf_counter()
                    if not await conn.fetchval(system.unfinished_sql):
                        break
                    if now - started > TIMEOUT_SECONDS:
                        raise BenchmarkError(
                            f"{system.name}: drain not done after {now - started}s"
                        )
                    await asyncio.sleep(POLL_SECONDS)
            drain = now - started
            worker1, server1 = cpu_seconds(proc), cpu_seconds(server, children=True)
            worker.stop()
            res = await worker.result()
        autoanalyzed = await conn.fetchval(AUTOANALYZE_COUNT) - analyzed0
        problems = exactly_once(res, n) + await system(dsn).check(conn, n)
        if problems:
            raise BenchmarkError(f"{system.name} bulk run {rep}: " + "; ".join(problems))
    return {
        "jobs": n,
        "enqueue_seconds": enq["seconds"],
        "enqueue_per_s": n / enq["seconds"],
        "drain_seconds": drain,
        "drain_per_s": n / drain,
        "worker_cpu_us_per_job": _per_job(worker0, worker1, n),
        # CPU seconds per wall second: 1.0 is one core kept busy for the whole drain.
        "worker_cpu_cores": _per_second(worker0, worker1, drain),
        "server_cpu_us_per_job": _per_job(server0, server1, n),
        "server_cpu_cores": _per_second(server0, server1, drain),
        "autoanalyze_during_drain": autoanalyzed,
    }


async def latency(
    cfg: Config, srv: Server, system: type[systems.System], rep: int
) -> dict[str, Any]:
    """C: an idle worker; one producer enqueues cfg.rate jobs/s; enqueue-to-start latency."""
    async with fresh_database(srv, f"bench_{system.name}_latency_{rep}") as (dsn, conn):
        await run_agent(system, dsn, "setup")
        args = (f"--concurrency={cfg.concurrency}", "--mode=latency")
        async with agent_process(system, dsn, "worker", *args) as worker:
            await worker.ready()
            await asyncio.sleep(IDLE_SECONDS)
            prod = await run_agent(
                system, dsn, "produce", f"--rate={cfg.rate}", f"--seconds={cfg.latency_seconds}"
            )
            worker.stop()
            res = await worker.result()
        n = prod["enqueued"]
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM bench.started) AS started, "
            "(SELECT count(DISTINCT i) FROM bench.started) AS distinct_started, "
            "(SELECT count(DISTINCT i) FROM bench.enqueued) AS enqueued"
        )
        problems = exactly_once(res, n) + [
            f"{key} = {value}, expected {n}" for key, value in counts.items() if value != n
        ]
        if problems:
            raise BenchmarkError(f"{system.name} latency run {rep}: " + "; ".join(problems))
        ms = sorted(
            await conn.fetchval(
                "SELECT array_agg((extract(epoch FROM s.at - e.at) * 1000)::float8) "
                "FROM bench.started AS s JOIN bench.enqueued AS e USING (i)"
            )
        )
    return {
        "jobs": n,
        "rate": prod["rate"],
        "producer_behind_max_ms": prod["behind_max_s"] * 1000,
        **{f"p{q}_ms": _percentile(ms, q) for q in (50, 95, 99)},
        "max_ms": ms[-1],
    }


WORKLOADS: dict[str, Callable[..., Any]] = {"A": bulk, "C": latency}


async def run(cfg: Config, srv: Server, log: Callable[[str], None]) -> dict[str, Any]:
    """Every (workload, system) cfg.repeat times; systems interleaved so drift hits all."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {w: [] for w in cfg.workloads} for s in cfg.systems
    }
    for rep in range(1, cfg.repeat + 1):
        for workload in cfg.workloads:
            for name in cfg.systems:
                result = await WORKLOADS[workload](cfg, srv, systems.load(name), rep)
                runs[name][workload].append(result)
                log(f"[{name}] {workload} run {rep}/{cfg.repeat}: {_brief(result)}")
    return runs


def exactly_once(worker_result: dict[str, Any], expected: int) -> list[str]:
    executed, distinct = worker_result["executed"], worker_result["distinct"]
    if executed == distinct == expected:
        return []
    return [f"worker ran {executed} job(s), {distinct} distinct, expected {expected} once each"]


def _per_job(before: float | None, after: float | None, n: int) -> float | None:
    return None if before is None or after is None else (after - before) / n * 1e6


def _per_second(before: float | None, after: float | None, seconds: float) -> float | None:
    return None if before is None or after is None else (after - before) / seconds


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def _brief(result: dict[str, Any]) -> str:
    keys = ("enqueue_per_s", "drain_per_s", "p50_ms", "p99_ms", "max_ms")
    return ", ".join(f"{k} {result[k]:,.1f}" for k in keys if k in result)
