"""Many hosts: the drain on 1 to 3 worker hosts in network namespaces, with and without 1 ms RTT.

Each "host" is one ``python -m taskq worker`` (concurrency 10) in a network
namespace of its own (benchmarks/hostnet.py) and a UTS namespace named for
the host, reaching Postgres through a relay process on the root side of its
link (benchmarks/delay_relay.py) that adds nothing, or holds each chunk
0.5 ms each way (about 1 ms of round trip: a LAN). Needs root, iproute2 and
util-linux's ``unshare``::

    python -m benchmarks.multihost                  # a throwaway embedded Postgres
    python -m benchmarks.multihost --dsn postgresql://... --jobs 20000 --repeat 3

Each run: a fresh schema; every host's workers registered; N no-op jobs
enqueued in one statement; jobs/s from history (first start to last finish);
every job checked to have run exactly once, and which host ran how many.
CPU from before the enqueue to an empty queue: Postgres (the postmaster
and its backends, also those that exit meanwhile), the workers (with their
children) and the relays, per job. Runs:

1. ``SELECT 1`` round trips from inside a namespace, without and with delay;
2. 1, 2 and 3 hosts: on loopback without namespace or relay (the baseline),
   through namespaces and relays, and with the delay;
3. the ceiling: 3 hosts with more worker processes each (``--processes``)
   (``--ceiling``, 1 to 4) to find where jobs/s stops growing, and how busy
   Postgres is meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import psutil

import taskq

from . import hostnet
from .environment import BenchmarkError, Server, postmaster, server, server_facts

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 10
DELAY_MS = 0.5  # each way: about 1 ms of round trip
TIMEOUT = 300.0  # seconds a drain may take before the run is called failed
PATHS = {
    "loopback": "no namespace, no relay",
    "relay": "namespace + relay",
    "delay": "namespace + relay, +1 ms RTT",
}


app = taskq.App()  # the workers' App: $TASKQ_DSN and $TASKQ_SCHEMA


@app.task(name="bench.noop")
async def noop() -> None:
    return None


@dataclass
class Run:
    path: str  # a key of PATHS
    hosts: int
    processes: int  # per host
    jobs: int
    jobs_per_s: float = 0.0
    per_host: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds, enqueue to empty queue
    wall: float = 0.0  # seconds of that window
    load: float = 0.0  # 1-minute load average when the run ended

    def us_per_job(self, what: str) -> float:
        return self.cpu[what] / self.jobs * 1e6

    def cores(self, what: str) -> float:
        return self.cpu[what] / self.wall


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- processes and schemas -----------------------------------------------------------------


async def fresh(dsn: str) -> taskq.App:
    bench = taskq.App(dsn, schema=f"bench_mh_{secrets.token_hex(4)}")
    bench.task(name="bench.noop")(lambda: None)
    await bench.open()
    return bench


async def drop(bench: taskq.App) -> None:
    async with bench.pool.acquire() as c:
        await c.execute(f'DROP SCHEMA "{bench.schema}" CASCADE')
    await bench.close()


async def fetchval(bench: taskq.App, sql: str) -> Any:
    async with bench.pool.acquire() as c:
        return await c.fetchval(sql.replace("{s}", f'"{bench.schema}"'))


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to a process started here, by its PID; SIGKILL if it is still there after 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def env(dsn: str, schema: str = "") -> dict[str, str]:
    return dict(os.environ, TASKQ_DSN=dsn, TASKQ_SCHEMA=schema, PYTHONPATH=str(ROOT))


def upstream_of(dsn: str) -> str:
    """How a relay on this machine reaches the server: its unix socket, or loopback TCP."""
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qs(parts.query)
    host = query.get("host", [parts.hostname or ""])[0]
    port = int(query.get("port", [parts.port or 5432])[0])
    if host.startswith("/"):
        return f"unix:{host}/.s.PGSQL.{port}"
    if host in ("127.0.0.1", "::1", "localhost"):
        return f"tcp:{host}:{port}"
    raise BenchmarkError("the relays forward only to a Postgres on this machine")


def relayed_dsn(dsn: str, host: hostnet.Host, port: int) -> str:
    parts = urllib.parse.urlsplit(dsn)
    user = parts.netloc.rpartition("@")[0] or "postgres"
    return f"postgresql://{user}@{host.root_addr}:{port}{parts.path}"


async def start_relay(
    upstream: str, host: hostnet.Host, delay_ms: float
) -> tuple[subprocess.Popen[bytes], int]:
    proc = spawn_relay(upstream, host, delay_ms)
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        return proc, int(line)
    except (TimeoutError, ValueError):
        terminate(proc)
        raise BenchmarkError(f"the relay for {host.name} did not start") from None


def spawn_relay(upstream: str, host: hostnet.Host, delay_ms: float) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "benchmarks.delay_relay", "--listen", host.root_addr,
           "--upstream", upstream, "--delay-ms", str(delay_ms)]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=env(""), stdout=subprocess.PIPE)


def spawn_worker(
    host: hostnet.Host, namespace: bool, dsn: str, schema: str, processes: int, output: Path
) -> subprocess.Popen[bytes]:
    """One host's ``python -m taskq worker``, its output in ``output``."""
    argv = [sys.executable, "-m", "taskq", "worker", "benchmarks.multihost:app",
            "--concurrency", str(CONCURRENCY), "--processes", str(processes)]  # fmt: skip
    cmd = hostnet.in_host(host if namespace else None, host.name, argv)
    with output.open("wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env(dsn, schema), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip


@contextlib.contextmanager
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started in the block, each ended by its PID when it exits."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            terminate(p)


# -- CPU ---------------------------------------------------------------------------------


def tree_cpu(pid: int) -> float:
    """User + system CPU of a process and its live descendants."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        top = psutil.Process(pid)
        for p in [top, *top.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    return total


def postgres_cpu(master: psutil.Process | None) -> float:
    """The postmaster, its live backends, and the backends it has reaped (children_*)."""
    if master is None:
        return float("nan")
    t = master.cpu_times()
    return (
        t.user
        + t.system
        + t.children_user
        + t.children_system
        + sum(tree_cpu(c.pid) for c in master.children())
    )


def snapshot(
    master: psutil.Process | None, workers: list[int], relays: list[int]
) -> dict[str, float]:
    busy = psutil.cpu_times()
    return {
        "postgres": postgres_cpu(master),
        "workers": sum(tree_cpu(p) for p in workers),
        "relays": sum(tree_cpu(p) for p in relays),
        # Every core of the machine, whoever used it: shows when all are busy.
        # (guest time is counted in user already.)
        "machine": busy.user + busy.nice + busy.system + busy.irq + busy.softirq + busy.steal,
        "t": time.perf_counter(),
    }


# -- one drain ---------------------------------------------------------------------------


async def wait_registered(bench: taskq.App, n: int, workers: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 60
    while await fetchval(bench, "SELECT count(*) FROM {s}.workers") != n:
        if any(w.poll() is not None for w in workers) or time.monotonic() > deadline:
            raise BenchmarkError(f"not all {n} workers registered (see the logs)")
        await asyncio.sleep(0.1)


async def wait_drained(bench: taskq.App) -> None:
    deadline = time.monotonic() + TIMEOUT
    while await fetchval(bench, "SELECT EXISTS (SELECT 1 FROM {s}.jobs)"):
        if time.monotonic() > deadline:
            raise BenchmarkError(f"drain not done after {TIMEOUT:.0f} s")
        await asyncio.sleep(0.05)


async def check(bench: taskq.App, run: Run) -> None:
    """Every job ran exactly once, and where."""
    async with bench.pool.acquire() as c:
        s = f'"{bench.schema}"'
        row = await c.fetchrow(
            f"SELECT count(*) AS n, count(DISTINCT id) AS ids, "
            f"count(*) FILTER (WHERE state = 'succeeded' AND attempts = 1) AS once, "
            f"extract(epoch FROM max(finished_at) - min(started_at))::float8 AS span "
            f"FROM {s}.history"
        )
        if not row["n"] == row["ids"] == row["once"] == run.jobs:
            raise BenchmarkError(f"{run.jobs} jobs, history: {dict(row)}")
        hosts = await c.fetch(
            f"SELECT split_part(worker_id, ':', 1) AS host, count(*) AS n FROM {s}.history "
            "GROUP BY 1 ORDER BY 1"
        )
    run.jobs_per_s = run.jobs / row["span"]
    run.per_host = {r["host"]: r["n"] for r in hosts}


async def drain(
    srv: Server, hosts: list[hostnet.Host], path: str, processes: int, jobs: int, logs: Path
) -> Run:
    run = Run(path, len(hosts), processes, jobs)
    bench = await fresh(srv.dsn)
    delay = DELAY_MS if path == "delay" else 0.0
    try:
        with started() as relays, started() as workers:
            for h in hosts:
                dsn = srv.dsn
                if path != "loopback":
                    relay, port = await start_relay(upstream_of(srv.dsn), h, delay)
                    relays.append(relay)
                    dsn = relayed_dsn(srv.dsn, h, port)
                log_file = logs / f"{path}-{len(hosts)}-{processes}-{h.name}.log"
                workers.append(
                    spawn_worker(h, path != "loopback", dsn, bench.schema, processes, log_file)
                )
            await wait_registered(bench, len(hosts) * processes, workers)
            master = postmaster(srv)
            pids = ([w.pid for w in workers], [r.pid for r in relays])
            # From before the enqueue: on a full machine this process may get the
            # enqueue's reply only after the workers have drained much of it.
            before = snapshot(master, *pids)
            await bench.tasks["bench.noop"].enqueue_many([{}] * jobs)
            await wait_drained(bench)
            after = snapshot(master, *pids)
        await check(bench, run)
    finally:
        await drop(bench)
    run.wall = after["t"] - before["t"]
    run.cpu = {k: after[k] - before[k] for k in ("postgres", "workers", "relays", "machine")}
    run.load = os.getloadavg()[0]
    log(f"  {PATHS[path]}, {len(hosts)} host(s) x {processes} process(es): "
        f"{run.jobs_per_s:,.0f} jobs/s {run.per_host}; load {run.load:.2f}")  # fmt: skip
    return run


async def enqueue_cost(srv: Server, jobs: int) -> float:
    """Postgres CPU per job of the enqueue statement alone (no worker running), in µs."""
    bench = await fresh(srv.dsn)
    try:
        master = postmaster(srv)
        before = postgres_cpu(master)
        await bench.tasks["bench.noop"].enqueue_many([{}] * jobs)
        return (postgres_cpu(master) - before) / jobs * 1e6
    finally:
        await drop(bench)


# -- round trips -------------------------------------------------------------------------


async def rtt(srv: Server, host: hostnet.Host) -> list[tuple[str, dict[str, float]]]:
    """``SELECT 1`` round trips: from the root namespace directly, then from a namespace."""

    async def probe(cmd: list[str]) -> dict[str, float]:
        out = await asyncio.to_thread(
            subprocess.run, cmd, cwd=ROOT, env=env(""), capture_output=True, text=True,
            timeout=120, check=True,
        )  # fmt: skip
        return dict(json.loads(out.stdout))

    probe_cmd = [sys.executable, "-m", "benchmarks.rtt"]
    found = [(PATHS["loopback"], await probe([*probe_cmd, srv.dsn]))]
    for path, delay in (("relay", 0.0), ("delay", DELAY_MS)):
        with started() as relays:
            relay, port = await start_relay(upstream_of(srv.dsn), host, delay)
            relays.append(relay)
            dsn = relayed_dsn(srv.dsn, host, port)
            inside = ["ip", "netns", "exec", host.netns, *probe_cmd, dsn]
            found.append((f"{PATHS[path]} ({delay:g} ms each way)", await probe(inside)))
    return found


# -- the report ----------------------------------------------------------------------------


def _median(runs: list[Run], value: Any) -> float:
    return statistics.median(value(r) for r in runs)


def rate_cell(runs: list[Run]) -> str:
    rates = [r.jobs_per_s for r in runs]
    return f"{statistics.median(rates):,.0f} | {min(rates):,.0f}–{max(rates):,.0f}"


def cpu_cells(runs: list[Run]) -> str:
    us = [f"{_median(runs, lambda r, w=w: r.us_per_job(w)):.0f}" for w in ("postgres", "workers")]
    relays = (
        "–"
        if runs[0].path == "loopback"
        else f"{_median(runs, lambda r: r.us_per_job('relays')):.0f}"
    )
    cores = [f"{_median(runs, lambda r, w=w: r.cores(w)):.2f}" for w in ("postgres", "machine")]
    return " | ".join([*us, relays, *cores])


def report_drains(groups: dict[tuple[str, int, int], list[Run]]) -> None:
    print("| hosts | path | jobs/s (median) | range | jobs per host (last run) | load (1 min) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (path, hosts, _), runs in groups.items():
        spread = ", ".join(f"{n:,}" for n in runs[-1].per_host.values())
        loads = f"{min(r.load for r in runs):.1f}–{max(r.load for r in runs):.1f}"
        print(f"| {hosts} | {PATHS[path]} | {rate_cell(runs)} | {spread} | {loads} |")
    print("\nCPU per job, enqueue and drain (µs, median of runs) and cores busy (CPU s / wall s)\n")
    print("| hosts | path | Postgres µs/job | workers µs/job | relays µs/job "
          "| Postgres cores | machine cores |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (path, hosts, _), runs in groups.items():
        print(f"| {hosts} | {PATHS[path]} | {cpu_cells(runs)} |")


def report_ceiling(groups: dict[tuple[str, int, int], list[Run]], cores: int) -> None:
    print("| processes per host | workers | jobs/s (median) | range | Postgres µs/job "
          "| workers µs/job | relays µs/job | Postgres cores | machine cores |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (_, hosts, processes), runs in groups.items():
        print(f"| {processes} | {hosts * processes} | {rate_cell(runs)} | {cpu_cells(runs)} |")
    runs = [r for rs in groups.values() for r in rs]
    best = max(groups.values(), key=lambda rs: _median(rs, lambda r: r.jobs_per_s))
    us = _median(runs, lambda r: r.us_per_job("postgres"))
    print(f"\nHighest median: {_median(best, lambda r: r.jobs_per_s):,.0f} jobs/s at "
          f"{best[0].processes} process(es) per host, Postgres busy "
          f"{_median(best, lambda r: r.cores('postgres')):.2f} of {cores} cores.")  # fmt: skip
    print(f"Postgres CPU per job over these runs: {us:.0f} µs (median): one core's worth is "
          f"{1e6 / us:,.0f} jobs/s, {cores} cores' {cores * 1e6 / us:,.0f} (if Postgres had them "
          f"alone); extrapolated, 16 cores {16e6 / us:,.0f} jobs/s.")  # fmt: skip


async def measure(args: argparse.Namespace, srv: Server) -> None:
    conn = await asyncpg.connect(srv.dsn)
    try:
        facts = await server_facts(conn, srv)
    finally:
        await conn.close()
    cores = os.cpu_count() or 1
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{when}; {cores} cores; load average {load} (1 / 5 / 15 min) before the runs")
    print(f"{facts['version'].split(' on ')[0]}; synchronous_commit {facts['synchronous_commit']}")
    if postmaster(srv) is None:
        print("(Postgres is not on this machine or its data directory is unreadable: no CPU)")
    print(f"{args.jobs:,} no-op jobs a run, concurrency {CONCURRENCY} a worker process, "
          f"{args.repeat} runs a configuration\n")  # fmt: skip
    with hostnet.network() as hosts, tempfile.TemporaryDirectory(prefix="taskq-bmh-") as tmp:
        logs = Path(tmp)
        print("Round trips of `SELECT 1` (1,000 after 50 unmeasured)\n")
        print("| from | median (ms) | p99 (ms) |")
        print("| --- | --- | --- |")
        for label, found in await rtt(srv, hosts[0]):
            print(f"| {label} | {found['median_ms']:.3f} | {found['p99_ms']:.3f} |", flush=True)
        costs = [await enqueue_cost(srv, args.jobs) for _ in range(args.repeat)]
        print(f"\nPostgres CPU of the enqueue statement alone, no worker running: "
              f"{statistics.median(costs):.0f} µs/job (median of {len(costs)})")  # fmt: skip
        groups: dict[tuple[str, int, int], list[Run]] = {}
        for n in (1, 2, 3):
            for path in PATHS:
                groups[(path, n, 1)] = []
        # Repetitions take turns, so a busy minute on the machine touches every configuration.
        for i in range(args.repeat):
            log(f"round {i + 1} of {args.repeat}")
            for (path, n, p), runs in groups.items():
                runs.append(await drain(srv, hosts[:n], path, p, args.jobs, logs))
        print(f"\nDrain of {args.jobs:,} no-op jobs, one worker process a host\n")
        report_drains(groups)
        ceiling: dict[tuple[str, int, int], list[Run]] = {}
        for p in args.ceiling:
            ceiling[("relay", 3, p)] = [
                await drain(srv, hosts, "relay", p, args.jobs, logs) for _ in range(args.repeat)
            ]
        print(
            f"\nThe ceiling: 3 hosts through relays, more worker processes each ({cores} cores)\n"
        )
        report_ceiling(ceiling, cores)
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload average after the runs: {load}; namespaces of ours left: "
          f"{hostnet.leftovers() or 'none'}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=None, help="Postgres DSN (default: embedded)")
    parser.add_argument("--jobs", type=int, default=20_000, help="no-op jobs a run (20000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs a configuration (3)")
    parser.add_argument("--ceiling", default="1,2,3,4",
                        help="worker processes per host in the ceiling runs (1,2,3,4)")  # fmt: skip
    args = parser.parse_args()
    args.ceiling = [int(p) for p in args.ceiling.split(",") if p]
    if reason := hostnet.missing_requirement():
        raise SystemExit(f"python -m benchmarks.multihost: {reason}")
    try:
        with server(args.dsn) as srv:
            asyncio.run(measure(args, srv))
    except (BenchmarkError, hostnet.NetworkUnavailable) as exc:
        raise SystemExit(f"benchmark failed: {exc}") from None


if __name__ == "__main__":
    main()
