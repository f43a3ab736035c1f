"""The SQL of workflows: writing one, reading its state, cancelling and retrying it.

The graph logic itself lives in Postgres functions (``taskq/objects/``:
``workflow_enqueue()``, ``steps_ended()``, ``steps_ready()``,
``cancel_steps()``, ``workflow_retry()``); this module only calls them and
reads the tables. Values travel as bind parameters; the schema name is
validated and quoted by ``quote_schema``.
"""

from __future__ import annotations

from typing import Any

from ._names import quote_schema

Conn = Any

_WORKFLOW_COLUMNS = (
    "w.id, w.name, w.state, w.steps, w.succeeded, w.failed, w.cancelled, w.cancel_requested, "
    "w.sinks, w.results::text AS results, w.meta::text AS meta, w.created_at, w.finished_at"
)


class WorkflowStore:
    """The statements of one schema's workflows, as methods taking a connection."""

    def __init__(self, schema: str) -> None:
        s = quote_schema(schema)
        self.channel = f"taskq:{schema}:workflow"
        self._enqueue = (
            f"SELECT workflow_id, job_ids FROM {s}.workflow_enqueue($1, $2::jsonb, $3::jsonb)"
        )
        # One row, and the live steps' states from the jobs_workflow index:
        # never a scan of history.
        live = (
            "CASE WHEN w.finished_at IS NULL THEN "
            "(SELECT coalesce(jsonb_object_agg(state, n), '{}')::text "
            f"FROM (SELECT j.state, count(*) AS n FROM {s}.jobs AS j WHERE j.workflow_id = w.id "
            "GROUP BY j.state) AS l) ELSE '{}' END AS live"
        )
        self._get = f"SELECT {_WORKFLOW_COLUMNS}, {live} FROM {s}.workflows AS w WHERE w.id = $1"
        # Each step with its job (live or in history) and its parents.
        self._steps = (
            "SELECT s.job_id, s.name, s.kind, s.map_of, s.position, s.expanded, s.pending, "
            "s.on_parent_failure, coalesce(j.state, h.state) AS state, "
            "coalesce(j.task, h.task) AS task, coalesce(j.queue, h.queue) AS queue, "
            "coalesce(j.attempts, h.attempts) AS attempts, "
            "coalesce(j.max_attempts, h.max_attempts) AS max_attempts, "
            "coalesce(j.started_at, h.started_at) AS started_at, h.finished_at, "
            "coalesce(j.last_error, h.error)::text AS error, j.run_at, "
            "coalesce(j.worker_id, h.worker_id) AS worker_id, "
            "array(SELECT e.parent_step FROM "
            f"{s}.workflow_edges AS e WHERE e.child_id = s.job_id AND s.kind = 'task' "
            "ORDER BY e.parent_id) AS parents "
            f"FROM {s}.workflow_steps AS s LEFT JOIN {s}.jobs AS j ON j.id = s.job_id "
            f"LEFT JOIN {s}.history AS h ON h.id = s.job_id "
            "WHERE s.workflow_id = $1 ORDER BY s.job_id"
        )
        # The steps without children, with their tasks (to decode the result).
        self._sinks = (
            "SELECT s.name, coalesce(j.task, h.task) AS task, s.kind "
            f"FROM {s}.workflow_steps AS s LEFT JOIN {s}.jobs AS j ON j.id = s.job_id "
            f"LEFT JOIN {s}.history AS h ON h.id = s.job_id "
            "WHERE s.workflow_id = $1 AND s.sink"
        )
        # Newest first, by id (keyset: $2 is the last id seen), by state; the
        # live steps of running workflows counted like _get's.
        self._list = (
            f"SELECT {_WORKFLOW_COLUMNS}, {live} FROM {s}.workflows AS w "
            "WHERE ($1::text IS NULL OR w.state = $1) AND ($2::bigint IS NULL OR w.id < $2) "
            "AND ($4::text IS NULL OR w.name = $4) ORDER BY w.id DESC LIMIT $3"
        )
        self._step_job = (
            f"SELECT job_id FROM {s}.workflow_steps WHERE workflow_id = $1 AND name = $2"
        )
        self._request_cancel = (
            f"UPDATE {s}.workflows SET cancel_requested = true "
            "WHERE id = $1 AND finished_at IS NULL RETURNING id"
        )
        # Every step's row locked, in id order (as the statements that end
        # steps take them): a transaction releasing steps of this workflow
        # commits first, and its released steps are then seen live.
        self._lock_steps = (
            f"SELECT count(*) FROM (SELECT 1 FROM {s}.workflow_steps WHERE workflow_id = $1 "
            "ORDER BY job_id FOR UPDATE) AS l"
        )
        self._live_steps = (
            f"SELECT id FROM {s}.jobs WHERE workflow_id = $1 AND NOT cancel_requested ORDER BY id"
        )
        self._retry = f"SELECT {s}.workflow_retry($1)"
        self._exists = f"SELECT finished_at IS NULL FROM {s}.workflows WHERE id = $1"

    async def enqueue(
        self, conn: Conn, name: str, steps: str, meta: str | None
    ) -> tuple[int, list[int]]:
        """Write a workflow (``steps``: JSON text, see ``workflow_enqueue()``): (id, job ids)."""
        row = await conn.fetchrow(self._enqueue, name, steps, meta)
        return int(row[0]), list(row[1])

    async def get(self, conn: Conn, workflow_id: int) -> Any:
        """The workflow's row with its live steps' counts by state (``live``), or None."""
        return await conn.fetchrow(self._get, workflow_id)

    async def steps(self, conn: Conn, workflow_id: int) -> list[Any]:
        return list(await conn.fetch(self._steps, workflow_id))

    async def sinks(self, conn: Conn, workflow_id: int) -> list[Any]:
        """(name, task, kind) of the workflow's steps without children."""
        return list(await conn.fetch(self._sinks, workflow_id))

    async def list_workflows(
        self,
        conn: Conn,
        *,
        state: str | None = None,
        before_id: int | None = None,
        limit: int = 50,
        name: str | None = None,
    ) -> list[Any]:
        return list(await conn.fetch(self._list, state, before_id, limit, name))

    async def step_job(self, conn: Conn, workflow_id: int, step: str) -> int | None:
        value = await conn.fetchval(self._step_job, workflow_id, step)
        return None if value is None else int(value)

    async def request_cancel(self, conn: Conn, workflow_id: int) -> bool:
        """Mark a running workflow as cancelled: steps released from now on do not run."""
        return await conn.fetchval(self._request_cancel, workflow_id) is not None

    async def live_steps(self, conn: Conn, workflow_id: int) -> list[int]:
        """Ids of the workflow's live steps not yet asked to cancel."""
        return [r[0] for r in await conn.fetch(self._live_steps, workflow_id)]

    async def lock_and_list_live(self, conn: Conn, workflow_id: int) -> list[int]:
        """In a transaction: lock the workflow's steps; the live ones not asked to cancel."""
        await conn.execute(self._lock_steps, workflow_id)
        return await self.live_steps(conn, workflow_id)

    async def retry(self, conn: Conn, workflow_id: int) -> int:
        """Put a finished workflow's failed and cancelled steps back; how many."""
        return int(await conn.fetchval(self._retry, workflow_id))

    async def running(self, conn: Conn, workflow_id: int) -> bool | None:
        """Whether the workflow is running (None: no such workflow)."""
        value = await conn.fetchval(self._exists, workflow_id)
        return None if value is None else bool(value)
