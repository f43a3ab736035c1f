-- object: function workflow_enqueue(text, jsonb, jsonb)
--
-- Write a whole workflow in one statement (and so in the caller's
-- transaction, if it has one): its row, one job per step (steps without
-- parents queued, the others waiting), the graph, and the wake-ups (sent by
-- Postgres at commit, so workers never see a workflow that rolled back).
-- p_steps is a JSON array of steps in an order where parents come first
-- (the builder's order), each:
--   {"name", "task", "queue", "priority", "args" (object), "max_attempts",
--    "delay" (seconds), "run_at" (timestamp or null), "unique_key", "meta",
--    "concurrency_key" (a map's items get the map's),
--    "kind" ("task" | "map"), "on_parent_failure" ("cancel" | "run"),
--    "sink" (bool), "map_over" (a parent's name), "map_arg",
--    "parents": [{"step": name, "data": bool}, ...]}
-- p_meta (the workflow's meta: what enqueue middleware added, e.g. a trace
-- context) is kept on the workflow and carried by every step (a step's own
-- meta keys win).
-- Returns the workflow's id and the job ids of the steps, in p_steps order.
CREATE OR REPLACE FUNCTION {schema}.workflow_enqueue(
    p_name text, p_steps jsonb, p_meta jsonb,
    OUT workflow_id bigint, OUT job_ids bigint[]
)
LANGUAGE plpgsql
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_names text[];
    v_told bigint;
BEGIN
    INSERT INTO {schema}.workflows (name, steps, sinks, meta)
    VALUES (p_name, jsonb_array_length(p_steps),
        array(SELECT x ->> 'name' FROM jsonb_array_elements(p_steps) AS x
              WHERE (x ->> 'sink')::boolean),
        nullif(p_meta, 'null'::jsonb))
    RETURNING id INTO workflow_id;

    WITH s AS (
        SELECT x.v, x.i FROM jsonb_array_elements(p_steps) WITH ORDINALITY AS x(v, i)
    ),
    made AS (
        INSERT INTO {schema}.jobs AS j (queue, task, args, priority, run_at, max_attempts,
            meta, unique_key, concurrency_key, workflow_id, step, state)
        SELECT v ->> 'queue', v ->> 'task', v -> 'args', (v ->> 'priority')::smallint,
            coalesce((v ->> 'run_at')::timestamptz, now())
                + make_interval(secs => coalesce((v ->> 'delay')::float8, 0)),
            (v ->> 'max_attempts')::integer,
            nullif(coalesce(nullif(p_meta, 'null'::jsonb), '{}'::jsonb)
                || coalesce(nullif(v -> 'meta', 'null'::jsonb), '{}'::jsonb), '{}'::jsonb),
            v ->> 'unique_key', v ->> 'concurrency_key', workflow_enqueue.workflow_id,
            v ->> 'name',
            CASE WHEN jsonb_array_length(v -> 'parents') = 0 AND v ->> 'kind' = 'task'
                THEN 'queued' ELSE 'waiting' END
        FROM s ORDER BY i
        RETURNING j.id, j.step
    )
    SELECT array_agg(m.id ORDER BY s.i), array_agg(m.step ORDER BY s.i)
    INTO job_ids, v_names
    FROM made AS m JOIN s ON s.v ->> 'name' = m.step;

    INSERT INTO {schema}.workflow_steps (job_id, workflow_id, name, kind, parents, pending,
        on_parent_failure, sink, map_over, map_arg)
    SELECT n.id, workflow_enqueue.workflow_id, n.name, x.v ->> 'kind',
        jsonb_array_length(x.v -> 'parents'), jsonb_array_length(x.v -> 'parents'),
        x.v ->> 'on_parent_failure', (x.v ->> 'sink')::boolean, x.v ->> 'map_over',
        x.v ->> 'map_arg'
    FROM unnest(job_ids, v_names) WITH ORDINALITY AS n(id, name, i)
    JOIN jsonb_array_elements(p_steps) WITH ORDINALITY AS x(v, i) ON x.i = n.i;

    INSERT INTO {schema}.workflow_edges (parent_id, child_id, workflow_id, parent_step, data)
    SELECT p.id, c.id, workflow_enqueue.workflow_id, p.name, (e.v ->> 'data')::boolean
    FROM unnest(job_ids, v_names) WITH ORDINALITY AS c(id, name, i)
    JOIN jsonb_array_elements(p_steps) WITH ORDINALITY AS x(v, i) ON x.i = c.i
    CROSS JOIN jsonb_array_elements(x.v -> 'parents') AS e(v)
    JOIN unnest(job_ids, v_names) AS p(id, name) ON p.name = e.v ->> 'step';

    SELECT count(pg_notify({enqueued_channel}, CASE WHEN first <= now() THEN queue
        ELSE queue || '@' || extract(epoch FROM first)::text END))
    INTO v_told
    FROM (SELECT j.queue, min(j.run_at) AS first FROM {schema}.jobs AS j
          WHERE j.id = ANY(job_ids) AND j.state = 'queued' GROUP BY j.queue) AS q;
END
$$;
