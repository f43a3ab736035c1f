"""Operator actions behind the command line: status, job listings, bulk retry,
cancel and purge.

The SQL lives in :class:`AdminStatements`, built once per schema like
:class:`taskq._store.Store`: the schema is the one identifier in the text,
validated and quoted by ``quote_schema``; every user value is a bind
parameter. The async functions below take an open :class:`taskq.App` and get
their connections from ``app._acquire``.

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
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ._errors import JobNotFound
from ._job import JobState, JobStatus, status_from_row
from ._names import quote_schema

if TYPE_CHECKING:
    from ._app import App

#: Jobs per statement in bulk retry, cancel and purge.
BATCH_SIZE = 1000

#: States a job can be in, in lifecycle order.
ALL_STATES: tuple[str, ...] = tuple(str(s) for s in JobState)
LIVE_STATES = ("queued", "running")
FINISHED_STATES = ("succeeded", "failed", "cancelled")
#: States ``retry`` can take a job from.
RETRYABLE_STATES = ("failed", "cancelled")

#: Called after each batch with (jobs done so far, jobs expected in all).
Progress = Callable[[int, int], None]

# A job row as status_from_row() reads it, plus rescues and cancel_requested.
_LIVE_ROW = (
    "id, queue, task, args::text AS args, state, priority, attempts, max_attempts, "
    "enqueued_at, run_at, started_at, NULL::timestamptz AS finished_at, "
    "last_error::text AS error, NULL::text AS result, worker_id, unique_key, "
    "meta::text AS meta, rescues, cancel_requested"
)
_HISTORY_ROW = (
    "id, queue, task, args::text AS args, state, priority, attempts, max_attempts, "
    "enqueued_at, NULL::timestamptz AS run_at, started_at, finished_at, error::text AS error, "
    "result::text AS result, worker_id, unique_key, meta::text AS meta, rescues, "
    "false AS cancel_requested"
)
# Optional filters on queue and task: NULL matches every value.
_FILTERS = "($2::text IS NULL OR queue = $2) AND ($3::text IS NULL OR task = $3)"


class AdminStatements:
    """The SQL of the operator commands for one taskq schema."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        s = quote_schema(schema)
        self.enqueued_channel = f"taskq:{schema}:enqueued"
        self.finished_channel = f"taskq:{schema}:finished"
        self.cancel_channel = f"taskq:{schema}:cancel"

        # -- status ----------------------------------------------------------
        # The live table is small: a full GROUP BY is cheap.
        _live = (
            "count(*) FILTER (WHERE state = 'queued' AND run_at <= now()) AS queued, "
            "count(*) FILTER (WHERE state = 'queued' AND run_at > now()) AS scheduled, "
            "count(*) FILTER (WHERE state = 'running') AS running"
        )
        self.live_counts = f"SELECT queue, {_live} FROM {s}.jobs GROUP BY queue"
        # The same per queue, with the wait of the oldest due job and whether
        # the queue is paused; queues with settings but no job count zero
        # (for the Prometheus queue gauges).
        self.queue_depth = (
            "SELECT n.queue, sum(n.queued)::bigint AS queued, "
            "sum(n.scheduled)::bigint AS scheduled, sum(n.running)::bigint AS running, "
            "max(n.lag) AS lag, coalesce(bool_or(q.paused), false) AS paused FROM ("
            f"SELECT queue, {_live}, extract(epoch FROM now() - min(run_at) "
            "FILTER (WHERE state = 'queued' AND run_at <= now()))::float8 AS lag "
            f"FROM {s}.jobs GROUP BY queue "
            f"UNION ALL SELECT name, 0, 0, 0, NULL FROM {s}.queues) AS n "
            f"LEFT JOIN {s}.queues AS q ON q.name = n.queue GROUP BY n.queue"
        )
        _finished = (
            "SELECT queue, "
            "count(*) FILTER (WHERE state = 'succeeded') AS succeeded, "
            "count(*) FILTER (WHERE state = 'failed') AS failed, "
            "count(*) FILTER (WHERE state = 'cancelled') AS cancelled "
            f"FROM {s}.history"
        )
        # All of history: one scan of the table, fine for a one-off look.
        self.history_counts = f"{_finished} GROUP BY queue"
        # A recent window only: the BRIN index on finished_at finds the block
        # ranges of recent rows, so the cost follows the jobs finished in the
        # window, not the size of history (for status --watch).
        self.history_counts_since = (
            f"{_finished} WHERE finished_at > now() - make_interval(secs => $1) GROUP BY queue"
        )
        self.paused = f"SELECT name, paused FROM {s}.queues"
        self.workers = (
            "SELECT w.id, w.hostname, w.pid, w.concurrency, w.queues, w.started_at, "
            "w.heartbeat_at, extract(epoch FROM now() - w.heartbeat_at)::float8 AS heartbeat_age, "
            "coalesce(r.n, 0) AS running "
            f"FROM {s}.workers AS w LEFT JOIN (SELECT worker_id, count(*) AS n FROM {s}.jobs "
            "WHERE state = 'running' GROUP BY worker_id) AS r ON r.worker_id = w.id "
            "ORDER BY w.hostname, w.pid, w.id"
        )

        # -- jobs ------------------------------------------------------------
        self.get_job = (
            f"SELECT {_LIVE_ROW} FROM {s}.jobs WHERE id = $1 "
            f"UNION ALL SELECT {_HISTORY_ROW} FROM {s}.history WHERE id = $1"
        )
        # Newest first from each table, then merged. A listing that asks only
        # for live states never touches history (a backward walk of its
        # primary key looking for states it cannot hold would read all of it).
        live = (
            f"(SELECT {_LIVE_ROW} FROM {s}.jobs WHERE state = ANY($1::text[]) AND {_FILTERS} "
            "ORDER BY id DESC LIMIT $4)"
        )
        finished = (
            f"(SELECT {_HISTORY_ROW} FROM {s}.history WHERE state = ANY($1::text[]) "
            f"AND {_FILTERS} ORDER BY id DESC LIMIT $4)"
        )
        self.list_live = live
        self.list_history = finished
        self.list_all = (
            f"SELECT * FROM ({live} UNION ALL {finished}) AS j ORDER BY id DESC LIMIT $4"
        )
        # Task names for `jobs list --task`: those workers registered and those
        # of live jobs (the hot table is small). History has no index on task,
        # so it is asked only whether it holds one name the others lack.
        self.known_tasks = (
            f"SELECT name FROM {s}.tasks UNION SELECT DISTINCT task FROM {s}.jobs ORDER BY 1"
        )
        self.task_in_history = f"SELECT EXISTS (SELECT FROM {s}.history WHERE task = $1)"
        self.locate = (
            f"SELECT id, state, true AS live FROM {s}.jobs WHERE id = ANY($1::bigint[]) "
            f"UNION ALL SELECT id, state, false FROM {s}.history WHERE id = ANY($1::bigint[])"
        )

        # -- retry -----------------------------------------------------------
        # Exactly what Job.retry() does, for many jobs at once: the job goes
        # back to the hot table under its own id with a fresh attempt budget,
        # due now, keeping its last error and its meta. A unique job goes back
        # only while no live job holds its key: ON CONFLICT leaves it in
        # history (also when two retried jobs share a key; the newest wins),
        # and it also settles a race with a producer. The candidates are
        # locked, so two retries of the same job cannot both insert it.
        self.retry_ids = self._retry(
            s, "h.id = ANY($1::bigint[]) AND h.state = ANY($2::text[])", channel="$3"
        )
        self.retry_batch = self._retry(
            s,
            "h.state = ANY($1::text[]) AND ($2::text IS NULL OR h.queue = $2) "
            "AND ($3::text IS NULL OR h.task = $3) AND h.id > $4 AND h.id <= $5 "
            "ORDER BY h.id LIMIT $6",
            channel="$7",
        )
        # Jobs a retry would leave in history: their key is held by a live
        # job, or by another of the retried jobs with the same key.
        _key_held = (
            "SELECT count(*) AS n, count(*) FILTER (WHERE held) "
            "+ count(*) FILTER (WHERE unique_key IS NOT NULL AND NOT held) "
            "- count(DISTINCT ARRAY[queue, unique_key]) "
            "FILTER (WHERE unique_key IS NOT NULL AND NOT held) AS key_held{} "
            "FROM (SELECT h.id, h.queue, h.unique_key, h.unique_key IS NOT NULL AND EXISTS "
            f"(SELECT 1 FROM {s}.jobs AS j WHERE j.queue = h.queue "
            "AND j.unique_key = h.unique_key) AS held "
            f"FROM {s}.history AS h WHERE {{}}) AS m"
        )
        self.count_retry = _key_held.format(
            ", coalesce(max(id), 0) AS last_id",
            "h.state = ANY($1::text[]) AND ($2::text IS NULL OR h.queue = $2) "
            "AND ($3::text IS NULL OR h.task = $3)",
        )
        self.count_retry_ids = _key_held.format(
            "", "h.id = ANY($1::bigint[]) AND h.state = ANY($2::text[])"
        )

        # -- cancel ----------------------------------------------------------
        # Queued jobs go to history as cancelled, like Job.cancel(); waiters
        # on their result are told (ids in chunks: a NOTIFY payload is capped
        # at 8000 bytes). SKIP LOCKED passes over a job that a worker is
        # claiming at this moment; it is running by the time the running
        # jobs are asked to stop.
        self.cancel_queued_ids = self._cancel_queued(
            s, "id = ANY($1::bigint[]) AND state = 'queued'", channel="$2"
        )
        self.cancel_queued_batch = self._cancel_queued(
            s,
            f"state = 'queued' AND {_FILTERS} AND id > $4 AND id <= $5 ORDER BY id LIMIT $1",
            channel="$6",
        )
        # A running job is flagged and its worker told at once; a worker that
        # missed the NOTIFY sees the flag at its next lease renewal.
        _request = (
            f"UPDATE {s}.jobs SET cancel_requested = true WHERE state = 'running' AND {{}} "
            "RETURNING id, pg_notify({}, id::text)"
        )
        self.cancel_running_ids = _request.format("id = ANY($1::bigint[])", "$2")
        self.cancel_running = _request.format(
            "($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR task = $2)", "$3"
        )
        self.count_cancel = (
            "SELECT count(*) FILTER (WHERE state = 'queued') AS queued, "
            "count(*) FILTER (WHERE state = 'running') AS running, "
            f"coalesce(max(id), 0) AS last_id FROM {s}.jobs "
            "WHERE ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR task = $2)"
        )
        self.count_cancel_ids = (
            "SELECT count(*) FILTER (WHERE state = 'queued') AS queued, "
            "count(*) FILTER (WHERE state = 'running') AS running "
            f"FROM {s}.jobs WHERE id = ANY($1::bigint[])"
        )

        # -- purge -----------------------------------------------------------
        _purge_filter = "state = ANY($1::text[]) AND ($2::timestamptz IS NULL OR finished_at < $2)"
        self.cutoff = "SELECT now() - make_interval(secs => $1)"
        self.count_purge = (
            f"SELECT count(*) AS n, coalesce(max(id), 0) AS last_id FROM {s}.history "
            f"WHERE {_purge_filter}"
        )
        # FOR UPDATE: a row that another session deletes meanwhile (the
        # workers' pruning, a retry) is skipped and the LIMIT takes the next
        # one, so a batch comes back short only at the end.
        self.purge_batch = (
            f"WITH d AS (DELETE FROM {s}.history WHERE id IN (SELECT id FROM {s}.history "
            f"WHERE {_purge_filter} AND id > $3 AND id <= $4 ORDER BY id LIMIT $5 FOR UPDATE) "
            "RETURNING id) SELECT count(*) AS n, max(id) AS last_id FROM d"
        )

    @staticmethod
    def _retry(s: str, where: str, *, channel: str) -> str:
        return (
            f"WITH cand AS (SELECT h.* FROM {s}.history AS h WHERE {where} FOR UPDATE OF h), "
            f"ins AS (INSERT INTO {s}.jobs (id, queue, task, args, priority, run_at, attempts, "
            "max_attempts, enqueued_at, last_error, unique_key, meta) "
            "SELECT id, queue, task, args, priority, now(), 0, max_attempts, enqueued_at, error, "
            "unique_key, meta FROM cand ORDER BY id DESC "
            "ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL DO NOTHING "
            "RETURNING id, queue), "
            f"gone AS (DELETE FROM {s}.history AS h USING ins WHERE h.id = ins.id "
            "RETURNING h.id) "
            "SELECT (SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM cand) AS matched, "
            "(SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM gone) AS retried, "
            f"(SELECT count(pg_notify({channel}, q.queue)) "
            "FROM (SELECT DISTINCT queue FROM ins) AS q) AS woken"
        )

    @staticmethod
    def _cancel_queued(s: str, where: str, *, channel: str) -> str:
        return (
            f"WITH c AS (DELETE FROM {s}.jobs AS j WHERE j.id IN (SELECT id FROM {s}.jobs "
            f"WHERE {where} FOR UPDATE SKIP LOCKED) AND j.state = 'queued' RETURNING j.*), "
            f"h AS (INSERT INTO {s}.history (id, queue, task, args, state, priority, attempts, "
            "max_attempts, rescues, enqueued_at, started_at, error, unique_key, meta) "
            "SELECT id, queue, task, args, 'cancelled', priority, attempts, max_attempts, "
            "rescues, enqueued_at, started_at, jsonb_build_object('type', 'taskq.JobCancelled', "
            "'message', 'cancelled while queued', 'traceback', ''), unique_key, meta FROM c "
            "RETURNING id), "
            f"told AS (SELECT count(pg_notify({channel}, ids)) AS n "
            "FROM (SELECT string_agg(id::text, ',') AS ids "
            "FROM (SELECT id, (row_number() OVER ()) / 300 AS chunk FROM c WHERE awaited) AS x "
            "GROUP BY chunk) AS chunks) "
            "SELECT (SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM h) AS cancelled, "
            "(SELECT max(id) FROM c) AS last_id, (SELECT n FROM told) AS told"
        )


@lru_cache(maxsize=16)
def statements(schema: str) -> AdminStatements:
    """The statements of one schema, built once."""
    return AdminStatements(schema)


# -- status ----------------------------------------------------------------------


@dataclass(frozen=True)
class QueueStatus:
    """Counts of one queue. ``succeeded``/``failed``/``cancelled`` cover the
    window of the report (all of history when it has none)."""

    name: str
    paused: bool
    queued: int
    scheduled: int
    running: int
    succeeded: int
    failed: int
    cancelled: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "name": self.name,
            "paused": self.paused,
            "queued": self.queued,
            "scheduled": self.scheduled,
            "running": self.running,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
        }


@dataclass(frozen=True)
class WorkerStatus:
    """A worker process registered in the ``workers`` table."""

    id: str
    hostname: str
    pid: int
    concurrency: int
    queues: list[str] | None
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age: float
    running: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values: timestamps as ISO 8601 strings."""
        return {
            "id": self.id,
            "hostname": self.hostname,
            "pid": self.pid,
            "concurrency": self.concurrency,
            "queues": self.queues,
            "running": self.running,
            "started_at": self.started_at.isoformat(),
            "heartbeat_at": self.heartbeat_at.isoformat(),
            "heartbeat_age_seconds": round(self.heartbeat_age, 3),
        }


@dataclass(frozen=True)
class StatusReport:
    """One snapshot of the cluster, read in one transaction."""

    time: datetime
    schema: str
    #: Finished counts cover the last this many seconds; None: all of history.
    window: float | None
    queues: list[QueueStatus]
    workers: list[WorkerStatus]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "time": self.time.isoformat(),
            "schema": self.schema,
            "window_seconds": self.window,
            "queues": [q.to_dict() for q in self.queues],
            "workers": [w.to_dict() for w in self.workers],
        }


async def status(app: App, *, window: float | None = None) -> StatusReport:
    """Per-queue counts and live workers.

    ``window``: count finished jobs of the last ``window`` seconds only (cheap
    on a large history); ``None`` counts all of history.
    """
    sql = statements(app.schema)
    # One snapshot: a job moving from jobs to history is counted once.
    async with (
        app._acquire("reading the status") as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        now = await conn.fetchval("SELECT now()")
        live = await conn.fetch(sql.live_counts)
        if window is None:
            done = await conn.fetch(sql.history_counts)
        else:
            done = await conn.fetch(sql.history_counts_since, window)
        paused = {r["name"]: r["paused"] for r in await conn.fetch(sql.paused)}
        workers = await conn.fetch(sql.workers)
    counts: dict[str, dict[str, int]] = {name: {} for name in paused}
    for r in live:
        counts.setdefault(r["queue"], {}).update(
            queued=r["queued"], scheduled=r["scheduled"], running=r["running"]
        )
    for r in done:
        counts.setdefault(r["queue"], {}).update(
            succeeded=r["succeeded"], failed=r["failed"], cancelled=r["cancelled"]
        )
    queues = [
        QueueStatus(
            name=name,
            paused=bool(paused.get(name, False)),
            queued=c.get("queued", 0),
            scheduled=c.get("scheduled", 0),
            running=c.get("running", 0),
            succeeded=c.get("succeeded", 0),
            failed=c.get("failed", 0),
            cancelled=c.get("cancelled", 0),
        )
        for name, c in sorted(counts.items())
    ]
    return StatusReport(
        time=now,
        schema=app.schema,
        window=window,
        queues=queues,
        workers=[
            WorkerStatus(
                id=w["id"],
                hostname=w["hostname"],
                pid=w["pid"],
                concurrency=w["concurrency"],
                queues=None if w["queues"] is None else list(w["queues"]),
                started_at=w["started_at"],
                heartbeat_at=w["heartbeat_at"],
                heartbeat_age=max(0.0, float(w["heartbeat_age"])),
                running=int(w["running"]),
            )
            for w in workers
        ],
    )


# -- jobs ------------------------------------------------------------------------


@dataclass(frozen=True)
class JobDetail:
    """A job's status plus what only operators look at."""

    status: JobStatus
    #: Times the job's lease expired under a worker (crash, kill, partition).
    rescues: int
    #: A cancel was asked for while it was running and has not landed yet.
    cancel_requested: bool

    def to_dict(self) -> dict[str, Any]:
        """``JobStatus.to_dict()`` with ``rescues`` and ``cancel_requested``."""
        return {
            **self.status.to_dict(),
            "rescues": self.rescues,
            "cancel_requested": self.cancel_requested,
        }


def _detail(row: Any) -> JobDetail:
    return JobDetail(status_from_row(row), int(row["rescues"]), bool(row["cancel_requested"]))


async def get_job(app: App, job_id: int) -> JobDetail:
    """One job, live or finished.

    Raises:
        JobNotFound: no job with that id (or it was pruned from history).
    """
    async with app._acquire("reading a job") as conn:
        row = await conn.fetchrow(statements(app.schema).get_job, job_id)
    if row is None:
        raise JobNotFound(f"no job with id {job_id} in schema {app.schema!r}")
    return _detail(row)


async def list_jobs(
    app: App,
    *,
    states: Sequence[str] = ALL_STATES,
    queue: str | None = None,
    task: str | None = None,
    limit: int = 50,
) -> list[JobDetail]:
    """Live and finished jobs, newest (highest id) first."""
    sql = statements(app.schema)
    wanted = list(dict.fromkeys(states))
    live = any(s in LIVE_STATES for s in wanted)
    finished = any(s in FINISHED_STATES for s in wanted)
    if not (live or finished) or limit <= 0:
        return []
    query = sql.list_all if live and finished else sql.list_live if live else sql.list_history
    async with app._acquire("listing jobs") as conn:
        rows = await conn.fetch(query, wanted, queue, task, limit)
    return [_detail(r) for r in rows]


async def known_tasks(app: App) -> list[str]:
    """Task names that workers registered or that live jobs name, sorted."""
    async with app._acquire("listing task names") as conn:
        rows = await conn.fetch(statements(app.schema).known_tasks)
    return [r[0] for r in rows]


async def task_in_history(app: App, name: str) -> bool:
    """Whether a finished job of task ``name`` is in history (a scan of history)."""
    async with app._acquire("looking up a task name") as conn:
        return bool(await conn.fetchval(statements(app.schema).task_in_history, name))


async def _locate(conn: Any, sql: AdminStatements, ids: list[int]) -> dict[int, tuple[str, bool]]:
    """{id: (state, live)} of the jobs that exist among ``ids``."""
    return {r["id"]: (r["state"], r["live"]) for r in await conn.fetch(sql.locate, ids)}


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
    """

    retried: list[int] = field(default_factory=list)
    key_held: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    not_found: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "retried": len(self.retried),
            "retried_ids": self.retried,
            "key_held": self.key_held,
            "skipped": [{"id": i, "state": s} for i, s in self.skipped.items()],
            "not_found": self.not_found,
        }


@dataclass(frozen=True)
class Matched:
    """How many jobs a bulk command would touch (``--dry-run``, progress totals)."""

    count: int
    #: Of those (retry): jobs whose unique key a live job holds now.
    key_held: int = 0
    #: Of those (cancel): queued and running jobs.
    queued: int = 0
    running: int = 0
    #: The highest matching id now: the end of a bulk run.
    last_id: int = 0


async def count_retry(
    app: App,
    *,
    ids: Sequence[int] | None = None,
    states: Sequence[str] = ("failed",),
    queue: str | None = None,
    task: str | None = None,
) -> Matched:
    """How many finished jobs a retry with these arguments would take."""
    sql = statements(app.schema)
    async with app._acquire("counting jobs to retry") as conn:
        if ids is not None:
            total = held = 0
            for chunk in _chunks(ids, BATCH_SIZE):
                row = await conn.fetchrow(sql.count_retry_ids, chunk, list(states))
                total += row["n"]
                held += row["key_held"]
            return Matched(total, key_held=held)
        row = await conn.fetchrow(sql.count_retry, list(states), queue, task)
    return Matched(row["n"], key_held=row["key_held"], last_id=row["last_id"])


async def retry_ids(
    app: App,
    ids: Sequence[int],
    *,
    states: Sequence[str] = RETRYABLE_STATES,
    progress: Progress | None = None,
) -> RetryResult:
    """Re-run the named jobs (those in ``states``) with a fresh attempt budget."""
    sql = statements(app.schema)
    result = RetryResult()
    chunks = _chunks(ids, BATCH_SIZE)
    total = sum(map(len, chunks))
    done = 0
    for chunk in chunks:
        async with app._acquire("retrying jobs") as conn:
            row = await conn.fetchrow(sql.retry_ids, chunk, list(states), sql.enqueued_channel)
            retried = set(row["retried"])
            held = [i for i in row["matched"] if i not in retried]
            rest = [i for i in chunk if i not in retried and i not in held]
            where = await _locate(conn, sql, rest) if rest else {}
        result.retried.extend(sorted(retried))
        result.key_held.extend(held)
        for i in rest:
            if i in where:
                result.skipped[i] = where[i][0]
            else:
                result.not_found.append(i)
        done += len(chunk)
        if progress is not None:
            progress(done, total)
    return result


async def retry_matching(
    app: App,
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
    """
    sql = statements(app.schema)
    if last_id is None:
        counted = await count_retry(app, states=states, queue=queue, task=task)
        last_id, total = counted.last_id, counted.count
    result = RetryResult()
    after = 0
    done = 0
    while True:
        async with app._acquire("retrying jobs") as conn:
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
    return result


# -- cancel ----------------------------------------------------------------------


@dataclass
class CancelResult:
    """What a cancel did.

    ``cancelled``: queued jobs now cancelled in history. ``requested``: running
    jobs whose worker was asked to stop them (they end as cancelled when the
    coroutine is cancelled). ``finished``: named jobs that had already finished
    (id -> state). ``not_found``: named ids that no job has.
    """

    cancelled: list[int] = field(default_factory=list)
    requested: list[int] = field(default_factory=list)
    finished: dict[int, str] = field(default_factory=dict)
    not_found: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "cancelled": len(self.cancelled),
            "cancelled_ids": self.cancelled,
            "cancel_requested": len(self.requested),
            "cancel_requested_ids": self.requested,
            "finished": [{"id": i, "state": s} for i, s in self.finished.items()],
            "not_found": self.not_found,
        }


async def count_cancel(
    app: App,
    *,
    ids: Sequence[int] | None = None,
    queue: str | None = None,
    task: str | None = None,
    states: Sequence[str] = LIVE_STATES,
) -> Matched:
    """How many live jobs a cancel with these arguments would take."""
    sql = statements(app.schema)
    queued = running = last_id = 0
    async with app._acquire("counting jobs to cancel") as conn:
        if ids is not None:
            for chunk in _chunks(ids, BATCH_SIZE):
                row = await conn.fetchrow(sql.count_cancel_ids, chunk)
                queued += row["queued"]
                running += row["running"]
        else:
            row = await conn.fetchrow(sql.count_cancel, queue, task)
            queued, running, last_id = row["queued"], row["running"], row["last_id"]
    queued = queued if "queued" in states else 0
    running = running if "running" in states else 0
    return Matched(queued + running, queued=queued, running=running, last_id=last_id)


async def cancel_ids(app: App, ids: Sequence[int]) -> CancelResult:
    """Cancel the named jobs: queued ones at once, running ones by their worker."""
    sql = statements(app.schema)
    result = CancelResult()
    for chunk in _chunks(ids, BATCH_SIZE):
        rest = chunk
        where: dict[int, tuple[str, bool]] = {}
        async with app._acquire("cancelling jobs") as conn:
            # A job can move from queued to running between the two
            # statements (a claim); another round then finds it running.
            for _ in range(3):
                row = await conn.fetchrow(sql.cancel_queued_ids, rest, sql.finished_channel)
                cancelled = set(row["cancelled"])
                rest = [i for i in rest if i not in cancelled]
                requested = {
                    r["id"]
                    for r in await conn.fetch(sql.cancel_running_ids, rest, sql.cancel_channel)
                }
                rest = [i for i in rest if i not in requested]
                result.cancelled.extend(sorted(cancelled))
                result.requested.extend(sorted(requested))
                if not rest:
                    break
                where = await _locate(conn, sql, rest)
                if not any(live for _, live in where.values()):
                    break
        for i in rest:
            if i not in where:
                result.not_found.append(i)
            elif not where[i][1]:
                result.finished[i] = where[i][0]
            # else: still changing hands after three rounds; reported by neither list
    return result


async def cancel_matching(
    app: App,
    *,
    queue: str | None = None,
    task: str | None = None,
    states: Sequence[str] = LIVE_STATES,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
) -> CancelResult:
    """Cancel the live jobs of the queue and task given (None: any).

    Queued jobs first, in batches, up to the highest id live when it starts;
    then running jobs, which includes those claimed meanwhile.
    """
    sql = statements(app.schema)
    matched = await count_cancel(app, queue=queue, task=task, states=states)
    result = CancelResult()
    done = 0
    if "queued" in states:
        after = 0
        while True:
            async with app._acquire("cancelling jobs") as conn:
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
    if "running" in states:
        async with app._acquire("cancelling jobs") as conn:
            rows = await conn.fetch(sql.cancel_running, queue, task, sql.cancel_channel)
        result.requested.extend(sorted(r["id"] for r in rows))
    return result


# -- purge -----------------------------------------------------------------------


async def purge_cutoff(app: App, older_than: float | None) -> datetime | None:
    """The database's ``now() - older_than`` (None: no age limit)."""
    if older_than is None:
        return None
    async with app._acquire("reading the clock") as conn:
        value: datetime = await conn.fetchval(statements(app.schema).cutoff, older_than)
    return value


async def count_purge(
    app: App, *, states: Sequence[str], finished_before: datetime | None
) -> Matched:
    """How many finished jobs a purge would delete."""
    async with app._acquire("counting jobs to purge") as conn:
        row = await conn.fetchrow(statements(app.schema).count_purge, list(states), finished_before)
    return Matched(row["n"], last_id=row["last_id"])


async def purge(
    app: App,
    *,
    states: Sequence[str],
    finished_before: datetime | None,
    last_id: int,
    total: int = 0,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
) -> int:
    """Delete finished jobs in ``states`` (finished before the cutoff, if any)
    with ids up to ``last_id``; return how many were deleted."""
    sql = statements(app.schema)
    after = 0
    deleted = 0
    while True:
        async with app._acquire("purging history") as conn:
            row = await conn.fetchrow(
                sql.purge_batch, list(states), finished_before, after, last_id, batch_size
            )
        if not row["n"]:
            break
        deleted += row["n"]
        after = row["last_id"]
        if progress is not None:
            progress(deleted, max(total, deleted))
    return deleted
