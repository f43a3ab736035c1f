-- object: function steps_ready(bigint[])
--
-- Workflow steps whose parents have all ended (workflow_steps.pending = 0),
-- or that a retry puts back: the caller holds the workflow_steps row lock of
-- each (every path that changes a waiting step's job row holds it first, so
-- two transactions never decide about the same step).
-- - a task step goes to the queue, due now (or at its own later start),
--   with the results of its data parents copied into inputs; its workers
--   are woken. In a workflow being cancelled it is cancelled instead.
-- - a map that has not expanded yet creates one item step per element of
--   its map_over parent's result (queued at once), or ends at once when the
--   list is empty (succeeded, []) or is not a list (failed);
-- - a map whose items have all ended ends with the list of their results
--   (in order): succeeded if every item did, else failed.
-- Returns the ids of the steps that ended here (maps, cancelled steps), which
-- the caller hands to steps_ended(), and the steps that maps added, by
-- workflow (grown, grown_by), which the caller counts: the workflow rows are
-- locked last, in id order, by the caller (a lock taken here, between step
-- locks, could deadlock with another transaction that ends steps).
CREATE OR REPLACE FUNCTION {schema}.steps_ready(
    p_ids bigint[], OUT ended bigint[], OUT grown bigint[], OUT grown_by integer[]
)
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
    v_some bigint[];
    v_map record;
    v_inputs jsonb;
    v_list jsonb;
    v_n integer;
    v_told bigint;
BEGIN
    ended := '{}';
    grown := '{}';
    grown_by := '{}';
    IF coalesce(cardinality(p_ids), 0) = 0 THEN
        RETURN;
    END IF;
    -- Steps of a workflow being cancelled do not start.
    WITH gone AS (
        DELETE FROM {schema}.jobs AS j
        USING {schema}.workflows AS w
        WHERE j.id = ANY(p_ids) AND j.state = 'waiting' AND w.id = j.workflow_id
            AND w.cancel_requested
        RETURNING j.*
    ),
    archived AS (
        INSERT INTO {schema}.history (id, queue, task, args, state, priority, attempts,
            max_attempts, rescues, enqueued_at, started_at, error, unique_key, meta, progress,
            errors, requeued_by, workflow_id, step, inputs)
        SELECT id, queue, task, args, 'cancelled', priority, attempts, max_attempts, rescues,
            enqueued_at, started_at, jsonb_build_object('type', 'taskq.JobCancelled',
                'message', 'not run: its workflow was cancelled', 'traceback', ''),
            unique_key, meta, progress, errors, requeued_by, workflow_id, step, inputs
        FROM gone
        RETURNING id
    )
    SELECT coalesce(array_agg(id), '{}') INTO v_some FROM archived;
    ended := ended || v_some;

    -- Task steps: to the queue, with their parents' results.
    WITH released AS (
        UPDATE {schema}.jobs AS j SET state = 'queued', run_at = greatest(j.run_at, now()),
            inputs = coalesce((SELECT jsonb_object_agg(e.parent_step, e.result)
                               FROM {schema}.workflow_edges AS e
                               WHERE e.child_id = j.id AND e.data), j.inputs)
        FROM {schema}.workflow_steps AS s
        WHERE j.id = ANY(p_ids) AND j.state = 'waiting' AND s.job_id = j.id AND s.kind = 'task'
        RETURNING j.queue, j.run_at
    )
    SELECT count(pg_notify({enqueued_channel}, CASE WHEN first <= now() THEN queue
            ELSE queue || '@' || extract(epoch FROM first)::text END))
    INTO v_told
    FROM (SELECT queue, min(run_at) AS first FROM released GROUP BY queue) AS n;

    -- Maps.
    FOR v_map IN
        SELECT s.job_id, s.workflow_id, s.name, s.map_over, s.map_arg, s.expanded, j.queue,
            j.task, j.args, j.priority, j.max_attempts, j.meta, j.concurrency_key
        FROM {schema}.workflow_steps AS s JOIN {schema}.jobs AS j ON j.id = s.job_id
        WHERE s.job_id = ANY(p_ids) AND s.kind = 'map' AND j.state = 'waiting'
        ORDER BY s.job_id
    LOOP
        IF v_map.expanded THEN
            -- Every item ended: the map ends with their results, in order.
            WITH items AS (
                SELECT jsonb_agg(e.result ORDER BY e.position) AS result,
                    count(*) FILTER (WHERE e.outcome <> 'succeeded') AS bad, count(*) AS n,
                    min(e.position) FILTER (WHERE e.outcome <> 'succeeded') AS first_bad
                FROM {schema}.workflow_edges AS e
                WHERE e.child_id = v_map.job_id AND e.position IS NOT NULL
            ),
            gone AS (
                DELETE FROM {schema}.jobs AS j WHERE j.id = v_map.job_id RETURNING j.*
            ),
            archived AS (
                INSERT INTO {schema}.history (id, queue, task, args, state, priority, attempts,
                    max_attempts, rescues, enqueued_at, started_at, result, error, unique_key,
                    meta, progress, errors, requeued_by, workflow_id, step, inputs)
                SELECT g.id, g.queue, g.task, g.args,
                    CASE WHEN i.bad = 0 THEN 'succeeded' ELSE 'failed' END, g.priority,
                    g.attempts, g.max_attempts, g.rescues, g.enqueued_at, g.started_at,
                    coalesce(i.result, '[]'::jsonb),
                    CASE WHEN i.bad > 0 THEN jsonb_build_object('type', 'taskq.MapFailed',
                        'message', format('%s of %s items did not succeed (the first: %s[%s])',
                            i.bad, i.n, g.step, i.first_bad), 'traceback', '') END,
                    g.unique_key, g.meta, g.progress, g.errors, g.requeued_by, g.workflow_id,
                    g.step, g.inputs
                FROM gone AS g, items AS i
                RETURNING id
            )
            SELECT coalesce(array_agg(id), '{}') INTO v_some FROM archived;
            ended := ended || v_some;
            CONTINUE;
        END IF;
        SELECT jsonb_object_agg(e.parent_step, e.result) INTO v_inputs
        FROM {schema}.workflow_edges AS e WHERE e.child_id = v_map.job_id AND e.data;
        v_list := v_inputs -> v_map.map_over;
        v_n := CASE WHEN jsonb_typeof(v_list) = 'array' THEN jsonb_array_length(v_list) END;
        IF v_n IS NULL OR v_n = 0 THEN
            -- Nothing to run: the map ends now.
            WITH gone AS (
                DELETE FROM {schema}.jobs AS j WHERE j.id = v_map.job_id RETURNING j.*
            ),
            archived AS (
                INSERT INTO {schema}.history (id, queue, task, args, state, priority, attempts,
                    max_attempts, rescues, enqueued_at, started_at, result, error, unique_key,
                    meta, progress, errors, requeued_by, workflow_id, step, inputs)
                SELECT g.id, g.queue, g.task, g.args,
                    CASE WHEN v_n IS NULL THEN 'failed' ELSE 'succeeded' END, g.priority,
                    g.attempts, g.max_attempts, g.rescues, g.enqueued_at, g.started_at,
                    CASE WHEN v_n IS NULL THEN NULL ELSE '[]'::jsonb END,
                    CASE WHEN v_n IS NULL THEN jsonb_build_object('type', 'taskq.MapFailed',
                        'message', format('cannot map over the result of step %L: it is %s, '
                            'not a list', v_map.map_over,
                            coalesce(jsonb_typeof(v_list), 'missing')), 'traceback', '') END,
                    g.unique_key, g.meta, g.progress, g.errors, g.requeued_by, g.workflow_id,
                    g.step, v_inputs
                FROM gone AS g
                RETURNING id
            )
            SELECT coalesce(array_agg(id), '{}') INTO v_some FROM archived;
            ended := ended || v_some;
            CONTINUE;
        END IF;
        -- One item step per element, queued now, in order (ids follow the
        -- order of the elements). Items get the map's other inputs, not the
        -- list itself (each holds its own element).
        v_inputs := nullif(v_inputs - v_map.map_over, '{}'::jsonb);
        WITH made AS (
            INSERT INTO {schema}.jobs (queue, task, args, priority, run_at, max_attempts, meta,
                concurrency_key, workflow_id, step, inputs, state)
            SELECT v_map.queue, v_map.task, v_map.args || jsonb_build_object(v_map.map_arg, x.v),
                v_map.priority, now(), v_map.max_attempts, v_map.meta, v_map.concurrency_key,
                v_map.workflow_id, v_map.name || '[' || (x.i - 1) || ']', v_inputs, 'queued'
            FROM jsonb_array_elements(v_list) WITH ORDINALITY AS x(v, i)
            ORDER BY x.i
            RETURNING id, step
        ),
        numbered AS (
            SELECT id, step, (row_number() OVER (ORDER BY id) - 1)::integer AS position
            FROM made
        ),
        steps AS (
            INSERT INTO {schema}.workflow_steps (job_id, workflow_id, name, kind, parents,
                pending, map_of, position)
            SELECT id, v_map.workflow_id, step, 'task', 0, 0, v_map.job_id, position
            FROM numbered
        ),
        edges AS (
            INSERT INTO {schema}.workflow_edges (parent_id, child_id, workflow_id, parent_step,
                data, position)
            SELECT id, v_map.job_id, v_map.workflow_id, step, true, position FROM numbered
        )
        SELECT count(*) INTO v_n FROM numbered;
        UPDATE {schema}.workflow_steps AS s SET expanded = true, pending = v_n,
            on_parent_failure = 'run', failed_parent = NULL
        WHERE s.job_id = v_map.job_id;
        grown := grown || v_map.workflow_id;
        grown_by := grown_by || v_n;
        PERFORM pg_notify({enqueued_channel}, v_map.queue);
    END LOOP;
END
$$;
