"""``retry``, ``cancel`` and ``purge``: the commands that change jobs, by id or by filter."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio

from .. import _admin
from .._admin import FINISHED_STATES, LIVE_STATES, RETRYABLE_STATES, Matched, RetryResult
from .._app import App
from .connect import app_for, opened
from .exits import EXIT_ERROR, EXIT_NOT_FOUND, EXIT_OK, UsageError
from .options import (
    Commands,
    db_options,
    json_option,
    parse_duration,
    positive_int,
    queue_name,
    task_name,
)
from .output import Progress, error, plural, print_json, when


def add_parsers(commands: Commands) -> None:
    """``retry``, ``cancel`` and ``purge``, in that order."""
    retry = commands.add_parser(
        "retry",
        help="run failed (or cancelled) jobs again with a fresh attempt budget",
        description="retry ID [ID ...] | retry --all | retry [--queue Q] [--task T]",
    )
    retry.add_argument("ids", nargs="*", type=positive_int, metavar="ID", help="job ids")
    retry.add_argument("--all", action="store_true", help="every failed job")
    retry.add_argument("--queue", type=queue_name, help="failed jobs of this queue")
    retry.add_argument("--task", type=task_name, help="failed jobs of this task")
    retry.add_argument(
        "--state",
        action="append",
        choices=RETRYABLE_STATES,
        help="which finished jobs to take (repeatable; default: failed, "
        "or failed and cancelled for named ids)",
    )
    retry.add_argument(
        "--dry-run", action="store_true", help="print how many jobs would be retried"
    )
    json_option(retry)
    db_options(retry)
    retry.set_defaults(handler=cmd_retry)

    cancel = commands.add_parser(
        "cancel",
        help="cancel queued jobs and stop running ones",
        description="cancel ID [ID ...] | cancel [--queue Q] [--task T] [--state queued|running]",
    )
    cancel.add_argument("ids", nargs="*", type=positive_int, metavar="ID", help="job ids")
    cancel.add_argument("--queue", type=queue_name, help="live jobs of this queue")
    cancel.add_argument("--task", type=task_name, help="live jobs of this task")
    cancel.add_argument(
        "--state",
        action="append",
        choices=LIVE_STATES,
        help="only waiting workflow steps, queued or running jobs (repeatable; default all)",
    )
    cancel.add_argument(
        "--dry-run", action="store_true", help="print how many jobs would be cancelled"
    )
    json_option(cancel)
    db_options(cancel)
    cancel.set_defaults(handler=cmd_cancel)

    purge = commands.add_parser(
        "purge",
        help="delete finished jobs from history",
        description="Delete finished jobs (default: succeeded and cancelled) from history. "
        "Without --older-than, or with --state failed, it needs --yes.",
    )
    purge.add_argument(
        "--older-than",
        type=parse_duration,
        metavar="DURATION",
        help="only jobs that finished longer ago than this, e.g. 7d, 12h, 30m",
    )
    purge.add_argument(
        "--state",
        action="append",
        choices=FINISHED_STATES,
        help="which finished jobs (repeatable; default succeeded and cancelled)",
    )
    purge.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="confirm deleting without --older-than or failed jobs",
    )
    purge.add_argument("--dry-run", action="store_true", help="print how many would be deleted")
    json_option(purge)
    db_options(purge)
    purge.set_defaults(handler=cmd_purge)


def _scope(queue: str | None, task: str | None) -> str:
    parts = [f"queue {queue!r}" if queue else "", f"task {task!r}" if task else ""]
    text = " and ".join(p for p in parts if p)
    return f" of {text}" if text else ""


def _not_found(app: App, ids: Sequence[int]) -> None:
    for i in ids:
        error(f"no job with id {i} in schema {app.schema!r}")


# -- retry -----------------------------------------------------------------------------


async def cmd_retry(args: argparse.Namespace) -> int:
    bulk = args.all or args.queue is not None or args.task is not None
    if args.ids and bulk:
        raise UsageError("give job ids, or --all / --queue / --task, not both")
    if not args.ids and not bulk:
        raise UsageError("retry needs job ids, --all, or --queue/--task")
    if args.all and (args.queue is not None or args.task is not None):
        raise UsageError("--all takes no --queue or --task (they narrow the selection)")
    # Named jobs: failed or cancelled, like Job.retry(); a bulk retry takes
    # failed jobs (dead letters) unless --state says otherwise.
    states = list(dict.fromkeys(args.state or ([] if bulk else RETRYABLE_STATES)))
    states = states or ["failed"]
    app = app_for(args)
    async with opened(app, args):
        if args.ids:
            return await _retry_ids(app, args, states)
        return await _retry_bulk(app, args, states)


async def _retry_ids(app: App, args: argparse.Namespace, states: list[str]) -> int:
    if args.dry_run:
        matched = await _admin.count_retry(app.database, app.schema, ids=args.ids, states=states)
        return _dry_run_retry(args, matched, f"of the {plural(len(set(args.ids)), 'named job')}")
    progress = Progress("retrying")
    try:
        result = await _admin.retry_ids(
            app.database, app.schema, args.ids, states=states, progress=progress
        )
    finally:
        progress.close()
    if args.json:
        print_json({"matched": len(result.retried) + len(result.key_held), **result.to_dict()})
    else:
        _retry_summary(result)
        for job_id, state in result.skipped.items():
            print(
                f"job {job_id}: not retried: its state is {state} "
                f"(retry takes {' or '.join(states)} jobs)"
            )
        _not_found(app, result.not_found)
    return EXIT_NOT_FOUND if result.not_found else EXIT_OK


async def _retry_bulk(app: App, args: argparse.Namespace, states: list[str]) -> int:
    matched = await _admin.count_retry(
        app.database, app.schema, states=states, queue=args.queue, task=args.task
    )
    what = f"{'/'.join(states)} jobs{_scope(args.queue, args.task)}"
    if args.dry_run:
        return _dry_run_retry(args, matched, what)
    if not matched.count:
        if args.json:
            empty = RetryResult(steps_skipped=matched.steps, workflows=list(matched.workflows))
            print_json({"matched": 0, **empty.to_dict()})
        else:
            print(f"no {what} to retry")
            _steps_note(matched.steps, list(matched.workflows))
        return EXIT_OK
    progress = Progress("retrying")
    try:
        result = await _admin.retry_matching(
            app.database,
            app.schema,
            states=states,
            queue=args.queue,
            task=args.task,
            last_id=matched.last_id,
            total=matched.count,
            progress=progress,
        )
    finally:
        progress.close()
    if args.json:
        print_json({"matched": len(result.retried) + len(result.key_held), **result.to_dict()})
    else:
        _retry_summary(result)
    return EXIT_OK


def _dry_run_retry(args: argparse.Namespace, matched: Matched, what: str) -> int:
    if args.json:
        print_json(
            {
                "dry_run": True,
                "matched": matched.count,
                "key_held": matched.key_held,
                "workflow_steps": matched.steps,
            }
        )
        return EXIT_OK
    print(f"would retry {plural(matched.count, 'job')} ({what})")
    if matched.key_held:
        print(
            f"{plural(matched.key_held, 'job')} of them would stay in history: their unique "
            "key is held by a live job (or by another of the jobs retried)"
        )
    _steps_note(matched.steps, list(matched.workflows), would=True)
    return EXIT_OK


def _retry_summary(result: RetryResult) -> None:
    print(f"retried {plural(len(result.retried), 'job')}")
    if result.key_held:
        held = ", ".join(map(str, result.key_held[:20]))
        more = " ..." if len(result.key_held) > 20 else ""
        print(
            f"not retried: {plural(len(result.key_held), 'job')} whose unique key a live job "
            f"holds (they stay in history): {held}{more}"
        )
    _steps_note(result.steps_skipped, result.workflows)


def _steps_note(steps: int, workflows: list[int], *, would: bool = False) -> None:
    """Why workflow steps were left alone, and the command that retries them."""
    if not steps:
        return
    shown = ", ".join(map(str, workflows[:10])) + (" ..." if len(workflows) > 10 else "")
    verb = "would be skipped" if would else "skipped"
    print(
        f"{verb}: {plural(steps, 'workflow step')} (a step runs again with its workflow, "
        f"which also runs the steps that depend on it: python -m taskq workflows retry ID; "
        f"{'workflow' if len(workflows) == 1 else 'workflows'} {shown})"
    )


# -- cancel ----------------------------------------------------------------------------


async def cmd_cancel(args: argparse.Namespace) -> int:
    bulk = args.queue is not None or args.task is not None
    if args.ids and bulk:
        raise UsageError("give job ids, or --queue / --task, not both")
    if not args.ids and not bulk:
        raise UsageError("cancel needs job ids, or --queue and/or --task")
    if args.ids and args.state:
        raise UsageError(
            "--state applies to --queue / --task; named jobs are cancelled as they are"
        )
    states = list(dict.fromkeys(args.state or LIVE_STATES))
    app = app_for(args)
    async with opened(app, args):
        if args.dry_run:
            matched = await _admin.count_cancel(
                app.database,
                app.schema,
                ids=args.ids or None,
                queue=args.queue,
                task=args.task,
                states=states,
            )
            if args.json:
                print_json(
                    {
                        "dry_run": True,
                        "queued": matched.queued,
                        "running": matched.running,
                        "waiting": matched.waiting,
                        "workflow_steps": matched.steps,
                    }
                )
            else:
                print(
                    f"would cancel {plural(matched.queued, 'queued job')} and ask the workers "
                    f"of {plural(matched.running, 'running job')} to stop them"
                )
                if matched.steps:
                    print(
                        f"{plural(matched.steps, 'workflow step')} of the queued ones "
                        f"({matched.waiting:,} waiting for their parents) would be cancelled "
                        "with the steps that depend on them"
                    )
            return EXIT_OK
        if args.ids:
            result = await _admin.cancel_ids(app.database, app.schema, args.ids)
        else:
            progress = Progress("cancelling")
            try:
                result = await _admin.cancel_matching(
                    app.database,
                    app.schema,
                    queue=args.queue,
                    task=args.task,
                    states=states,
                    progress=progress,
                )
            finally:
                progress.close()
    if args.json:
        print_json(result.to_dict())
    else:
        print(
            f"cancelled {plural(len(result.cancelled), 'queued job')}; asked the workers of "
            f"{plural(len(result.requested), 'running job')} to stop them"
        )
        if result.waiting:
            print(f"{plural(len(result.waiting), 'workflow step')} of them waited for parents")
        if result.descendants:
            print(
                f"{plural(len(result.descendants), 'workflow step')} that depended on them "
                "ended with them (see python -m taskq workflows show ID)"
            )
        for job_id, state in result.finished.items():
            print(f"job {job_id}: not cancelled: it has already finished ({state})")
        _not_found(app, result.not_found)
    return EXIT_NOT_FOUND if result.not_found else EXIT_OK


# -- purge -----------------------------------------------------------------------------


def _confirm(question: str) -> bool:
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


async def cmd_purge(args: argparse.Namespace) -> int:
    states = list(dict.fromkeys(args.state or ["succeeded", "cancelled"]))
    risky = []
    if args.older_than is None:
        risky.append("of any age (no --older-than)")
    if "failed" in states:
        risky.append("including failed jobs (dead letters)")
    interactive = sys.stdin.isatty()
    if risky and not args.yes and not args.dry_run and not interactive:
        # CI and scripts: never wait on a prompt nobody can answer.
        raise UsageError(
            f"purge would delete {'/'.join(states)} jobs {', '.join(risky)}: add --yes to "
            "confirm (stdin is not a terminal, so taskq does not ask); nothing deleted"
        )
    app = app_for(args)
    async with opened(app, args):
        database, schema = app.database, app.schema
        cutoff = await _admin.purge_cutoff(database, schema, args.older_than)
        matched = await _admin.count_purge(database, schema, states=states, finished_before=cutoff)
        what = f"{'/'.join(states)} jobs" + (
            "" if cutoff is None else f" finished before {when(cutoff)} UTC"
        )
        if args.dry_run:
            if args.json:
                print_json({"dry_run": True, "matched": matched.count})
            else:
                print(f"would delete {plural(matched.count, 'job')} ({what})")
            return EXIT_OK
        if not matched.count:
            if args.json:
                print_json({"deleted": 0})
            else:
                print(f"no {what} to delete")
            return EXIT_OK
        if risky and not args.yes:
            question = f"Delete {plural(matched.count, 'job')} ({what})? This cannot be undone."
            if not await anyio.to_thread.run_sync(_confirm, question):
                error("not confirmed; nothing deleted")
                return EXIT_ERROR
        progress = Progress("deleting")
        try:
            deleted = await _admin.purge(
                database,
                schema,
                states=states,
                finished_before=cutoff,
                last_id=matched.last_id,
                total=matched.count,
                progress=progress,
            )
        finally:
            progress.close()
    if args.json:
        print_json({"deleted": deleted})
    else:
        print(f"deleted {plural(deleted, 'job')} ({what})")
    return EXIT_OK
