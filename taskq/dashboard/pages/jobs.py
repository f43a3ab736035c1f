"""The jobs page: jobs by state, filtered, paged by id; retry, cancel and delete in bulk.

Listing reads are bounded (see :mod:`.jobs_query`). Bulk actions reuse the
operator functions of :mod:`taskq._admin.bulk`; an action over "all jobs
matching this filter" first shows a confirmation page with the exact count
and acts only when that page's form is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlencode

from ... import _admin
from ..._names import quote_schema
from .._core import Action, BadRequest, Core, Done, Form, Page, Rendered, View
from .jobs_query import (
    HISTORY_TABS,
    MAX_PAGE_SIZE,
    PAGE_SIZE,
    TABS,
    Filter,
    matching_ids,
    read_page,
    top_id,
)

#: What each action does, in the words of its button and its confirmation.
VERBS = {"retry": "Retry", "cancel": "Cancel", "delete": "Delete"}
#: The tabs each action applies to.
ACTION_TABS = {
    "retry": ("failed", "cancelled"),
    "cancel": ("queued", "scheduled", "running", "waiting"),
    "delete": HISTORY_TABS,
}
#: How a tab's jobs are called in a sentence ("Cancel 3 ready jobs?").
STATE_WORDS = {"queued": "ready", **{s: s for s, _label, _table in TABS if s != "queued"}}


# -- the page --------------------------------------------------------------------


@lru_cache(maxsize=16)
def _names_sql(schema: str) -> dict[str, str]:
    s = quote_schema(schema)
    # For the filter's suggestions: small tables, never jobs or history.
    return {
        "queues": f"SELECT name FROM {s}.queues UNION SELECT queue FROM {s}.tasks ORDER BY 1",
        "tasks": f"SELECT name FROM {s}.tasks ORDER BY 1",
    }


def _limit(view: View) -> int:
    limit = view.int_arg("limit", PAGE_SIZE)
    assert limit is not None
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise BadRequest(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")
    return limit


async def load(view: View) -> dict[str, Any]:
    f = Filter.read(view.arg)
    limit = _limit(view)
    before, after = view.int_arg("before"), view.int_arg("after")
    if before is not None and after is not None:
        raise BadRequest("give before or after, not both")
    names = _names_sql(view.core.schema)
    async with (
        view.core.database.acquire("reading the dashboard's jobs") as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        listing = await read_page(
            conn, view.core.schema, f, before=before, after=after, limit=limit
        )
        queues = [r[0] for r in await conn.fetch(names["queues"])]
        tasks = [r[0] for r in await conn.fetch(names["tasks"])]
    label = dict((s, lbl) for s, lbl, _t in TABS)[f.state]
    return {
        "title": f"Jobs · {label}",
        "filter": f,
        "tabs": TABS,
        "listing": listing,
        "limit": limit,
        "queues": queues,
        "tasks": tasks,
        "actions": [op for op, tabs in ACTION_TABS.items() if f.state in tabs],
        "verbs": VERBS,
        "state_word": STATE_WORDS[f.state],
        "described": f.describe(),
    }


# -- deleting from history -------------------------------------------------------------


@lru_cache(maxsize=16)
def _delete_sql(schema: str) -> str:
    s = quote_schema(schema)
    # Like prune(): the job's recorded steps go with it, and a finished step
    # of a workflow that is still running is kept (its workflow reads it).
    # The checkpoints are looked up by the ids given: history's partitions
    # each count a row for the ids, and with that many the planner would
    # rather read all the checkpoints than probe their key.
    return (
        f"WITH gone AS (DELETE FROM {s}.history AS h WHERE h.id = ANY($1::bigint[]) "
        f"AND (h.workflow_id IS NULL OR NOT EXISTS (SELECT FROM {s}.workflows AS w "
        "WHERE w.id = h.workflow_id AND w.finished_at IS NULL)) RETURNING h.id), "
        f"c AS (DELETE FROM {s}.job_checkpoints WHERE job_id = ANY($1::bigint[]) "
        "AND job_id IN (SELECT id FROM gone)) "
        "SELECT coalesce(array_agg(id), '{}') FROM gone"
    )


@dataclass
class DeleteResult:
    """What a delete did: ids gone; ids kept (steps of running workflows); ids not in history."""

    deleted: int = 0
    kept: int = 0
    missing: int = 0


async def delete_ids(core: Core, ids: Sequence[int]) -> DeleteResult:
    """Delete these finished jobs from history, in batches of the bulk functions' size."""
    result = DeleteResult()
    unique = list(dict.fromkeys(ids))
    sql = _delete_sql(core.schema)
    locate = _admin.statements(core.schema).locate
    for i in range(0, len(unique), _admin.BATCH_SIZE):
        chunk = unique[i : i + _admin.BATCH_SIZE]
        async with core.database.acquire("deleting jobs from history") as conn:
            gone = set(await conn.fetchval(sql, chunk))
            rest = [j for j in chunk if j not in gone]
            found = {r["id"]: r for r in await conn.fetch(locate, rest)} if rest else {}
        result.deleted += len(gone)
        for j in rest:
            row = found.get(j)
            if row is not None and not row["live"]:
                result.kept += 1
            else:
                result.missing += 1
    return result


# -- the actions -----------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _location(f: Filter) -> str:
    return "/jobs?" + urlencode(f.items())


def _checked(form: Form) -> tuple[str, Filter]:
    op = form.get("op")
    f = Filter.read(form.get)
    if op not in VERBS:
        raise BadRequest(f"op must be one of {', '.join(VERBS)}, got {op!r}")
    if f.state not in ACTION_TABS[op]:
        raise BadRequest(f"{op} does not apply to {f.state} jobs")
    return op, f


def _retried(r: _admin.RetryResult) -> tuple[str, bool]:
    parts = [f"Retried {_plural(len(r.retried), 'job')}"]
    if r.key_held:
        parts.append(
            f"{len(r.key_held):,} left in history because a live job holds their unique key"
        )
    if r.steps_skipped:
        shown = ", ".join(str(w) for w in r.workflows[:10])
        parts.append(
            f"{_plural(r.steps_skipped, 'workflow step')} left alone: retry the workflow "
            f"instead ({shown})"
        )
    if r.skipped:
        parts.append(f"{len(r.skipped):,} skipped because they are no longer failed or cancelled")
    if r.not_found:
        parts.append(f"{len(r.not_found):,} skipped because they no longer exist")
    return "; ".join(parts) + ".", bool(r.retried) or not (len(parts) > 1)


def _cancelled(r: _admin.CancelResult) -> tuple[str, bool]:
    parts = [f"Cancelled {_plural(len(r.cancelled), 'job')}"]
    if r.requested:
        parts.append(f"asked the workers of {_plural(len(r.requested), 'running job')} to stop")
    if r.descendants:
        parts.append(f"{_plural(len(r.descendants), 'workflow step')} depending on them ended too")
    if r.finished:
        parts.append(f"{len(r.finished):,} skipped because they had already finished")
    if r.not_found:
        parts.append(f"{len(r.not_found):,} skipped because they no longer exist")
    done = bool(r.cancelled or r.requested)
    return "; ".join(parts) + ".", done or not (len(parts) > 1)


def _deleted(r: DeleteResult) -> tuple[str, bool]:
    parts = [f"Deleted {_plural(r.deleted, 'job')} from history"]
    if r.kept:
        parts.append(f"{r.kept:,} kept because they are steps of a workflow still running")
    if r.missing:
        parts.append(f"{r.missing:,} skipped because they are not in history")
    return "; ".join(parts) + ".", bool(r.deleted) or not (len(parts) > 1)


async def _act_on_ids(core: Core, op: str, f: Filter, ids: list[int]) -> tuple[str, bool]:
    if op == "retry":
        return _retried(await _admin.retry_ids(core.database, core.schema, ids, states=[f.state]))
    if op == "cancel":
        return _cancelled(await _admin.cancel_ids(core.database, core.schema, ids))
    return _deleted(await delete_ids(core, ids))


_WHAT_HAPPENS = {
    "retry": "They go back to their queues with a fresh attempt budget and run as soon as "
    "a worker is free; their last error is kept.",
    "cancel": "Jobs that have not started end as cancelled at once; running ones are asked "
    "to stop and end as cancelled when they do.",
    "delete": "They are removed from history with their recorded steps.",
}


def _confirmation(
    op: str,
    f: Filter,
    count: int,
    notes: list[str],
    *,
    upto: int = 0,
    ids: Sequence[int] = (),
) -> Rendered:
    notes = [_WHAT_HAPPENS[op], *notes]
    described = f" {f.describe()}" if f.describe() and not ids else ""
    where = " from history" if op == "delete" else ""
    question = f"{VERBS[op]} {_plural(count, STATE_WORDS[f.state] + ' job')}{where}{described}?"
    return Rendered(
        "jobs_confirm.html",
        {
            "title": question,
            "question": question,
            "op": op,
            "verb": VERBS[op],
            "count": count,
            "notes": notes,
            "filter": f,
            "upto": upto,
            "ids": list(ids),
            "action": "selected" if ids else "matching",
            "back": _location(f),
        },
        nav="jobs",
    )


async def act_on_selected(form: Form) -> Done | Rendered:
    """Retry, cancel or delete the ticked jobs (delete asks first, on a page of its own)."""
    op, f = _checked(form)
    ids = form.ids()
    if not ids:
        return Done(_location(f), "Tick the jobs to act on first.", ok=False)
    if op == "delete" and form.get("confirm") != "yes":
        notes = ["This cannot be undone: their arguments, results and errors are gone for good."]
        return _confirmation(op, f, len(set(ids)), notes, ids=ids)
    message, ok = await _act_on_ids(form.core, op, f, ids)
    return Done(_location(f), message, ok)


async def act_on_matching(form: Form) -> Done | Rendered:
    """Every job matching the filter: a confirmation page with the count, then the action."""
    op, f = _checked(form)
    core = form.core
    confirmed = form.get("confirm") == "yes"
    # Retry by queue and task only: the CLI's statements (by index, in batches).
    if op == "retry" and not f.narrow:
        if not confirmed:
            m = await _admin.count_retry(
                core.database,
                core.schema,
                states=[f.state],
                queue=f.queue or None,
                task=f.task or None,
            )
            if not m.count:
                return Done(_location(f), f"No {f.state} job matches: nothing to retry.", False)
            return _confirmation(op, f, m.count, _retry_notes(m), upto=m.last_id)
        result = await _admin.retry_matching(
            core.database,
            core.schema,
            states=[f.state],
            queue=f.queue or None,
            task=f.task or None,
            last_id=_upto(form),
        )
        message, ok = _retried(result)
        return Done(_location(f), message, ok)
    if not confirmed:
        upto = await top_id(core, f)
        ids = await matching_ids(core, f, upto)
        if not ids:
            return Done(
                _location(f), f"No {STATE_WORDS[f.state]} job matches: nothing to do.", False
            )
        notes: list[str] = []
        count = len(ids)
        if op == "retry":
            m = await _admin.count_retry(core.database, core.schema, ids=ids, states=[f.state])
            count, notes = m.count, _retry_notes(m)
        elif op == "cancel":
            m = await _admin.count_cancel(core.database, core.schema, ids=ids)
            count = m.count
            if m.running:
                notes.append(
                    f"{m.running:,} of them are running: their workers are asked to stop them "
                    "(they end as cancelled when they do)."
                )
            if m.steps:
                notes.append(
                    f"{_plural(m.steps, 'workflow step')}: the steps that depend on them "
                    "are cancelled too."
                )
        else:
            notes.append("This cannot be undone: their arguments, results and errors are gone.")
        return _confirmation(op, f, count, notes, upto=upto)
    ids = await matching_ids(core, f, _upto(form))
    message, ok = await _act_on_ids(core, op, f, ids)
    return Done(_location(f), message, ok)


def _retry_notes(m: _admin.Matched) -> list[str]:
    notes = []
    if m.key_held:
        notes.append(
            f"{m.key_held:,} of them will stay in history: a live job holds their unique key."
        )
    if m.steps:
        notes.append(
            f"{_plural(m.steps, 'workflow step')} also match and are left alone: a step runs "
            "again with its workflow (retry the workflow)."
        )
    return notes


def _upto(form: Form) -> int:
    try:
        return int(form.get("upto"))
    except ValueError:
        raise BadRequest("the confirmation form lost its upto field; start again") from None


PAGES = [Page("/jobs", "jobs.html", load, nav="jobs", regions={"rows": "jobs_rows.html"})]
ACTIONS = [
    Action("/jobs/selected", act_on_selected),
    Action("/jobs/matching", act_on_matching),
]
