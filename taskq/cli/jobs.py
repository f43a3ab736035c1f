"""``jobs list``, ``jobs show`` and ``jobs why``: live and finished jobs, one job in full,
and why one is not running."""

from __future__ import annotations

import argparse
import difflib
from typing import Any

from .._admin import (
    ALL_STATES,
    get_job,
    known_tasks,
    list_jobs,
    task_in_history,
    why_not_running,
)
from .._app import App
from .connect import app_for, opened
from .exits import EXIT_OK, UsageError
from .options import Commands, db_options, json_option, positive_int, queue_name, task_name
from .output import iso, json_text, plural, print_json, print_table, when


def add_parser(commands: Commands) -> None:
    jobs = commands.add_parser("jobs", help="list jobs, or show one in full")
    actions = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="live and finished jobs, newest first")
    listing.add_argument(
        "--state",
        action="append",
        choices=ALL_STATES,
        help="only jobs in this state (repeatable; default all; waiting: workflow steps "
        "whose parent steps have not all ended)",
    )
    listing.add_argument("--queue", type=queue_name, help="only jobs of this queue")
    listing.add_argument(
        "--task",
        type=task_name,
        help="only jobs of this task: its full name, or the part after the last dot when "
        "only one known task ends with it (e.g. store for myapp.jobs.store)",
    )
    listing.add_argument(
        "--limit", type=positive_int, default=50, help="most jobs listed (default 50)"
    )
    json_option(listing)
    db_options(listing)
    listing.set_defaults(handler=cmd_jobs_list)
    show = actions.add_parser("show", help="one job: args, attempts, error, result, meta")
    show.add_argument("id", type=positive_int, help="the job id")
    json_option(show)
    db_options(show)
    show.set_defaults(handler=cmd_jobs_show)
    why = actions.add_parser(
        "why", help="why a job is not running: every reason that holds now, most important first"
    )
    why.add_argument("id", type=positive_int, help="the job id")
    json_option(why)
    db_options(why)
    why.set_defaults(handler=cmd_jobs_why)


async def cmd_jobs_list(args: argparse.Namespace) -> int:
    app = app_for(args)
    states = args.state or list(ALL_STATES)
    async with opened(app, args):
        task = None if args.task is None else await resolve_task(app, args.task)
        jobs = await list_jobs(
            app.database, app.schema, states=states, queue=args.queue, task=task, limit=args.limit
        )
    if args.json:
        print_json([j.to_dict() for j in jobs])
        return EXIT_OK
    if not jobs:
        print("no jobs")
        return EXIT_OK
    # The workflow column only when a listed job is a workflow step.
    steps = any(j.status.workflow_id is not None for j in jobs)
    rows = []
    for j in jobs:
        s = j.status
        row = [
            str(s.id),
            str(s.state),
            s.queue,
            s.task,
            f"{s.attempts}/{s.max_attempts}",
            when(s.enqueued_at),
            when(s.finished_at) if s.state.finished else "-",
        ]
        if steps:
            row.append(step_label(s.workflow_id, s.step))
        rows.append([*row, _short_error(s.error)])
    headers = ["id", "state", "queue", "task", "attempts", "enqueued", "finished"]
    print_table([*headers, *(["workflow"] if steps else []), "error"], rows, right=(0,))
    return EXIT_OK


def names_text(names: list[str], most: int = 5) -> str:
    """``'a', 'b' and 3 more`` (step names), or ``-``."""
    shown = ", ".join(map(repr, names[:most]))
    return (shown + (f" and {len(names) - most} more" if len(names) > most else "")) or "-"


def step_label(workflow_id: int | None, step: str | None) -> str:
    """``7:merge`` (workflow id, step name) for a workflow step, else ``-``."""
    return "-" if workflow_id is None else f"{workflow_id}:{step}"


async def cmd_jobs_show(args: argparse.Namespace) -> int:
    app = app_for(args)
    async with opened(app, args):
        detail = await get_job(app.database, app.schema, args.id)
    if args.json:
        print_json(detail.to_dict())
        return EXIT_OK
    s = detail.status
    state = str(s.state)
    if detail.cancel_requested:
        state += " (cancel requested)"
    fields = [
        ("state", state),
        ("task", s.task),
        ("queue", s.queue),
        ("priority", str(s.priority)),
        ("attempts", f"{s.attempts} of {s.max_attempts}"),
        ("rescues", str(detail.rescues)),
        ("args", json_text(s.args)),
        ("unique key", s.unique_key or "-"),
        ("meta", json_text(s.meta) if s.meta else "-"),
        ("enqueued at", iso(s.enqueued_at)),
        ("run at", iso(s.run_at)),
        ("started at", iso(s.started_at)),
        ("finished at", iso(s.finished_at)),
        ("worker", s.worker_id or "-"),
        ("progress", _progress_text(s.progress)),
    ]
    if s.workflow_id is not None:
        # After the state: what the job is part of, and what it waits for.
        fields.insert(1, ("workflow", f"{s.workflow_id} (step {s.step!r})"))
        if detail.waiting_for is not None:
            fields.insert(2, ("waiting for", names_text(detail.waiting_for)))
    if s.state.finished:
        fields.append(("result", json_text(s.result) if s.state == "succeeded" else "-"))
    if s.error:
        fields.append(("error", f"{s.error.get('type')}: {s.error.get('message')}"))
    print(f"job {s.id}")
    for name, value in fields:
        print(f"  {name:<12} {value}")
    traceback = (s.error or {}).get("traceback")
    if traceback:
        print("  traceback:")
        for line in str(traceback).rstrip("\n").splitlines():
            print(f"    {line}")
    if s.errors:
        # One line per attempt, oldest first; --json has their tracebacks.
        print(f"  errors of the last {plural(len(s.errors), 'attempt')}:")
        for e in s.errors:
            text = f"{e.get('type')}: {e.get('message')}".replace("\n", " ")
            print(f"    attempt {e.get('attempt')}  {e.get('at') or '-'}  {text}")
    return EXIT_OK


async def cmd_jobs_why(args: argparse.Namespace) -> int:
    app = app_for(args)
    async with opened(app, args):
        explained = await why_not_running(app.database, app.schema, args.id)
    if args.json:
        print_json(explained.to_dict())
        return EXIT_OK
    print(f"job {explained.job_id} is {explained.state}:")
    for reason in explained.reasons:
        print(f"  {reason.code}: {reason.message}")
    return EXIT_OK


def _progress_text(progress: dict[str, Any] | None) -> str:
    """``40% copying files (at 2024-...)``, or ``-``."""
    if not progress:
        return "-"
    parts = []
    fraction = progress.get("fraction")
    if isinstance(fraction, int | float):
        parts.append(f"{fraction:.0%}")
    if progress.get("message"):
        parts.append(str(progress["message"]))
    if progress.get("at"):
        parts.append(f"(at {progress['at']})")
    return " ".join(parts) or "-"


async def resolve_task(app: App, name: str) -> str:
    """The full task name that ``name`` means: itself, or a unique short name.

    Raises UsageError with a suggestion when no known task matches, or when
    a short name fits several tasks.
    """
    known = await known_tasks(app.database, app.schema)
    if name in known:
        return name
    matches = [k for k in known if _short_name(k) == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(
            f"{plural(len(matches), 'task')} are named {name!r} in schema {app.schema!r}: "
            f"{', '.join(map(repr, matches))}; give the full name"
        )
    # A task that only finished jobs remember (e.g. cancelled before any
    # worker ran it) is in neither list; history is asked about it last.
    if await task_in_history(app.database, app.schema, name):
        return name
    raise UsageError(_no_such_task(app.schema, name, known))


def _no_such_task(schema: str, name: str, known: list[str]) -> str:
    message = f"no task named {name!r} in schema {schema!r}"
    by_short: dict[str, list[str]] = {}
    for task in known:
        by_short.setdefault(_short_name(task), []).append(task)
    # The closest full or short name; a short name stands for every task it ends.
    close = difflib.get_close_matches(name, [*known, *by_short], n=1)
    guesses = list(
        dict.fromkeys(
            full for c in close for full in ([c] if c in known else []) + by_short.get(c, [])
        )
    )
    if guesses:
        return f"{message}; did you mean {' or '.join(map(repr, guesses))}?"
    if known:
        shown = ", ".join(map(repr, known[:10])) + (", ..." if len(known) > 10 else "")
        return f"{message} (known tasks: {shown})"
    return f"{message} (no worker has registered a task there yet)"


def _short_name(task: str) -> str:
    """``store`` for ``gjobs.store``: the part after the last dot."""
    return task.rpartition(".")[2]


def _short_error(error: dict[str, Any] | None, width: int = 60) -> str:
    if not error:
        return ""
    text = f"{error.get('type')}: {error.get('message')}".replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"
