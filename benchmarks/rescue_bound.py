"""How long after its worker's last renewal is a killed worker's job queued again?

Measures the rescue bound that ``docs/guarantees.md`` states (lease plus one
rescue interval), with real worker processes killed with SIGKILL::

    python -m benchmarks.rescue_bound --dsn postgresql://...   # steady: one worker rescues
    python -m benchmarks.rescue_bound --dsn ... --restarts 3   # workers live 3 s each
    python -m benchmarks.rescue_bound --dsn ... --lease 4 --kills 4   # quick

Each killed worker holds one job in a queue of its own, killed at a random
moment of its lease. The delay is measured on the database's clock: from the
last renewal (the lease it left behind, less a lease) to the re-queue
(``run_at``, set by the rescue). With ``--restarts S`` no worker runs for
long: one after another lives S seconds, then gets SIGTERM, as in a crash
loop or a rolling deploy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import taskq

ROOT = Path(__file__).resolve().parent.parent

app = taskq.App()  # the workers' App: $TASKQ_DSN and $TASKQ_SCHEMA


@app.task(name="rescue_bound.hang")
async def hang() -> None:
    await asyncio.sleep(3600)


def spawn(dsn: str, schema: str, lease: float, queue: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, TASKQ_DSN=dsn, TASKQ_SCHEMA=schema, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "taskq", "worker", "benchmarks.rescue_bound:app"),
            *("--queue", queue, "--lease-seconds", str(lease), "--shutdown-timeout", "1"),
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )


def terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def rescuers(dsn: str, schema: str, lease: float, lifetime: float | None) -> None:
    """A worker that rescues (and serves no job's queue) for ever, or one after another."""
    while True:
        proc = spawn(dsn, schema, lease, "rescue_bound.none")
        try:
            if lifetime is None:
                await asyncio.Event().wait()
            await asyncio.sleep(lifetime)
        finally:
            await asyncio.to_thread(terminate, proc)


async def measure(dsn: str, lease: float, kills: int, lifetime: float | None) -> list[float]:
    schema = f"rescue_bound_{secrets.token_hex(4)}"
    measuring = taskq.App(dsn, schema=schema)
    measuring.task(name="rescue_bound.hang")(lambda: None)
    doomed: list[subprocess.Popen[bytes]] = []
    async with measuring:
        s = f'"{schema}"'
        try:
            for i in range(kills):
                await measuring.enqueue("rescue_bound.hang", queue=f"d{i}")
                doomed.append(spawn(dsn, schema, lease, f"d{i}"))
            async with measuring.pool.acquire() as c:
                running = f"SELECT count(*) FROM {s}.jobs WHERE state = 'running'"
                while await c.fetchval(running) < kills:
                    await asyncio.sleep(0.1)
            rescuing = asyncio.create_task(rescuers(dsn, schema, lease, lifetime))
            renewed: dict[str, object] = {}
            for i, proc in enumerate(doomed):  # kills spread over one lease
                await asyncio.sleep(random.uniform(0, lease / kills))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                async with measuring.pool.acquire() as c:
                    renewed[f"d{i}"] = await c.fetchval(
                        f"SELECT lease_expires_at - make_interval(secs => $2) FROM {s}.jobs "
                        "WHERE queue = $1",
                        f"d{i}",
                        lease,
                    )
            async with measuring.pool.acquire() as c:
                deadline = time.monotonic() + 3 * lease + 60
                while await c.fetchval(f"SELECT count(*) FROM {s}.jobs WHERE rescues = 0") > 0:
                    if time.monotonic() > deadline:
                        raise SystemExit("jobs were not rescued within 3 leases + 60 s")
                    await asyncio.sleep(0.1)
                rows = await c.fetch(f"SELECT queue, run_at FROM {s}.jobs")
            rescuing.cancel()
            await asyncio.gather(rescuing, return_exceptions=True)
            return sorted((r["run_at"] - renewed[r["queue"]]).total_seconds() for r in rows)
        finally:
            for proc in doomed:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            async with measuring.pool.acquire() as c:
                await c.execute(f"DROP SCHEMA {s} CASCADE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("TASKQ_DSN"), help="Postgres DSN")
    parser.add_argument("--lease", type=float, default=30.0, help="lease_seconds (default 30)")
    parser.add_argument("--kills", type=int, default=8, help="workers killed (default 8)")
    parser.add_argument(
        "--restarts",
        type=float,
        metavar="S",
        help="no steady worker: workers that live S seconds each, one after another",
    )
    args = parser.parse_args()
    if not args.dsn:
        parser.error("give --dsn or set $TASKQ_DSN")
    delays = asyncio.run(measure(args.dsn, args.lease, args.kills, args.restarts))
    interval = args.lease / 2
    how = f"workers living {args.restarts:g}s each" if args.restarts else "one steady worker"
    print(
        f"lease {args.lease:g}s, rescue interval {interval:g}s, {how}: {len(delays)} jobs "
        f"re-queued {min(delays):.2f}s to {max(delays):.2f}s after their worker's last renewal "
        f"(median {statistics.median(delays):.2f}s; bound lease + rescue interval = "
        f"{args.lease + interval:g}s, {max(delays) - args.lease - interval:+.2f}s)"
    )


if __name__ == "__main__":
    main()
