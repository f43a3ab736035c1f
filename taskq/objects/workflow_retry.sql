-- object: function workflow_retry(bigint)
-- requires: steps_ready, steps_ended
--
-- Run a finished workflow's failed and cancelled steps again, keeping what
-- succeeded: each such step goes back from history to jobs (same id, zero
-- attempts, its errors kept), waiting for those of its parents that run
-- again, or released at once when all its parents succeeded (with their
-- recorded results). A map whose items ran goes back waiting for the items
-- that run again; a map that never expanded waits for its parents as before.
-- The workflow is running again. Locks: the workflow's steps (in id order),
-- then its row, as the statements that end steps take them.
-- Returns the number of steps put back (0: the workflow is running or not
-- found, or nothing failed).
CREATE OR REPLACE FUNCTION {schema}.workflow_retry(p_workflow bigint)
RETURNS integer
LANGUAGE plpgsql
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_ids bigint[];
    v_ready bigint[];
    v_step record;
    v_failed integer;
    v_cancelled integer;
BEGIN
    PERFORM 1 FROM {schema}.workflow_steps AS s
    WHERE s.workflow_id = p_workflow ORDER BY s.job_id FOR UPDATE;
    PERFORM 1 FROM {schema}.workflows AS w
    WHERE w.id = p_workflow AND w.finished_at IS NOT NULL FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    WITH back AS (
        DELETE FROM {schema}.history AS h
        WHERE h.workflow_id = p_workflow AND h.state IN ('failed', 'cancelled')
        RETURNING h.*
    ),
    ins AS (
        INSERT INTO {schema}.jobs (id, queue, task, args, priority, run_at, attempts,
            max_attempts, enqueued_at, last_error, unique_key, meta, errors, workflow_id, step,
            inputs, state)
        SELECT id, queue, task, args, priority, now(), 0, max_attempts, enqueued_at, error,
            unique_key, meta, errors, workflow_id, step, inputs, 'waiting'
        FROM back
        RETURNING id
    )
    SELECT coalesce(array_agg(id), '{}'),
        (SELECT count(*) FROM back WHERE state = 'failed'),
        (SELECT count(*) FROM back WHERE state = 'cancelled')
    INTO v_ids, v_failed, v_cancelled FROM ins;
    IF cardinality(v_ids) = 0 THEN
        RETURN 0;
    END IF;
    -- Edges from the steps that run again wait for their new outcome.
    UPDATE {schema}.workflow_edges AS e SET outcome = NULL, result = NULL
    WHERE e.parent_id = ANY(v_ids);
    -- Each step waits for its parents that run again (a map that expanded:
    -- for its items that run again).
    WITH counted AS (
        SELECT s.job_id, (SELECT count(*) FROM {schema}.workflow_edges AS e
                          WHERE e.child_id = s.job_id AND e.outcome IS NULL
                              AND (e.position IS NOT NULL OR NOT s.expanded))::integer AS n
        FROM {schema}.workflow_steps AS s WHERE s.job_id = ANY(v_ids)
    )
    UPDATE {schema}.workflow_steps AS s SET pending = c.n, failed_parent = NULL
    FROM counted AS c WHERE s.job_id = c.job_id;
    UPDATE {schema}.workflows AS w SET state = 'running', finished_at = NULL,
        cancel_requested = false, failed = w.failed - v_failed,
        cancelled = w.cancelled - v_cancelled
    WHERE w.id = p_workflow;
    SELECT array_agg(s.job_id) INTO v_ready FROM {schema}.workflow_steps AS s
    WHERE s.job_id = ANY(v_ids) AND s.pending = 0;
    IF v_ready IS NOT NULL THEN
        SELECT * INTO v_step FROM {schema}.steps_ready(v_ready);
        IF cardinality(v_step.grown) > 0 THEN
            UPDATE {schema}.workflows AS w SET steps = w.steps + g.n
            FROM (SELECT sum(x)::integer AS n FROM unnest(v_step.grown_by) AS x) AS g
            WHERE w.id = p_workflow;
        END IF;
        IF cardinality(v_step.ended) > 0 THEN
            PERFORM {schema}.steps_ended(v_step.ended);
        END IF;
    END IF;
    RETURN cardinality(v_ids);
END
$$;
