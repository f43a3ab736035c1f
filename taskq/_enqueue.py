"""Enqueue: arguments checked and encoded, enqueue middleware, single/bulk/unique insert.

Tasks (``task.enqueue()``) and the App (``app.enqueue("name", ...)``) hand
their jobs to :class:`Enqueuer`, which writes them in the caller's
transaction when it gave a connection, or on a connection of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from ._database import Database, translate_errors
from ._errors import ConfigurationError, TaskqError, UnknownTaskError
from ._hooks import EnqueueContext
from ._job import Job
from ._names import check_task_name, suggest_task
from ._options import EnqueueOptions, with_key
from ._registry import Registry
from ._results import Results
from ._serialization import encode, encode_many
from ._store import Store
from ._task import Task
from ._workflow_store import WorkflowStore


class Enqueuer:
    """Writes jobs: one, many, or unique, through the enqueue middleware."""

    def __init__(
        self,
        database: Database,
        store: Store,
        registry: Registry,
        results: Results,
        *,
        schema: str,
        max_payload_bytes: int,
    ) -> None:
        self._db = database
        self._store = store
        self._registry = registry
        self._results = results
        self._schema = schema
        self._max_payload_bytes = max_payload_bytes
        self._workflow_store = WorkflowStore(schema)
        # (default queue, attempt budget) of tasks some worker reported.
        self._known_tasks: dict[str, tuple[str, int]] = {}

    async def enqueue_by_name(
        self, task: str, args: Mapping[str, Any] | None, **options: Any
    ) -> Job:
        """A job of the task registered (here or by a worker) under ``task``.

        ``options`` are those of :meth:`taskq.Task.options`.
        """
        check_task_name(task)
        if args is not None and not isinstance(args, Mapping):
            raise TypeError(
                f"args must be a mapping of keyword arguments, got {type(args).__name__}"
            )
        opts = EnqueueOptions.make(**options)
        local = self._registry.tasks.get(task)
        if local is None:
            return await self.enqueue_one(task, dict(args or {}), opts, None)
        stored, key = local.bind_job((), args or {}, opts.concurrency_key)
        return await self.enqueue_one(task, stored, with_key(opts, key), local)

    async def task_defaults(self, name: str, task: Task[Any, Any] | None) -> tuple[str, int]:
        """(default queue, attempt budget) of a task, local or reported by a worker."""
        if task is not None:
            return task.queue, task.retry.attempts
        if name in self._known_tasks:
            return self._known_tasks[name]
        async with self._db.acquire("looking up a task") as conn:
            found = await self._store.lookup_task(conn, name)
        if found is None:
            async with self._db.acquire("looking up a task") as conn:
                reported = await self._store.task_names(conn)
            guess = suggest_task(name, [*self._registry.tasks, *reported])
            hint = f" Did you mean {guess!r}?" if guess else ""
            raise UnknownTaskError(
                f"no task named {name!r} is registered on this App, and no worker using "
                f"schema {self._schema!r} has reported it.{hint} Task names are "
                "'module.function'; register it with @app.task, or start a worker that has "
                "it once, then enqueue again."
            )
        self._known_tasks[name] = found
        return found

    async def enqueue_one(
        self,
        name: str,
        stored: dict[str, Any],
        opts: EnqueueOptions,
        task: Task[Any, Any] | None,
    ) -> Job:
        payload = encode(
            stored, what=f"arguments of task {name!r}", max_bytes=self._max_payload_bytes
        )
        if opts.unique_key is not None:
            job_id, created = await self._insert(name, payload, opts, task, many=False)
            return Job(self._results, job_id, duplicate=not created)
        job_id = await self._insert(name, payload, opts, task, many=False)
        return Job(self._results, job_id)

    async def enqueue_many(
        self,
        name: str,
        stored: list[dict[str, Any]],
        opts: EnqueueOptions,
        task: Task[Any, Any] | None,
        keys: list[str | None] | None = None,
    ) -> list[Job]:
        """Jobs of ``stored`` arguments; ``keys``: each one's concurrency key."""
        if opts.unique_key is not None:
            raise ConfigurationError(
                "unique_key applies to one job; enqueue unique jobs one by one with enqueue()"
            )
        if not stored:
            return []
        payloads = encode_many(
            stored, what=f"arguments of task {name!r}", max_bytes=self._max_payload_bytes
        )
        if keys is None or not any(keys):
            keys = [opts.concurrency_key] * len(stored) if opts.concurrency_key else None
        ids = await self._insert(
            name, payloads, opts, task, many=True, count=len(stored), keys=keys
        )
        return [Job(self._results, i) for i in ids]

    async def _insert(
        self,
        name: str,
        args: str,
        opts: EnqueueOptions,
        task: Task[Any, Any] | None,
        *,
        many: bool,
        count: int = 1,
        keys: list[str | None] | None = None,
    ) -> Any:
        """Write encoded jobs, in the caller's transaction if it gave a connection.

        With ``many``, ``args`` is a JSON array of ``count`` jobs' arguments and
        ``keys`` their concurrency keys (None: none has one).
        """
        default_queue, attempts = await self.task_defaults(name, task)
        # The options' queue and priority, else the task's (no copy of the
        # options: this runs once per enqueue call).
        queue = opts.queue or default_queue
        priority = opts.priority
        if priority is None:
            priority = task.priority if task else 0
        insert: Callable[..., Any] = self._store.insert_jobs if many else self._store.insert_job
        action = "enqueueing jobs" if many else "enqueueing a job"
        kwargs: dict[str, Any] = dict(
            queue=queue,
            task=name,
            args=args,
            priority=priority,
            run_at=opts.run_at,
            delay=opts.delay,
            max_attempts=attempts,
        )
        if many and keys is not None:
            kwargs["concurrency_key"] = keys
        elif not many and opts.concurrency_key is not None:
            kwargs["concurrency_key"] = opts.concurrency_key
        if opts.unique_key is not None:
            insert = self._store.insert_unique_job
            kwargs.update(unique_key=opts.unique_key, unique_for=opts.unique_for)

        async def write(meta: Mapping[str, Any] | None) -> Any:
            if meta:
                kwargs["meta"] = encode(
                    meta, what=f"meta of task {name!r}", max_bytes=self._max_payload_bytes
                )
            if opts.connection is not None:
                with translate_errors(action):
                    return await insert(opts.connection, **kwargs)
            async with self._db.acquire(action) as conn:
                return await insert(conn, **kwargs)

        if not self._registry.hooks.enqueue:
            return await write(opts.meta)
        ctx = EnqueueContext(
            task=name,
            queue=queue,
            count=count,
            meta=dict(opts.meta or {}),
            in_transaction=opts.connection is not None,
        )

        result: Any = None

        async def call_next() -> Any:
            nonlocal result
            result = await write(ctx.meta)
            if isinstance(result, tuple):  # a unique job: (id, created)
                ctx.job_ids = [result[0]]
                ctx.duplicate = not result[1]
            else:
                ctx.job_ids = list(result) if many else [result]
            return result

        await self._registry.hooks.run_enqueue(ctx, call_next)
        if not ctx.job_ids:
            raise TaskqError(
                f"an enqueue middleware did not call call_next(): no {name!r} job was written"
            )
        return result

    async def enqueue_workflow(
        self,
        name: str,
        steps: Sequence[dict[str, Any]],
        *,
        meta: Mapping[str, Any] | None,
        connection: Any,
    ) -> tuple[int, list[int]]:
        """Write a workflow's steps (see ``workflow_enqueue()``) in one statement: (id, job ids).

        Each step's ``args`` is checked like a job's (JSON, size). The enqueue
        middleware runs once for the whole workflow (``ctx.task`` is
        ``"workflow:<name>"``); the meta it leaves is the workflow's and is
        carried by every step (a step's own meta wins).
        """
        parts = []
        for step in steps:
            args = encode(
                step["args"],
                what=f"arguments of step {step['name']!r} (task {step['task']!r})",
                max_bytes=self._max_payload_bytes,
            )
            parts.append({**step, "args": orjson.Fragment(args)})
        payload = orjson.dumps(parts).decode()
        label = f"workflow:{name}"

        async def write(meta: Mapping[str, Any] | None) -> tuple[int, list[int]]:
            meta_text = (
                encode(meta, what=f"meta of workflow {name!r}", max_bytes=self._max_payload_bytes)
                if meta
                else None
            )
            if connection is not None:
                with translate_errors("enqueueing a workflow"):
                    return await self._workflow_store.enqueue(connection, name, payload, meta_text)
            async with self._db.acquire("enqueueing a workflow") as conn:
                return await self._workflow_store.enqueue(conn, name, payload, meta_text)

        if not self._registry.hooks.enqueue:
            return await write(meta)
        ctx = EnqueueContext(
            task=label,
            queue=str(steps[0]["queue"]) if steps else "",
            count=len(steps),
            meta=dict(meta or {}),
            in_transaction=connection is not None,
        )
        written: list[tuple[int, list[int]]] = []

        async def call_next() -> Any:
            written.append(await write(ctx.meta))
            ctx.job_ids = list(written[-1][1])
            return written[-1]

        await self._registry.hooks.run_enqueue(ctx, call_next)
        if not written:
            raise TaskqError(
                f"an enqueue middleware did not call call_next(): workflow {name!r} was not written"
            )
        return written[-1]
