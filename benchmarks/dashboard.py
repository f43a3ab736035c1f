"""``python -m benchmarks.dashboard``: how fast each dashboard page answers on big tables.

Fills a fresh schema with ``--history-rows`` finished jobs (default 1,000,000:
one every 0.5 s back from now, ids rising with time, so the last hour holds 7,200; 94% succeeded,
5% failed with an error, 1% cancelled, over 4 queues and 12 tasks) and
``--queued`` live jobs (default 100,000: 90% due, 10% scheduled, plus 40
running on 4 registered workers), and a few workflows. Then it serves the
dashboard with uvicorn in a child process (one server process, as an operator
would run it) and, from this process, requests each page ``--requests`` times
one after another, after ``--warmup`` requests. It prints p50, p95 and max per
page, in milliseconds, measured at the client (HTTP included).

Uses --dsn, else $TASKQ_DSN, else the embedded Postgres; works in a fresh
schema and drops it at the end (--keep keeps it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import statistics
import sys
import time
from pathlib import Path

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent

QUEUES = ["default", "mail", "reports", "billing"]
#: History ids start above the workflows' jobs made through the API first.
BASE_ID = 10_000
TASKS = [f"bench.task_{i}" for i in range(12)]


async def fill(dsn: str, schema: str, history_rows: int, queued: int) -> dict[str, int]:
    """The tables as a busy install has them; returns ids the pages are asked about."""
    import taskq

    app = taskq.App(dsn, schema=schema)

    @app.task(name="bench.step")
    async def step(n: int = 0) -> int:
        return n

    async with app:
        # A few workflows made through the real API (their rows stay queued or waiting).
        workflow_ids = []
        for w in range(20):
            wf = taskq.Workflow(name=f"report-{w}")
            parts = [wf.add(step, n=i) for i in range(8)]
            wf.add(step.options(queue="reports"), n=99, after=parts)
            run = await wf.enqueue()
            workflow_ids.append(run.id)
    conn = await asyncpg.connect(dsn)
    s = f'"{schema}"'
    try:
        queues = "ARRAY[" + ",".join(f"'{q}'" for q in QUEUES) + "]"
        tasks = "ARRAY[" + ",".join(f"'{t}'" for t in TASKS) + "]"
        await conn.execute(
            f"""
            INSERT INTO {s}.history (id, queue, task, args, state, priority, attempts,
                max_attempts, enqueued_at, started_at, finished_at, worker_id, result, error)
            SELECT $2::bigint + $1 - g, ({queues})[1 + g % 4], ({tasks})[1 + g % 12],
                jsonb_build_object('user_id', g, 'email', 'user' || g || '@example.com'),
                CASE WHEN g % 100 < 94 THEN 'succeeded' WHEN g % 100 < 99 THEN 'failed'
                     ELSE 'cancelled' END,
                0, CASE WHEN g % 100 BETWEEN 94 AND 98 THEN 3 ELSE 1 END, 3,
                now() - g * interval '500 ms' - interval '2 s',
                now() - g * interval '500 ms' - interval '1 s', now() - g * interval '500 ms',
                'bench-worker-' || (g % 4),
                CASE WHEN g % 100 < 94 THEN to_jsonb(g) END,
                CASE WHEN g % 100 BETWEEN 94 AND 98 THEN jsonb_build_object(
                    'type', 'ConnectionError', 'message', 'smtp timed out for user' || g,
                    'traceback', 'Traceback (most recent call last):\n  ...') END
            FROM generate_series(1, $1::int) AS g
            """,
            history_rows,
            BASE_ID,
        )
        # Live jobs come after history in id order, as on a running install.
        await conn.execute(
            f"SELECT setval(pg_get_serial_sequence('{s}.jobs', 'id'), $1)",
            BASE_ID + history_rows + 1,
        )
        await conn.execute(
            f"""
            INSERT INTO {s}.jobs (queue, task, args, state, priority, run_at, max_attempts)
            SELECT ({queues})[1 + g % 4], ({tasks})[1 + g % 12],
                jsonb_build_object('user_id', g, 'email', 'user' || g || '@example.com'),
                'queued', (g % 3)::smallint,
                CASE WHEN g % 10 = 0 THEN now() + g * interval '1 s'
                     ELSE now() - g * interval '10 ms' END, 3
            FROM generate_series(1, $1::int) AS g
            """,
            queued,
        )
        for w in range(4):
            await conn.execute(
                f"INSERT INTO {s}.workers (id, hostname, pid, queues, tasks, concurrency) "
                "VALUES ($1, $2, $3, NULL, $4, 10)",
                f"bench-worker-{w}",
                f"host-{w}",
                1000 + w,
                TASKS,
            )
        await conn.execute(
            f"""
            UPDATE {s}.jobs SET state = 'running', attempts = 1, started_at = now(),
                worker_id = 'bench-worker-' || (id % 4), lease_token = gen_random_uuid(),
                lease_expires_at = now() + interval '1 hour'
            WHERE id IN (SELECT id FROM {s}.jobs WHERE state = 'queued' AND task LIKE 'bench.task%'
                         ORDER BY id LIMIT 40)
            """
        )
        await conn.execute(f"VACUUM ANALYZE {s}.history")
        await conn.execute(f"VACUUM ANALYZE {s}.jobs")
        ids = {
            "failed": await conn.fetchval(
                f"SELECT id FROM {s}.history WHERE state = 'failed' ORDER BY id DESC LIMIT 1"
            ),
            "old": BASE_ID + history_rows // 2,
            "queued": await conn.fetchval(
                f"SELECT id FROM {s}.jobs WHERE state = 'queued' AND run_at <= now() "
                "ORDER BY id DESC LIMIT 1"
            ),
            "workflow": workflow_ids[0],
        }
    finally:
        await conn.close()
    return ids


def pages(ids: dict[str, int]) -> list[tuple[str, str]]:
    """(label, address) of every page, with the filters that cost the most."""
    return [
        ("overview", "/"),
        ("jobs: queued", "/jobs?state=queued"),
        ("jobs: scheduled", "/jobs?state=scheduled"),
        ("jobs: running", "/jobs?state=running"),
        ("jobs: succeeded", "/jobs?state=succeeded"),
        ("jobs: failed", "/jobs?state=failed"),
        ("jobs: succeeded, deep page", f"/jobs?state=succeeded&before={ids['old']}"),
        ("jobs: failed, one queue", "/jobs?state=failed&queue=mail"),
        ("jobs: succeeded, one task", f"/jobs?state=succeeded&task={TASKS[5]}"),
        ("jobs: succeeded, text search", "/jobs?state=succeeded&text=user12345%40"),
        ("jobs: queued, one queue", "/jobs?state=queued&queue=billing"),
        ("job: failed (history)", f"/jobs/{ids['failed']}"),
        ("job: queued, why not running", f"/jobs/{ids['queued']}"),
        ("workflows", "/workflows"),
        ("workflow graph", f"/workflows/{ids['workflow']}"),
        ("queues", "/queues"),
        ("cron", "/cron"),
        ("workers", "/workers"),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def measure(base: str, paths: list[tuple[str, str]], requests: int, warmup: int) -> list:
    rows = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        for label, path in paths:
            for _ in range(warmup):
                r = await client.get(path)
            if r.status_code != 200:
                raise SystemExit(f"{path} answered {r.status_code}: {r.text[:300]}")
            times = []
            for _ in range(requests):
                started = time.perf_counter()
                r = await client.get(path)
                times.append((time.perf_counter() - started) * 1000)
                r.raise_for_status()
            times.sort()
            p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
            rows.append((label, path, statistics.median(times), p95, times[-1]))
    return rows


def serve_child(dsn: str, schema: str, port: int) -> None:
    """The server process: the dashboard alone, as `python -m taskq dashboard` runs it."""
    import uvicorn

    import taskq
    from taskq.dashboard import Dashboard, no_auth

    app = taskq.App(dsn, schema=schema, auto_migrate=False)
    uvicorn.run(Dashboard(app, auth=no_auth), host="127.0.0.1", port=port, log_level="warning")


async def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dashboard", description=__doc__)
    p.add_argument("--dsn")
    p.add_argument("--history-rows", type=int, default=1_000_000)
    p.add_argument("--queued", type=int, default=100_000)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--keep", action="store_true", help="keep the schema afterwards")
    p.add_argument("--only", help="measure only pages whose label contains this text")
    args = p.parse_args(argv)
    dsn = args.dsn or os.environ.get("TASKQ_DSN")
    if not dsn:
        from taskq import _embedded

        # Left running for the next run, like the other benchmarks' server.
        dsn = _embedded.ensure_server(Path.home() / ".cache" / "taskq-bench" / "pg-dashboard").dsn
    schema = f"dash_{secrets.token_hex(4)}"
    started = time.monotonic()
    ids = await fill(dsn, schema, args.history_rows, args.queued)
    print(
        f"filled {args.history_rows:,} history rows and {args.queued:,} live jobs "
        f"in {time.monotonic() - started:.0f} s",
        flush=True,
    )
    port = free_port()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.dashboard", "--serve", dsn, schema, str(port), cwd=ROOT
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                async with httpx.AsyncClient() as c:
                    await c.get(base + "/static/taskq.css")
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise SystemExit("the dashboard server did not start") from None
                await asyncio.sleep(0.2)
        chosen = [x for x in pages(ids) if not args.only or args.only in x[0]]
        rows = await measure(base, chosen, args.requests, args.warmup)
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
            await child.wait()
        if not args.keep:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            finally:
                await conn.close()
    print(
        f"\nDashboard pages, {args.history_rows:,} history rows, {args.queued:,} live jobs; "
        f"{args.requests} sequential requests each after {args.warmup} warm-up requests\n"
    )
    print("| page | address | p50 ms | p95 ms | max ms |")
    print("|---|---|---:|---:|---:|")
    for label, path, p50, p95, worst in rows:
        print(f"| {label} | `{path}` | {p50:.1f} | {p95:.1f} | {worst:.1f} |")
    slow = [r for r in rows if r[3] >= 100]
    print(f"\npages with p95 >= 100 ms: {len(slow)}" + "".join(f"\n- {r[0]}" for r in slow))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:  # the child process (uvicorn runs its own loop)
        serve_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(asyncio.run(main(sys.argv[1:])))
