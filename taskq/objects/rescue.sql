-- object: function rescue(text, text, integer)
-- requires: append_error, steps_ended
--
-- The rescue: a running job whose lease ran out belongs to a dead or
-- partitioned worker. Up to 1000 such rows are locked and re-checked in one
-- statement (FOR UPDATE re-evaluates the condition on the newest row version,
-- and SKIP LOCKED passes over a row that a completion is writing), so a
-- completion or renewal that lands first wins and nothing is re-queued behind
-- its back. A job is not queued again when its attempts are used up, when it
-- was rescued too often (poison: it takes its worker down every time), or when
-- it was being cancelled. The rescue's error is added to the job's errors (not
-- a cancel's), and it never sets requeued_by or history.lease_token: those
-- name an attempt whose own outcome was written, and a rescued attempt's
-- worker must not take the rescue for its outcome (see finish()).
--
-- A function so that the workflow steps it ends are handed to steps_ended()
-- in the same transaction, with one statement from the worker: their
-- children are released or cancelled with the rescue.
--
-- Notifications: the ended jobs' ids on the finished channel, the queues of
-- re-queued jobs on the enqueued channel (both passed in).
CREATE OR REPLACE FUNCTION {schema}.rescue(
    p_finished_channel text, p_enqueued_channel text, p_max_rescues integer,
    OUT requeued_ids bigint[], OUT ended_ids bigint[]
)
LANGUAGE plpgsql
SET jit = off
AS $$
DECLARE
    v_steps bigint[];
    v_told bigint;
    v_woken bigint;
BEGIN
    WITH expired AS (
        SELECT id FROM {schema}.jobs
        WHERE state = 'running' AND lease_expires_at < now()
        LIMIT 1000 FOR UPDATE SKIP LOCKED
    ),
    requeued AS (
        UPDATE {schema}.jobs AS j SET state = 'queued', run_at = now(), worker_id = NULL,
            lease_token = NULL, lease_expires_at = NULL, rescues = j.rescues + 1,
            last_error = x.error, errors = {schema}.append_error(j.errors, j.attempts, x.error)
        FROM expired AS e, (SELECT jsonb_build_object('type', 'taskq.LeaseExpired', 'message',
            'the worker running this job stopped renewing its lease (it crashed, was killed '
            'or lost its database connection)', 'traceback', '') AS error) AS x
        WHERE j.id = e.id AND NOT j.cancel_requested AND j.attempts < j.max_attempts
            AND j.rescues + 1 < p_max_rescues
        RETURNING j.id, j.queue
    ),
    ended AS (
        DELETE FROM {schema}.jobs AS j USING expired AS e
        WHERE j.id = e.id AND (j.cancel_requested OR j.attempts >= j.max_attempts
            OR j.rescues + 1 >= p_max_rescues)
        RETURNING j.*
    ),
    archived AS (
        INSERT INTO {schema}.history (id, queue, task, args, state, priority, attempts,
            max_attempts, rescues, enqueued_at, started_at, worker_id, error, unique_key, meta,
            progress, errors, requeued_by, workflow_id, step, inputs)
        SELECT id, queue, task, args, kind, priority, attempts, max_attempts, rescues + 1,
            enqueued_at, started_at, worker_id, err, unique_key, meta, progress,
            CASE WHEN kind = 'failed' THEN {schema}.append_error(errors, attempts, err)
                ELSE errors END,
            requeued_by, workflow_id, step, inputs
        FROM (
            SELECT g.*,
                CASE WHEN g.cancel_requested THEN 'cancelled' ELSE 'failed' END AS kind,
                CASE WHEN g.cancel_requested THEN jsonb_build_object('type',
                        'taskq.JobCancelled', 'message',
                        'cancelled; its worker stopped renewing the lease', 'traceback', '')
                    WHEN g.rescues + 1 >= p_max_rescues THEN jsonb_build_object('type',
                        'taskq.PoisonJob', 'message', format('its worker stopped renewing the '
                        'lease %s times in a row (it crashed, was killed or was cut off each '
                        'time it ran this job); not run again', g.rescues + 1), 'traceback', '')
                    ELSE jsonb_build_object('type', 'taskq.LeaseExpired', 'message',
                        'the worker running its last attempt stopped renewing the lease; no '
                        'attempts left', 'traceback', '') END AS err
            FROM ended AS g
        ) AS x
        RETURNING id, workflow_id
    )
    SELECT (SELECT coalesce(array_agg(id), '{}') FROM requeued),
        (SELECT coalesce(array_agg(id), '{}') FROM archived),
        (SELECT coalesce(array_agg(id), '{}') FROM archived WHERE workflow_id IS NOT NULL),
        (SELECT count(pg_notify(p_finished_channel, ids))
         FROM (SELECT string_agg(id::text, ',') AS ids
               FROM (SELECT id, (row_number() OVER ()) / 300 AS chunk FROM archived) AS c
               GROUP BY chunk) AS n),
        (SELECT count(pg_notify(p_enqueued_channel, queue))
         FROM (SELECT DISTINCT queue FROM requeued) AS q)
    INTO requeued_ids, ended_ids, v_steps, v_told, v_woken;
    IF cardinality(v_steps) > 0 THEN
        PERFORM {schema}.steps_ended(v_steps);
    END IF;
END
$$;
