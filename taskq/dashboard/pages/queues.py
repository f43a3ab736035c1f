"""The queues page: every queue's depth and settings, pause and resume, and
cluster-wide limits edited with the same validation as ``app.queue().configure()``."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ..._admin import statements
from ..._errors import ConfigurationError
from ..._limits import RateLimit, check_concurrency_limit
from ..._names import check_queue, quote_schema
from .._core import Action, BadRequest, Done, Form, Page, View

#: The queue's own oldest ready job waited this long: its lag is shown in amber.
LAG_WARN_SECONDS = 60.0


@lru_cache(maxsize=16)
def _sql(schema: str) -> dict[str, str]:
    s = quote_schema(schema)
    return {
        # Both settings tables are small: one row per queue, one per task name.
        "queues": (
            f"SELECT name, paused, concurrency_limit, rate_limit, rate_period FROM {s}.queues"
        ),
        "task_rates": (
            f"SELECT name, queue, rate_limit, rate_period FROM {s}.tasks "
            "WHERE rate_limit IS NOT NULL ORDER BY name"
        ),
    }


def rate_text(limit: int | None, period: float | None) -> str | None:
    """The rate as people read it, "10 per 60 s" (None when there is no limit)."""
    if limit is None or period is None:
        return None
    return f"{limit:,} per {period:g} s"


def rate_field(limit: int | None, period: float | None) -> str:
    """The rate as the form writes it ("10/60s"); empty when there is none."""
    if limit is None or period is None:
        return ""
    return f"{limit}/{period:g}s"


async def load(view: View) -> dict[str, Any]:
    admin = statements(view.core.schema)
    sql = _sql(view.core.schema)
    async with (
        view.core.database.acquire("reading the dashboard queues") as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        depth = await conn.fetch(admin.queue_depth)
        settings = {r["name"]: r for r in await conn.fetch(sql["queues"])}
        task_rates = await conn.fetch(sql["task_rates"])
    queues = []
    for r in sorted(depth, key=lambda r: r["queue"]):
        row = settings.get(r["queue"])
        limit = row["concurrency_limit"] if row else None
        rate_limit = row["rate_limit"] if row else None
        rate_period = row["rate_period"] if row else None
        queues.append(
            {
                "name": r["queue"],
                "paused": r["paused"],
                "queued": r["queued"],
                "scheduled": r["scheduled"],
                "running": r["running"],
                "waiting": r["waiting"],
                "lag": r["lag"],
                "lag_warn": r["lag"] is not None and r["lag"] > LAG_WARN_SECONDS,
                "concurrency_limit": limit,
                "full": limit is not None and r["running"] >= limit,
                "rate": rate_text(rate_limit, rate_period),
                "rate_field": rate_field(rate_limit, rate_period),
            }
        )
    return {
        "title": "Queues",
        "queues": queues,
        "task_rates": [
            {
                "name": t["name"],
                "queue": t["queue"],
                "rate": rate_text(t["rate_limit"], t["rate_period"]),
            }
            for t in task_rates
        ],
    }


def _queue_name(form: Form) -> str:
    try:
        return check_queue(str(form.params["name"]))
    except ConfigurationError as exc:
        raise BadRequest(str(exc)) from None


async def pause(form: Form) -> Done:
    name = _queue_name(form)
    await form.core.app.queue(name).pause()
    return Done(
        "/queues",
        f"Queue {name} paused: no new job of it starts on any worker; running jobs go on.",
    )


async def resume(form: Form) -> Done:
    name = _queue_name(form)
    await form.core.app.queue(name).resume()
    return Done("/queues", f"Queue {name} resumed: its jobs start again.")


def parse_limits(form: Form) -> tuple[int | None, RateLimit | None]:
    """The form's concurrency limit and rate (blank = none); ConfigurationError
    says what is wrong with the first bad one."""
    raw_limit = form.get("concurrency_limit")
    limit: int | None = None
    if raw_limit:
        try:
            number = int(raw_limit)
        except ValueError:
            raise ConfigurationError(
                f"concurrency limit {raw_limit!r} is not a whole number: give a number of "
                "jobs of at least 1, or leave it blank for no limit"
            ) from None
        try:
            limit = check_concurrency_limit(number)
        except ConfigurationError:
            raise ConfigurationError(
                f"concurrency limit {raw_limit!r} must be at least 1 (leave it blank for "
                "no limit; pause the queue to stop it)"
            ) from None
    raw_rate = form.get("rate_limit")
    rate = RateLimit.parse(raw_rate) if raw_rate else None
    return limit, rate


async def limits(form: Form) -> Done:
    name = _queue_name(form)
    try:
        limit, rate = parse_limits(form)
    except ConfigurationError as exc:
        # Nothing is written: both fields are checked before either is set.
        return Done("/queues", f"Queue {name} not changed: {exc}", ok=False)
    info = await form.core.app.queue(name).configure(concurrency_limit=limit, rate_limit=rate)
    shown_limit = (
        "no concurrency limit"
        if info.concurrency_limit is None
        else f"at most {info.concurrency_limit} running"
    )
    shown_rate = (
        "no rate limit"
        if info.rate_limit is None
        else f"at most {rate_text(info.rate_limit.limit, info.rate_limit.period)} starts"
    )
    return Done("/queues", f"Queue {name}: {shown_limit}, {shown_rate}.")


PAGES = [
    Page(
        "/queues",
        "queues.html",
        load,
        nav="queues",
        regions={"queues": "queues_table.html"},
    )
]
ACTIONS = [
    Action("/queues/{name}/pause", pause),
    Action("/queues/{name}/resume", resume),
    Action("/queues/{name}/limits", limits),
]
