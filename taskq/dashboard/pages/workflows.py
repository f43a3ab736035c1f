"""The workflows pages: the list with step counts, and one workflow drawn as a
graph of its steps (live), with cancel and retry.

The list is ``Workflows.listing()`` (one row per workflow, newest first by
id, keyset on ``before``). One workflow is read in one repeatable-read
transaction: its row, its steps (``workflow_steps`` by workflow, each job by
primary key in ``jobs`` or ``history``) and its edges (``workflow_edges`` by
workflow): never a scan of the big tables.

A map's items are drawn as one box (``resize[0..499]``) with their counts
by state and a bar of them, so a map of 500 items stays readable.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..._job import JobState
from ..._names import quote_schema
from ..._results import is_bigint
from ..._workflow_run import StepStatus, WorkflowState, WorkflowStatus, status_from_rows
from ..._workflow_store import WorkflowStore
from .._core import Action, BadRequest, Done, Form, NotFound, Page, View
from .._graph import NODE_HEIGHT, NODE_WIDTH, layout

#: Workflows on one page of the list.
PAGE_SIZE = 50
#: Items of one map listed in the steps table (the unusual ones first: failed,
#: running...); the rest are summed up on one line.
ITEM_ROWS = 30
#: More alike steps than this (same task, parents and children) are drawn as one box.
FOLD_ALIKE = 20
#: A map with at most this many items lists them all in the steps table.
SMALL_MAP = 10
#: Longest task name shown whole in the steps table (the full name is its tooltip).
TASK_CHARS = 48
#: Characters that fit on a box's lines (11-12 px text in NODE_WIDTH).
NAME_CHARS = 28
DETAIL_CHARS = 33
#: Step states in the order they are told (counts, bars, table).
STATES = ("failed", "running", "queued", "waiting", "cancelled", "succeeded")
_BAR_ORDER = ("succeeded", "failed", "cancelled", "running", "queued", "waiting")


@lru_cache(maxsize=16)
def _store(schema: str) -> WorkflowStore:
    return WorkflowStore(schema)


@lru_cache(maxsize=16)
def _edges_sql(schema: str) -> str:
    # The graph's edges, by the workflow_edges_workflow index. Not data: an
    # ``after=`` edge (order only).
    return (
        "SELECT parent_id, child_id, data "
        f"FROM {quote_schema(schema)}.workflow_edges WHERE workflow_id = $1"
    )


# -- the list ---------------------------------------------------------------------------


async def load_list(view: View) -> dict[str, Any]:
    state = view.arg("state")
    if state and state not in {str(s) for s in WorkflowState}:
        raise BadRequest(f"state must be one of {', '.join(WorkflowState)}, got {state!r}")
    name = view.arg("name")
    before = view.int_arg("before")
    found = await view.core.app.workflows.listing(
        state=state or None, name=name or None, before_id=before, limit=PAGE_SIZE + 1
    )
    more = len(found) > PAGE_SIZE
    found = found[:PAGE_SIZE]
    return {
        "title": "Workflows",
        "workflows": [_list_row(w) for w in found],
        "state": state,
        "name": name,
        "before": before,
        "states": [str(s) for s in WorkflowState],
        "older": found[-1].id if more else None,
    }


def _list_row(w: WorkflowStatus) -> dict[str, Any]:
    counts = {s: w.counts.get(s, 0) for s in STATES if w.counts.get(s, 0)}
    return {
        "id": w.id,
        "name": w.name,
        "state": str(w.state),
        "cancel_requested": w.cancel_requested,
        "total": w.total,
        "counts": counts,
        "bar": _bar(counts, 100.0),
        "created_at": w.created_at,
        "finished_at": w.finished_at,
        "took": (w.finished_at - w.created_at) if w.finished_at else None,
    }


# -- one workflow -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Node:
    key: str
    name: str
    job_id: int
    state: str
    label: str
    detail: str
    title: str
    counts: dict[str, int]


async def load_one(view: View) -> dict[str, Any]:
    workflow_id: int = view.params["id"]
    if not is_bigint(workflow_id):
        raise NotFound(f"There is no workflow {workflow_id}.")
    store = _store(view.core.schema)
    async with (
        view.core.database.acquire("reading a workflow for the dashboard") as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        row = await store.get(conn, workflow_id)
        if row is None:
            raise NotFound(f"There is no workflow {workflow_id}.")
        step_rows = await store.steps(conn, workflow_id)
        edge_rows = await conn.fetch(_edges_sql(view.core.schema), workflow_id)
    status = status_from_rows(row, step_rows)
    nodes, edges, table = _graph_parts(status.steps, edge_rows)
    drawn = layout([n.key for n in nodes], [(s, t) for s, t, _ in edges])
    after = {(s, t) for s, t, data in edges if not data}
    by_key = {n.key: n for n in nodes}
    graph = {
        "width": drawn.width,
        "height": drawn.height,
        "nodes": [
            {
                **vars(by_key[key]),
                "x": box.x,
                "y": box.y,
                "bar": _bar(by_key[key].counts, NODE_WIDTH - 16) if by_key[key].counts else [],
            }
            for key, box in drawn.boxes.items()
        ],
        "edges": [{"d": e.d, "after": (e.source, e.target) in after} for e in drawn.edges],
        "node_width": NODE_WIDTH,
        "node_height": NODE_HEIGHT,
    }
    counts = {s: status.counts.get(s, 0) for s in STATES if status.counts.get(s, 0)}
    return {
        "title": f"Workflow {status.id} · {status.name}",
        "wf": status,
        "state": str(status.state),
        "counts": counts,
        "running": status.state is WorkflowState.RUNNING,
        "retryable": status.state is not WorkflowState.RUNNING
        and bool(status.counts.get("failed") or status.counts.get("cancelled")),
        "took": (status.finished_at - status.created_at) if status.finished_at else None,
        "graph": graph,
        "has_after": bool(after),
        "rows": table,
    }


def _graph_parts(
    steps: list[StepStatus], edge_rows: list[Any]
) -> tuple[list[_Node], list[tuple[str, str, bool]], list[dict[str, Any]]]:
    """The boxes, the edges between them and the rows of the steps table.

    A map's items are folded into the map's box; so are alike steps (the
    same task, the same parents and children: ``[wf.add(fetch, url=u) for u
    in urls]``) when there are more than ``FOLD_ALIKE`` of them.
    """
    maps = {s.job_id for s in steps if s.kind == "map"}
    members: dict[str, list[StepStatus]] = defaultdict(list)
    base: dict[int, str] = {}
    for s in steps:
        item = s.map_of is not None and s.map_of in maps
        base[s.job_id] = str(s.map_of) if item else str(s.job_id)
        if item:
            members[str(s.map_of)].append(s)
    parents: dict[str, set[str]] = defaultdict(set)
    children: dict[str, set[str]] = defaultdict(set)
    for r in edge_rows:
        source, target = base.get(r["parent_id"]), base.get(r["child_id"])
        if source is not None and target is not None and source != target:
            parents[target].add(source)
            children[source].add(target)
    alike: dict[tuple[str, frozenset[str], frozenset[str]], list[StepStatus]] = defaultdict(list)
    for s in steps:
        key = str(s.job_id)
        if s.kind == "task" and base[s.job_id] == key:
            alike[(s.task, frozenset(parents[key]), frozenset(children[key]))].append(s)
    box_of = dict(base)
    for group in alike.values():
        if len(group) > FOLD_ALIKE:
            key = f"g{group[0].job_id}"
            members[key] = group
            for s in group:
                box_of[s.job_id] = key

    nodes: list[_Node] = []
    table: list[dict[str, Any]] = []
    drawn: set[str] = set()
    for s in steps:
        key = box_of[s.job_id]
        if key in drawn:
            continue
        drawn.add(key)
        if key.startswith("g"):
            group = members[key]
            node = _group_node(key, group)
            nodes.append(node)
            row = _table_row(group[0], count=len(group))
            table.append({**row, "kind": "group", "name": node.label, "state": node.state})
            table.extend(_member_rows(node.label, group[0].job_id, group))
        elif key != str(s.job_id):
            continue  # an item whose map is drawn (maps come before their items)
        elif s.kind == "map":
            mine = sorted(members.get(key, []), key=lambda i: i.position or 0)
            node = _map_node(s, mine)
            nodes.append(node)
            table.append({**_table_row(s, count=len(mine)), "state": node.state})
            table.extend(_member_rows(s.name, s.job_id, mine))
        else:
            nodes.append(_step_node(s))
            table.append(_table_row(s))
    edges: dict[tuple[str, str], bool] = {}
    for r in edge_rows:
        source, target = box_of.get(r["parent_id"]), box_of.get(r["child_id"])
        if source is None or target is None or source == target:
            continue  # a purged step, or an item and its own map
        edges[(source, target)] = edges.get((source, target), False) or bool(r["data"])
    return nodes, [(s, t, data) for (s, t), data in edges.items()], table


def _group_node(key: str, group: list[StepStatus]) -> _Node:
    counts = Counter(str(s.state) for s in group)
    ordered = {k: counts[k] for k in STATES if counts[k]}
    # Colour: what is still moving first, then the worst outcome.
    state = next(
        k for k in ("running", "queued", "waiting", "failed", "cancelled", "succeeded") if counts[k]
    )
    first, last = group[0], group[-1]
    label = f"{first.name} … {last.name}"
    title = f"{label}: {len(group)} steps of task {first.task} with the same parents and children"
    title += " (" + ", ".join(f"{n} {k}" for k, n in ordered.items()) + ")"
    return _Node(
        key=key,
        name=label,
        job_id=first.job_id,
        state=state,
        label=_cut(label, NAME_CHARS),
        detail=_cut(", ".join(f"{n} {k}" for k, n in ordered.items()), DETAIL_CHARS),
        title=title,
        counts=ordered,
    )


def _step_node(s: StepStatus) -> _Node:
    state = str(s.state)
    detail = state
    if s.attempts > 1 or (s.state is JobState.RUNNING and s.max_attempts > 1):
        detail += f" · attempt {s.attempts}/{s.max_attempts}"
    error = _error_text(s.error)
    if error and s.state in (JobState.FAILED, JobState.CANCELLED):
        detail += f" · {(s.error or {}).get('type', '')}".rstrip(" ·")
    title = f"{s.name}: {state} (task {s.task}, queue {s.queue}, job {s.job_id})"
    if error:
        title += f"\n{error}"
    return _Node(
        key=str(s.job_id),
        name=s.name,
        job_id=s.job_id,
        state=state,
        label=_cut(s.name, NAME_CHARS),
        detail=_cut(detail, DETAIL_CHARS),
        title=title,
        counts={},
    )


def _map_node(s: StepStatus, mine: list[StepStatus]) -> _Node:
    counts = Counter(str(i.state) for i in mine)
    ordered = {k: counts[k] for k in STATES if counts[k]}
    if s.state.finished or not mine:
        state = str(s.state)
    else:
        # The map's own row waits while its items run: colour it by them.
        state = next((k for k in ("running", "queued") if counts[k]), str(s.state))
    if mine:
        label = f"{s.name}[0..{len(mine) - 1}]"
        detail = ", ".join(f"{n} {k}" for k, n in ordered.items())
    else:
        label = f"{s.name}[…]"
        detail = f"map · {s.state}" if s.state.finished else "map · waiting for its list"
    title = f"{label}: {state}; map of task {s.task} over {len(mine)} items"
    if ordered:
        title += " (" + ", ".join(f"{n} {k}" for k, n in ordered.items()) + ")"
    error = _error_text(s.error)
    if error:
        title += f"\n{error}"
    return _Node(
        key=str(s.job_id),
        name=s.name,
        job_id=s.job_id,
        state=state,
        label=_cut(label, NAME_CHARS),
        detail=_cut(detail, DETAIL_CHARS),
        title=title,
        counts=ordered,
    )


def _table_row(s: StepStatus, *, count: int | None = None, item: bool = False) -> dict[str, Any]:
    return {
        "kind": "item" if item else s.kind,
        "name": s.name,
        "job_id": s.job_id,
        "task": s.task,
        # The end of a long task name tells it apart (the module path is shared).
        "task_tail": s.task if len(s.task) <= TASK_CHARS else "…" + s.task[-(TASK_CHARS - 1) :],
        "queue": s.queue,
        "state": str(s.state),
        "attempts": s.attempts,
        "max_attempts": s.max_attempts,
        "parents": () if item else s.parents,  # a member has its box's parents
        "started_at": s.started_at,
        "finished_at": s.finished_at,
        "took": (s.finished_at - s.started_at) if s.finished_at and s.started_at else None,
        "error": _error_text(s.error),
        "item_count": count,
        "more": None,
    }


def _member_rows(name: str, job_id: int, mine: list[StepStatus]) -> list[dict[str, Any]]:
    """A box's members (a map's items, a group's steps) worth a line, and one
    line summing up the rest.

    A small map lists every item; a big one only those that did not succeed
    (failed first), at most ``ITEM_ROWS``: 500 green lines tell nothing.
    """
    if len(mine) <= SMALL_MAP:
        shown = list(mine)
    else:
        rank = {state: i for i, state in enumerate(STATES)}
        unusual = [i for i in mine if i.state is not JobState.SUCCEEDED]
        shown = sorted(unusual, key=lambda i: (rank.get(str(i.state), 0), i.position or 0))
        shown = sorted(shown[:ITEM_ROWS], key=lambda i: i.position or 0)
    rows = [_table_row(i, item=True) for i in shown]
    left = Counter(str(i.state) for i in mine) - Counter(str(i.state) for i in shown)
    if left:
        rows.append(
            {
                "kind": "more",
                "name": name,
                "job_id": job_id,
                "more": ", ".join(f"{left[k]} {k}" for k in STATES if left[k]),
                "count": sum(left.values()),
            }
        )
    return rows


def _error_text(error: dict[str, Any] | None) -> str:
    if not error:
        return ""
    kind, message = error.get("type", ""), error.get("message", "")
    return f"{kind}: {message}" if kind and message else str(kind or message)


def _bar(counts: dict[str, int], width: float) -> list[dict[str, Any]]:
    """Segments of a horizontal bar of step states (x and width in user units)."""
    total = sum(counts.values())
    if not total:
        return []
    out, x = [], 0.0
    for state in _BAR_ORDER:
        n = counts.get(state, 0)
        if n:
            w = width * n / total
            out.append({"state": state, "x": round(x, 2), "w": round(w, 2), "n": n})
            x += w
    return out


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- actions ----------------------------------------------------------------------------


async def cancel(form: Form) -> Done:
    workflow_id: int = form.params["id"]
    here = f"/workflows/{workflow_id}"
    if await form.core.app.get_workflow(workflow_id).cancel():
        return Done(
            here,
            f"Workflow {workflow_id} cancelled: its steps that had not started will not run, "
            "and its running steps were told to stop.",
        )
    return Done(here, f"Workflow {workflow_id} had already ended: nothing to cancel.", ok=False)


async def retry(form: Form) -> Done:
    workflow_id: int = form.params["id"]
    here = f"/workflows/{workflow_id}"
    run = form.core.app.get_workflow(workflow_id)
    count = await run.retry()
    if count:
        steps = "step" if count == 1 else "steps"
        return Done(
            here,
            f"Workflow {workflow_id}: {count} failed or cancelled {steps} will run again; "
            "the steps that succeeded keep their results.",
        )
    status = await run.status(steps=False)
    if status.state is WorkflowState.RUNNING:
        return Done(
            here,
            f"Workflow {workflow_id} is still running: retry it once it has ended.",
            ok=False,
        )
    return Done(here, f"Workflow {workflow_id} has no failed or cancelled step to retry.", ok=False)


PAGES = [
    Page(
        "/workflows",
        "workflows.html",
        load_list,
        nav="workflows",
        regions={"list": "workflows_list.html"},
    ),
    Page(
        "/workflows/{id:int}",
        "workflow.html",
        load_one,
        nav="workflows",
        regions={
            "summary": "workflow_summary.html",
            "graph": "workflow_graph.html",
            "steps": "workflow_steps.html",
        },
    ),
]
ACTIONS = [
    Action("/workflows/{id:int}/cancel", cancel),
    Action("/workflows/{id:int}/retry", retry),
]
