"""taskq through its public API: ``enqueue_many``, ``enqueue``, ``app.worker(...)``.

Variants (workload F, the cost of each feature): ``result`` returns a small
dict that taskq stores; ``retry`` fails every job's first attempt under
``taskq.Retry(attempts=2, wait=0)``; ``history`` runs with many finished jobs
already in the history table (see :meth:`TaskqSystem.prepare`; workloads F and
H). :meth:`TaskqSystem.plans` reads the plans of the claim's and the
write-back's statements (workload H). The flow-control
variants set a cluster-wide limit on the task's queue in :meth:`TaskqSystem.setup`,
through ``app.queue(...).configure(...)``, before anything is enqueued:
``limit`` a concurrency limit equal to the worker's concurrency (it does not
bind: the worker never runs more), ``limit_half`` one of half the worker's
concurrency (it binds), ``rate_limit`` a rate limit far above any drain rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

import asyncpg

from .base import JobFn, System

if TYPE_CHECKING:
    import taskq

SCHEMA = "taskq"
TASK = "bench.job"
#: The task's queue (taskq's default), the one the flow-control variants limit.
QUEUE = "default"
#: The ``rate_limit`` variant's queue rate limit: taskq's largest count in the
#: shortest unit, far above any drain rate, so it never holds a job back.
RATE_LIMIT = "1000000/second"
#: The span of time the ``history`` variant's finished jobs cover, back from now:
#: inside the default 7-day retention, so the worker's pruning has nothing to
#: delete, however many rows there are.
HISTORY_SPAN_SECONDS = 500_000.0
#: plans(): every statement's plan, nested ones included (claim() and finish()
#: are plpgsql functions), as JSON with EXPLAIN ANALYZE's rows and buffers,
#: sent to the session as notices.
AUTO_EXPLAIN = (
    "LOAD 'auto_explain'",
    "SET auto_explain.log_min_duration = 0",
    "SET auto_explain.log_analyze = on",
    "SET auto_explain.log_buffers = on",
    "SET auto_explain.log_nested_statements = on",
    "SET auto_explain.log_format = 'json'",
    "SET auto_explain.log_level = 'notice'",
    "SET client_min_messages = 'notice'",
)
#: plans(): jobs claimed and written back, as a worker at the benchmarks'
#: concurrency does when all its slots are free; the lease a worker asks for.
PLAN_BATCH = 10
PLAN_LEASE_SECONDS = 30.0
#: plans() reads the last of these rounds, each rolled back: past the first
#: (cold caches) and past the five custom plans after which plpgsql's cached
#: statements may switch to a generic plan, as they do in a worker's session.
PLAN_ROUNDS = 7


def concurrency_limit(variant: str, concurrency: int) -> int | None:
    """The global concurrency limit a variant sets, at the run's worker concurrency."""
    if variant == "limit":
        return concurrency  # the worker never runs more: the limit does not bind
    if variant == "limit_half":
        return max(1, concurrency // 2)
    return None


class FirstAttemptFails(Exception):
    """Raised by every job's first attempt in the ``retry`` variant."""


class TaskqSystem(System):
    name = "taskq"
    variants: ClassVar[dict[str, str]] = {
        "": "taskq",
        "result": "taskq, results stored",
        "retry": "taskq, every job retried once",
        "history": "taskq, finished jobs in history",
        "limit": "taskq, global concurrency limit = concurrency",
        "limit_half": "taskq, global concurrency limit = half the concurrency",
        "rate_limit": f"taskq, queue rate limit {RATE_LIMIT}",
    }
    packages = ("taskq-pg", "asyncpg", "anyio", "orjson")
    unfinished_sql = f"SELECT EXISTS (SELECT FROM {SCHEMA}.jobs)"
    backlog_sql = f"SELECT count(*) FROM {SCHEMA}.jobs"
    settings: ClassVar[dict[str, str]] = {
        "": "`app.worker(concurrency=N)` with every other setting at its default",
        "result": "the job returns `{'i': i, 'ok': True}`, stored in history",
        "retry": "`retry=taskq.Retry(attempts=2, wait=0)`; the first attempt raises",
        "history": "history pre-filled by one `INSERT ... SELECT generate_series`, then "
        "`VACUUM ANALYZE`",
        "rate_limit": f"`await app.queue(...).configure(rate_limit={RATE_LIMIT!r})` before the "
        "enqueue",
    }

    @classmethod
    def describe(cls, variant: str, concurrencies: tuple[int, ...]) -> str:
        limit = concurrency_limit(variant, concurrencies[0]) if concurrencies else None
        if limit is None:
            return super().describe(variant, concurrencies)
        return f"`await app.queue(...).configure(concurrency_limit={limit})` before the enqueue"

    @classmethod
    def runs_per_job(cls, variant: str) -> int:
        return 2 if variant == "retry" else 1

    async def open(self) -> None:
        import taskq

        self._job: JobFn | None = None
        self._failed: set[int] = set()
        self.app = taskq.App(self.dsn, schema=SCHEMA)
        retry = taskq.Retry(attempts=2, wait=0) if self.variant == "retry" else None
        returns = self.variant == "result"
        fails_first = self.variant == "retry"

        @self.app.task(name=TASK, queue=QUEUE, retry=retry)
        async def bench_job(i: int) -> dict[str, Any] | None:
            assert self._job is not None, "only workers run jobs"
            await self._job(i)
            if fails_first and i not in self._failed:
                self._failed.add(i)
                raise FirstAttemptFails(i)
            return {"i": i, "ok": True} if returns else None

        self.task: taskq.Task[Any, Any] = bench_job
        await self.app.open()  # applies migrations on a fresh database

    async def close(self) -> None:
        await self.app.close()

    async def setup(self) -> None:
        await self.app.migrate()
        # The flow-control variants: a limit on the task's queue, through the public
        # API, stored in Postgres before anything is enqueued or claimed.
        queue = self.app.queue(QUEUE)
        if self.variant == "rate_limit":
            info = await queue.configure(rate_limit=RATE_LIMIT)
            if str(info.rate_limit) != RATE_LIMIT:
                raise RuntimeError(f"queue {queue.name!r} has rate limit {info.rate_limit}")
        elif self.variant in ("limit", "limit_half"):
            if self.concurrency is None:
                raise RuntimeError(
                    f"variant {self.variant!r} needs the run's worker concurrency "
                    "(set by `agent setup --concurrency=N`, as workload F does)"
                )
            limit = concurrency_limit(self.variant, self.concurrency)
            info = await queue.configure(concurrency_limit=limit)
            if info.concurrency_limit != limit:
                raise RuntimeError(
                    f"queue {queue.name!r} has concurrency limit {info.concurrency_limit}"
                )

    async def enqueue_bulk(self, batch: list[dict[str, Any]]) -> None:
        await self.task.enqueue_many(batch)

    async def enqueue_one(self, args: dict[str, Any]) -> None:
        await self.task.enqueue(**args)

    async def enqueue_times(self) -> dict[int, datetime]:
        # enqueued_at defaults to now() in taskq's INSERT: the statement's start on
        # the database clock. One statement, one snapshot: each job is counted in
        # exactly one of the two tables even while workers move it.
        sql = (
            f"SELECT (args->>'i')::int, enqueued_at FROM {SCHEMA}.jobs UNION ALL "
            f"SELECT (args->>'i')::int, enqueued_at FROM {SCHEMA}.history WHERE task = '{TASK}'"
        )
        async with self.app.pool.acquire() as conn:
            return {i: at for i, at in await conn.fetch(sql)}

    async def run_worker(
        self, concurrency: int, job: JobFn, ready: Callable[[], None], stop: asyncio.Event
    ) -> None:
        self._job = job
        async with self.app.worker(concurrency=concurrency):
            ready()
            await stop.wait()

    async def sleep(self, seconds: float) -> None:
        import anyio

        await anyio.sleep(seconds)

    async def prepare(self, conn: asyncpg.Connection, options: dict[str, Any]) -> None:
        if self.variant != "history":
            return
        await _history_partitions(conn)
        rows = int(options.get("history_rows", 0))
        if not rows:
            return
        # Finished jobs of another task, spread evenly over HISTORY_SPAN_SECONDS back
        # from now (1,000,000 rows: one every 0.5 s). Ids are negative: below every
        # new job's.
        await conn.execute(
            f"""
            INSERT INTO {SCHEMA}.history (id, queue, task, args, state, priority, attempts,
                max_attempts, enqueued_at, started_at, finished_at, worker_id, result)
            SELECT -g, 'default', 'bench.old', jsonb_build_object('i', g), 'succeeded', 0, 1,
                5, f.at - interval '20 ms', f.at - interval '10 ms', f.at,
                'bench-old-worker', NULL
            FROM generate_series(1, $1::bigint) AS g,
                LATERAL (SELECT now() - make_interval(secs => g * $2::float8) AS at) AS f
            """,
            rows,
            HISTORY_SPAN_SECONDS / rows,
        )
        # A long-running install has vacuumed and analyzed its history; without
        # this, autovacuum's first pass over the new rows would land in the run.
        await conn.execute(f"VACUUM ANALYZE {SCHEMA}.history")

    async def plans(self) -> list[dict[str, Any]]:
        """EXPLAIN (ANALYZE, BUFFERS) of what claim() and finish() run, by auto_explain.

        The calls a worker serving every queue makes (taskq's own statements):
        the look-up of the queues that hold jobs (once per poll interval), a
        claim of PLAN_BATCH jobs from them, then the write-back of their
        success, in a transaction rolled back, so the jobs stay queued. One entry per
        statement, in the order run: the call that ran it, whether it is the
        call itself (its buffers include everything the function ran), its text
        with whitespace folded, its plan's shape (node lines without numbers),
        the same lines with rows and buffers, and the root node's buffers.
        """
        from taskq._statements import Statements

        sql = Statements(SCHEMA)
        notices: list[str] = []
        conn = await asyncpg.connect(self.dsn)
        conn.add_log_listener(lambda _c, msg: notices.append(str(msg.message)))
        try:
            for setting in AUTO_EXPLAIN:
                await conn.execute(setting)
            for _ in range(PLAN_ROUNDS):
                notices.clear()
                async with _rolled_back(conn):
                    queues = await conn.fetchval(sql.queued_queues)
                    rows = await conn.fetch(
                        sql.claim, queues, [TASK], PLAN_BATCH, "bench-plans", PLAN_LEASE_SECONDS
                    )
                    jobs = [(r["id"], r["lease_token"]) for r in rows if r["lost"] is False]
                    if len(jobs) != PLAN_BATCH:
                        raise RuntimeError(f"claimed {len(jobs)} jobs, expected {PLAN_BATCH}")
                    n = len(jobs)
                    await conn.fetchval(
                        sql.finish, [j for j, _ in jobs], [t for _, t in jobs],
                        ["succeeded"] * n, [None] * n, [None] * n, [0.0] * n,
                    )  # fmt: skip
                # The rollback's reply came after every notice: their callbacks are due.
                await asyncio.sleep(0)
        finally:
            await conn.close()
        calls = {"queues": sql.queued_queues, "claim": sql.claim, "finish": sql.finish}
        return _explained(calls, notices)

    async def check(self, conn: asyncpg.Connection, expected: int) -> list[str]:
        # The run's jobs have positive ids, the history variant's rows negative ones: a
        # range of the primary key, not a scan of millions of rows (9 s at 10,000,000).
        mine = f"{SCHEMA}.history WHERE id > 0 AND task = '{TASK}'"
        row = await conn.fetchrow(
            f"SELECT (SELECT count(*) FROM {SCHEMA}.jobs) AS live, "
            f"(SELECT count(*) FROM {mine} AND state = 'succeeded') AS succeeded, "
            f"(SELECT count(*) FROM {mine}) AS history, "
            f"(SELECT count(DISTINCT args->>'i') FROM {mine}) AS distinct_i, "
            f"(SELECT count(*) FROM {mine} AND result IS NOT NULL) AS results, "
            f"(SELECT count(*) FROM {mine} AND attempts = 2) AS retried"
        )
        problems = []
        if row["live"]:
            problems.append(f"taskq.jobs still holds {row['live']} job(s)")
        for key in ("succeeded", "history", "distinct_i"):
            if row[key] != expected:
                problems.append(f"taskq.history {key} = {row[key]}, expected {expected}")
        wanted = {
            "results": expected if self.variant == "result" else 0,
            "retried": expected if self.variant == "retry" else 0,
        }
        for key, value in wanted.items():
            if row[key] != value:
                problems.append(f"taskq.history {key} = {row[key]}, expected {value}")
        # The limit a flow-control variant set was in place for the whole drain.
        limits = await conn.fetchrow(
            f"SELECT concurrency_limit, rate_limit FROM {SCHEMA}.queues WHERE name = $1", QUEUE
        )
        has = {
            "concurrency_limit": limits is not None and limits["concurrency_limit"] is not None,
            "rate_limit": limits is not None and limits["rate_limit"] is not None,
        }
        should = {
            "concurrency_limit": self.variant in ("limit", "limit_half"),
            "rate_limit": self.variant == "rate_limit",
        }
        for key, value in should.items():
            if has[key] != value:
                problems.append(f"queue {QUEUE!r}: {key} {'missing' if value else 'set'}")
        return problems


async def _history_partitions(conn: asyncpg.Connection) -> None:
    """History's time partitions over HISTORY_SPAN_SECONDS back from now and as far
    ahead as a worker's upkeep makes them, at its width for taskq's default retention.

    A long-running install has them (taskq partitions history by time since schema
    version 12; before, nothing to do). Without them every row would go to
    history_default, and the worker's first upkeep round would read all of them to
    attach a partition, in the middle of the run.
    """
    kind = await conn.fetchval(
        "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)", f"{SCHEMA}.history"
    )
    if kind != "p":
        return
    from taskq._app import DEFAULT_HISTORY_RETENTION
    from taskq.worker.config import DEFAULT_PRUNE_INTERVAL
    from taskq.worker.upkeep import HISTORY_AHEAD_ROUNDS, partition_width

    width = partition_width(DEFAULT_HISTORY_RETENTION.total_seconds(), DEFAULT_PRUNE_INTERVAL)
    ahead = max(width, HISTORY_AHEAD_ROUNDS * DEFAULT_PRUNE_INTERVAL)
    await conn.execute(
        f"""
        SELECT {SCHEMA}.history_partition_add(to_timestamp(k * $1), to_timestamp((k + 1) * $1))
        FROM generate_series(floor((extract(epoch FROM now()) - $2) / $1)::bigint,
            floor((extract(epoch FROM now()) + $3) / $1)::bigint) AS k
        """,
        width,
        HISTORY_SPAN_SECONDS,
        ahead,
    )


def _folded(sql: str) -> str:
    return " ".join(sql.split())


@contextlib.asynccontextmanager
async def _rolled_back(conn: asyncpg.Connection) -> AsyncIterator[None]:
    tx = conn.transaction()
    await tx.start()
    try:
        yield
    finally:
        await tx.rollback()


def _explained(calls: dict[str, str], notices: list[str]) -> list[dict[str, Any]]:
    """auto_explain's JSON notices ("duration: ... plan:" then the plan) as entries.

    A call's own plan is logged when it ends, after those of the statements it
    ran: each statement belongs to the first call logged after it.
    """
    tops = {_folded(sql): call for call, sql in calls.items()}
    out: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    for notice in notices:
        _, found, text = notice.partition("plan:\n")
        if not found:
            continue
        doc = json.loads(text)
        query = _folded(doc["Query Text"])
        lines = _plan_lines(doc["Plan"])
        root = doc["Plan"]
        pending.append(
            {
                "top": query in tops,
                "query": query,
                "shape": [shape for shape, _ in lines],
                "nodes": [f"{shape}  ({numbers})" for shape, numbers in lines],
                "buffers": {
                    k: root.get(f"Shared {k.title()} Blocks", 0)
                    for k in ("hit", "read", "dirtied", "written")
                },
            }
        )
        if query in tops:
            out += [{"call": tops[query], **entry} for entry in pending]
            pending = []
    if pending or sorted({e["call"] for e in out}) != sorted(calls):
        raise RuntimeError(f"auto_explain's notices do not end with each call: {notices}")
    return out


def _plan_lines(node: dict[str, Any], depth: int = 0) -> list[tuple[str, str]]:
    """One (shape, numbers) line per plan node, indented by depth, like EXPLAIN's text."""
    what = node["Operation"] if node["Node Type"] == "ModifyTable" else node["Node Type"]
    if node.get("Strategy") in ("Sorted", "Hashed", "Mixed"):
        what = f"{node['Strategy']} {what}"
    if "Join Type" in node and node["Join Type"] != "Inner":
        what += f" {node['Join Type']} Join"
    if node.get("Scan Direction") == "Backward":
        what += " Backward"
    if "Index Name" in node:
        what += f" using {node['Index Name']}"
    target = node.get("Relation Name") or node.get("CTE Name") or node.get("Function Name")
    if target:
        what += f" on {target}"
    if "Subplan Name" in node:
        what = f"{node['Subplan Name']}: {what}"
    shape = "  " * depth + what
    numbers = (
        f"rows {node.get('Actual Rows', '?')}, loops {node.get('Actual Loops', '?')}, "
        f"shared hit {node.get('Shared Hit Blocks', 0)} read {node.get('Shared Read Blocks', 0)} "
        f"dirtied {node.get('Shared Dirtied Blocks', 0)}"
    )
    lines = [(shape, numbers)]
    for child in node.get("Plans", []):
        lines += _plan_lines(child, depth + 1)
    return lines
