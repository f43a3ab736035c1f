"""``workflows list``, ``show``, ``cancel`` and ``retry``: workflows and their steps."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from .._app import App
from .._errors import WorkflowNotFound
from .._job import JobState
from .._workflow_run import StepStatus, WorkflowState, WorkflowStatus
from .connect import app_for, opened
from .exits import EXIT_NOT_FOUND, EXIT_OK
from .options import Commands, db_options, json_option, positive_int
from .output import age, error, plural, print_json, print_table, when

#: ``workflows show`` folds a run of more than this many alike steps (same
#: state, nothing to tell apart: no error, no children) into one line,
#: unless ``--all``: a map of 500 items stays a screen long.
FOLD_AFTER = 5
#: ``workflows list`` shows this many workflows when ``--limit`` is not given.
DEFAULT_LIMIT = 50
#: Widest error text on a step's line (``--json`` has it whole).
ERROR_WIDTH = 80
#: Most parent names on an ``(also after: ...)`` note.
NOTE_NAMES = 3

T = TypeVar("T")

_LIST_HEADERS = [
    "id",
    "name",
    "state",
    "steps",
    "succeeded/failed/cancelled",
    "pending",
    "created",
    "finished",
]
_WORKFLOW_STATES = [str(s) for s in WorkflowState]
# States whose alike runs fold; failed and running steps always show.
_FOLDING = (JobState.SUCCEEDED, JobState.CANCELLED, JobState.QUEUED, JobState.WAITING)


def add_parser(commands: Commands) -> None:
    workflows = commands.add_parser(
        "workflows", help="list workflows, show one's steps, cancel or retry one"
    )
    actions = workflows.add_subparsers(dest="workflows_command", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="workflows, newest first, with step counts")
    listing.add_argument(
        "--state", choices=_WORKFLOW_STATES, help="only workflows in this state (default all)"
    )
    listing.add_argument("--name", help="only workflows of this name (Workflow(name=...))")
    listing.add_argument(
        "--limit",
        type=positive_int,
        default=DEFAULT_LIMIT,
        help=f"most workflows listed (default {DEFAULT_LIMIT})",
    )
    listing.add_argument(
        "--before",
        type=positive_int,
        metavar="ID",
        help="the page after this id: workflows with smaller ids (the last id of a page)",
    )
    json_option(listing)
    db_options(listing)
    listing.set_defaults(handler=cmd_workflows_list)

    show = actions.add_parser(
        "show", help="one workflow: its counts, then its steps as a tree with their errors"
    )
    show.add_argument("id", type=positive_int, help="the workflow id")
    show.add_argument(
        "--all",
        action="store_true",
        help=f"every step on its own line (default: runs of more than {FOLD_AFTER} alike "
        "steps, e.g. a map's succeeded items, are folded into one line)",
    )
    json_option(show)
    db_options(show)
    show.set_defaults(handler=cmd_workflows_show)

    cancel = actions.add_parser(
        "cancel", help="cancel a running workflow: its steps that have not started never run"
    )
    cancel.add_argument("id", type=positive_int, help="the workflow id")
    json_option(cancel)
    db_options(cancel)
    cancel.set_defaults(handler=cmd_workflows_cancel)

    retry = actions.add_parser(
        "retry", help="run an ended workflow's failed and cancelled steps again"
    )
    retry.add_argument("id", type=positive_int, help="the workflow id")
    json_option(retry)
    db_options(retry)
    retry.set_defaults(handler=cmd_workflows_retry)


# -- list ------------------------------------------------------------------------------


async def cmd_workflows_list(args: argparse.Namespace) -> int:
    app = app_for(args)
    async with opened(app, args):
        found = await app.workflows.listing(
            state=args.state, name=args.name, before_id=args.before, limit=args.limit
        )
    if args.json:
        print_json([_list_item(w) for w in found])
        return EXIT_OK
    if not found:
        print("no workflows" + (" before that id" if args.before else ""))
        return EXIT_OK
    print_table(
        _LIST_HEADERS,
        [
            [
                str(w.id),
                w.name,
                _state_text(w),
                str(w.total),
                f"{w.counts['succeeded']}/{w.counts['failed']}/{w.counts['cancelled']}",
                str(_pending(w)),
                when(w.created_at),
                when(w.finished_at),
            ]
            for w in found
        ],
        right=(0, 3, 5),
    )
    if len(found) == args.limit:
        print(f"\nnext page: --before {found[-1].id}")
    return EXIT_OK


def _pending(w: WorkflowStatus) -> int:
    """Steps that have not ended (waiting, queued, running) among those known so far."""
    return max(0, w.total - w.counts["succeeded"] - w.counts["failed"] - w.counts["cancelled"])


def _list_item(w: WorkflowStatus) -> dict[str, Any]:
    # The listing reads one row per workflow, never its steps: the counts of
    # ended steps, and how many are still pending (waiting, queued or running).
    return {
        "id": w.id,
        "name": w.name,
        "state": str(w.state),
        "total": w.total,
        "succeeded": w.counts["succeeded"],
        "failed": w.counts["failed"],
        "cancelled": w.counts["cancelled"],
        "pending": _pending(w),
        "cancel_requested": w.cancel_requested,
        "created_at": w.created_at.isoformat(),
        "finished_at": None if w.finished_at is None else w.finished_at.isoformat(),
        "meta": w.meta,
    }


def _state_text(w: WorkflowStatus) -> str:
    if w.cancel_requested and w.state is WorkflowState.RUNNING:
        return "running (cancel requested)"
    return str(w.state)


# -- show ------------------------------------------------------------------------------


async def cmd_workflows_show(args: argparse.Namespace) -> int:
    app = app_for(args)
    async with opened(app, args):
        status = await _found(app, args.id, app.get_workflow(args.id).status)
    if status is None:
        return EXIT_NOT_FOUND
    if args.json:
        print_json(status.to_dict())
        return EXIT_OK
    now = datetime.now(UTC)
    print(f"workflow {status.id}")
    for name, value in _header(status, now):
        print(f"  {name:<10} {value}")
    if not status.steps:
        print("\nno steps (their jobs were purged from history)")
        return EXIT_OK
    print()
    rows = [_row(line, status.created_at, now) for line in tree_lines(status.steps, args.all)]
    print_table(["step", "state", "attempts", "started", "finished", "took", ""], rows)
    return EXIT_OK


def _header(status: WorkflowStatus, now: datetime) -> list[tuple[str, str]]:
    counts = ", ".join(f"{n} {state}" for state, n in status.counts.items() if n)
    end = status.finished_at
    took = _seconds((end or now) - status.created_at) + ("" if end else " so far")
    return [
        ("name", status.name),
        ("state", _state_text(status)),
        ("steps", f"{status.total}" + (f": {counts}" if counts else "")),
        ("created", f"{when(status.created_at)} UTC"),
        ("finished", "-" if end is None else f"{when(end)} UTC"),
        ("duration", took),
    ]


@dataclass
class Line:
    """One line of the step tree: a step at a depth, or a fold of alike steps."""

    depth: int
    step: StepStatus
    #: For a fold: the steps it stands for (``step`` is the first).
    folded: list[StepStatus] = field(default_factory=list)
    #: The step's other parents (it is drawn under its first).
    also_after: tuple[str, ...] = ()


@dataclass
class _Node:
    step: StepStatus
    children: list[_Node] = field(default_factory=list)
    also_after: tuple[str, ...] = ()


def tree_lines(steps: list[StepStatus], show_all: bool = False) -> list[Line]:
    """The steps as a tree, in order: roots first, each step under its first
    parent (its other parents named), a map's items under the map, then the
    map's children. Runs of more than :data:`FOLD_AFTER` alike leaves fold
    into one line unless ``show_all``."""
    nodes = {s.name: _Node(s) for s in steps}
    by_job = {s.job_id: nodes[s.name] for s in steps}
    roots: list[_Node] = []
    items: dict[int, list[_Node]] = {}
    children: dict[str, list[_Node]] = {}
    for s in steps:
        node = nodes[s.name]
        if s.map_of is not None and s.map_of in by_job:
            items.setdefault(s.map_of, []).append(node)
            continue
        placed = [p for p in s.parents if p in nodes]
        if not placed:
            # A root, or a step whose parents' rows are gone (purged).
            node.also_after = s.parents
            roots.append(node)
            continue
        node.also_after = tuple(p for p in s.parents if p != placed[0])
        children.setdefault(placed[0], []).append(node)
    for node in nodes.values():
        own = sorted(items.get(node.step.job_id, []), key=lambda n: n.step.position or 0)
        node.children = own + children.get(node.step.name, [])
    out: list[Line] = []
    _walk(roots, 0, out, show_all)
    return out


def _walk(siblings: list[_Node], depth: int, out: list[Line], show_all: bool) -> None:
    i = 0
    while i < len(siblings):
        node = siblings[i]
        key = _fold_key(node)
        run = 1
        if key is not None and not show_all:
            while i + run < len(siblings) and _fold_key(siblings[i + run]) == key:
                run += 1
        if run > FOLD_AFTER:
            # The first stays on its own line (its timings as a sample).
            out.append(Line(depth, node.step))
            rest = [n.step for n in siblings[i + 1 : i + run]]
            out.append(Line(depth, rest[0], folded=rest))
            i += run
            continue
        out.append(Line(depth, node.step, also_after=node.also_after))
        _walk(node.children, depth + 1, out, show_all)
        i += 1


def _fold_key(node: _Node) -> tuple[str, str] | None:
    """What alike steps share (state, and a cancelled one's reason); None: never folded."""
    s = node.step
    if node.children or node.also_after or s.state not in _FOLDING:
        return None
    reason = _error_text(s.error, 200) if s.state is JobState.CANCELLED else ""
    return (str(s.state), reason)


def _row(line: Line, created: datetime, now: datetime) -> list[str]:
    indent = "  " * line.depth
    s = line.step
    if line.folded:
        first, last = line.folded[0].name, line.folded[-1].name
        n = len(line.folded)
        note = _error_text(s.error, ERROR_WIDTH) if s.state is JobState.CANCELLED else ""
        return [
            f"{indent}... {n} more {s.state}",
            "",
            "",
            "",
            "",
            "",
            f"({first} to {last})" + (f" {note}" if note else ""),
        ]
    name = f"{indent}{s.name}" + (" (map)" if s.kind == "map" else "")
    notes = []
    if line.also_after:
        names = ", ".join(line.also_after[:NOTE_NAMES])
        more = len(line.also_after) - NOTE_NAMES
        notes.append(f"(also after: {names}{f' and {more} more' if more > 0 else ''})")
    if s.state in (JobState.FAILED, JobState.CANCELLED) and s.error:
        notes.append(_error_text(s.error, ERROR_WIDTH))
    took = "-"
    if s.started_at is not None:
        end = s.finished_at or now
        took = _seconds(end - s.started_at) + ("" if s.finished_at else " so far")
    return [
        name,
        str(s.state),
        f"{s.attempts}/{s.max_attempts}",
        _clock(s.started_at, created),
        _clock(s.finished_at, created),
        took,
        "  ".join(notes),
    ]


def _clock(value: datetime | None, day_of: datetime) -> str:
    """UTC time of day; with the date too when it is not the workflow's first day."""
    if value is None:
        return "-"
    value = value.astimezone(UTC)
    if value.date() == day_of.astimezone(UTC).date():
        return value.strftime("%H:%M:%S")
    return value.strftime("%m-%d %H:%M:%S")


def _seconds(delta: Any) -> str:
    """``0.42s``, ``12.3s``, then ``3m05s``, ``2h10m``."""
    s = max(0.0, delta.total_seconds())
    if s < 10:
        return f"{s:.2f}s"
    if s < 60:
        return f"{s:.1f}s"
    return age(s)


def _error_text(err: dict[str, Any] | None, width: int) -> str:
    if not err:
        return ""
    text = f"{err.get('type')}: {err.get('message')}".replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


# -- cancel and retry -------------------------------------------------------------------


async def cmd_workflows_cancel(args: argparse.Namespace) -> int:
    app = app_for(args)
    async with opened(app, args):
        run = app.get_workflow(args.id)
        cancelled = await _found(app, args.id, run.cancel)
        if cancelled is None:
            return EXIT_NOT_FOUND
        status = await run.status(steps=False)
    if args.json:
        print_json({"id": status.id, "cancelled": cancelled, "state": str(status.state)})
        return EXIT_OK
    head = f"workflow {status.id} ({status.name!r})"
    if not cancelled:
        print(f"{head}: not cancelled: it has already ended ({status.state})")
    elif status.state is WorkflowState.CANCELLED:
        print(f"{head} cancelled: {_ended_counts(status)}")
    else:
        running = status.counts.get("running", 0)
        print(
            f"{head}: cancelling: its steps that had not started are cancelled; asked the "
            f"workers of {plural(running, 'running step')} to stop them (it ends cancelled "
            "when they have)"
        )
    return EXIT_OK


async def cmd_workflows_retry(args: argparse.Namespace) -> int:
    app = app_for(args)
    async with opened(app, args):
        run = app.get_workflow(args.id)
        retried = await _found(app, args.id, run.retry)
        if retried is None:
            return EXIT_NOT_FOUND
        status = await run.status(steps=False)
    if args.json:
        print_json({"id": status.id, "retried": retried, "state": str(status.state)})
        return EXIT_OK
    head = f"workflow {status.id} ({status.name!r})"
    if retried:
        print(
            f"{head}: put {plural(retried, 'failed or cancelled step')} back; they run again "
            "(each once its parents that run again have succeeded); the steps that succeeded "
            "keep their results"
        )
    elif status.state is WorkflowState.RUNNING:
        print(
            f"{head} is still running: nothing retried (retry takes an ended workflow: wait "
            "for it to end, or cancel it first)"
        )
    elif status.state is WorkflowState.SUCCEEDED:
        print(f"{head} succeeded: no failed or cancelled step to run again")
    else:
        print(f"{head} ({status.state}): no failed or cancelled step left in history to run again")
    return EXIT_OK


def _ended_counts(status: WorkflowStatus) -> str:
    c = status.counts
    return f"{c['succeeded']} succeeded, {c['failed']} failed, {c['cancelled']} cancelled"


async def _found(
    app: App, workflow_id: int, action: Callable[[], Coroutine[Any, Any, T]]
) -> T | None:
    """``action()``, or None after the not-found message when there is no such workflow."""
    try:
        return await action()
    except WorkflowNotFound:
        error(f"no workflow with id {workflow_id} in schema {app.schema!r}")
        return None
