"""Workflow handles: what ``wf.enqueue()`` returns and ``App.get_workflow(id)`` rebuilds."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio

from ._database import Database
from ._errors import WorkflowCancelled, WorkflowFailed, WorkflowNotFound
from ._inputs import step_failed
from ._job import Job, JobState
from ._registry import Registry
from ._results import Results, is_bigint
from ._serialization import decode
from ._store import Store
from ._workflow_store import WorkflowStore

log = logging.getLogger("taskq")

#: A waiter re-reads the workflow this often, in case a notification was lost.
RECHECK_SECONDS = 5.0
#: run.cancel() goes over the live steps again after this long while some
#: were held by another transaction (a claim taking them, a lease renewal).
CANCEL_PASS_PAUSE_SECONDS = 0.02
#: ... and gives up after this many passes (the rest end by themselves:
#: steps released from now on see the workflow cancelled and do not run).
CANCEL_PASSES = 250


class WorkflowState(enum.StrEnum):
    """Where a workflow is: ``running``, then ``succeeded``, ``failed`` or ``cancelled``.

    ``succeeded``: every step without children (a sink) succeeded (a step
    that failed under an ``on_parent_failure="run"`` join does not count
    against it). ``failed``: some sink did not succeed. ``cancelled``:
    ``run.cancel()`` was called.
    """

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class StepStatus:
    """One step of a workflow, from ``await run.status()``."""

    name: str
    job_id: int
    task: str
    queue: str
    #: ``waiting`` (for parents), ``queued``, ``running``, or a final state.
    state: JobState
    #: ``"task"``, or ``"map"`` (a step that runs one item step per element
    #: of a list and ends with the list of their results).
    kind: str
    attempts: int
    max_attempts: int
    #: The steps it depends on (for a map's items: none; see ``map_of``).
    parents: tuple[str, ...]
    started_at: datetime | None
    finished_at: datetime | None
    #: The last error, ``{"type", "message", "traceback"}``, if any.
    error: dict[str, Any] | None
    worker_id: str | None = None
    #: For an item of a map: the map's job id and the item's index.
    map_of: int | None = None
    position: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "job_id": self.job_id,
            "task": self.task,
            "queue": self.queue,
            "state": str(self.state),
            "kind": self.kind,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "parents": list(self.parents),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "error": self.error,
            "worker_id": self.worker_id,
            "map_of": self.map_of,
            "position": self.position,
        }


@dataclass(frozen=True)
class WorkflowStatus:
    """A snapshot of a workflow, from ``await run.status()``.

    ``counts`` has every step state (``waiting``, ``queued``, ``running``,
    ``succeeded``, ``failed``, ``cancelled``); ``total`` counts the steps known
    so far (a map adds its items when its list is known).
    """

    id: int
    name: str
    state: WorkflowState
    total: int
    counts: dict[str, int]
    created_at: datetime
    finished_at: datetime | None
    cancel_requested: bool
    meta: dict[str, Any] = field(default_factory=dict)
    #: Every step, in the order they were created (empty when asked without).
    steps: list[StepStatus] = field(default_factory=list)

    def step(self, name: str) -> StepStatus:
        """The step named ``name`` (KeyError if there is none)."""
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The status as JSON-ready values (timestamps as ISO 8601 strings)."""
        return {
            "id": self.id,
            "name": self.name,
            "state": str(self.state),
            "total": self.total,
            "counts": self.counts,
            "created_at": _iso(self.created_at),
            "finished_at": _iso(self.finished_at),
            "cancel_requested": self.cancel_requested,
            "meta": self.meta,
            "steps": [s.to_dict() for s in self.steps],
        }


class Workflows:
    """Workflow handles and what they ask of the database."""

    def __init__(
        self, database: Database, jobs: Store, results: Results, registry: Registry, schema: str
    ) -> None:
        self._db = database
        self._store = WorkflowStore(schema)
        self._jobs = jobs  # the job path's statements: cancel_steps()
        self._results = results
        self._registry = registry
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._notifier: Any = None

    def run(self, workflow_id: int, jobs: Mapping[str, int] | None = None) -> WorkflowRun:
        if not isinstance(workflow_id, int) or isinstance(workflow_id, bool):
            raise TypeError(f"workflow id must be an int, got {type(workflow_id).__name__}")
        return WorkflowRun(self, workflow_id, jobs)

    def _check_id(self, workflow_id: int) -> None:
        if not is_bigint(workflow_id):
            raise WorkflowNotFound(f"no workflow with id {workflow_id}")

    async def _row(self, workflow_id: int) -> Any:
        self._check_id(workflow_id)
        async with self._db.acquire("reading a workflow") as conn:
            row = await self._store.get(conn, workflow_id)
        if row is None:
            raise WorkflowNotFound(f"no workflow with id {workflow_id}")
        return row

    async def status(self, workflow_id: int, *, steps: bool = True) -> WorkflowStatus:
        self._check_id(workflow_id)
        async with self._db.acquire("reading a workflow") as conn:
            row = await self._store.get(conn, workflow_id)
            if row is None:
                raise WorkflowNotFound(f"no workflow with id {workflow_id}")
            step_rows = await self._store.steps(conn, workflow_id) if steps else []
        return status_from_rows(row, step_rows)

    async def listing(
        self,
        *,
        state: str | None = None,
        name: str | None = None,
        before_id: int | None = None,
        limit: int = 50,
    ) -> list[WorkflowStatus]:
        """Workflows, newest first (``before_id``: the page after that id)."""
        if state is not None:
            WorkflowState(state)  # ValueError for an unknown state
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"limit must be a positive int, got {limit!r}")
        if before_id is not None and (
            not isinstance(before_id, int)
            or isinstance(before_id, bool)
            or not is_bigint(before_id)
        ):
            raise ValueError(f"before_id must be a workflow id (an int), got {before_id!r}")
        async with self._db.acquire("listing workflows") as conn:
            rows = await self._store.list_workflows(
                conn, state=state, before_id=before_id, limit=limit, name=name
            )
        return [status_from_rows(r, []) for r in rows]

    # -- waiting -------------------------------------------------------------

    async def _listen(self) -> None:
        notifier = await self._db.listener()
        if notifier is not self._notifier:
            self._notifier = notifier
            notifier.subscribe(self._store.channel, self._on_finished)
            notifier.on_reconnect(self._wake_all)

    def _on_finished(self, payload: str) -> None:
        try:
            workflow_id = int(payload)
        except ValueError:
            return
        for fut in self._waiters.get(workflow_id, ()):
            if not fut.done():
                fut.set_result(None)

    def _wake_all(self) -> None:
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_result(None)

    async def wait(self, workflow_id: int, timeout: float | None) -> Any:
        """Wait until the workflow has ended; its row."""
        self._check_id(workflow_id)
        await self._listen()
        loop = asyncio.get_running_loop()
        futures = self._waiters.setdefault(workflow_id, [])
        fut: asyncio.Future[None] = loop.create_future()
        futures.append(fut)
        try:
            with anyio.fail_after(timeout):
                while True:
                    row = await self._row(workflow_id)
                    if row["finished_at"] is not None:
                        return row
                    with anyio.move_on_after(RECHECK_SECONDS):
                        await asyncio.shield(fut)
                    if fut.done():
                        futures.remove(fut)
                        fut = loop.create_future()
                        futures.append(fut)
        except TimeoutError:
            status = await self.status(workflow_id, steps=False)
            raise TimeoutError(
                f"workflow {workflow_id} ({status.name!r}) did not finish within {timeout:g} s: "
                f"{_counts_text(status.counts)}"
            ) from None
        finally:
            if fut in futures:
                futures.remove(fut)
            if not futures:
                self._waiters.pop(workflow_id, None)

    async def result(self, workflow_id: int, timeout: float | None) -> Any:
        row = await self.wait(workflow_id, timeout)
        state = WorkflowState(row["state"])
        if state is not WorkflowState.SUCCEEDED:
            status = await self.status(workflow_id)
            bad = [
                {
                    "step": s.name,
                    "job_id": s.job_id,
                    "state": str(s.state),
                    "type": (s.error or {}).get("type", ""),
                    "message": (s.error or {}).get("message", ""),
                }
                for s in status.steps
                if s.state in (JobState.FAILED, JobState.CANCELLED)
            ]
            first = [b for b in bad if b["state"] == "failed"] or bad
            detail = "; ".join(
                f"step {b['step']!r} {b['state']}: {b['type']}: {b['message']}" for b in first[:3]
            )
            more = f" (and {len(first) - 3} more)" if len(first) > 3 else ""
            text = f"workflow {workflow_id} ({row['name']!r}) {state}"
            if state is WorkflowState.CANCELLED:
                raise WorkflowCancelled(text, workflow_id=workflow_id, steps=bad)
            raise WorkflowFailed(f"{text}: {detail}{more}", workflow_id=workflow_id, steps=bad)
        results = decode(row["results"]) or {}
        sinks = list(row["sinks"])
        async with self._db.acquire("reading a workflow") as conn:
            rows = await self._store.sinks(conn, workflow_id)
        tasks = {r["name"]: (r["task"], r["kind"]) for r in rows}
        values = {
            name: self._decode(results.get(name), *tasks.get(name, ("", ""))) for name in sinks
        }
        if len(sinks) == 1:
            return values[sinks[0]]
        return values

    def _decode(self, value: Any, task_name: str, kind: str) -> Any:
        task = self._registry.tasks.get(task_name)
        if task is None:
            return value
        if kind == "map" and isinstance(value, list):
            return [step_failed(v) or task.codec.decode_result(v) for v in value]
        return task.codec.decode_result(value)

    # -- acting on it -----------------------------------------------------------

    async def cancel(self, workflow_id: int) -> bool:
        """Cancel a running workflow; False if it has already ended."""
        self._check_id(workflow_id)
        async with self._db.acquire("cancelling a workflow") as conn:
            if not await self._store.request_cancel(conn, workflow_id):
                if await self._store.running(conn, workflow_id) is None:
                    raise WorkflowNotFound(f"no workflow with id {workflow_id}")
                return False
            for _ in range(CANCEL_PASSES):
                async with conn.transaction():
                    ids = await self._store.lock_and_list_live(conn, workflow_id)
                    if not ids:
                        break
                    cancelled, flagged = await self._jobs.cancel_steps(
                        conn, ids, "cancelled with its workflow"
                    )
                if len(cancelled) + len(flagged) == len(ids):
                    break
                await asyncio.sleep(CANCEL_PASS_PAUSE_SECONDS)
        return True

    async def retry(self, workflow_id: int) -> int:
        """Run the failed and cancelled steps of an ended workflow again; how many."""
        self._check_id(workflow_id)
        async with self._db.acquire("retrying a workflow") as conn:
            running = await self._store.running(conn, workflow_id)
            if running is None:
                raise WorkflowNotFound(f"no workflow with id {workflow_id}")
            if running:
                return 0
            return await self._store.retry(conn, workflow_id)

    async def step_job(self, workflow_id: int, step: str) -> Job:
        self._check_id(workflow_id)
        async with self._db.acquire("reading a workflow") as conn:
            job_id = await self._store.step_job(conn, workflow_id, step)
        if job_id is None:
            raise KeyError(f"workflow {workflow_id} has no step named {step!r}")
        return self._results.job(job_id)


class WorkflowRun:
    """A handle on an enqueued workflow.

    Returned by ``await wf.enqueue()``; ``app.get_workflow(run.id)`` makes one
    from an id (e.g. in a later HTTP request).
    """

    def __init__(
        self, workflows: Workflows, workflow_id: int, jobs: Mapping[str, int] | None = None
    ) -> None:
        self._workflows = workflows
        self.id = workflow_id
        #: Job ids of the steps by name, when this handle came from ``enqueue()``
        #: (a map's items are not in it: they are made when the map's list is known).
        self.job_ids: dict[str, int] = dict(jobs or {})

    def __repr__(self) -> str:
        return f"<taskq.WorkflowRun {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkflowRun) and other.id == self.id

    def __hash__(self) -> int:
        return hash(("workflow", self.id))

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the workflow to end; return its result.

        The result of its one step without children (the sink), decoded by
        that task's return annotation; with several sinks, a dict of their
        results by step name. A sink that is a map gives the list of its items'
        results.

        Raises:
            WorkflowFailed: a sink failed or was cancelled (``.steps`` lists the
                steps that did not succeed).
            WorkflowCancelled: the workflow was cancelled.
            TimeoutError: it did not end within ``timeout`` seconds (the message
                gives its step counts).
            WorkflowNotFound: no such workflow.
        """
        return await self._workflows.result(self.id, timeout)

    async def wait(self, timeout: float | None = None) -> WorkflowStatus:
        """Wait for the workflow to end, whatever its outcome; its final status."""
        await self._workflows.wait(self.id, timeout)
        return await self._workflows.status(self.id)

    async def status(self, *, steps: bool = True) -> WorkflowStatus:
        """Its state, the count of steps in each state and (unless ``steps=False``) each step."""
        return await self._workflows.status(self.id, steps=steps)

    async def cancel(self) -> bool:
        """Cancel it: waiting and queued steps never run; running ones are cancelled.

        Steps released after this call (a parent that was ending meanwhile)
        are cancelled too. Returns False if the workflow had already ended.
        """
        return await self._workflows.cancel(self.id)

    async def retry(self) -> int:
        """Run the failed and cancelled steps again, keeping what succeeded.

        Each such step runs again once those of its parents that run again
        have succeeded; steps that succeeded keep their results and are not
        run. Returns how many steps were put back (0 while the workflow is
        running, or when nothing failed).
        """
        return await self._workflows.retry(self.id)

    async def job(self, step: str) -> Job:
        """The job of the step named ``step`` (also a map item: ``"name[3]"``)."""
        if step in self.job_ids:
            return self._workflows._results.job(self.job_ids[step])
        return await self._workflows.step_job(self.id, step)


def status_from_rows(row: Any, step_rows: list[Any]) -> WorkflowStatus:
    counts = dict.fromkeys(("waiting", "queued", "running"), 0)
    live = decode(row["live"]) if row["live"] is not None else None
    if live is not None:
        counts.update({k: int(v) for k, v in live.items()})
    counts["succeeded"] = row["succeeded"]
    counts["failed"] = row["failed"]
    counts["cancelled"] = row["cancelled"]
    steps = [
        StepStatus(
            name=r["name"],
            job_id=r["job_id"],
            task=r["task"],
            queue=r["queue"],
            state=JobState(r["state"]),
            kind=r["kind"],
            attempts=r["attempts"],
            max_attempts=r["max_attempts"],
            parents=tuple(r["parents"] or ()),
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            error=decode(r["error"]),
            worker_id=r["worker_id"],
            map_of=r["map_of"],
            position=r["position"],
        )
        for r in step_rows
        if r["state"] is not None  # the job row was purged by an operator
    ]
    if live is None and steps:
        for s in steps:
            if not s.state.finished:
                counts[str(s.state)] += 1
    return WorkflowStatus(
        id=row["id"],
        name=row["name"],
        state=WorkflowState(row["state"]),
        total=row["steps"],
        counts=counts,
        created_at=row["created_at"],
        finished_at=row["finished_at"],
        cancel_requested=row["cancel_requested"],
        meta=decode(row["meta"]) or {},
        steps=steps,
    )


def _counts_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "no steps"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
