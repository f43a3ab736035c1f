-- object: function steps_ended(bigint[])
-- requires: steps_ready
--
-- Workflow steps that have just ended (their rows are in history: moved there
-- earlier in the caller's transaction by finish(), the rescue or a cancel).
-- For each, in one transaction with that move:
-- 1. its outcome and result go on the edges to its children (a failure as a
--    description that the worker turns into taskq.StepFailed), so that the
--    children get them whatever retention later does to its history row;
-- 2. each child's count of pending parents goes down, under the child's
--    workflow_steps row lock taken in id order: two parents that end at the
--    same instant in different transactions take turns, and only the one
--    that brings the count to 0 releases the child (exactly once). The
--    release (steps_ready) is a later statement, whose snapshot sees the
--    edges the other parents' committed transactions wrote;
-- 3. a child whose parent failed or was cancelled is cancelled at once
--    (on_parent_failure = 'cancel'), naming the parent; with 'run' it waits
--    for its other parents and runs;
-- 4. steps that end because of this (cancelled children, maps) are handled
--    the same way, down the graph;
-- 5. last, each workflow's counts, in workflow id order; a workflow whose
--    steps have all ended gets its final state and is announced on the
--    workflow channel.
CREATE OR REPLACE FUNCTION {schema}.steps_ended(p_ids bigint[])
RETURNS void
LANGUAGE plpgsql
SET jit = off
-- Its statements look rows up by key. Planning them on every call (custom
-- plans) cost more than running them; and right after a workflow is written
-- its tables have no statistics yet, with which the planner chose a
-- sequential scan of all its steps on every call (measured: 6 ms a call on
-- a 10,000-step workflow).
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    v_ids bigint[] := p_ids;
    v_all bigint[] := '{}';
    v_children bigint[];
    v_counts integer[];
    v_failed text[];
    v_cancel bigint[];
    v_ready bigint[];
    v_next bigint[];
    v_grown bigint[] := '{}';
    v_grown_by integer[] := '{}';
    v_step record;
    v_done bigint[];
    v_told bigint;
    v_workflows bigint[];
BEGIN
    WHILE coalesce(cardinality(v_ids), 0) > 0 LOOP
        v_all := v_all || v_ids;
        -- 1. Outcomes on the edges (once: a step ends once).
        WITH e AS (
            UPDATE {schema}.workflow_edges AS e SET outcome = h.state,
                result = CASE WHEN h.state = 'succeeded' OR h.result IS NOT NULL THEN h.result
                    ELSE jsonb_build_object('$taskq_failed', jsonb_build_object(
                        'step', h.step, 'job_id', h.id, 'state', h.state,
                        'type', coalesce(h.error ->> 'type', ''),
                        'message', coalesce(h.error ->> 'message', ''))) END
            FROM {schema}.history AS h
            WHERE h.id = ANY(v_ids) AND e.parent_id = h.id AND e.outcome IS NULL
            RETURNING e.child_id, e.parent_step, h.state
        )
        SELECT array_agg(child_id ORDER BY child_id), array_agg(n ORDER BY child_id),
            array_agg(failed ORDER BY child_id)
        INTO v_children, v_counts, v_failed
        FROM (SELECT child_id, count(*)::integer AS n,
                  min(parent_step) FILTER (WHERE state <> 'succeeded') AS failed
              FROM e GROUP BY child_id) AS g;
        v_cancel := NULL;
        v_ready := NULL;
        IF v_children IS NOT NULL THEN
            -- 2. The children, locked in id order, then counted down (one
            --    child: the update locks it).
            IF cardinality(v_children) > 1 THEN
                PERFORM 1 FROM {schema}.workflow_steps AS s
                WHERE s.job_id = ANY(v_children) ORDER BY s.job_id FOR UPDATE;
            END IF;
            WITH u AS (
                UPDATE {schema}.workflow_steps AS s SET pending = s.pending - g.n,
                    failed_parent = coalesce(s.failed_parent, g.failed)
                FROM unnest(v_children, v_counts, v_failed) AS g(id, n, failed)
                WHERE s.job_id = g.id
                RETURNING s.job_id, s.pending, s.failed_parent, s.on_parent_failure
            )
            SELECT array_agg(job_id) FILTER (WHERE failed_parent IS NOT NULL
                       AND on_parent_failure = 'cancel'),
                   array_agg(job_id) FILTER (WHERE pending <= 0 AND (failed_parent IS NULL
                       OR on_parent_failure = 'run'))
            INTO v_cancel, v_ready FROM u;
        END IF;
        v_next := '{}';
        -- 3. Children of a failed or cancelled parent, still waiting: cancelled.
        IF v_cancel IS NOT NULL THEN
            WITH gone AS (
                DELETE FROM {schema}.jobs AS j
                WHERE j.id = ANY(v_cancel) AND j.state = 'waiting'
                RETURNING j.*
            ),
            archived AS (
                INSERT INTO {schema}.history (id, queue, task, args, state, priority, attempts,
                    max_attempts, rescues, enqueued_at, started_at, error, unique_key, meta,
                    progress, errors, requeued_by, workflow_id, step, inputs)
                SELECT g.id, g.queue, g.task, g.args, 'cancelled', g.priority, g.attempts,
                    g.max_attempts, g.rescues, g.enqueued_at, g.started_at,
                    jsonb_build_object('type', 'taskq.ParentFailed', 'message',
                        format('not run: its parent step %L %s', s.failed_parent,
                            CASE WHEN e.outcome = 'cancelled' THEN 'was cancelled'
                                ELSE 'failed' END),
                        'traceback', ''),
                    g.unique_key, g.meta, g.progress, g.errors, g.requeued_by, g.workflow_id,
                    g.step, g.inputs
                FROM gone AS g
                JOIN {schema}.workflow_steps AS s ON s.job_id = g.id
                LEFT JOIN {schema}.workflow_edges AS e
                    ON e.child_id = g.id AND e.parent_step = s.failed_parent
                RETURNING id
            )
            SELECT coalesce(array_agg(id), '{}') INTO v_done FROM archived;
            v_next := v_next || v_done;
        END IF;
        -- 4. Children whose last parent this was: released (or, for maps,
        --    expanded or ended).
        IF v_ready IS NOT NULL THEN
            SELECT * INTO v_step FROM {schema}.steps_ready(v_ready);
            v_next := v_next || v_step.ended;
            v_grown := v_grown || v_step.grown;
            v_grown_by := v_grown_by || v_step.grown_by;
        END IF;
        v_ids := v_next;
    END LOOP;

    -- 5. The workflows' counts, rows locked in id order. (Their ids are read
    -- by the steps' primary key first: a subquery here got a generic plan
    -- that read every step of the workflow on each call.)
    -- (No DISTINCT: its generic plan walked a whole index for the order.)
    v_workflows := array(
        SELECT s.workflow_id FROM {schema}.workflow_steps AS s WHERE s.job_id = ANY(v_all));
    IF EXISTS (SELECT FROM unnest(v_workflows) AS x WHERE x <> v_workflows[1]) THEN
        PERFORM 1 FROM {schema}.workflows AS w
        WHERE w.id = ANY(v_workflows) ORDER BY w.id FOR UPDATE;
    END IF;
    WITH ended AS (
        SELECT h.workflow_id AS wid, h.state, h.step, h.result, s.sink
        FROM {schema}.history AS h JOIN {schema}.workflow_steps AS s ON s.job_id = h.id
        WHERE h.id = ANY(v_all)
    ),
    counted AS (
        SELECT wid, count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
            count(*) FILTER (WHERE state = 'failed') AS failed,
            count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
            jsonb_object_agg(step, result) FILTER (WHERE sink AND state = 'succeeded')
                AS results
        FROM ended GROUP BY wid
    ),
    grown AS (
        SELECT g.wid, sum(g.n)::integer AS n
        FROM unnest(v_grown, v_grown_by) AS g(wid, n) GROUP BY g.wid
    )
    UPDATE {schema}.workflows AS w SET
        succeeded = w.succeeded + c.succeeded,
        failed = w.failed + c.failed,
        cancelled = w.cancelled + c.cancelled,
        steps = w.steps + coalesce(g.n, 0),
        results = CASE WHEN c.results IS NULL THEN w.results
            ELSE coalesce(w.results, '{}'::jsonb) || c.results END
    FROM counted AS c LEFT JOIN grown AS g ON g.wid = c.wid
    WHERE w.id = c.wid;
    -- Workflows whose every step has ended.
    WITH finished AS (
        UPDATE {schema}.workflows AS w SET finished_at = now(), state = CASE
            WHEN w.cancel_requested THEN 'cancelled'
            WHEN (SELECT count(*) FROM jsonb_object_keys(coalesce(w.results, '{}'::jsonb)))
                >= cardinality(w.sinks) THEN 'succeeded'
            ELSE 'failed' END
        WHERE w.id = ANY(v_workflows)
            AND w.finished_at IS NULL AND w.succeeded + w.failed + w.cancelled >= w.steps
        RETURNING w.id
    )
    SELECT count(pg_notify({workflow_channel}, f.id::text)) INTO v_told
    FROM finished AS f;
END
$$;
