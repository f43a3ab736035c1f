-- object: function cancel_steps(bigint[], text)
-- requires: steps_ended
--
-- Cancel workflow steps: waiting and queued ones move to history as
-- cancelled (with p_reason) and their children are handled as for any ended
-- step (steps_ended); running ones are flagged and their workers told, as for
-- job.cancel(). The steps' workflow_steps rows are locked first, in id
-- order, as every path that changes a waiting step does. A queued or running
-- row that another transaction holds at this instant (a claim, a lease
-- renewal, a write-back) is passed over (SKIP LOCKED): the caller looks again.
-- A map that has made its items is cancelled with its items.
-- Returns the ids cancelled now and the ids flagged now.
CREATE OR REPLACE FUNCTION {schema}.cancel_steps(
    p_ids bigint[], p_reason text, OUT cancelled bigint[], OUT flagged bigint[]
)
LANGUAGE plpgsql
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_told bigint;
    v_ids bigint[];
BEGIN
    -- A map that has made its items: its items go with it.
    v_ids := p_ids || array(
        SELECT s.job_id FROM {schema}.workflow_steps AS s
        WHERE s.map_of = ANY(p_ids) AND NOT s.job_id = ANY(p_ids));
    PERFORM 1 FROM {schema}.workflow_steps AS s
    WHERE s.job_id = ANY(v_ids) ORDER BY s.job_id FOR UPDATE;
    WITH picked AS (
        SELECT j.id FROM {schema}.jobs AS j
        WHERE j.id = ANY(v_ids) AND j.state IN ('waiting', 'queued')
        FOR UPDATE SKIP LOCKED
    ),
    gone AS (
        DELETE FROM {schema}.jobs AS j USING picked WHERE j.id = picked.id RETURNING j.*
    ),
    archived AS (
        INSERT INTO {schema}.history (id, queue, task, args, state, priority, attempts,
            max_attempts, rescues, enqueued_at, started_at, error, unique_key, meta, progress,
            errors, requeued_by, workflow_id, step, inputs)
        SELECT id, queue, task, args, 'cancelled', priority, attempts, max_attempts, rescues,
            enqueued_at, started_at, jsonb_build_object('type', 'taskq.JobCancelled',
                'message', p_reason, 'traceback', ''),
            unique_key, meta, progress, errors, requeued_by, workflow_id, step, inputs
        FROM gone
        RETURNING id
    ),
    told AS (
        SELECT count(pg_notify({finished_channel}, ids)) AS n
        FROM (SELECT string_agg(id::text, ',') AS ids
              FROM (SELECT id, (row_number() OVER ()) / 300 AS chunk
                    FROM gone WHERE awaited) AS c
              GROUP BY chunk) AS chunks
    )
    SELECT coalesce(array_agg(a.id), '{}') INTO cancelled FROM archived AS a, told;
    WITH picked AS (
        SELECT j.id FROM {schema}.jobs AS j
        WHERE j.id = ANY(v_ids) AND j.state = 'running' AND NOT j.cancel_requested
        FOR UPDATE SKIP LOCKED
    ),
    up AS (
        UPDATE {schema}.jobs AS j SET cancel_requested = true FROM picked
        WHERE j.id = picked.id RETURNING j.id
    )
    SELECT coalesce(array_agg(up.id), '{}'), count(pg_notify({cancel_channel}, up.id::text))
    INTO flagged, v_told FROM up;
    IF cardinality(cancelled) > 0 THEN
        PERFORM {schema}.steps_ended(cancelled);
    END IF;
END
$$;
