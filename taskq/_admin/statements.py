"""The SQL of the operator commands (status, jobs, retry, cancel, purge), one set per schema.

Built once per schema like :class:`taskq._store.Store`: the schema is the one
identifier in the text, validated and quoted by ``quote_schema``; every user
value is a bind parameter.
"""

from __future__ import annotations

from functools import lru_cache

from .._names import quote_schema

# A job row as status_from_row() reads it, plus rescues and cancel_requested.
_LIVE_ROW = (
    "id, queue, task, args::text AS args, state, priority, attempts, max_attempts, "
    "enqueued_at, run_at, started_at, NULL::timestamptz AS finished_at, "
    "last_error::text AS error, NULL::text AS result, worker_id, unique_key, "
    "meta::text AS meta, errors::text AS errors, progress::text AS progress, rescues, "
    "cancel_requested, workflow_id, step"
)
_HISTORY_ROW = (
    "id, queue, task, args::text AS args, state, priority, attempts, max_attempts, "
    "enqueued_at, NULL::timestamptz AS run_at, started_at, finished_at, error::text AS error, "
    "result::text AS result, worker_id, unique_key, meta::text AS meta, "
    "errors::text AS errors, progress::text AS progress, rescues, false AS cancel_requested, "
    "workflow_id, step"
)
# Optional filters on queue and task: NULL matches every value.
_FILTERS = "($2::text IS NULL OR queue = $2) AND ($3::text IS NULL OR task = $3)"
#: Retry reports the workflows of the steps it left alone, up to this many.
MAX_WORKFLOWS_LISTED = 100


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
        # Workflow steps waiting for their parents are not runnable: counted
        # apart (never in queued or scheduled).
        self.live_counts = (
            f"SELECT queue, {_live}, count(*) FILTER (WHERE state = 'waiting') AS waiting "
            f"FROM {s}.jobs GROUP BY queue"
        )
        # The same per queue, with the wait of the oldest due job and whether
        # the queue is paused; queues with settings but no job count zero
        # (for the Prometheus queue gauges).
        self.queue_depth = (
            "SELECT n.queue, sum(n.queued)::bigint AS queued, "
            "sum(n.scheduled)::bigint AS scheduled, sum(n.running)::bigint AS running, "
            "sum(n.waiting)::bigint AS waiting, "
            "max(n.lag) AS lag, coalesce(bool_or(q.paused), false) AS paused FROM ("
            f"SELECT queue, {_live}, count(*) FILTER (WHERE state = 'waiting') AS waiting, "
            "extract(epoch FROM now() - min(run_at) "
            "FILTER (WHERE state = 'queued' AND run_at <= now()))::float8 AS lag "
            f"FROM {s}.jobs GROUP BY queue "
            f"UNION ALL SELECT name, 0, 0, 0, 0, NULL FROM {s}.queues) AS n "
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
        # waiting_for: the parent steps a waiting step still waits for.
        self.get_job = (
            f"SELECT {_LIVE_ROW}, CASE WHEN state = 'waiting' THEN array(SELECT e.parent_step "
            f"FROM {s}.workflow_edges AS e WHERE e.child_id = j.id AND e.outcome IS NULL "
            "ORDER BY e.parent_id) END AS waiting_for "
            f"FROM {s}.jobs AS j WHERE id = $1 "
            f"UNION ALL SELECT {_HISTORY_ROW}, NULL FROM {s}.history WHERE id = $1"
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
            f"SELECT id, state, true AS live, workflow_id FROM {s}.jobs "
            "WHERE id = ANY($1::bigint[]) "
            f"UNION ALL SELECT id, state, false, workflow_id FROM {s}.history "
            "WHERE id = ANY($1::bigint[])"
        )

        # -- retry -----------------------------------------------------------
        # Exactly what Job.retry() does, for many jobs at once: the job goes
        # back to the hot table under its own id with a fresh attempt budget,
        # due now, keeping its last error, its errors and its meta, without the
        # progress of its last run. A unique job goes back
        # only while no live job holds its key: ON CONFLICT leaves it in
        # history (also when two retried jobs share a key; the newest wins),
        # and it also settles a race with a producer. The candidates are
        # locked, so two retries of the same job cannot both insert it.
        # Workflow steps are never taken: a step put back alone would run
        # without its workflow knowing (its counts, its children waiting on
        # edges that already recorded its failure); it runs again with its
        # workflow (workflow_retry(): `workflows retry ID`).
        _retry_filter = (
            "h.state = ANY($1::text[]) AND ($2::text IS NULL OR h.queue = $2) "
            "AND ($3::text IS NULL OR h.task = $3)"
        )
        self.retry_ids = self._retry(
            s,
            "h.id = ANY($1::bigint[]) AND h.state = ANY($2::text[]) AND h.workflow_id IS NULL",
            channel="$3",
        )
        self.retry_batch = self._retry(
            s,
            f"{_retry_filter} AND h.workflow_id IS NULL AND h.id > $4 AND h.id <= $5 "
            "ORDER BY h.id LIMIT $6",
            channel="$7",
        )
        # Jobs a retry would leave in history: their key is held by a live
        # job, or by another of the retried jobs with the same key; and the
        # workflow steps it leaves alone (steps, in which workflows).
        _key_held = (
            "SELECT count(*) FILTER (WHERE workflow_id IS NULL) AS n, "
            "count(*) FILTER (WHERE held) "
            "+ count(*) FILTER (WHERE unique_key IS NOT NULL AND NOT held) "
            "- count(DISTINCT ARRAY[queue, unique_key]) "
            "FILTER (WHERE unique_key IS NOT NULL AND NOT held) AS key_held, "
            "count(*) FILTER (WHERE workflow_id IS NOT NULL) AS steps, "
            "coalesce((array_agg(DISTINCT workflow_id) "
            f"FILTER (WHERE workflow_id IS NOT NULL))[1:{MAX_WORKFLOWS_LISTED}], '{{{{}}}}') "
            "AS workflows{} "
            "FROM (SELECT h.id, h.queue, h.workflow_id, "
            "CASE WHEN h.workflow_id IS NULL THEN h.unique_key END AS unique_key, "
            "h.workflow_id IS NULL AND h.unique_key IS NOT NULL AND EXISTS "
            f"(SELECT 1 FROM {s}.jobs AS j WHERE j.queue = h.queue "
            "AND j.unique_key = h.unique_key) AS held "
            f"FROM {s}.history AS h WHERE {{}}) AS m"
        )
        self.count_retry = _key_held.format(
            ", coalesce(max(id) FILTER (WHERE workflow_id IS NULL), 0) AS last_id", _retry_filter
        )
        self.count_retry_ids = _key_held.format(
            "", "h.id = ANY($1::bigint[]) AND h.state = ANY($2::text[])"
        )
        # The steps a bulk retry leaves alone, through the index on workflow_id
        # (its rows are the steps only: cheap next to the scan of history).
        self.skipped_steps = (
            "SELECT count(*) AS steps, coalesce((array_agg(DISTINCT h.workflow_id))"
            f"[1:{MAX_WORKFLOWS_LISTED}], '{{}}') AS workflows FROM {s}.history AS h "
            f"WHERE h.workflow_id IS NOT NULL AND {_retry_filter}"
        )

        # -- cancel ----------------------------------------------------------
        # Queued jobs go to history as cancelled, like Job.cancel(); waiters
        # on their result are told (ids in chunks: a NOTIFY payload is capped
        # at 8000 bytes). SKIP LOCKED passes over a job that a worker is
        # claiming at this moment; it is running by the time the running
        # jobs are asked to stop. Plain jobs only: a workflow step deleted
        # here would leave its children waiting for ever and its workflow
        # running (see cancel_steps below).
        self.cancel_queued_ids = self._cancel_queued(
            s, "id = ANY($1::bigint[]) AND state = 'queued' AND workflow_id IS NULL", channel="$2"
        )
        self.cancel_queued_batch = self._cancel_queued(
            s,
            f"state = 'queued' AND workflow_id IS NULL AND {_FILTERS} AND id > $4 AND id <= $5 "
            "ORDER BY id LIMIT $1",
            channel="$6",
        )
        # Workflow steps that have not started (waiting or queued) are
        # cancelled by cancel_steps(), in the caller's transaction: their
        # descendants are cancelled with them and their workflows' counts
        # kept (a workflow whose steps have all ended ends).
        self.live_steps_ids = (
            f"SELECT id, state, workflow_id FROM {s}.jobs WHERE id = ANY($1::bigint[]) "
            "AND workflow_id IS NOT NULL AND state = ANY($2::text[]) ORDER BY id"
        )
        self.live_steps_batch = (
            f"SELECT id, state, workflow_id FROM {s}.jobs WHERE workflow_id IS NOT NULL "
            f"AND state = ANY($1::text[]) AND {_FILTERS} AND id > $4 AND id <= $5 "
            "ORDER BY id LIMIT $6"
        )
        self.cancel_steps = f"SELECT cancelled, flagged FROM {s}.cancel_steps($1::bigint[], $2)"
        # The steps of those workflows that this transaction moved to history
        # besides the ones named ($2): descendants cancelled with them. xmin
        # is the transaction that wrote the row (its low 32 bits).
        self.cancelled_with = (
            f"SELECT h.id FROM {s}.history AS h WHERE h.workflow_id = ANY($1::bigint[]) "
            "AND h.xmin::text::bigint = txid_current() % 4294967296 "
            "AND NOT h.id = ANY($2::bigint[]) ORDER BY h.id"
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
        _count_live = (
            "count(*) FILTER (WHERE state = 'waiting') AS waiting, "
            "count(*) FILTER (WHERE state = 'queued') AS queued, "
            "count(*) FILTER (WHERE state = 'running') AS running, "
            "count(*) FILTER (WHERE state = 'waiting' AND workflow_id IS NOT NULL) "
            "AS waiting_steps, "
            "count(*) FILTER (WHERE state = 'queued' AND workflow_id IS NOT NULL) "
            "AS queued_steps"
        )
        self.count_cancel = (
            f"SELECT {_count_live}, coalesce(max(id), 0) AS last_id FROM {s}.jobs "
            "WHERE ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR task = $2)"
        )
        self.count_cancel_ids = f"SELECT {_count_live} FROM {s}.jobs WHERE id = ANY($1::bigint[])"

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
            "max_attempts, enqueued_at, last_error, unique_key, meta, errors, workflow_id, step, "
            "inputs) "
            "SELECT id, queue, task, args, priority, now(), 0, max_attempts, enqueued_at, error, "
            "unique_key, meta, errors, workflow_id, step, inputs FROM cand ORDER BY id DESC "
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
            "max_attempts, rescues, enqueued_at, started_at, error, unique_key, meta, progress, "
            "errors, requeued_by, workflow_id, step, inputs) "
            "SELECT id, queue, task, args, 'cancelled', priority, attempts, max_attempts, "
            "rescues, enqueued_at, started_at, jsonb_build_object('type', 'taskq.JobCancelled', "
            "'message', 'cancelled while queued', 'traceback', ''), unique_key, meta, progress, "
            "errors, requeued_by, workflow_id, step, inputs FROM c RETURNING id), "
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
