"""Retry, cancel and purge: many jobs at once, by id or by filter, in batches.

Bulk operations work in batches of :data:`BATCH_SIZE` jobs, one short
transaction each, walking the primary key in order (``id > last``), so a
batch never re-reads rows that earlier batches deleted and a million-row run
costs one pass over the index. Each run is bounded by the highest matching id
seen when it started: jobs that fail or finish while it runs are left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from .._checkpoints import checkpoints_for
from .jobs import LIVE_STATES
from .statements import AdminStatements, statements

if TYPE_CHECKING:
    from .._database import Database

#: Jobs per statement in bulk retry, cancel and purge.
BATCH_SIZE = 1000

#: States ``retry`` can take a job from.
RETRYABLE_STATES = ("failed", "cancelled")

#: States of the workflow steps that cancel moves to history itself (with
#: cancel_steps(), their descendants with them); running ones are asked to stop.
STEP_CANCEL_STATES = ("waiting", "queued")

#: The error message of workflow steps cancelled by a bulk cancel.
STEP_CANCEL_REASON = "cancelled by an operator (taskq cancel) before it ran"

#: Called after each batch with (jobs done so far, jobs expected in all).
Progress = Callable[[int, int], None]


class _Found(NamedTuple):
    state: str
    live: bool
    workflow_id: int | None


async def _locate(conn: Any, sql: AdminStatements, ids: list[int]) -> dict[int, _Found]:
    """{id: (state, live, workflow_id)} of the jobs that exist among ``ids``."""
    return {
        r["id"]: _Found(r["state"], r["live"], r["workflow_id"])
        for r in await conn.fetch(sql.locate, ids)
    }


def _chunks(ids: Sequence[int], size: int) -> list[list[int]]:
    unique = list(dict.fromkeys(ids))
    return [unique[i : i + size] for i in range(0, len(unique), size)]


# -- retry -----------------------------------------------------------------------


@dataclass
class RetryResult:
    """What a retry did.

    ``retried``: ids back in the queue. ``key_held``: failed or cancelled jobs
    left in history because a live job holds their unique key.
    ``skipped``: named jobs that are not in a state to retry (id -> state).
    ``not_found``: named ids that no job has.
    ``steps_skipped``: failed or cancelled jobs left in history because they
    are workflow steps: a step runs again with its workflow (``workflows retry
    ID``, which also runs the steps that depend on it); ``step_ids`` names
    them (named ids only), ``workflows`` lists their workflows (at most 100).
    """

    retried: list[int] = field(default_factory=list)
    key_held: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    not_found: list[int] = field(default_factory=list)
    steps_skipped: int = 0
    step_ids: list[int] = field(default_factory=list)
    workflows: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "retried": len(self.retried),
            "retried_ids": self.retried,
            "key_held": self.key_held,
            "skipped": [{"id": i, "state": s} for i, s in self.skipped.items()],
            "not_found": self.not_found,
            "workflow_steps": {
                "skipped": self.steps_skipped,
                "ids": self.step_ids,
                "workflows": self.workflows,
            },
        }


@dataclass(frozen=True)
class Matched:
    """How many jobs a bulk command would touch (``--dry-run``, progress totals)."""

    count: int
    #: Of those (retry): jobs whose unique key a live job holds now.
    key_held: int = 0
    #: Of those (cancel): jobs not started yet (workflow steps waiting for
    #: their parents included) and running jobs.
    queued: int = 0
    running: int = 0
    #: The highest matching id now: the end of a bulk run.
    last_id: int = 0
    #: Cancel: of ``queued``, workflow steps waiting for their parents.
    waiting: int = 0
    #: Cancel: of ``queued``, the workflow steps (cancelled with their
    #: descendants). Retry: failed or cancelled workflow steps that match but
    #: are not counted in ``count`` (a step is retried with its workflow),
    #: and their workflows (at most 100).
    steps: int = 0
    workflows: tuple[int, ...] = ()


async def count_retry(
    database: Database,
    schema: str,
    *,
    ids: Sequence[int] | None = None,
    states: Sequence[str] = ("failed",),
    queue: str | None = None,
    task: str | None = None,
) -> Matched:
    """How many finished jobs a retry with these arguments would take."""
    sql = statements(schema)
    async with database.acquire("counting jobs to retry") as conn:
        if ids is not None:
            total = held = steps = 0
            workflows: set[int] = set()
            for chunk in _chunks(ids, BATCH_SIZE):
                row = await conn.fetchrow(sql.count_retry_ids, chunk, list(states))
                total += row["n"]
                held += row["key_held"]
                steps += row["steps"]
                workflows.update(row["workflows"])
            return Matched(total, key_held=held, steps=steps, workflows=tuple(sorted(workflows)))
        row = await conn.fetchrow(sql.count_retry, list(states), queue, task)
    return Matched(
        row["n"],
        key_held=row["key_held"],
        last_id=row["last_id"],
        steps=row["steps"],
        workflows=tuple(sorted(row["workflows"])),
    )


async def retry_ids(
    database: Database,
    schema: str,
    ids: Sequence[int],
    *,
    states: Sequence[str] = RETRYABLE_STATES,
    progress: Progress | None = None,
) -> RetryResult:
    """Re-run the named jobs (those in ``states``) with a fresh attempt budget.

    Workflow steps are left alone and reported (``steps_skipped``).
    """
    sql = statements(schema)
    result = RetryResult()
    chunks = _chunks(ids, BATCH_SIZE)
    total = sum(map(len, chunks))
    done = 0
    for chunk in chunks:
        async with database.acquire("retrying jobs") as conn:
            row = await conn.fetchrow(sql.retry_ids, chunk, list(states), sql.enqueued_channel)
            retried = set(row["retried"])
            held = [i for i in row["matched"] if i not in retried]
            rest = [i for i in chunk if i not in retried and i not in held]
            where = await _locate(conn, sql, rest) if rest else {}
        result.retried.extend(sorted(retried))
        result.key_held.extend(held)
        for i in rest:
            found = where.get(i)
            if found is None:
                result.not_found.append(i)
            elif found.workflow_id is not None and not found.live and found.state in states:
                result.step_ids.append(i)
                if found.workflow_id not in result.workflows:
                    result.workflows.append(found.workflow_id)
            else:
                result.skipped[i] = found.state
        done += len(chunk)
        if progress is not None:
            progress(done, total)
    result.steps_skipped = len(result.step_ids)
    result.workflows.sort()
    return result


async def retry_matching(
    database: Database,
    schema: str,
    *,
    states: Sequence[str] = ("failed",),
    queue: str | None = None,
    task: str | None = None,
    last_id: int | None = None,
    total: int = 0,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
) -> RetryResult:
    """Re-run every finished job in ``states`` of the queue and task given (None: any).

    ``last_id`` bounds the run (jobs that end up in history later are left
    alone); by default it is the highest matching id when the run starts.
    Workflow steps are left alone and counted (``steps_skipped``).
    """
    sql = statements(schema)
    if last_id is None:
        counted = await count_retry(database, schema, states=states, queue=queue, task=task)
        last_id, total = counted.last_id, counted.count
    result = RetryResult()
    after = 0
    done = 0
    while True:
        async with database.acquire("retrying jobs") as conn:
            row = await conn.fetchrow(
                sql.retry_batch,
                list(states),
                queue,
                task,
                after,
                last_id,
                batch_size,
                sql.enqueued_channel,
            )
        matched = list(row["matched"])
        if not matched:
            break
        retried = set(row["retried"])
        result.retried.extend(sorted(retried))
        result.key_held.extend(i for i in matched if i not in retried)
        after = matched[-1]
        done += len(matched)
        if progress is not None:
            progress(done, max(total, done))
    async with database.acquire("counting workflow steps") as conn:
        row = await conn.fetchrow(sql.skipped_steps, list(states), queue, task)
    result.steps_skipped = row["steps"]
    result.workflows = sorted(row["workflows"])
    return result


# -- cancel ----------------------------------------------------------------------


@dataclass
class CancelResult:
    """What a cancel did.

    ``cancelled``: queued jobs (and workflow steps waiting for their parents)
    now cancelled in history. ``requested``: running jobs whose worker was
    asked to stop them (they end as cancelled when the coroutine is
    cancelled). ``finished``: named jobs that had already finished (id ->
    state). ``not_found``: named ids that no job has. ``waiting``: of
    ``cancelled``, the workflow steps that were waiting for their parents.
    ``descendants``: workflow steps that ended because steps cancelled here
    did: the steps waiting for them (cancelled), a map whose last item one
    was (failed).
    """

    cancelled: list[int] = field(default_factory=list)
    requested: list[int] = field(default_factory=list)
    finished: dict[int, str] = field(default_factory=dict)
    not_found: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    descendants: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "cancelled": len(self.cancelled),
            "cancelled_ids": self.cancelled,
            "cancelled_waiting": len(self.waiting),
            "cancel_requested": len(self.requested),
            "cancel_requested_ids": self.requested,
            "descendants_ended": len(self.descendants),
            "descendants_ended_ids": self.descendants,
            "finished": [{"id": i, "state": s} for i, s in self.finished.items()],
            "not_found": self.not_found,
        }


async def count_cancel(
    database: Database,
    schema: str,
    *,
    ids: Sequence[int] | None = None,
    queue: str | None = None,
    task: str | None = None,
    states: Sequence[str] = LIVE_STATES,
) -> Matched:
    """How many live jobs a cancel with these arguments would take."""
    sql = statements(schema)
    counts = dict.fromkeys(("waiting", "queued", "running", "waiting_steps", "queued_steps"), 0)
    last_id = 0
    async with database.acquire("counting jobs to cancel") as conn:
        if ids is not None:
            for chunk in _chunks(ids, BATCH_SIZE):
                row = await conn.fetchrow(sql.count_cancel_ids, chunk)
                for key in counts:
                    counts[key] += row[key]
        else:
            row = await conn.fetchrow(sql.count_cancel, queue, task)
            counts = {key: row[key] for key in counts}
            last_id = row["last_id"]
    waiting = counts["waiting"] if "waiting" in states else 0
    queued = counts["queued"] if "queued" in states else 0
    running = counts["running"] if "running" in states else 0
    steps = (counts["waiting_steps"] if "waiting" in states else 0) + (
        counts["queued_steps"] if "queued" in states else 0
    )
    return Matched(
        waiting + queued + running,
        queued=waiting + queued,
        running=running,
        last_id=last_id,
        waiting=waiting,
        steps=steps,
    )


@dataclass
class _StepsCancelled:
    cancelled: list[int]
    waiting: list[int]
    flagged: list[int]
    descendants: list[int]


async def _cancel_steps(conn: Any, sql: AdminStatements, rows: list[Any]) -> _StepsCancelled:
    """Cancel these workflow steps (rows: id, state, workflow_id) in the open transaction.

    Through cancel_steps(), never by deleting their rows here: deleting a
    step's job row would leave the steps that wait for it waiting for ever
    and its workflow running with counts that never add up.
    """
    ids = [r["id"] for r in rows]
    cancelled, flagged = await conn.fetchrow(sql.cancel_steps, ids, STEP_CANCEL_REASON)
    done = set(cancelled)
    waiting = [r["id"] for r in rows if r["state"] == "waiting" and r["id"] in done]
    workflows = sorted({r["workflow_id"] for r in rows})
    descendants = [r[0] for r in await conn.fetch(sql.cancelled_with, workflows, ids)]
    return _StepsCancelled(sorted(done), waiting, sorted(flagged), descendants)


async def cancel_ids(database: Database, schema: str, ids: Sequence[int]) -> CancelResult:
    """Cancel the named jobs: queued ones at once, running ones by their worker.

    Workflow steps that have not started are cancelled with their
    descendants (``cancel_steps()``), so that their workflows end.
    """
    sql = statements(schema)
    result = CancelResult()
    for chunk in _chunks(ids, BATCH_SIZE):
        rest = chunk
        where: dict[int, _Found] = {}
        async with database.acquire("cancelling jobs") as conn:
            # A job can move from queued to running between the two
            # statements (a claim); another round then finds it running.
            for _ in range(3):
                row = await conn.fetchrow(sql.cancel_queued_ids, rest, sql.finished_channel)
                cancelled = set(row["cancelled"])
                rest = [i for i in rest if i not in cancelled]
                result.cancelled.extend(sorted(cancelled))
                done = None
                async with conn.transaction():
                    steps = await conn.fetch(sql.live_steps_ids, rest, list(STEP_CANCEL_STATES))
                    if steps:
                        done = await _cancel_steps(conn, sql, steps)
                if done is not None:
                    result.cancelled.extend(done.cancelled)
                    result.requested.extend(done.flagged)
                    result.waiting.extend(done.waiting)
                    result.descendants.extend(done.descendants)
                    gone = {*done.cancelled, *done.flagged}
                    rest = [i for i in rest if i not in gone]
                requested = {
                    r["id"]
                    for r in await conn.fetch(sql.cancel_running_ids, rest, sql.cancel_channel)
                }
                rest = [i for i in rest if i not in requested]
                result.requested.extend(sorted(requested))
                if not rest:
                    break
                where = await _locate(conn, sql, rest)
                if not any(found.live for found in where.values()):
                    break
        for i in rest:
            if i not in where:
                result.not_found.append(i)
            elif not where[i].live:
                result.finished[i] = where[i].state
            # else: still changing hands after three rounds; reported by neither list
    return result


async def cancel_matching(
    database: Database,
    schema: str,
    *,
    queue: str | None = None,
    task: str | None = None,
    states: Sequence[str] = LIVE_STATES,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
) -> CancelResult:
    """Cancel the live jobs of the queue and task given (None: any).

    Queued plain jobs first, in batches, up to the highest id live when it
    starts; then workflow steps that have not started (waiting or queued),
    in batches, each with its descendants; then running jobs, which
    includes those claimed meanwhile.
    """
    sql = statements(schema)
    matched = await count_cancel(database, schema, queue=queue, task=task, states=states)
    result = CancelResult()
    done = 0
    if "queued" in states:
        after = 0
        while True:
            async with database.acquire("cancelling jobs") as conn:
                row = await conn.fetchrow(
                    sql.cancel_queued_batch,
                    batch_size,
                    queue,
                    task,
                    after,
                    matched.last_id,
                    sql.finished_channel,
                )
            if row["last_id"] is None:
                break
            after = row["last_id"]
            result.cancelled.extend(row["cancelled"])
            done += len(row["cancelled"])
            if progress is not None:
                progress(done, max(matched.count, done))
    step_states = [s for s in STEP_CANCEL_STATES if s in states]
    if step_states:
        after = 0
        while True:
            cancelled = None
            async with database.acquire("cancelling workflow steps") as conn, conn.transaction():
                steps = await conn.fetch(
                    sql.live_steps_batch,
                    step_states,
                    queue,
                    task,
                    after,
                    matched.last_id,
                    batch_size,
                )
                if steps:
                    cancelled = await _cancel_steps(conn, sql, steps)
            if cancelled is None:
                break
            after = steps[-1]["id"]
            result.cancelled.extend(cancelled.cancelled)
            result.requested.extend(cancelled.flagged)
            result.waiting.extend(cancelled.waiting)
            result.descendants.extend(cancelled.descendants)
            done += len(cancelled.cancelled)
            if progress is not None:
                progress(done, max(matched.count, done))
    if "running" in states:
        async with database.acquire("cancelling jobs") as conn:
            rows = await conn.fetch(sql.cancel_running, queue, task, sql.cancel_channel)
        result.requested.extend(sorted(r["id"] for r in rows))
    return result


# -- purge -----------------------------------------------------------------------


async def purge_cutoff(
    database: Database, schema: str, older_than: float | None
) -> datetime | None:
    """The database's ``now() - older_than`` (None: no age limit)."""
    if older_than is None:
        return None
    async with database.acquire("reading the clock") as conn:
        value: datetime = await conn.fetchval(statements(schema).cutoff, older_than)
    return value


async def count_purge(
    database: Database, schema: str, *, states: Sequence[str], finished_before: datetime | None
) -> Matched:
    """How many finished jobs a purge would delete."""
    async with database.acquire("counting jobs to purge") as conn:
        row = await conn.fetchrow(statements(schema).count_purge, list(states), finished_before)
    return Matched(row["n"], last_id=row["last_id"])


async def purge(
    database: Database,
    schema: str,
    *,
    states: Sequence[str],
    finished_before: datetime | None,
    last_id: int,
    total: int = 0,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
) -> int:
    """Delete finished jobs in ``states`` (finished before the cutoff, if any)
    with ids up to ``last_id``, and their recorded steps; return how many jobs
    were deleted."""
    sql = statements(schema)
    checkpoints = checkpoints_for(schema)
    after = 0
    deleted = 0
    while True:
        async with database.acquire("purging history") as conn, conn.transaction():
            row = await conn.fetchrow(
                sql.purge_batch, list(states), finished_before, after, last_id, batch_size
            )
            if row["n"]:
                # The recorded steps (ctx.step) of the jobs just deleted, in
                # the same transaction: none is left behind without its job.
                await checkpoints.delete_orphans(conn, after, row["last_id"])
        if not row["n"]:
            break
        deleted += row["n"]
        after = row["last_id"]
        if progress is not None:
            progress(deleted, max(total, deleted))
    return deleted
