"""The overview: every queue's depth and lag, the last hour's throughput and
failures, and the live workers, on one screen."""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from typing import Any

from ..._admin import statements
from ..._names import quote_schema
from .._charts import stacked_bars
from .._core import Action, Page, View

#: Set for the last hour's count: without fresh statistics on history the
#: planner would scan all of it instead of the BRIN index's last block
#: ranges; a plan with a disabled node costs enough to trigger JIT
#: compilation, pointless for a query of milliseconds.
HOUR_SETTINGS = ("SET LOCAL enable_seqscan = off", "SET LOCAL jit = off")
#: A worker whose heartbeat is older than this is shown as stale.
STALE_WORKER_SECONDS = 60.0
MINUTES = 60


@lru_cache(maxsize=16)
def _sql(schema: str) -> dict[str, str]:
    s = quote_schema(schema)
    return {
        # Finished jobs per minute of the last hour: the BRIN index on
        # finished_at limits the scan to the last hour's blocks.
        "per_minute": (
            "SELECT date_bin('1 minute', finished_at, $1) AS minute, "
            "count(*) FILTER (WHERE state = 'succeeded') AS succeeded, "
            "count(*) FILTER (WHERE state = 'failed') AS failed, "
            "count(*) FILTER (WHERE state = 'cancelled') AS cancelled "
            f"FROM {s}.history WHERE finished_at >= $1 GROUP BY 1"
        ),
        "hour_start": (
            f"SELECT date_trunc('minute', now()) - make_interval(mins => {MINUTES - 1}), now()"
        ),
        "limits": f"SELECT name, concurrency_limit, rate_limit, rate_period FROM {s}.queues",
    }


async def load(view: View) -> dict[str, Any]:
    admin = statements(view.core.schema)
    sql = _sql(view.core.schema)
    async with (
        view.core.database.acquire("reading the dashboard overview") as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        start, now = await conn.fetchrow(sql["hour_start"])
        depth = await conn.fetch(admin.queue_depth)
        workers = await conn.fetch(admin.workers)
        limits = {r["name"]: r for r in await conn.fetch(sql["limits"])}
        for setting in HOUR_SETTINGS:
            await conn.execute(setting)
        minutes = await conn.fetch(sql["per_minute"], start)
    queues = [
        {
            "name": r["queue"],
            "paused": r["paused"],
            "queued": r["queued"],
            "scheduled": r["scheduled"],
            "running": r["running"],
            "waiting": r["waiting"],
            "lag": r["lag"],
            "limit": limits[r["queue"]]["concurrency_limit"] if r["queue"] in limits else None,
        }
        for r in sorted(depth, key=lambda r: r["queue"])
    ]
    times = [start + timedelta(minutes=i) for i in range(MINUTES)]
    by_minute = {r["minute"]: r for r in minutes}

    def series(name: str) -> list[int]:
        return [int(by_minute[t][name]) if t in by_minute else 0 for t in times]

    throughput = stacked_bars(
        "Jobs finished per minute, last hour (succeeded, failed, cancelled)",
        times,
        [
            ("succeeded", series("succeeded")),
            ("failed", series("failed")),
            ("cancelled", series("cancelled")),
        ],
    )
    failures = stacked_bars(
        "Failed jobs per minute, last hour", times, [("failed", series("failed"))]
    )
    live = [w for w in workers if w["heartbeat_age"] <= STALE_WORKER_SECONDS]
    totals = {
        key: sum(q[key] for q in queues) for key in ("queued", "scheduled", "running", "waiting")
    }
    lags = [q["lag"] for q in queues if q["lag"] is not None]
    return {
        "title": "Overview",
        "now": now,
        "queues": queues,
        "totals": totals,
        "oldest_lag": max(lags, default=None),
        "throughput": throughput,
        "failures": failures,
        "workers_live": len(live),
        "workers_stale": len(workers) - len(live),
        "slots": sum(w["concurrency"] for w in live),
        "busy": sum(w["running"] for w in live),
    }


PAGES = [
    Page(
        "/",
        "overview.html",
        load,
        nav="overview",
        regions={
            "summary": "overview_summary.html",
            "queues": "overview_queues.html",
            "charts": "overview_charts.html",
        },
    )
]
ACTIONS: list[Action] = []
