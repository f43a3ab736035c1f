"""The workers page: every worker process with its queues, concurrency, running
jobs and heartbeat; those whose heartbeat stopped are shown as stale, last."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ..._admin import statements
from ..._names import quote_schema
from ..._results import LIVE_WORKER_SECONDS
from .._core import Action, Page, View

#: Running job ids listed per worker (the count covers all of them).
RUNNING_IDS_SHOWN = 5


@lru_cache(maxsize=16)
def _sql(schema: str) -> dict[str, str]:
    s = quote_schema(schema)
    return {
        # One row per worker process: tiny.
        "tasks": f"SELECT id, cardinality(tasks) AS tasks FROM {s}.workers",
        # Running rows only, through the jobs_running partial index.
        "running_ids": (
            f"SELECT worker_id, (array_agg(id ORDER BY id))[1:$1] AS ids FROM {s}.jobs "
            "WHERE state = 'running' AND worker_id IS NOT NULL GROUP BY worker_id"
        ),
    }


async def load(view: View) -> dict[str, Any]:
    admin = statements(view.core.schema)
    sql = _sql(view.core.schema)
    async with (
        view.core.database.acquire("reading the dashboard workers") as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        rows = await conn.fetch(admin.workers)
        tasks = {r["id"]: r["tasks"] for r in await conn.fetch(sql["tasks"])}
        running = {
            r["worker_id"]: r["ids"]
            for r in await conn.fetch(sql["running_ids"], RUNNING_IDS_SHOWN)
        }
    workers = [
        {
            "id": r["id"],
            "hostname": r["hostname"],
            "pid": r["pid"],
            "queues": r["queues"],
            "tasks": tasks.get(r["id"]) or 0,
            "concurrency": r["concurrency"],
            "running": r["running"],
            "running_ids": running.get(r["id"], []),
            "started_at": r["started_at"],
            "heartbeat_at": r["heartbeat_at"],
            "heartbeat_age": r["heartbeat_age"],
            # The same rule as job.result() and why_not_running() use.
            "stale": r["heartbeat_age"] > LIVE_WORKER_SECONDS,
        }
        for r in rows
    ]
    # Live ones first (by host and pid, as the statement orders them), stale ones last.
    workers.sort(key=lambda w: w["stale"])
    live = [w for w in workers if not w["stale"]]
    return {
        "title": "Workers",
        "workers": workers,
        "live_count": len(live),
        "stale_count": len(workers) - len(live),
        "slots": sum(w["concurrency"] for w in live),
        "busy": sum(w["running"] for w in live),
        "live_after": LIVE_WORKER_SECONDS,
    }


PAGES = [
    Page("/workers", "workers.html", load, nav="workers", regions={"workers": "workers_table.html"})
]
ACTIONS: list[Action] = []
