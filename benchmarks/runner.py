"""The workloads: each run gets a fresh database and the system's own processes.

A  bulk: enqueue with the batch API, then one worker process drains.
B  streaming: one producer enqueues one job per call, back to back, while a worker consumes.
C  latency: one job every 1/rate s into an idle worker; enqueue-to-start times.
D  scaling: A's drain with several worker processes.
E  many sleeping jobs at high concurrency: drain rate and the worker's peak memory.
F  taskq only: A's drain with each feature in use (results, retries, queue limits,
   a big history).
G  A with two worker processes: drain rate and CPU per job (both processes summed).
W  taskq only: a fan-out/fan-in workflow against the same jobs enqueued plainly, and a
   released child's pickup against a plain job's (benchmarks/workflows.py).

Long runs, only when named (``--workloads Q,H``), never in a default or quick run:

Q  taskq and the floor: a deep backlog. The rate of running the first jobs (as many
   as A's) out of a million queued, against the same number out of that many.
H  taskq only: a big history. A's drain, and the plans (EXPLAIN ANALYZE, BUFFERS) of
   the statements claim() and finish() run, with ten million finished jobs in
   history against an empty one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import asyncpg
import orjson
import psutil

from . import agent, systems, venvs
from .environment import ROOT, BenchmarkError, Server, cpu_seconds, database_dsn, postmaster

#: How often the runner asks Postgres whether a drain is over.
POLL_SECONDS = 0.02
#: A drain or a process that takes longer than this is stuck, not slow.
TIMEOUT_SECONDS = 600.0
#: Lets the worker settle into its idle wait before a producer starts.
IDLE_SECONDS = 0.5
#: The floor every ratio is taken against.
FLOOR = "minimal"
#: Worker processes in workload G.
G_PROCESSES = 2
#: Workload F: taskq variant -> what the row measures. None: not built yet.
FEATURES: list[tuple[str | None, str]] = [
    ("", "(1) baseline: no-op returning None"),
    ("result", "(2) results stored (returns a small dict)"),
    ("retry", "(3) every job fails once, `Retry(attempts=2, wait=0)`"),
    ("limit", "(4a) global concurrency limit {concurrency} (= the worker's concurrency)"),
    ("limit_half", "(4b) global concurrency limit {half_concurrency} (half the worker's)"),
    ("rate_limit", "(4c) queue rate limit 1,000,000/second"),
    ("history", "(5) {history_rows} finished jobs already in history"),
]

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
    stream_seconds: float = 15.0
    processes: tuple[int, ...] = (2, 4)
    sleep_jobs: int = 100_000
    sleep_concurrency: int = 1_000
    history_rows: int = 1_000_000
    #: Workload Q: jobs queued, and how many of them the timed drain runs.
    backlog: int = 1_000_000
    backlog_drain: int = 20_000
    #: ... unless that takes longer than this: Q's rate is then what ran meanwhile.
    backlog_seconds: float = 120.0
    #: Workload H: finished jobs in history.
    big_history: int = 10_000_000
    quick: bool = False
    #: Workloads the peers run (None: all); quick runs keep peers to A.
    peer_workloads: tuple[str, ...] | None = None
    analyze: bool = False
    profile_dir: Path | None = None
    #: Workload W: steps of the fan-out/fan-in workflow; two-step chains timed.
    workflow_steps: int = 10_000
    workflow_chains: int = 500


@dataclass(frozen=True)
class Subject:
    """One row of the tables: a system in one variant, run by one interpreter."""

    system: str
    variant: str
    label: str
    python: str

    @property
    def cls(self) -> type[systems.System]:
        return systems.load(self.system)

    def make(self, dsn: str) -> systems.System:
        return self.cls(dsn, self.variant)

    @property
    def slug(self) -> str:
        return re.sub(r"\W", "_", f"{self.system}_{self.variant}".strip("_"))

    def argv(self, *args: str) -> list[str]:
        return [self.system, f"--variant={self.variant}", *args]

    def jobs(self, n: int, workload: str) -> int:
        """How many of a bulk workload's ``n`` jobs this row runs (see System.jobs_share)."""
        return max(1, round(n * self.cls.jobs_share(self.variant, workload)))

    @property
    def peer(self) -> bool:
        return self.system not in (FLOOR, "taskq")


@dataclass
class Plan:
    """What the run measures: the rows, and what was skipped and why."""

    subjects: list[Subject]
    features: list[Subject]
    skipped: dict[str, str]
    versions: dict[str, dict[str, Any]]
    settings: dict[str, str]


# -- processes ---------------------------------------------------------------------


class Agent:
    """One process of a system under test (``python -m benchmarks.agent``)."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: IO[bytes], what: str) -> None:
        self.proc, self._stderr, self.what = proc, stderr, what

    @classmethod
    async def start(
        cls, subject: Subject, dsn: str, stderr: IO[bytes], *args: str, env: dict[str, str]
    ) -> Agent:
        proc = await asyncio.create_subprocess_exec(
            subject.python,
            "-m",
            "benchmarks.agent",
            *subject.argv(*args),
            cwd=ROOT,
            env={**os.environ, **env, agent.DSN_ENV: dsn},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            # A worker's result line lists the ids it ran: over 64 KiB (the
            # default line limit) past about 10,000 jobs.
            limit=2**26,
        )
        return cls(proc, stderr, f"{subject.label} {args[0]}")

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

    async def expect(self, word: str, timeout: float = 60.0) -> None:
        while (line := await self._line(timeout)) != word:
            print(f"[{self.what}] {line}", file=sys.stderr)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

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
async def agent_process(
    subject: Subject, dsn: str, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[Agent]:
    # stderr goes to a file: a pipe nobody reads could fill up and stall the process.
    with tempfile.TemporaryFile() as stderr:
        proc = await Agent.start(subject, dsn, stderr, *args, env=env or {})
        try:
            yield proc
        finally:
            await proc.kill()


async def run_agent(subject: Subject, dsn: str, *args: str) -> dict[str, Any]:
    async with agent_process(subject, dsn, *args) as proc:
        return await proc.result()


@contextlib.asynccontextmanager
async def workers(
    subject: Subject,
    dsn: str,
    count: int,
    concurrency: int,
    mode: str,
    *,
    setup: bool = False,
    notify_after: int | None = None,
) -> AsyncIterator[tuple[list[Agent], float]]:
    """``count`` worker processes, connected, then released together by GO.

    Yields once all are ready, with the moment the first one was: from then on
    jobs may run, so a drain's clock starts there. ``setup``: the first one
    installs the schema before it connects (a fresh database, nothing enqueued).
    ``notify_after``: each prints agent.REACHED once it has run that many jobs.
    """
    args = [f"--concurrency={concurrency}", f"--mode={mode}", f"--processes={count}"]
    if count > 1:
        args.append("--ids")
    if notify_after is not None:
        args.append(f"--notify-after={notify_after}")
    async with contextlib.AsyncExitStack() as stack:
        procs = []
        for n in range(count):
            extra = ["--setup"] if setup and n == 0 else []
            procs.append(
                await stack.enter_async_context(
                    agent_process(subject, dsn, "worker", *args, *extra)
                )
            )
            if extra:  # the others start on the installed schema
                await procs[0].expect(agent.OPEN)
        for p in procs[1 if setup else 0 :]:
            await p.expect(agent.OPEN)
        for p in procs:
            p.send(agent.GO)
        first = math.inf
        for ready in asyncio.as_completed([p.expect(agent.READY) for p in procs]):
            await ready
            first = min(first, time.perf_counter())
        yield procs, first


async def stop_all(procs: list[Agent]) -> list[dict[str, Any]]:
    for p in procs:
        p.stop()
    return list(await asyncio.gather(*(p.result() for p in procs)))


# -- databases ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fresh_database(srv: Server, name: str) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """A new database (dropped afterwards), so that runs never see each other's rows."""
    admin = await asyncpg.connect(srv.dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = database_dsn(srv.dsn, name)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(BENCH_SCHEMA)
            await checkpoint(conn)
            yield dsn, conn
        finally:
            await conn.close()
    finally:
        with contextlib.suppress(asyncpg.PostgresError):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def checkpoint(conn: asyncpg.Connection) -> None:
    """Flush what setup wrote and restart the checkpoint timer, so no checkpoint
    lands inside the measurement."""
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await conn.execute("CHECKPOINT")


def db_name(subject: Subject, workload: str, rep: int, suffix: str = "") -> str:
    return f"bench_{subject.slug}_{workload}{suffix}_{rep}"


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


# -- the drain every throughput workload shares --------------------------------------


async def wait_drained(
    conn: asyncpg.Connection, subject: Subject, started: float, timeout: float
) -> float:
    """Poll until no job is unfinished; return when the last poll began.

    The end is the start of the first poll that sees no job left: the snapshot
    it reads is taken then. Resolution: POLL_SECONDS.
    """
    sql = subject.cls.unfinished_sql
    while True:
        now = time.perf_counter()
        if not await conn.fetchval(sql):
            return now
        if now - started > timeout:
            raise BenchmarkError(f"{subject.label}: drain not done after {now - started:.0f}s")
        await asyncio.sleep(POLL_SECONDS)


async def drain(
    cfg: Config,
    srv: Server,
    subject: Subject,
    dsn: str,
    conn: asyncpg.Connection,
    *,
    jobs: int,
    processes: int = 1,
    concurrency: int,
    mode: str = "noop",
    profile: Path | None = None,
    backlog: int | None = None,
) -> dict[str, Any]:
    """Start worker processes on enqueued jobs; time them until none is left; verify.

    Worker CPU is summed over the worker processes; memory is the first one's,
    reported for a single process only. ``backlog``: that many jobs are queued
    and one worker process runs ``jobs`` of them. The clock then stops when the
    worker says it has run ``jobs`` (agent.REACHED) rather than when Postgres
    shows none left, or after cfg.backlog_seconds: the jobs it ran by then
    (counted when it stopped, so up to its concurrency more) over that time.
    The checks are that no job ran twice and that the system's tables hold
    exactly the jobs not run.
    """
    if backlog is not None and processes != 1:
        raise ValueError("a drain of part of a backlog is timed by its one worker's count")
    analyzed0 = await conn.fetchval(AUTOANALYZE_COUNT)
    server = postmaster(srv)
    reached = True
    async with workers(
        subject, dsn, processes, concurrency, mode, notify_after=None if backlog is None else jobs
    ) as (procs, started):
        ps = [psutil.Process(p.proc.pid) for p in procs]
        rss_ready = _memory(ps[0].pid, "VmRSS")
        worker0, server0 = _cpu_sum(ps), cpu_seconds(server, children=True)
        with profiled(ps[0].pid, profile):
            if backlog is None:
                ended = await wait_drained(conn, subject, started, TIMEOUT_SECONDS)
            else:
                reached = await _reached(procs[0], cfg.backlog_seconds)
                ended = time.perf_counter()
        seconds = ended - started
        worker1, server1 = _cpu_sum(ps), cpu_seconds(server, children=True)
        peak = _memory(ps[0].pid, "VmHWM")
        results = await stop_all(procs)
    if backlog is None:
        problems = exactly_once(results, jobs, subject.cls.runs_per_job(subject.variant))
        problems += await subject.make(dsn).check(conn, jobs)
    else:
        problems = await _part_run(conn, subject, results, jobs if reached else 0, backlog)
        if not reached:
            jobs = sum(r["executed"] for r in results)
    if problems:
        raise BenchmarkError(f"{subject.label}: " + "; ".join(problems))
    out: dict[str, Any] = {
        "jobs": jobs,
        "drain_seconds": seconds,
        "drain_per_s": jobs / seconds,
        "autoanalyze_during_drain": await conn.fetchval(AUTOANALYZE_COUNT) - analyzed0,
        "worker_cpu_us_per_job": _per_job(worker0, worker1, jobs),
        # CPU seconds per wall second: 1.0 is one core kept busy for the whole drain.
        "worker_cpu_cores": _per_second(worker0, worker1, seconds),
        "server_cpu_us_per_job": _per_job(server0, server1, jobs),
        "server_cpu_cores": _per_second(server0, server1, seconds),
    }
    if processes == 1:
        out |= {"rss_ready_mb": rss_ready, "rss_peak_mb": peak}
    if backlog is not None:
        out["reached"] = float(reached)
    return out


async def _reached(worker: Agent, seconds: float) -> bool:
    """Whether the worker said agent.REACHED within ``seconds``."""
    try:
        await asyncio.wait_for(worker.expect(agent.REACHED, seconds + 60), seconds)
    except TimeoutError:
        return False
    return True


def _cpu_sum(procs: list[psutil.Process]) -> float | None:
    seconds = [cpu_seconds(p) for p in procs]
    return None if None in seconds else sum(s for s in seconds if s is not None)


async def _part_run(
    conn: asyncpg.Connection,
    subject: Subject,
    results: list[dict[str, Any]],
    jobs: int,
    backlog: int,
) -> list[str]:
    """After at least ``jobs`` of ``backlog`` ran: each once, and the rest still queued."""
    executed = sum(r["executed"] for r in results)
    if executed < jobs:
        return [f"workers ran {executed} job(s), expected at least {jobs}"]
    problems = exactly_once(results, executed)
    left = await conn.fetchval(subject.cls.backlog_sql)
    if left != backlog - executed:
        problems.append(f"{left} job(s) left of {backlog} after {executed} ran")
    return problems


def _memory(pid: int, key: str) -> float | None:
    """A /proc/PID/status memory line in MB (VmRSS now, VmHWM the peak so far)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / 1e6  # kB there are KiB
    return None


# -- the workloads -------------------------------------------------------------------


async def bulk_enqueue(
    subject: Subject, dsn: str, jobs: int, batch: int, *, setup: bool = True
) -> float:
    """Install the schema (unless done already) and enqueue ``jobs``; the enqueue's seconds."""
    args = [f"--jobs={jobs}", f"--batch={batch}", *(["--setup"] if setup else [])]
    res = await run_agent(subject, dsn, "enqueue-bulk", *args)
    seconds: float = res["seconds"]
    return seconds


async def enqueue_and_drain(
    cfg: Config,
    srv: Server,
    subject: Subject,
    database: str,
    jobs: int,
    processes: int = 1,
    profile: Path | None = None,
) -> dict[str, Any]:
    """A fresh database, ``jobs`` enqueued in batches, drained by ``processes`` workers."""
    async with fresh_database(srv, database) as (dsn, conn):
        enq = await bulk_enqueue(subject, dsn, jobs, cfg.batch)
        if cfg.analyze:
            await conn.execute("ANALYZE")
        res = await drain(
            cfg, srv, subject, dsn, conn, jobs=jobs, processes=processes,
            concurrency=cfg.concurrency, profile=profile,
        )  # fmt: skip
    return {"enqueue_seconds": enq, "enqueue_per_s": jobs / enq, **res}


async def bulk(cfg: Config, srv: Server, subject: Subject, rep: int) -> dict[str, Any]:
    """A: enqueue cfg.jobs in batches, then one worker process drains them."""
    out = cfg.profile_dir and cfg.profile_dir / f"{subject.slug}-bulk-{rep}.svg"
    return await enqueue_and_drain(
        cfg, srv, subject, db_name(subject, "a", rep), subject.jobs(cfg.jobs, "A"), profile=out
    )


async def two_processes(cfg: Config, srv: Server, subject: Subject, rep: int) -> dict[str, Any]:
    """G: A with G_PROCESSES worker processes, each at cfg.concurrency."""
    jobs = subject.jobs(cfg.jobs, "G")
    return await enqueue_and_drain(cfg, srv, subject, db_name(subject, "g", rep), jobs, G_PROCESSES)


async def stream(cfg: Config, srv: Server, subject: Subject, rep: int) -> dict[str, Any]:
    """B: a producer enqueues one job per call, back to back, while one worker consumes."""
    async with fresh_database(srv, db_name(subject, "b", rep)) as (dsn, conn):
        async with workers(subject, dsn, 1, cfg.concurrency, "noop", setup=True) as (procs, _):
            await asyncio.sleep(IDLE_SECONDS)
            prod = await run_agent(
                subject, dsn, "produce", "--rate=0", f"--seconds={cfg.stream_seconds}"
            )
            # The backlog left when the producer stopped drains; how long it takes.
            tail_start = time.perf_counter()
            tail = await wait_drained(conn, subject, tail_start, TIMEOUT_SECONDS) - tail_start
            results = await stop_all(procs)
        n, seconds, backlog = prod["enqueued"], prod["seconds"], prod["backlog"]
        problems = exactly_once(results, n, subject.cls.runs_per_job(subject.variant))
        problems += await subject.make(dsn).check(conn, n)
        if problems:
            raise BenchmarkError(f"{subject.label} streaming run {rep}: " + "; ".join(problems))
    return {
        "jobs": n,
        "enqueue_per_s": n / seconds,
        # Finished while the producer ran: enqueued minus what was still unfinished.
        "executed_per_s": (n - backlog) / seconds,
        "backlog": backlog,
        "backlog_drain_seconds": tail,
    }


async def latency(cfg: Config, srv: Server, subject: Subject, rep: int) -> dict[str, Any]:
    """C: an idle worker; one producer enqueues cfg.rate jobs/s; enqueue-to-start latency."""
    async with fresh_database(srv, db_name(subject, "c", rep)) as (dsn, conn):
        async with workers(subject, dsn, 1, cfg.concurrency, "latency", setup=True) as (
            procs,
            _,
        ):
            await asyncio.sleep(IDLE_SECONDS)
            prod = await run_agent(
                subject, dsn, "produce", f"--rate={cfg.rate}", f"--seconds={cfg.latency_seconds}"
            )
            results = await stop_all(procs)
        n = prod["enqueued"]
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM bench.started) AS started, "
            "(SELECT count(DISTINCT i) FROM bench.started) AS distinct_started, "
            "(SELECT count(DISTINCT i) FROM bench.enqueued) AS enqueued"
        )
        problems = exactly_once(results, n, subject.cls.runs_per_job(subject.variant)) + [
            f"{key} = {value}, expected {n}" for key, value in counts.items() if value != n
        ]
        problems += await subject.make(dsn).check(conn, n)
        if problems:
            raise BenchmarkError(f"{subject.label} latency run {rep}: " + "; ".join(problems))
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


async def scaling(cfg: Config, srv: Server, subject: Subject, rep: int) -> dict[str, Any]:
    """D: A's drain with several worker processes, each at cfg.concurrency."""
    out: dict[str, Any] = {}
    jobs = subject.jobs(cfg.jobs, "D")
    for k in cfg.processes:
        name = db_name(subject, "d", rep, f"_{k}")
        res = await enqueue_and_drain(cfg, srv, subject, name, jobs, k)
        out[f"drain_per_s_{k}"] = res["drain_per_s"]
    out["jobs"] = jobs
    return out


async def sleepers(cfg: Config, srv: Server, subject: Subject, rep: int) -> dict[str, Any]:
    """E: many 10 ms sleeping jobs at high concurrency in one worker; its peak memory."""
    jobs = subject.jobs(cfg.sleep_jobs, "E")
    async with fresh_database(srv, db_name(subject, "e", rep)) as (dsn, conn):
        await bulk_enqueue(subject, dsn, jobs, cfg.batch)
        res = await drain(
            cfg, srv, subject, dsn, conn, jobs=jobs, concurrency=cfg.sleep_concurrency,
            mode="sleep",
        )  # fmt: skip
    keys = ("jobs", "drain_seconds", "drain_per_s", "rss_ready_mb", "rss_peak_mb")
    return {k: res[k] for k in keys}


async def feature(cfg: Config, srv: Server, subject: Subject, rep: int) -> dict[str, Any]:
    """F: A's drain for one taskq variant (results, retries, queue limits, a big history)."""
    async with fresh_database(srv, db_name(subject, "f", rep)) as (dsn, conn):
        # The concurrency: the limit variants configure their queue from it.
        await run_agent(subject, dsn, "setup", f"--concurrency={cfg.concurrency}")
        await subject.make(dsn).prepare(conn, {"history_rows": cfg.history_rows})
        await checkpoint(conn)  # the history insert's pages, before the clock starts
        await bulk_enqueue(subject, dsn, cfg.jobs, cfg.batch, setup=False)
        res = await drain(cfg, srv, subject, dsn, conn, jobs=cfg.jobs, concurrency=cfg.concurrency)
    keys = ("drain_per_s", "worker_cpu_us_per_job", "server_cpu_us_per_job")
    return {k: res[k] for k in keys}


def _alternated(rep: int, cases: list[Any]) -> list[Any]:
    """The cases in turn forwards and backwards, so that a drift of the machine hits both."""
    return cases if rep % 2 else cases[::-1]


async def deep_backlog(cfg: Config, srv: Server, subject: Subject, rep: int) -> dict[str, Any]:
    """Q: cfg.backlog_drain jobs run out of cfg.backlog queued, against cfg.jobs of cfg.jobs.

    Each case in a fresh database: the jobs enqueued with the batch API, then
    ``VACUUM ANALYZE`` (a backlog that grew over time has been vacuumed and
    analyzed by autovacuum) and a checkpoint, then one worker process, timed
    until it has run its share (drain()'s ``backlog``). Keys end in
    ``_shallow`` and ``_deep``; ``ratio`` is deep / shallow.
    """
    out: dict[str, Any] = {}
    cases = [("shallow", cfg.jobs, cfg.jobs), ("deep", cfg.backlog_drain, cfg.backlog)]
    for case, jobs, queued in _alternated(rep, cases):
        async with fresh_database(srv, db_name(subject, "q", rep, f"_{case}")) as (dsn, conn):
            enq = await bulk_enqueue(subject, dsn, queued, cfg.batch)
            await conn.execute("VACUUM ANALYZE")
            await checkpoint(conn)
            res = await drain(
                cfg, srv, subject, dsn, conn, jobs=jobs, concurrency=cfg.concurrency,
                backlog=queued,
            )  # fmt: skip
        res |= {"queued": queued, "enqueue_per_s": queued / enq}
        out |= {f"{key}_{case}": value for key, value in res.items()}
    out["ratio"] = out["drain_per_s_deep"] / out["drain_per_s_shallow"]
    return out


async def big_history(cfg: Config, srv: Server, subject: Subject, rep: int) -> dict[str, Any]:
    """H (taskq): A's drain with cfg.big_history finished jobs in history, against none.

    Each case in a fresh database: the schema, the history rows (the ``history``
    variant's prepare(): one ``INSERT ... SELECT generate_series``, then
    ``VACUUM ANALYZE``), cfg.jobs enqueued, the plans of the claim's and the
    write-back's statements (System.plans(), rolled back), a checkpoint, the
    drain. Keys end in ``_empty`` and ``_big``; ``ratio`` is big / empty,
    ``plans_same`` 1 when every statement kept its plan's shape.
    """
    from .systems.taskq_system import SCHEMA  # loaded on demand, as in plan()

    hist = Subject(subject.system, "history", subject.label, subject.python)
    table = f"{SCHEMA}.history"
    out: dict[str, Any] = {}
    plans: dict[str, list[dict[str, Any]]] = {}
    for case, rows in _alternated(rep, [("empty", 0), ("big", cfg.big_history)]):
        async with fresh_database(srv, db_name(subject, "h", rep, f"_{case}")) as (dsn, conn):
            system = hist.make(dsn)
            await run_agent(hist, dsn, "setup")
            filling = time.perf_counter()
            await system.prepare(conn, {"history_rows": rows})
            filled = time.perf_counter() - filling
            await bulk_enqueue(hist, dsn, cfg.jobs, cfg.batch, setup=False)
            plans[case] = await system.plans()
            await checkpoint(conn)
            res = await drain(cfg, srv, hist, dsn, conn, jobs=cfg.jobs, concurrency=cfg.concurrency)
            res["history_rows"] = rows
            size = await conn.fetchval(
                "SELECT coalesce((SELECT sum(pg_total_relation_size(relid))::bigint "
                "FROM pg_partition_tree($1::regclass)), pg_total_relation_size($1::regclass))",
                table,
            )
            res["history_mb"] = size / 1e6
        res["fill_seconds"] = filled
        res |= {f"{name}_buffers": n for name, n in statement_buffers(plans[case]).items()}
        out |= {f"{key}_{case}": value for key, value in res.items()}
    out["ratio"] = out["drain_per_s_big"] / out["drain_per_s_empty"]
    out["plans_same"] = float(same_plans(plans["empty"], plans["big"]))
    # Not numbers: kept in the JSON and shown by the report, not summarized.
    out["plans"] = plans
    return out


def statement_buffers(plans: list[dict[str, Any]]) -> dict[str, int]:
    """Shared buffers (hit + read) of each top-level call System.plans() made, by name."""
    return {p["call"]: p["buffers"]["hit"] + p["buffers"]["read"] for p in plans if p["top"]}


def same_plans(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """The same statements, in the same order, with the same plan shapes."""
    return [(p["query"], p["shape"]) for p in a] == [(p["query"], p["shape"]) for p in b]


async def workflows(cfg: Config, srv: Server, subject: Subject, rep: int) -> dict[str, Any]:
    """W: taskq's workflows against plain jobs (benchmarks/workflows.py)."""
    from . import workflows as w  # it imports this module

    return await w.workload(cfg, srv, subject, rep)


Workload = Callable[[Config, Server, Subject, int], Awaitable[dict[str, Any]]]
WORKLOADS: dict[str, Workload] = {
    "A": bulk,
    "B": stream,
    "C": latency,
    "D": scaling,
    "E": sleepers,
    "F": feature,
    "G": two_processes,
    "H": big_history,
    "Q": deep_backlog,
    "W": workflows,
}
#: Workloads only taskq (its plain row) runs.
TASKQ_ONLY = ("W", "H")
#: Workloads only taskq's plain row and the floor run.
WITH_FLOOR_ONLY = ("Q",)
#: Workloads that run only when named (minutes each, and gigabytes of disk for H).
LONG = ("H", "Q")


# -- the plan and the run --------------------------------------------------------------


async def plan(cfg: Config, log: Callable[[str], None]) -> Plan:
    """Resolve the rows: each system's variants and interpreter (peers' virtualenvs)."""
    subjects: list[Subject] = []
    skipped: dict[str, str] = {}
    versions: dict[str, dict[str, Any]] = {}
    settings: dict[str, str] = {}
    pythons: dict[str, str] = {}
    for entry in cfg.systems:
        name, _, only = entry.partition(":")
        cls = systems.load(name)
        if name not in pythons and name not in skipped:
            try:
                pythons[name] = interpreter(cls, cfg.quick, log)
                versions[name] = await _versions(cls, pythons[name])
            except (venvs.VenvUnavailable, BenchmarkError) as exc:
                skipped[name] = str(exc)
                log(f"skipping {name}: {exc}")
        if name in skipped:
            continue
        for variant, label in cls.variants.items():
            if (only and variant != only) or (not only and name == "taskq" and variant):
                continue
            subjects.append(Subject(name, variant, label, pythons[name]))
            settings[label] = cls.describe(variant, (cfg.concurrency, cfg.sleep_concurrency))
    subjects.sort(key=lambda s: s.system != FLOOR)  # the floor first
    features: list[Subject] = []
    if "F" in cfg.workloads and "taskq" in pythons:
        cls = systems.load("taskq")
        from .systems.taskq_system import concurrency_limit  # loaded on demand, as above

        for feat, what in FEATURES:
            if feat is not None:
                label = what.format(
                    history_rows=f"{cfg.history_rows:,}",
                    concurrency=cfg.concurrency,
                    half_concurrency=concurrency_limit("limit_half", cfg.concurrency),
                )
                features.append(Subject("taskq", feat, label, pythons["taskq"]))
                settings[label] = cls.describe(feat, (cfg.concurrency,))
    return Plan(subjects, features, skipped, versions, settings)


def interpreter(cls: type[systems.System], quick: bool, log: Callable[[str], None]) -> str:
    if cls.venv is None:
        return sys.executable
    # Quick runs (CI) use a virtualenv only if it exists or can be made quickly.
    timeout = 90.0 if quick else 900.0
    pip_args = ("--retries=1", "--timeout=15") if quick else ()
    return venvs.ensure(cls.venv, timeout=timeout, log=log, pip_args=pip_args)


async def _versions(cls: type[systems.System], python: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        python, "-m", "benchmarks.agent", cls.name, "versions",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    lines = [ln for ln in out.decode().splitlines() if ln.startswith(agent.RESULT)]
    if proc.returncode or not lines:
        raise BenchmarkError(f"{python} cannot run the agent: {err.decode()[-500:]}")
    found: dict[str, Any] = orjson.loads(lines[-1].removeprefix(agent.RESULT))
    return found


async def run(
    cfg: Config, srv: Server, plan_: Plan, log: Callable[[str], None]
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every (workload, row) cfg.repeat times; rows interleaved so drift hits all."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rep in range(1, cfg.repeat + 1):
        for workload in cfg.workloads:
            rows = plan_.features if workload == "F" else plan_.subjects
            if workload in TASKQ_ONLY:
                rows = [s for s in rows if s.system == "taskq" and not s.variant]
            if workload in WITH_FLOOR_ONLY:
                rows = [s for s in rows if s.system in ("taskq", FLOOR) and not s.variant]
            if cfg.peer_workloads is not None and workload not in cfg.peer_workloads:
                rows = [s for s in rows if not s.peer]
            for subject in rows:
                started = time.perf_counter()
                result = await WORKLOADS[workload](cfg, srv, subject, rep)
                # Whether other work shared the machine (the run itself adds ~1-2).
                result["load_1m_after"] = os.getloadavg()[0]
                runs.setdefault(subject.label, {}).setdefault(workload, []).append(result)
                took = time.perf_counter() - started
                log(f"[{subject.label}] {workload} run {rep}/{cfg.repeat} ({took:.0f} s): "
                    f"{_brief(result)}")  # fmt: skip
    return runs


def exactly_once(results: list[dict[str, Any]], jobs: int, runs_per_job: int = 1) -> list[str]:
    """Every job ran, once (``runs_per_job`` times when each is retried), in one process."""
    executed = sum(r["executed"] for r in results)
    distinct = sum(r["distinct"] for r in results)
    problems = []
    if executed != jobs * runs_per_job or distinct != jobs:
        problems.append(
            f"workers ran {executed} job(s), {distinct} distinct, expected {jobs} "
            f"{'once' if runs_per_job == 1 else f'{runs_per_job} times'} each"
        )
    if len(results) > 1:
        union = set().union(*(r["ids"] for r in results))
        if len(union) != jobs:
            problems.append(f"{len(union)} distinct jobs ran across processes, expected {jobs}")
    return problems


def _per_job(before: float | None, after: float | None, n: int) -> float | None:
    return None if before is None or after is None else (after - before) / n * 1e6


def _per_second(before: float | None, after: float | None, seconds: float) -> float | None:
    return None if before is None or after is None else (after - before) / seconds


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def _brief(result: dict[str, Any]) -> str:
    keys: tuple[str, ...] = ("enqueue_per_s", "drain_per_s", "executed_per_s", "backlog")
    keys += ("p50_ms", "p99_ms", "ratio", "pickup_p50_delta_ms")
    keys += (*(k for k in result if k.startswith("drain_per_s_")), "rss_peak_mb")
    return ", ".join(f"{k} {result[k]:,.1f}" for k in keys if result.get(k) is not None)
