"""One job's whole story: its arguments, result, meta, every attempt's error,
its timings, the worker that ran it, its workflow; and, for a job that waits,
why it is not running. Actions: retry, cancel, delete from history."""

from __future__ import annotations

import re
from datetime import datetime
from functools import lru_cache
from typing import Any

from ..._admin import (
    FINISHED_STATES,
    RETRYABLE_STATES,
    JobDetail,
    Reason,
    cancel_ids,
    retry_ids,
    statements,
    why_not_running,
)
from ..._errors import JobNotFound
from ..._job import status_from_row
from ..._names import quote_schema
from .._core import Action, Done, Form, NotFound, Page, View
from .._render import duration, when
from .jobs import delete_ids

#: States whose job waits to start: the page says why it is not running.
WAITING_STATES = ("queued", "waiting")
#: States a cancel can take a job from (a waiting workflow step included).
CANCELLABLE_STATES = ("waiting", "queued", "running")
#: Reasons an operator has to act on (nothing will change by itself).
PROBLEM_REASONS = frozenset(
    {
        "queue_paused",
        "no_workers",
        "no_worker_for_task",
        "no_worker_for_queue",
        "no_worker_for_task_in_queue",
        "lease_expired",
    }
)
#: Reasons that hold a job back for now and pass by themselves (limits, load).
HELD_REASONS = frozenset(
    {
        "queue_limit_full",
        "key_limit_full",
        "beyond_key_window",
        "queue_rate_limited",
        "task_rate_limited",
        "workers_busy",
        "retry_backoff",
    }
)
#: Labels of a reason's numbers whose key does not read well as it is.
FACT_LABELS = {
    "seconds_left": "time left",
    "seconds_ago": "how long ago",
    "lease_seconds_left": "lease left",
    "period_seconds": "window",
    "live_after_seconds": "live if a heartbeat within",
    "free_slots": "free slots",
    "ahead": "jobs ahead",
    "capped": "count capped",
    "concurrency_key": "concurrency key",
    "window": "jobs looked at",
}
#: Numbers of a reason the page shows anyway (in the head and the details
#: table): repeated under the reason they would bury the ones that matter.
SHOWN_ELSEWHERE = frozenset(
    {"now", "attempts", "max_attempts", "worker_id", "hostname", "pid", "started_at"}
)
#: Items of a list shown in a reason's numbers; the rest are counted.
MAX_LISTED = 10
# W3C trace context: version-traceid-parentid-flags.
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")


@lru_cache(maxsize=16)
def _sql(schema: str) -> dict[str, str]:
    s = quote_schema(schema)
    return {
        "now": "SELECT now()",
        # The workers table is tiny (one row per process).
        "worker": (
            "SELECT hostname, pid, heartbeat_at, concurrency, queues "
            f"FROM {s}.workers WHERE id = $1"
        ),
        "workflow": f"SELECT name, state FROM {s}.workflows WHERE id = $1",
    }


def _detail(row: Any) -> JobDetail:
    waiting_for = row["waiting_for"]
    return JobDetail(
        status_from_row(row),
        int(row["rescues"]),
        bool(row["cancel_requested"]),
        None if waiting_for is None else list(waiting_for),
    )


async def load(view: View) -> dict[str, Any]:
    job_id: int = view.params["id"]
    core = view.core
    sql = _sql(core.schema)
    # One snapshot: the job, its worker and its workflow agree.
    async with (
        core.database.acquire("reading a job for the dashboard") as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        now: datetime = await conn.fetchval(sql["now"])
        row = await conn.fetchrow(statements(core.schema).get_job, job_id)
        if row is None:
            retention = core.app.history_retention
            raise NotFound(
                f"There is no job {job_id} in schema {core.schema!r}. It never existed, or "
                f"it finished more than {retention} ago (the history retention) and was "
                "pruned, or someone deleted it."
            )
        detail = _detail(row)
        job = detail.status
        worker = await conn.fetchrow(sql["worker"], job.worker_id) if job.worker_id else None
        workflow = (
            await conn.fetchrow(sql["workflow"], job.workflow_id) if job.workflow_id else None
        )
    state = str(job.state)
    why = await _why(view, state) if state in (*WAITING_STATES, "running") else None
    return {
        "title": f"Job {job.id} · {job.task}",
        "now": now,
        "job": job,
        "detail": detail,
        "state": state,
        "finished": state in FINISHED_STATES,
        "scheduled": state == "queued" and job.run_at is not None and job.run_at > now,
        "timings": _timings(job, now),
        "attempts": _attempts(job),
        "worker": worker,
        "workflow": workflow,
        "trace": _trace(job.meta),
        "progress": _progress(job.progress),
        "why": why,
        "actions": _actions(state, job.workflow_id, workflow),
    }


def _actions(state: str, workflow_id: int | None, workflow: Any) -> list[str]:
    """The actions that apply now. A workflow step is retried with its workflow,
    and stays in history while its workflow runs (like the pruning keeps it)."""
    out = []
    if state in RETRYABLE_STATES and workflow_id is None:
        out.append("retry")
    if state in CANCELLABLE_STATES:
        out.append("cancel")
    if state in FINISHED_STATES and (workflow is None or workflow["state"] != "running"):
        out.append("delete")
    return out


async def _why(view: View, state: str) -> list[dict[str, Any]] | None:
    """The reasons from why_not_running(), ready to show; None when they describe
    another instant than the job read above (it started or ended in between:
    the next refresh agrees)."""
    try:
        explanation = await why_not_running(view.core.database, view.core.schema, view.params["id"])
    except JobNotFound:
        return None
    if explanation.state != state:
        return None
    return [_reason(r) for r in explanation.reasons]


def _reason(reason: Reason) -> dict[str, Any]:
    kind = (
        "problem"
        if reason.code in PROBLEM_REASONS
        else "held"
        if reason.code in HELD_REASONS
        else "info"
    )
    return {
        "code": reason.code,
        "message": reason.message,
        "kind": kind,
        "facts": _facts(reason.details),
        "link": _link(reason),
    }


def _link(reason: Reason) -> tuple[str, str] | None:
    """Where an operator goes next about this reason: (label, dashboard path)."""
    code, details = reason.code, reason.details
    if code.startswith("queue_") or code in ("key_limit_full", "beyond_key_window"):
        return ("Open the queues page", "/queues")
    if code.startswith("no_worker") or code in ("workers_busy", "lease_expired"):
        return ("Open the workers page", "/workers")
    if code.startswith("waiting_for") and details.get("workflow_id") is not None:
        return ("Open its workflow", f"/workflows/{int(details['workflow_id'])}")
    return None


def _facts(details: dict[str, Any]) -> list[tuple[str, str]]:
    """A reason's numbers as (label, text): durations and times made readable."""
    facts = []
    for key, value in details.items():
        if value is None or value is False or key in SHOWN_ELSEWHERE:
            continue
        label = FACT_LABELS.get(key, key.replace("_", " "))
        if isinstance(value, bool):
            text = "yes" if value else "no"
        elif isinstance(value, int | float) and "second" in key:
            text = duration(value)
        elif isinstance(value, str) and key.endswith("_at"):
            try:
                text = when(datetime.fromisoformat(value))
            except ValueError:
                text = value
        elif isinstance(value, list):
            items = [_item(v) for v in value[:MAX_LISTED]]
            more = len(value) - MAX_LISTED
            text = ", ".join(items) + (f" and {more} more" if more > 0 else "")
            if not value:
                text = "none"
        elif isinstance(value, dict):
            text = ", ".join(f"{k}: {v}" for k, v in value.items())
        else:
            text = f"{value:,}" if isinstance(value, int) and key not in ("pid",) else str(value)
        facts.append((label, text))
    return facts


def _item(value: Any) -> str:
    if not isinstance(value, dict):
        return str(value)
    if "name" in value and "state" in value:  # a workflow parent
        return f"{value['name']} ({value['state']})"
    if "concurrency" in value:  # a busy worker
        running, slots = value.get("running"), value["concurrency"]
        return f"{value.get('hostname')} {value.get('id')}: {running}/{slots}"
    return ", ".join(f"{k}: {v}" for k, v in value.items())


def _timings(job: Any, now: datetime) -> dict[str, Any]:
    """Waited: to the last attempt's start (or to now, while it waits) from the
    latest of its enqueue, its due time and its previous attempt's failure.
    Ran for: the last attempt, to its end or to now while running."""
    started, finished = job.started_at, job.finished_at
    since, what = job.enqueued_at, "enqueued"
    if job.run_at is not None:
        if job.run_at > since:
            since, what = job.run_at, "due"
    else:
        # History keeps no due time: a job that ran again after a failure
        # waited since that failure at the earliest, not since its enqueue.
        failed = [
            at
            for at in (_parse_time(e.get("at")) for e in job.errors if isinstance(e, dict))
            if at is not None and (started is None or at <= started)
        ]
        if failed and max(failed) > since:
            since, what = max(failed), "the previous attempt failed"
    state = str(job.state)
    if started is not None and started >= since:
        waited = started - since
    elif started is None and state in WAITING_STATES and now > since:
        waited = now - since
    else:
        waited = None
    if started is not None and finished is not None:
        ran = finished - started
    elif started is not None and state == "running":
        ran = now - started
    else:
        ran = None
    return {"waited": waited, "since": what, "ran": ran, "waiting_now": started is None}


def _attempts(job: Any) -> list[dict[str, Any]]:
    """Every kept attempt's error, newest first. ``errors`` keeps the last 10
    (taskq.LeaseExpired and taskq.PoisonJob for rescues); a job that ended
    without any in it (cancelled while queued, or older than schema 5) has
    its last error only."""
    errors = [e for e in job.errors if isinstance(e, dict)]
    last = job.error if isinstance(job.error, dict) else None
    if last is not None and not any(
        e.get("type") == last.get("type") and e.get("message") == last.get("message")
        for e in errors[-1:]
    ):
        errors.append({**last, "attempt": last.get("attempt", job.attempts)})
    return [
        {
            "attempt": e.get("attempt"),
            "type": str(e.get("type") or "error"),
            "message": str(e.get("message") or ""),
            "traceback": str(e.get("traceback") or ""),
            "at": _parse_time(e.get("at")),
        }
        for e in reversed(errors)
    ]


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _trace(meta: dict[str, Any]) -> dict[str, str] | None:
    """The trace context the OpenTelemetry integration wrote into meta."""
    parent = meta.get("traceparent")
    if not isinstance(parent, str):
        return None
    found = _TRACEPARENT.match(parent.strip().lower())
    if found is None:
        return {"traceparent": parent}
    return {"trace_id": found.group(1), "span_id": found.group(2), "traceparent": parent}


def _progress(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    fraction = value.get("fraction")
    if isinstance(fraction, int | float) and not isinstance(fraction, bool):
        fraction = min(1.0, max(0.0, float(fraction)))
    else:
        fraction = None
    return {
        "fraction": fraction,
        "percent": None if fraction is None else round(fraction * 100),
        "message": value.get("message"),
        "at": _parse_time(value.get("at")),
    }


# -- actions -------------------------------------------------------------------------


def _here(form: Form) -> str:
    return f"/jobs/{form.params['id']}"


async def retry(form: Form) -> Done:
    job_id: int = form.params["id"]
    result = await retry_ids(form.core.database, form.core.schema, [job_id])
    if job_id in result.retried:
        return Done(_here(form), f"Job {job_id} is queued again with a fresh attempt budget.")
    if job_id in result.key_held:
        return Done(
            _here(form),
            f"Job {job_id} was not retried: a live job holds its unique key.",
            ok=False,
        )
    if job_id in result.step_ids:
        workflow = result.workflows[0] if result.workflows else "?"
        return Done(
            f"/workflows/{workflow}",
            f"Job {job_id} is a step of workflow {workflow}: a step runs again with its "
            "workflow (retry the workflow here).",
            ok=False,
        )
    if job_id in result.skipped:
        return Done(
            _here(form),
            f"Job {job_id} is {result.skipped[job_id]}: only failed or cancelled jobs "
            "can be retried.",
            ok=False,
        )
    return Done("/jobs", f"There is no job {job_id}.", ok=False)


async def cancel(form: Form) -> Done:
    job_id: int = form.params["id"]
    result = await cancel_ids(form.core.database, form.core.schema, [job_id])
    if job_id in result.cancelled:
        also = len(result.descendants)
        tail = f" ({also} workflow steps that depended on it ended with it)" if also else ""
        return Done(_here(form), f"Job {job_id} is cancelled{tail}.")
    if job_id in result.requested:
        return Done(
            _here(form),
            f"Job {job_id} is running: its worker was asked to stop it; it ends as "
            "cancelled when its code is interrupted.",
        )
    if job_id in result.finished:
        return Done(
            _here(form),
            f"Job {job_id} had already finished ({result.finished[job_id]}).",
            ok=False,
        )
    if job_id in result.not_found:
        return Done("/jobs", f"There is no job {job_id}.", ok=False)
    return Done(_here(form), f"Job {job_id} was changing hands; try again.", ok=False)


async def delete(form: Form) -> Done:
    job_id: int = form.params["id"]
    # The jobs page's delete: the same rules for one job as for many.
    result = await delete_ids(form.core, [job_id])
    if result.deleted:
        return Done("/jobs", f"Job {job_id} is deleted from history.")
    if result.kept:
        return Done(
            _here(form),
            f"Job {job_id} is a step of a workflow that is still running: its steps stay "
            "in history until it ends.",
            ok=False,
        )
    return Done(
        _here(form),
        f"Job {job_id} is not in history: only finished jobs can be deleted (cancel a "
        "live one first).",
        ok=False,
    )


PAGES = [
    Page(
        "/jobs/{id:int}",
        "job.html",
        load,
        nav="jobs",
        regions={
            "head": "job_head.html",
            "state": "job_state.html",
            "attempts": "job_attempts.html",
            "result": "job_result.html",
        },
    )
]
ACTIONS = [
    Action("/jobs/{id:int}/retry", retry),
    Action("/jobs/{id:int}/cancel", cancel),
    Action("/jobs/{id:int}/delete", delete),
]
