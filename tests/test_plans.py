"""The hot queries keep their plans on a big table: index scans, no sequential scan, no sort.

A guard on plan shapes, not on timings: the claim, the rescue, job lookups and
history pruning must not degrade into scans of a million-row table. The claim
runs inside a plpgsql function, so its inner plan is read with auto_explain.

History is partitioned by time: its million rows are in daily partitions (as
the upkeep makes them) and a few in the DEFAULT partition. A lookup by id
probes the primary key of every partition; a statement bounded by
finished_at reads only the partitions of its window.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import re
import uuid
from typing import Any

import asyncpg
import pytest

import taskq
from taskq._admin import statements
from taskq._admin.why import AHEAD_CAP, KEY_WINDOW, why_statements
from taskq._statements import Statements
from taskq._workflow_store import WorkflowStore
from taskq.dashboard.pages import overview as overview_page
from taskq.dashboard.pages import workers as workers_page
from taskq.dashboard.pages import workflows as workflows_page
from taskq.dashboard.pages.jobs_query import SCAN_ROWS, TABS, TOP_ID, tab_sql

pytestmark = pytest.mark.anyio

ROWS = 1_000_000


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


async def explain(conn: asyncpg.Connection, sql: str, *args: Any) -> str:
    rows = await conn.fetch("EXPLAIN " + sql, *args)
    return "\n".join(r[0] for r in rows)


async def inner_plans(conn: asyncpg.Connection, sql: str, *args: Any) -> str:
    """Plans of the statements run inside functions, via auto_explain notices."""
    notices: list[str] = []
    conn.add_log_listener(lambda _c, msg: notices.append(str(msg.message)))
    await conn.execute("LOAD 'auto_explain'")
    await conn.execute("SET auto_explain.log_min_duration = 0")
    await conn.execute("SET auto_explain.log_nested_statements = on")
    await conn.execute("SET auto_explain.log_level = 'notice'")
    await conn.execute("SET client_min_messages = 'notice'")
    # The plans a long-lived connection ends up with: plpgsql keeps a
    # statement's generic plan once it is no dearer than the custom ones.
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.fetch(sql, *args)
    finally:
        await tx.rollback()  # the claim and the prune change nothing for good
    await conn.execute("SET auto_explain.log_min_duration = -1")
    await conn.execute("RESET plan_cache_mode")
    return "\n".join(notices)


# A partition of history: a time partition, history_v11 or the DEFAULT one.
_PARTITION = r"history_(?:default|v11|\d{8}_\d{6})"


def probes(plan: str, index: str) -> set[str]:
    """The partitions of history the plan reads through their index of that kind
    (``pkey``, ``finished_at``, ``dead``, ``unique``, ``workflow``, ``unsucceeded``)."""
    found = re.findall(rf"(?:using|Bitmap Index Scan on) ({_PARTITION})_{index}\b", plan)
    return set(found)


async def every_partition(conn: asyncpg.Connection, schema: str) -> set[str]:
    rows = await conn.fetch(f'SELECT name FROM "{schema}".history_partitions()')
    return {r[0] for r in rows} | {"history_default"}


#: When the rows of a test's history were written (see fill()), if it filled one: the
#: partitions that start later are still empty, even once the clock passes their start
#: (a run across midnight UTC).
_FILLED_AT: list[dt.datetime] = []


def seq_scans(plan: str) -> list[str]:
    """The tables the plan reads whole, but for Postgres's catalogs and the partitions of
    history made ahead: they start in the future, so they are empty, and once analyzed
    so a scan of them is what they cost (the planner counts their pages as they grow)."""
    now = min([dt.datetime.now(dt.UTC).replace(tzinfo=None), *_FILLED_AT])

    def ahead(table: str) -> bool:
        return bool(re.fullmatch(r"history_\d{8}_\d{6}", table)) and (
            dt.datetime.strptime(table[8:], "%Y%m%d_%H%M%S") > now
        )

    found = re.findall(r"Seq Scan on (\w+)", plan)
    return [t for t in found if not t.startswith("pg_") and not ahead(t)]


def each_partition_by(plan: str, index: str) -> set[str]:
    """The partitions of history the plan reads through their index of that kind, and
    the empty ones made ahead that it reads whole (see seq_scans)."""
    scanned = set(re.findall(rf"Seq Scan on ({_PARTITION})\b", plan))
    return probes(plan, index) | {t for t in scanned if t not in seq_scans(plan)}


def assert_no_scan_of_the_whole(plan: str, table: str) -> None:
    name = table.split(".")[-1]
    assert not [t for t in seq_scans(plan) if t == name or t.startswith(f"{name}_")], plan


async def fill(app: taskq.App, conn: asyncpg.Connection) -> None:
    s = f'"{app.schema}"'
    # Daily partitions over the million seconds of finished jobs below, and
    # the next two days (as the upkeep makes them ahead); the first 1,000 rows
    # are older than every partition, in the DEFAULT partition (like the
    # kept steps of running workflows).
    start, today, now = await conn.fetchrow(
        "SELECT now() - make_interval(secs => $1), date_trunc('day', now()), now()", ROWS - 1000
    )
    bounds = [start]
    while bounds[-1] < today + dt.timedelta(days=2):
        bounds.append(bounds[-1].replace(hour=0, minute=0, second=0, microsecond=0))
        bounds[-1] += dt.timedelta(days=1)
    if now - today < dt.timedelta(hours=12) and today in bounds[1:-1]:
        # Early in the day its partition would hold a few rows, which the planner
        # rightly reads whole: yesterday's partition runs on to tomorrow instead.
        bounds.remove(today)
    for low, high in itertools.pairwise(bounds):
        await conn.execute(f"SELECT {s}.history_partition_add($1, $2)", low, high)
    # A million queued jobs over 4 queues, a million finished ones in history.
    await conn.execute(
        f"INSERT INTO {s}.jobs (queue, task, args, run_at) "
        f"SELECT 'q' || (g % 4), 'plan.task', '{{}}', now() - interval '1 hour' "
        f"FROM generate_series(1, {ROWS}) AS g"
    )
    # A queue of tenants' jobs (500 keys, some running) and a few without a key.
    await conn.execute(
        f"INSERT INTO {s}.jobs (queue, task, args, run_at, concurrency_key, state, "
        "lease_expires_at) "
        "SELECT 'qk', 'plan.task', '{}', now() - interval '1 hour', "
        "CASE WHEN g % 100 <> 0 THEN 'tenant:' || (g % 500) END, "
        "CASE WHEN g <= 300 THEN 'running' ELSE 'queued' END, "
        "CASE WHEN g <= 300 THEN now() + interval '1 hour' END "
        "FROM generate_series(1, 100000) AS g"
    )
    await conn.execute(
        f"INSERT INTO {s}.history (id, queue, task, args, state, priority, attempts, "
        "max_attempts, enqueued_at, finished_at) "
        f"SELECT {ROWS} + g, 'q' || (g % 4), 'plan.task', '{{}}', "
        "CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'succeeded' END, 0, 1, 1, "
        f"now() - interval '30 days', now() - make_interval(secs => {ROWS} - g) "
        f"FROM generate_series(1, {ROWS}) AS g"
    )
    filled: dt.datetime = await conn.fetchval("SELECT now()")
    _FILLED_AT[:] = [filled.astimezone(dt.UTC).replace(tzinfo=None)]
    # Recorded steps of some of those jobs (for the partitions' drop).
    await conn.execute(
        f"INSERT INTO {s}.job_checkpoints (job_id, name, result, attempt) "
        f"SELECT {ROWS} + g, 'step', '1', 1 FROM generate_series(1, {ROWS}, 100) AS g"
    )


async def test_hot_queries_use_indexes_on_a_million_rows(pg_dsn: str, schema: str) -> None:
    app = taskq.App(pg_dsn, schema=schema)

    @app.task(name="plan.task")
    async def task() -> None:
        return None

    async with app:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await fill(app, conn)
            for analyzed in (False, True):
                if analyzed:  # the same checks with fresh statistics
                    await conn.execute(f'ANALYZE "{schema}".jobs, "{schema}".history')
                await check_plans(app, conn)
        finally:
            _FILLED_AT.clear()
            await conn.close()


async def check_plans(app: taskq.App, conn: asyncpg.Connection) -> None:
    sql = Statements(app.schema)
    s = f'"{app.schema}"'

    for queues in (["q1"], ["q1", "q2"], None):
        plan = await inner_plans(
            conn, f"SELECT * FROM {s}.claim($1, $2, 10, 'w', 30)", queues, ["plan.task"]
        )
        assert "Index Scan using jobs_claim" in plan, plan
        assert not seq_scans(plan), plan
        assert "JIT" not in plan, plan
        assert "Sort" not in plan.replace("Sort Key", ""), plan
        assert "history" not in plan, plan
        assert "jobs_keyed" not in plan, plan  # fair sharing costs other queues nothing
        # The started jobs are found by id, not by hashing the whole table.
        assert "Hash Cond" not in plan and "Merge Join" not in plan, plan

    # A worker serving every queue finds them by a loose index scan of the
    # claim index: one probe per queue, whatever the backlog.
    plan = await explain(conn, sql.queued_queues)
    assert "jobs_claim" in plan, plan
    assert "Seq Scan" not in plan and "Sort" not in plan.replace("Sort Key", ""), plan
    assert sorted(await conn.fetchval(sql.queued_queues)) == ["q0", "q1", "q2", "q3", "qk"]

    # A queue with a concurrency limit and a rate limit: the claim also counts
    # its running jobs (by index) and takes the settings row's lock.
    await conn.execute(
        f"INSERT INTO {s}.queues (name, concurrency_limit, rate_limit, rate_period) "
        "VALUES ('q3', 100, 1000, 60) ON CONFLICT DO NOTHING"
    )
    plan = await inner_plans(
        conn, f"SELECT * FROM {s}.claim($1, $2, 10, 'w', 30)", ["q3"], ["plan.task"]
    )
    assert "Index Scan using jobs_claim" in plan, plan
    assert "jobs_running" in plan, plan
    assert "Seq Scan" not in plan and "JIT" not in plan and "Hash Cond" not in plan, plan

    # A unique enqueue finds a live holder, and one in the window, by index.
    plan = await inner_plans(
        conn,
        f"SELECT * FROM {s}.enqueue_unique('q1', 'plan.task', '{{}}', 0::smallint, now(), 1, "
        "'k', 3600, NULL)",
    )
    assert "jobs_unique" in plan and probes(plan, "unique"), plan
    # Only the partitions of the window (the last hour) and the DEFAULT one.
    assert probes(plan, "unique") <= {"history_default", *await partitions_since(conn, s, 3600)}
    assert not seq_scans(plan), plan

    await conn.fetch(sql.rescue, "c1", "c2", 3)  # asyncpg reads the result's types first
    plan = await inner_plans(conn, sql.rescue, "c1", "c2", 3)
    assert not seq_scans(plan), plan
    assert "jobs_running" in plan, plan
    assert "Scan using history" not in plan, plan  # it only inserts into history

    # A lookup by id: one probe of each partition's primary key.
    partitions = await every_partition(conn, app.schema)
    assert len(partitions) >= 14  # 11.6 days of rows, today and tomorrow, DEFAULT
    plan = await explain(conn, sql.get_job, 123)
    assert not seq_scans(plan), plan
    assert "jobs_pkey" in plan, plan
    assert each_partition_by(plan, "pkey") == partitions, plan

    # The result of a job its ctx.transaction() ended, and a late waiter's request.
    plan = await explain(conn, sql.set_result, ROWS + 7, uuid.uuid4(), None, False, "c")
    assert not seq_scans(plan) and each_partition_by(plan, "pkey") == partitions, plan
    plan = await explain(conn, sql.await_result, ROWS + 7)
    assert not seq_scans(plan) and each_partition_by(plan, "pkey") == partitions, plan
    plan = await explain(conn, sql.committed_before, [ROWS + 7], [uuid.uuid4()])
    assert not seq_scans(plan) and each_partition_by(plan, "pkey") == partitions, plan

    await check_retention_plans(app, conn)

    # The write-back: each outcome finds its job by id, whatever the backlog
    # (a generic plan must not hash or scan the million queued jobs).
    n = 50
    outcomes = (
        list(range(1, n + 1)),
        [uuid.uuid4() for _ in range(n)],  # no job holds these: nothing changes
        ["succeeded"] * (n - 2) + ["retry", "failed"],
        [None] * n,
        [None] * (n - 2) + ['{"type": "E"}'] * 2,
        [0.0] * n,
    )
    await conn.fetch(sql.finish, *outcomes)  # asyncpg reads the parameters' types first
    plan = await inner_plans(conn, sql.finish, *outcomes)
    assert "jobs_pkey" in plan, plan
    assert_no_scan_of_the_whole(plan, "jobs")
    # No hash join against the jobs (a hash on the few queue settings rows is fine).
    assert not [line for line in plan.splitlines() if "Hash Cond" in line and "j." in line], plan

    plan = await explain(conn, sql.renew, [1, 2], [None, None], 30.0)
    assert not seq_scans(plan), plan

    await check_keyed_plans(app, conn)
    await check_workflow_plans(app, conn)
    await check_why_plans(app, conn)
    await check_job_page_plans(app, conn)
    await check_dashboard_jobs_plans(app, conn)
    await check_dashboard_admin_plans(app, conn)
    await check_dashboard_overview_plans(app, conn)


async def check_keyed_plans(app: taskq.App, conn: asyncpg.Connection) -> None:
    """A queue with a per_key_limit: keys by a loose index scan, each key's jobs
    and the running counts by index, on a backlog of 100,000 keyed jobs."""
    s = f'"{app.schema}"'
    await conn.execute(
        f"INSERT INTO {s}.queues (name, per_key_limit) VALUES ('qk', 2) "
        "ON CONFLICT (name) DO UPDATE SET per_key_limit = 2"
    )
    try:
        for tasks in (["plan.task"], ["plan.task", "plan.other"]):
            plan = await inner_plans(
                conn, f"SELECT * FROM {s}.claim($1, $2, 10, 'w', 30)", ["qk"], tasks
            )
            assert "jobs_keyed" in plan, plan  # the keys and each key's best jobs
            assert "jobs_running" in plan, plan  # the running count per key
            assert "Seq Scan" not in plan and "JIT" not in plan and "Hash Cond" not in plan, plan
            assert "history" not in plan, plan
    finally:
        # Later checks claim from every queue, with the plain claim's plan.
        await conn.execute(f"DELETE FROM {s}.queues WHERE name = 'qk'")


async def check_workflow_plans(app: taskq.App, conn: asyncpg.Connection) -> None:
    """The statements that drive workflows read jobs and history by index only."""
    s = f'"{app.schema}"'
    steps = [
        {
            "name": f"p{i}",
            "task": "plan.task",
            "queue": "q1",
            "priority": 0,
            "args": {},
            "max_attempts": 1,
            "delay": 0,
            "run_at": None,
            "unique_key": None,
            "meta": None,
            "kind": "task",
            "on_parent_failure": "cancel",
            "sink": False,
            "map_over": None,
            "map_arg": None,
            "parents": [],
        }
        for i in range(50)
    ]
    steps.append(
        {
            **steps[0],
            "name": "join",
            "sink": True,
            "parents": [{"step": f"p{i}", "data": True} for i in range(50)],
        }
    )
    # Past the ids fill() gave to history rows.
    await conn.execute(f"SELECT setval(pg_get_serial_sequence('{s}.jobs', 'id'), {3 * ROWS})")
    tx = conn.transaction()
    await tx.start()
    try:
        row = await conn.fetchrow(
            f"SELECT * FROM {s}.workflow_enqueue('plan', $1::jsonb, NULL)", json.dumps(steps)
        )
        workflow_id, ids = row["workflow_id"], row["job_ids"]
        token = uuid.uuid4()
        await conn.execute(
            f"UPDATE {s}.jobs SET state = 'running', lease_token = $2 WHERE id = ANY($1)",
            ids[:50],
            token,
        )
        finishing = (
            f"SELECT {s}.finish($1, $2, $3, $4, $5, $6)",
            ids[:50],
            [token] * 50,
            ["succeeded"] * 50,
            ["1"] * 50,
            [None] * 50,
            [0.0] * 50,
        )
        plans = [await inner_plans(conn, *finishing)]
        await conn.fetch(*finishing)  # for real (rolled back below): the join is released
        assert await conn.fetchval(f"SELECT state FROM {s}.jobs WHERE id = $1", ids[50]) == (
            "queued"
        )
        store = WorkflowStore(app.schema)
        plans.append(await explain(conn, store._get, workflow_id))
        plans.append(await explain(conn, store._steps, workflow_id))
        plans.append(await explain(conn, store._list, None, None, 50, None))
        plans.append(await inner_plans(conn, f"SELECT * FROM {s}.cancel_steps($1, 'x')", ids[50:]))
        plans.append(await inner_plans(conn, f"SELECT {s}.workflow_retry($1)", workflow_id))
    finally:
        await tx.rollback()
    for plan in plans:
        assert_no_scan_of_the_whole(plan, f"{s}.jobs")
        assert_no_scan_of_the_whole(plan, f"{s}.history")
    assert "workflow_edges" in plans[0] and "workflow_steps" in plans[0], plans[0]
    assert probes(plans[2], "workflow") or probes(plans[2], "pkey"), plans[2]
    assert "workflow_retry" in plans[5] or probes(plans[5], "workflow"), plans[5]


async def check_why_plans(app: taskq.App, conn: asyncpg.Connection) -> None:
    """``why_not_running()`` reads a job, its queue, its workers and the jobs ahead by index."""
    sql = why_statements(app.schema)
    s = f'"{app.schema}"'
    job = await conn.fetchrow(f"SELECT id, priority, run_at FROM {s}.jobs WHERE id = $1", ROWS // 2)
    plans = {
        "live_job": await explain(conn, sql.live_job, job["id"]),
        "finished_job": await explain(conn, sql.finished_job, ROWS + 7),
        "queue": await explain(conn, sql.queue, "q3", None),
        "queue_key": await explain(conn, sql.queue, "q3", "tenant:1"),
        "task": await explain(conn, sql.task, "plan.task"),
        "running_by_worker": await explain(conn, sql.running_by_worker, ["w1", "w2"]),
        "ahead": await explain(
            conn, sql.ahead, "q2", job["priority"], job["run_at"], job["id"], AHEAD_CAP
        ),
        "ahead_in_key": await explain(
            conn, sql.ahead_in_key, "q2", job["priority"], job["run_at"], job["id"], AHEAD_CAP, "k"
        ),
        "key_window": await explain(
            conn, sql.key_window, "q2", job["priority"], job["run_at"], job["id"], KEY_WINDOW
        ),
        "edge_counts": await explain(conn, sql.edge_counts, job["id"]),
        "parents": await explain(conn, sql.parents, job["id"], 20),
    }
    for plan in plans.values():
        assert_no_scan_of_the_whole(plan, f"{s}.jobs")
        assert_no_scan_of_the_whole(plan, f"{s}.history")
    assert "jobs_pkey" in plans["live_job"] and probes(plans["finished_job"], "pkey")
    assert "jobs_running" in plans["queue"] and "jobs_running" in plans["running_by_worker"]
    assert "jobs_running" in plans["queue_key"], plans["queue_key"]
    assert "jobs_claim" in plans["ahead"], plans["ahead"]
    assert "jobs_keyed" in plans["ahead_in_key"], plans["ahead_in_key"]
    assert "jobs_claim" in plans["key_window"], plans["key_window"]
    assert "Sort" not in plans["ahead"].replace("Sort Key", ""), plans["ahead"]
    assert "workflow_edges_child" in plans["edge_counts"], plans["edge_counts"]


async def check_dashboard_jobs_plans(app: taskq.App, conn: asyncpg.Connection) -> None:
    """The jobs page's tabs read a bounded window of an index in id order, whatever the
    filter, with the values given (custom plans) and without them (generic plans)."""
    s = f'"{app.schema}"'
    # Which index each tab walks: the running tab must not walk the primary key past
    # a million queued jobs to find the few running ones.
    walks = {
        "running": "jobs_running",
        "waiting": "jobs_waiting",
        "failed": "_unsucceeded",
        "cancelled": "_unsucceeded",
    }
    filters = [None] * 7, ["q1", "plan.task", "needle", None, None, None, None]
    try:
        for mode in ("auto", "force_generic_plan"):
            await conn.execute(f"SET plan_cache_mode = {mode}")
            for state, _label, table in TABS:
                sql = tab_sql(app.schema, state)
                for params in filters:
                    plans = [
                        await explain(conn, sql.older, TOP_ID, SCAN_ROWS, *params, 51),
                        await explain(conn, sql.newer, 0, SCAN_ROWS, *params, 51),
                        await explain(conn, sql.collect, TOP_ID, SCAN_ROWS, *params),
                    ]
                    plans.append(await explain(conn, sql.window_older, TOP_ID, SCAN_ROWS))
                    plans.append(await explain(conn, sql.window_newer, 0, SCAN_ROWS))
                    for plan in plans:
                        assert_no_scan_of_the_whole(plan, f"{s}.jobs")
                        assert_no_scan_of_the_whole(plan, f"{s}.history")
                        if table == "history":
                            # Each partition's index, newest ids first, merged.
                            kind = walks.get(state, "_pkey")[1:]
                            assert each_partition_by(plan, kind) == await every_partition(
                                conn, app.schema
                            ), (
                                state,
                                mode,
                                plan,
                            )
                        else:
                            assert f"{table}_pkey" in plan or walks.get(state, "?") in plan, plan
                        if state in walks:
                            assert walks[state] in plan, (state, mode, plan)
    finally:
        await conn.execute("RESET plan_cache_mode")


async def check_job_page_plans(app: taskq.App, conn: asyncpg.Connection) -> None:
    """The job page reads one job by primary key (live or finished); a delete from
    history (the job page's and the jobs page's) goes by primary key, with the
    job's recorded steps."""
    from taskq.dashboard.pages.jobs import _delete_sql

    s = f'"{app.schema}"'
    admin = statements(app.schema)
    plans = {
        "get_job live": await explain(conn, admin.get_job, ROWS // 2),
        "get_job finished": await explain(conn, admin.get_job, ROWS + 7),
        "locate": await explain(conn, admin.locate, [ROWS // 2, ROWS + 7]),
        "delete": await explain(conn, _delete_sql(app.schema), [ROWS + 7, ROWS + 8]),
    }
    for name, plan in plans.items():
        assert_no_scan_of_the_whole(plan, f"{s}.jobs")
        assert_no_scan_of_the_whole(plan, f"{s}.history")
        assert each_partition_by(plan, "pkey") == await every_partition(conn, app.schema), (
            name,
            plan,
        )
    assert "job_checkpoints_pkey" in plans["delete"], plans["delete"]


async def check_dashboard_admin_plans(app: taskq.App, conn: asyncpg.Connection) -> None:
    """The workers page reads running jobs through a partial index of running rows, and
    the cron page finds its entries' last jobs by primary key."""
    s = f'"{app.schema}"'
    admin = statements(app.schema)
    running = workers_page._sql(app.schema)["running_ids"]
    plans = {
        "running_ids": await explain(conn, running, workers_page.RUNNING_IDS_SHOWN),
        "workers": await explain(conn, admin.workers),
        "locate": await explain(conn, admin.locate, [ROWS // 2, ROWS + 7]),
    }
    for plan in plans.values():
        assert_no_scan_of_the_whole(plan, f"{s}.jobs")
        assert_no_scan_of_the_whole(plan, f"{s}.history")
    for name in ("running_ids", "workers"):
        assert "jobs_running" in plans[name] or "jobs_lease" in plans[name], plans[name]
    assert "jobs_pkey" in plans["locate"] and probes(plans["locate"], "pkey"), plans["locate"]


async def check_dashboard_overview_plans(app: taskq.App, conn: asyncpg.Connection) -> None:
    """The overview counts the last hour of history through the BRIN index on
    finished_at (a million older rows cost nothing), its depth counts never
    touch history, and a workflow's graph reads its edges by workflow id."""
    s = f'"{app.schema}"'
    sql = overview_page._sql(app.schema)
    start = (await conn.fetchrow(sql["hour_start"]))[0]
    async with conn.transaction():
        for setting in overview_page.HOUR_SETTINGS:
            await conn.execute(setting)
        per_minute = await explain(conn, sql["per_minute"], start)
    assert_no_scan_of_the_whole(per_minute, f"{s}.history")
    # The partitions of the last hour only (and the DEFAULT one, which may hold any time).
    read = probes(per_minute, "finished_at")
    assert "history_default" in read, per_minute
    assert read <= {"history_default", *await partitions_since(conn, s, 3600)}, per_minute
    depth = await explain(conn, statements(app.schema).queue_depth)
    assert "history" not in depth, depth
    edges = await explain(conn, workflows_page._edges_sql(app.schema), 1)
    assert "workflow_edges_workflow" in edges, edges


async def partitions_since(conn: asyncpg.Connection, s: str, seconds: float) -> list[str]:
    """The time partitions that may hold rows finished in the last ``seconds`` (those
    made ahead included: a window open to the future reaches them, empty as they are)."""
    rows = await conn.fetch(
        f"SELECT name FROM {s}.history_partitions() "
        "WHERE to_at > now() - make_interval(secs => $1)",
        seconds,
    )
    return [r[0] for r in rows]


async def check_retention_plans(app: taskq.App, conn: asyncpg.Connection) -> None:
    """Retention: partitions are made ahead and dropped whole, with the kept rows found
    from the running workflows and the dropped jobs' checkpoints by id range; the
    DEFAULT partition alone is pruned row by row."""
    s = f'"{app.schema}"'
    sql = Statements(app.schema)
    # A running workflow with a step in the oldest partition: the drop keeps it.
    await conn.execute(
        f"INSERT INTO {s}.workflows (id, name, steps) VALUES (1, 'kept', 2) ON CONFLICT DO NOTHING"
    )
    oldest = await conn.fetchval(
        f"SELECT name FROM {s}.history_partitions() ORDER BY from_at LIMIT 1"
    )
    kept = await conn.fetchval(f"SELECT max(id) FROM {s}.{oldest}")
    await conn.execute(f"UPDATE {s}.history SET workflow_id = 1 WHERE id = $1", kept)

    plan = await inner_plans(conn, sql.prune, 7 * 86400.0, 5000)
    assert not seq_scans(plan), plan
    # The rows older than every partition: the DEFAULT partition's, by its BRIN index.
    assert probes(plan, "finished_at") == {"history_default"}, plan
    assert not re.search(r"on history_\d", plan), plan  # no time partition is read

    # Coverage reaches far enough: nothing to make (one catalog read).
    plan = await inner_plans(conn, sql.history_extend, 86400.0, 86400.0)
    assert not seq_scans(plan), plan
    # No partition covers now (today's and tomorrow's dropped, in a transaction
    # rolled back): the rows the DEFAULT partition holds from the start of the day
    # are looked for there only, by its BRIN index.
    ahead = await partitions_since(conn, s, 0)
    drop = ", ".join(f"{s}.{p}" for p in ahead)
    plan = await inner_plans(
        conn, f"DO $$ BEGIN DROP TABLE {drop}; PERFORM {s}.history_extend(86400, 86400); END $$"
    )
    assert not seq_scans(plan), plan
    assert probes(plan, "finished_at") == {"history_default"}, plan

    # Drop: the oldest partition (past a retention of 10 days) is detached, its kept
    # step copied back (from the running workflows' index to the partition's index
    # on workflow_id), and its jobs' checkpoints deleted by the range of its ids.
    plan = await inner_plans(
        conn, f"SELECT {s}.history_drop() FROM {s}.history_detach($1) AS d", 10 * 86400.0
    )
    assert not seq_scans(plan), plan
    assert "workflows_running" in plan and probes(plan, "workflow") == {oldest}, plan
    assert "job_checkpoints_pkey" in plan, plan
    await conn.execute(f"UPDATE {s}.history SET workflow_id = NULL WHERE id = $1", kept)
    await conn.execute(f"DELETE FROM {s}.workflows WHERE id = 1")
