-- object: function finish(bigint[], uuid[], text[], text[], text[], double precision[])
-- requires: append_error, steps_ended
--
-- Write back a batch of outcomes. Each names its lease token: a worker whose
-- lease was taken over (rescued, cancelled) changes nothing, so a job is
-- never finished twice, and sending the same batch again (after a lost reply)
-- is harmless. Kinds: succeeded / failed / cancelled move the job to history
-- (with its unique key and meta); retry puts it back after p_delays seconds;
-- release puts it back at once and gives the attempt back (shutdown
-- interrupted it); committed is succeeded, written in the task's own
-- transaction (ctx.transaction()) before the task returns its result: the
-- history row's result_pending is then the time the result is awaited from,
-- until Statements.set_result writes it (see migration 9). A job that would
-- go back to the queue while a cancel is pending ends cancelled instead of
-- running again. Returns the ids whose lease was no longer held (nothing was
-- written for them).
--
-- A retried or failed attempt's error is added to the job's errors (the last
-- attempts' errors, bounded by append_error()). The token of the attempt is
-- kept with what it wrote: requeued_by on a job it put back in the queue,
-- lease_token on the history row of a job it ended. Only this function sets
-- them, and only with the token it matched, so when an outcome is sent again
-- after a lost reply (the first write committed, its answer never arrived),
-- the worker can tell its own committed outcome from a lost lease (see
-- Statements.committed_before). The progress a task reported goes to history
-- with the job.
--
-- Notifications: waiters on results hear the finished ids on the finished
-- channel (in chunks: NOTIFY payloads are capped at 8000 bytes); retried and
-- released jobs wake workers like new ones; a job of a queue with a
-- concurrency limit or a per-key limit that ends (or goes back to the queue)
-- announces the freed slot, so that workers held back by the limit claim at
-- once instead of at their next poll.
--
-- Workflow steps that ended are handed to steps_ended() in the same
-- transaction: their children are released (or cancelled) by the statement
-- that records their outcome, with no poller or sweeper. Plain jobs pay
-- nothing for it (an empty array).
CREATE OR REPLACE FUNCTION {schema}.finish(
    p_ids bigint[], p_tokens uuid[], p_kinds text[], p_results text[], p_errors text[],
    p_delays double precision[]
) RETURNS bigint[]
LANGUAGE plpgsql
SET jit = off
AS $$
DECLARE
    v_done bigint[];
    v_steps bigint[];
BEGIN
    WITH u AS (
        SELECT * FROM unnest(p_ids, p_tokens, p_kinds, p_results, p_errors, p_delays)
            AS u(id, token, kind, result, error, delay)
    ),
    requeued AS (
        UPDATE {schema}.jobs AS j SET state = 'queued',
            run_at = now() + make_interval(secs => u.delay),
            attempts = CASE WHEN u.kind = 'release' THEN j.attempts - 1 ELSE j.attempts END,
            last_error = coalesce(u.error::jsonb, j.last_error),
            errors = CASE WHEN u.kind = 'retry'
                THEN {schema}.append_error(j.errors, j.attempts, u.error::jsonb)
                ELSE j.errors END,
            requeued_by = u.token,
            worker_id = NULL, lease_token = NULL, lease_expires_at = NULL
        FROM u
        WHERE u.kind IN ('retry', 'release') AND j.id = u.id AND j.lease_token = u.token
            AND NOT j.cancel_requested
        RETURNING j.id, j.queue, j.run_at
    ),
    finished AS (
        DELETE FROM {schema}.jobs AS j USING u
        WHERE j.id = u.id AND j.lease_token = u.token
            AND (u.kind IN ('succeeded', 'committed', 'failed', 'cancelled')
                OR j.cancel_requested)
        RETURNING j.id, j.queue, j.task, j.args, j.priority, j.attempts, j.max_attempts,
            j.rescues, j.enqueued_at, j.started_at, j.worker_id, j.awaited, j.unique_key,
            j.meta, j.progress, j.requeued_by, u.token, j.workflow_id, j.step, j.inputs,
            CASE WHEN u.kind IN ('retry', 'failed')
                THEN {schema}.append_error(j.errors, j.attempts, u.error::jsonb)
                ELSE j.errors END AS errors,
            CASE WHEN u.kind IN ('retry', 'release') THEN 'cancelled'
                WHEN u.kind = 'committed' THEN 'succeeded' ELSE u.kind END AS kind,
            u.result,
            CASE WHEN u.kind = 'committed' THEN clock_timestamp() END AS result_pending,
            CASE WHEN u.kind IN ('retry', 'release') THEN jsonb_build_object('type',
                'taskq.JobCancelled', 'message', 'cancelled while it was running', 'traceback',
                '')::text ELSE u.error END AS error
    ),
    archived AS (
        INSERT INTO {schema}.history (id, queue, task, args, state, priority, attempts,
            max_attempts, rescues, enqueued_at, started_at, worker_id, result, error, unique_key,
            meta, progress, errors, requeued_by, lease_token, workflow_id, step, inputs,
            result_pending)
        SELECT id, queue, task, args, kind, priority, attempts, max_attempts, rescues,
            enqueued_at, started_at, worker_id, result::jsonb, error::jsonb, unique_key, meta,
            progress, errors, requeued_by, token, workflow_id, step, inputs, result_pending
        FROM finished
        RETURNING id, workflow_id
    ),
    told AS (
        SELECT count(pg_notify({finished_channel}, ids)) AS n
        FROM (SELECT string_agg(id::text, ',') AS ids
              FROM (SELECT id, (row_number() OVER ()) / 300 AS chunk
                    FROM finished WHERE awaited) AS c
              GROUP BY chunk) AS chunks
    ),
    woken AS (
        SELECT count(pg_notify({enqueued_channel}, CASE WHEN due THEN queue
            ELSE queue || '@' || extract(epoch FROM first)::text END)) AS n
        FROM (SELECT queue, run_at <= now() AS due, min(run_at) AS first
              FROM requeued GROUP BY 1, 2) AS r
    ),
    freed AS (
        SELECT count(pg_notify({enqueued_channel}, q.name)) AS n
        FROM {schema}.queues AS q
        WHERE (q.concurrency_limit IS NOT NULL OR q.per_key_limit IS NOT NULL)
            AND q.name IN (SELECT f.queue FROM finished AS f
                           UNION SELECT r.queue FROM requeued AS r)
    )
    SELECT array(SELECT id FROM requeued UNION ALL SELECT id FROM archived),
        array(SELECT id FROM archived WHERE workflow_id IS NOT NULL)
    INTO v_done, v_steps
    FROM told, woken, freed;
    IF cardinality(v_steps) > 0 THEN
        PERFORM {schema}.steps_ended(v_steps);
    END IF;
    RETURN array(SELECT x FROM unnest(p_ids) AS x WHERE x <> ALL (v_done));
END
$$;
