"""The SQL text of one taskq schema: every statement the Store runs, built once.

Only the schema name is pasted into the text (validated and quoted by
``quote_schema``); every value travels as a bind parameter.
"""

from __future__ import annotations

from ._names import quote_schema

_JOB_COLUMNS = (
    "id, queue, task, args::text AS args, state, priority, attempts, max_attempts, "
    "enqueued_at, run_at, started_at, unique_key"
)

_QUEUE_COLUMNS = (
    "name, paused, concurrency_limit, rate_limit, rate_period, per_key_limit, updated_at, "
    "coalesce(cardinality(rate_log_at), 0) AS rate_log_len"
)


class Statements:
    """The statements of one schema, as attributes named for what they do."""

    def __init__(self, schema: str) -> None:
        s = quote_schema(schema)

        # Enqueue. Each statement also sends the wake-up (see the migration for
        # the payload): "queue" when the jobs are due now, "queue@epoch" when
        # they are due later. All jobs of one statement share queue and start.
        wake = (
            "pg_notify($8, CASE WHEN w.at <= now() THEN $1::text "
            "ELSE $1::text || '@' || extract(epoch FROM w.at)::text END)"
        )
        start = "coalesce($5::timestamptz, now()) + make_interval(secs => $6::float8)"
        self.insert_one = (
            f"WITH w AS (SELECT {start} AS at), "
            f"ins AS (INSERT INTO {s}.jobs "
            "(queue, task, args, priority, run_at, max_attempts, meta, concurrency_key) "
            "SELECT $1, $2, $3::text::jsonb, $4, w.at, $7, $9::text::jsonb, $10 "
            "FROM w RETURNING id) "
            f"SELECT ins.id, {wake} FROM ins, w"
        )
        # A bulk enqueue sends all arguments as one JSON array: one parse in
        # Postgres instead of one per job, and one text value over the wire.
        # The jobs' concurrency keys come as an array beside it (ROWS FROM
        # pairs them; NULL: no job has one).
        self.insert_many = (
            f"WITH w AS (SELECT {start} AS at), "
            f"ins AS (INSERT INTO {s}.jobs "
            "(queue, task, args, priority, run_at, max_attempts, meta, concurrency_key) "
            "SELECT $1, $2, a.args, $4, w.at, $7, $9::text::jsonb, a.key "
            "FROM w, ROWS FROM (jsonb_array_elements($3::text::jsonb), unnest($10::text[])) "
            "AS a(args, key) RETURNING id) "
            f"SELECT (SELECT array_agg(id ORDER BY id) FROM ins) AS ids, {wake} FROM w"
        )
        # The claim lives in a function (see the migration) so that its plan
        # does not depend on the table's statistics.
        self.claim = f"SELECT * FROM {s}.claim($1, $2, $3, $4, $5)"
        # A unique job: see enqueue_unique() in migrations 2 and 3.
        self.insert_unique = (
            f"SELECT id, created FROM {s}.enqueue_unique($1, $2, $3, $4, "
            "coalesce($5::timestamptz, now()) + make_interval(secs => $6::float8), $7, $8, $9, "
            "$10, $11)"
        )
        # The queues that hold queued jobs: one index probe per queue (a
        # loose index scan of jobs_claim), as claim() does when given none.
        self.queued_queues = (
            "WITH RECURSIVE q AS ("
            f"(SELECT j.queue FROM {s}.jobs AS j WHERE j.state = 'queued' "
            "ORDER BY j.queue LIMIT 1) "
            f"UNION ALL SELECT (SELECT j.queue FROM {s}.jobs AS j "
            "WHERE j.state = 'queued' AND j.queue > q.queue ORDER BY j.queue LIMIT 1) "
            "FROM q WHERE q.queue IS NOT NULL) "
            "SELECT coalesce(array_agg(q.queue), '{}') FROM q WHERE q.queue IS NOT NULL"
        )
        self.next_due = (
            f"SELECT min(run_at) - now() FROM {s}.jobs "
            "WHERE state = 'queued' AND task = ANY($2::text[]) "
            "AND ($1::text[] IS NULL OR queue = ANY($1::text[])) "
            f"AND queue NOT IN (SELECT name FROM {s}.queues WHERE paused)"
        )
        # Queue settings. NULL arguments leave a setting as it is; $6 clears
        # the rate limit, $7 the concurrency limit, $10 the per-key limit.
        # Resuming wakes the workers.
        self.configure_queue = (
            f"WITH up AS (INSERT INTO {s}.queues AS q (name, paused, concurrency_limit, "
            "rate_limit, rate_period, per_key_limit) "
            "VALUES ($1, coalesce($2, false), $3, $4, $5, $9) "
            "ON CONFLICT (name) DO UPDATE SET paused = coalesce($2, q.paused), "
            "concurrency_limit = CASE WHEN $7 THEN NULL "
            "ELSE coalesce($3, q.concurrency_limit) END, "
            "rate_limit = CASE WHEN $6 THEN NULL ELSE coalesce($4, q.rate_limit) END, "
            "per_key_limit = CASE WHEN $10 THEN NULL ELSE coalesce($9, q.per_key_limit) END, "
            "rate_period = CASE WHEN $6 THEN NULL ELSE coalesce($5, q.rate_period) END, "
            "rate_log_at = CASE WHEN $6 THEN '{}' ELSE q.rate_log_at END, "
            "rate_log_n = CASE WHEN $6 THEN '{}' ELSE q.rate_log_n END, "
            f"updated_at = now() RETURNING {_QUEUE_COLUMNS}) "
            "SELECT up.*, CASE WHEN NOT up.paused THEN pg_notify($8, up.name) END AS woken "
            "FROM up"
        )
        self.queue_settings = f"SELECT {_QUEUE_COLUMNS} FROM {s}.queues ORDER BY name"
        self.queue_overview = (
            "SELECT n.queue, coalesce(sum(n.queued), 0)::bigint AS queued, "
            "coalesce(sum(n.running), 0)::bigint AS running, bool_or(q.paused) AS paused, "
            "max(q.concurrency_limit) AS concurrency_limit, max(q.rate_limit) AS rate_limit, "
            "max(q.rate_period) AS rate_period, max(q.per_key_limit) AS per_key_limit FROM ("
            "SELECT queue, count(*) FILTER (WHERE state = 'queued') AS queued, "
            f"count(*) FILTER (WHERE state = 'running') AS running FROM {s}.jobs GROUP BY queue "
            f"UNION ALL SELECT name, 0, 0 FROM {s}.queues) AS n "
            f"LEFT JOIN {s}.queues AS q ON q.name = n.queue GROUP BY n.queue ORDER BY n.queue"
        )
        # Cron entries (see cron_fire() in migration 2). A changed expression
        # or time zone starts the entry afresh from $9, the newest slot at or
        # before now: its old slots say nothing about the new schedule.
        self.register_cron = (
            f"INSERT INTO {s}.crons AS c (name, expression, timezone, task, queue, args, "
            "priority, missed, last_slot) VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $9) "
            "ON CONFLICT (name) DO UPDATE SET expression = excluded.expression, "
            "timezone = excluded.timezone, task = excluded.task, queue = excluded.queue, "
            "args = excluded.args, priority = excluded.priority, missed = excluded.missed, "
            "registered_at = now(), last_slot = CASE WHEN (c.expression, c.timezone) "
            "IS DISTINCT FROM (excluded.expression, excluded.timezone) THEN excluded.last_slot "
            "ELSE c.last_slot END RETURNING last_slot"
        )
        self.cron_fire = f"SELECT {s}.cron_fire($1, $2, $3, $4, $5, $6, $7, $8)"
        self.list_crons = (
            "SELECT name, expression, timezone, task, queue, args::text AS args, priority, "
            f"missed, last_slot, last_job_id, registered_at FROM {s}.crons ORDER BY name"
        )
        # Write back a batch of outcomes (see finish() in the migration).
        self.finish = f"SELECT {s}.finish($1, $2, $3, $4, $5, $6)"
        # Of outcomes that finish() did not write (their token no longer
        # matched), those the same attempt had written already: a write-back
        # whose commit went through but whose reply was lost, sent again. Only
        # finish() sets requeued_by and history.lease_token, and only to the
        # token it matched, so a match proves the outcome was this attempt's.
        # A separate statement, after finish(): its snapshot includes a first
        # write that committed while the repeat waited for the row's lock.
        self.committed_before = (
            "SELECT u.id FROM unnest($1::bigint[], $2::uuid[]) AS u(id, token) "
            f"WHERE EXISTS (SELECT FROM {s}.jobs AS j WHERE j.id = u.id "
            "AND j.requeued_by = u.token) "
            f"OR EXISTS (SELECT FROM {s}.history AS h WHERE h.id = u.id "
            "AND (h.lease_token = u.token OR h.requeued_by = u.token))"
        )
        self.renew = (
            f"UPDATE {s}.jobs AS j SET lease_expires_at = now() + make_interval(secs => $3) "
            "FROM unnest($1::bigint[], $2::uuid[]) AS u(id, token) "
            "WHERE j.id = u.id AND j.lease_token = u.token RETURNING j.id, j.cancel_requested"
        )
        # Rescue: re-queue or end running jobs whose lease ran out (see
        # rescue(): one statement, and the workflow steps it ends release or
        # cancel their children in the same transaction).
        self.rescue = (
            f"SELECT requeued_ids AS requeued, ended_ids AS ended FROM {s}.rescue($1, $2, $3)"
        )
        # result_pending_for: how long ago a ctx.transaction() ended the job
        # while its result is not written yet (NULL otherwise; see migration 9).
        self.get_job = (
            f"SELECT {_JOB_COLUMNS}, NULL::timestamptz AS finished_at, last_error AS error, "
            "NULL::text AS result, worker_id, meta::text AS meta, errors::text AS errors, "
            "progress::text AS progress, workflow_id, step, NULL::float8 AS result_pending_for "
            f"FROM {s}.jobs WHERE id = $1 "
            "UNION ALL "
            "SELECT id, queue, task, args::text AS args, state, priority, attempts, max_attempts, "
            "enqueued_at, NULL::timestamptz AS run_at, started_at, unique_key, finished_at, "
            "error, result::text AS result, "
            "worker_id, meta::text AS meta, errors::text AS errors, progress::text AS progress, "
            "workflow_id, step, "
            "extract(epoch FROM now() - result_pending)::float8 AS result_pending_for "
            f"FROM {s}.history WHERE id = $1"
        )
        # A workflow step is cancelled by cancel_steps() instead (its children).
        self.cancel_queued = (
            f"WITH c AS (DELETE FROM {s}.jobs WHERE id = $1 AND state = 'queued' "
            "AND workflow_id IS NULL RETURNING *), "
            f"h AS (INSERT INTO {s}.history (id, queue, task, args, state, priority, attempts, "
            "max_attempts, rescues, enqueued_at, started_at, error, unique_key, meta, progress, "
            "errors, requeued_by) "
            "SELECT id, queue, task, args, 'cancelled', priority, attempts, max_attempts, "
            "rescues, enqueued_at, started_at, jsonb_build_object('type', 'taskq.JobCancelled', "
            "'message', 'cancelled while queued', 'traceback', ''), unique_key, meta, progress, "
            "errors, requeued_by FROM c RETURNING id) "
            "SELECT id, pg_notify($2, id::text) FROM h"
        )
        # Ask the write-back to announce this job's end. Zero rows: it has
        # already finished (or never existed), and the caller reads it.
        # This UPDATE locks a queued job's row for a moment; a claim running
        # then passes over it (SKIP LOCKED) and its worker may go back to sleep
        # until the next poll. So a job that is due is announced again.
        # Returns whether the job is live and awaited now: its end will be
        # announced (by finish(), or by set_result() after a ctx.transaction()).
        self.await_job = (
            f"WITH a AS (UPDATE {s}.jobs SET awaited = true WHERE id = $1 AND NOT awaited "
            "RETURNING queue, state, run_at), "
            "n AS (SELECT pg_notify($2, queue) FROM a WHERE state = 'queued' AND run_at <= now()) "
            "SELECT (SELECT count(*) FROM n) >= 0 AND (EXISTS (SELECT FROM a) "
            f"OR EXISTS (SELECT FROM {s}.jobs WHERE id = $1 AND awaited))"
        )
        self.request_cancel = (
            f"UPDATE {s}.jobs SET cancel_requested = true WHERE id = $1 AND state = 'running' "
            "RETURNING id, pg_notify($2, id::text)"
        )
        # A unique job goes back only while no other live job holds its key;
        # a workflow step goes back with its workflow (workflow_retry()).
        # the unique index settles a race with a producer (the caller reports it).
        # It keeps the errors of the earlier attempts and starts without
        # progress (the new run reports its own).
        self.rerun = (
            f"WITH h AS (DELETE FROM {s}.history AS h WHERE h.id = $1 "
            "AND h.state IN ('failed', 'cancelled') AND h.workflow_id IS NULL "
            "AND (h.unique_key IS NULL OR NOT EXISTS "
            f"(SELECT 1 FROM {s}.jobs AS j WHERE j.queue = h.queue "
            "AND j.unique_key = h.unique_key)) RETURNING *), "
            f"ins AS (INSERT INTO {s}.jobs (id, queue, task, args, priority, run_at, attempts, "
            "max_attempts, enqueued_at, last_error, unique_key, meta, errors) "
            "SELECT id, queue, task, args, priority, now(), 0, max_attempts, enqueued_at, error, "
            "unique_key, meta, errors FROM h RETURNING id, queue) "
            "SELECT id, pg_notify($2, queue) FROM ins"
        )
        self.counts = (
            f"SELECT queue, state, count(*) AS n FROM {s}.jobs GROUP BY queue, state "
            "UNION ALL "
            f"SELECT queue, state, count(*) AS n FROM {s}.history GROUP BY queue, state "
            "ORDER BY queue, state"
        )
        self.prune = f"SELECT {s}.prune($1, $2)"
        # History's time partitions (see history_extend(), history_detach(),
        # history_drop()): each in a transaction of its own.
        self.history_extend = f"SELECT {s}.history_extend($1, $2)"
        self.history_detach = f"SELECT detached, busy FROM {s}.history_detach($1)"
        self.history_drop = f"SELECT {s}.history_drop()"
        # Whose a workflow step's result is: the steps that take it, or the
        # workflow's (a step without children); NULL when nothing takes it.
        self.step_result_used = (
            "SELECT CASE WHEN s.sink THEN 'it is a result of the workflow' WHEN EXISTS ("
            f"SELECT FROM {s}.workflow_edges AS e WHERE e.parent_id = s.job_id AND e.data) "
            "THEN 'later steps take it' END "
            f"FROM {s}.workflow_steps AS s WHERE s.job_id = $1"
        )
        self.cancel_steps = f"SELECT cancelled, flagged FROM {s}.cancel_steps($1::bigint[], $2)"
        self.register_worker = (
            f"INSERT INTO {s}.workers (id, hostname, pid, queues, tasks, concurrency) "
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()"
        )
        self.register_tasks = (
            f"INSERT INTO {s}.tasks AS t (name, queue, max_attempts, rate_limit, rate_period) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::int[], $5::float8[]) "
            "ON CONFLICT (name) DO UPDATE SET queue = excluded.queue, "
            "max_attempts = excluded.max_attempts, last_seen_at = now(), "
            "rate_limit = excluded.rate_limit, rate_period = excluded.rate_period, "
            "rate_log_at = CASE WHEN t.rate_period IS NOT DISTINCT FROM excluded.rate_period "
            "THEN t.rate_log_at ELSE '{}' END, "
            "rate_log_n = CASE WHEN t.rate_period IS NOT DISTINCT FROM excluded.rate_period "
            "THEN t.rate_log_n ELSE '{}' END"
        )
        self.heartbeat = f"UPDATE {s}.workers SET heartbeat_at = now() WHERE id = $1"
        self.unregister_worker = f"DELETE FROM {s}.workers WHERE id = $1"
        self.forget_dead_workers = (
            f"DELETE FROM {s}.workers WHERE heartbeat_at < now() - make_interval(secs => $1)"
        )
        self.lookup_task = f"SELECT queue, max_attempts FROM {s}.tasks WHERE name = $1"
        self.task_names = f"SELECT name FROM {s}.tasks ORDER BY name"
        # Due jobs of tasks a worker does not have, counted over at most
        # $3 rows so that a huge backlog costs a bounded scan.
        self.stray_tasks = (
            "SELECT task, queue, count(*) AS n FROM ("
            f"SELECT task, queue FROM {s}.jobs WHERE state = 'queued' AND run_at <= now() "
            "AND ($1::text[] IS NULL OR queue = ANY($1::text[])) AND NOT task = ANY($2::text[]) "
            "LIMIT $3) AS j GROUP BY task, queue ORDER BY n DESC, task"
        )
        # What a result waiter that timed out tells: the job, whether its queue
        # is paused, and which live workers (a heartbeat within $2 s) serve it.
        self.explain_wait = (
            "SELECT j.state, j.task, j.queue, j.attempts, j.max_attempts, j.worker_id, "
            "extract(epoch FROM j.run_at - now())::float8 AS due_in, j.last_error::text AS error, "
            f"coalesce((SELECT paused FROM {s}.queues WHERE name = j.queue), false) AS paused, "
            "(SELECT count(*) FROM "
            f"{s}.workers w WHERE w.heartbeat_at > now() - make_interval(secs => $2)) AS live, "
            f"(SELECT count(*) FROM {s}.workers w "
            "WHERE w.heartbeat_at > now() - make_interval(secs => $2) AND j.task = ANY(w.tasks) "
            "AND (w.queues IS NULL OR j.queue = ANY(w.queues))) AS serving, "
            f"(SELECT array_agg(DISTINCT t) FROM {s}.workers w, unnest(w.tasks) AS t "
            "WHERE w.heartbeat_at > now() - make_interval(secs => $2)) AS known, "
            "j.workflow_id, j.step, (SELECT array_agg(e.parent_step ORDER BY e.parent_id) "
            f"FROM {s}.workflow_edges e WHERE e.child_id = j.id AND e.outcome IS NULL) "
            f"AS waiting_for FROM {s}.jobs j WHERE j.id = $1"
        )
        # One chosen job claimed now, whatever its due time, queue pause or
        # limits (taskq.testing's run_job): the lease of claim(), otherwise.
        self.claim_job = (
            f"UPDATE {s}.jobs AS j SET state = 'running', attempts = j.attempts + 1, "
            "worker_id = $3, lease_token = gen_random_uuid(), "
            "lease_expires_at = now() + make_interval(secs => $4), started_at = now() "
            "WHERE j.id = $1 AND j.state = 'queued' AND j.task = ANY($2::text[]) "
            "RETURNING j.id, j.task, j.queue, j.args::text, j.attempts, j.max_attempts, "
            "j.lease_token, j.priority, j.meta::text, j.inputs::text, j.workflow_id, j.step"
        )
        # The progress a running task reported (JobContext.progress), fenced by
        # the lease token: a worker that lost the job writes nothing. "at" is
        # when the task reported it ($5 seconds ago), on the database's clock.
        self.progress = (
            f"UPDATE {s}.jobs SET progress = jsonb_build_object('fraction', $3::float8, "
            "'message', $4::text, 'at', now() - make_interval(secs => $5::float8)) "
            "WHERE id = $1 AND lease_token = $2 RETURNING true"
        )
        # JobContext.transaction(), in the task's transaction just before its
        # finish(): lock the job's row while it is still ours (a rescue that
        # locked it first has changed the token: no row), and clear awaited
        # (returned as it was): the end is announced once the task's result is
        # written (set_result), not at the commit.
        self.lock_for_commit = (
            f"WITH o AS (SELECT id, awaited FROM {s}.jobs WHERE id = $1 AND lease_token = $2 "
            f"FOR UPDATE) UPDATE {s}.jobs AS j SET awaited = false FROM o WHERE j.id = o.id "
            "RETURNING o.awaited"
        )
        # The connection of a ctx.transaction() broke during its COMMIT: did it
        # commit? The server may still be running that transaction (COMMIT
        # not read yet, or still being written, or the client's end not
        # noticed): first end its backend, found by the pid the connection had
        # and by the transaction that holds the job's row (its xmax), so that
        # no other session can be hit; then wait for the row's lock, which the
        # transaction holds until it ends; then read whether the job ended
        # under the attempt's token.
        self.end_commit_backend = (
            f"SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity AS a "
            f"JOIN {s}.jobs AS j ON a.backend_xid = j.xmax WHERE j.id = $1 AND a.pid = $2"
        )
        self.commit_wait = f"SELECT true FROM {s}.jobs WHERE id = $1 FOR KEY SHARE"
        self.committed_by = (
            f"SELECT EXISTS (SELECT FROM {s}.history WHERE id = $1 AND lease_token = $2)"
        )
        # The result of a job that ctx.transaction() finished, written when its
        # task returns (None too: that ends the wait for it); only the attempt
        # that ended the job has its token. Announced if the job was awaited
        # at the commit ($4), or a waiter found its result pending since
        # (result_awaited, see await_result: a waiter's flag set first is seen
        # here, as this UPDATE then waits for its row lock and reads the row
        # anew; one arriving after this finds the result written).
        self.set_result = (
            f"UPDATE {s}.history SET result = coalesce($3::text::jsonb, result), "
            "result_pending = NULL WHERE id = $1 AND lease_token = $2 "
            "RETURNING CASE WHEN $4 OR result_awaited THEN pg_notify($5, id::text) END"
        )
        # A result waiter found the job's result pending: have its write
        # announced. No row: it has been written meanwhile (read it again).
        self.await_result = (
            f"UPDATE {s}.history SET result_awaited = true "
            "WHERE id = $1 AND result_pending IS NOT NULL RETURNING true"
        )
