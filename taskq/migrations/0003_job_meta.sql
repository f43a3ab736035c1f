-- taskq schema, version 3: metadata carried with each job.
--
-- `meta` holds what travels with a job besides its arguments: the trace
-- context of the request that enqueued it (so the run joins that trace) and
-- whatever the application adds with options(meta=...). NULL when empty, so a
-- job without metadata costs nothing more to write or claim. Adding a
-- nullable column without a default rewrites no rows.
ALTER TABLE {schema}.jobs ADD COLUMN meta jsonb;
ALTER TABLE {schema}.history ADD COLUMN meta jsonb;

-- The functions below are those of version 2, changed only to carry `meta`:
-- enqueue_unique() takes it, claim() returns it (a new last column), finish()
-- keeps it in history.
DROP FUNCTION {schema}.enqueue_unique(text, text, text, smallint, timestamptz, integer, text,
    double precision);
CREATE FUNCTION {schema}.enqueue_unique(
    p_queue text, p_task text, p_args text, p_priority smallint, p_run_at timestamptz,
    p_max_attempts integer, p_key text, p_window double precision, p_meta text
) RETURNS TABLE (id bigint, created boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
BEGIN
    FOR i IN 1 .. 20 LOOP
        SELECT j.id INTO v_id FROM {schema}.jobs AS j
        WHERE j.queue = p_queue AND j.unique_key = p_key;
        IF FOUND THEN
            RETURN QUERY SELECT v_id, false;
            RETURN;
        END IF;
        IF p_window > 0 THEN
            SELECT h.id INTO v_id FROM {schema}.history AS h
            WHERE h.queue = p_queue AND h.unique_key = p_key
                AND h.finished_at > now() - make_interval(secs => p_window)
            ORDER BY h.finished_at DESC LIMIT 1;
            IF FOUND THEN
                RETURN QUERY SELECT v_id, false;
                RETURN;
            END IF;
        END IF;
        INSERT INTO {schema}.jobs AS j (queue, task, args, priority, run_at, max_attempts,
            unique_key, meta)
        VALUES (p_queue, p_task, p_args::jsonb, p_priority, p_run_at, p_max_attempts, p_key,
            p_meta::jsonb)
        ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL DO NOTHING
        RETURNING j.id INTO v_id;
        IF FOUND THEN
            IF p_window > 0 AND EXISTS (
                SELECT 1 FROM {schema}.history AS h
                WHERE h.queue = p_queue AND h.unique_key = p_key
                    AND h.finished_at > now() - make_interval(secs => p_window)
            ) THEN
                DELETE FROM {schema}.jobs AS j WHERE j.id = v_id;
                CONTINUE;
            END IF;
            PERFORM pg_notify({enqueued_channel}, CASE WHEN p_run_at <= now() THEN p_queue
                ELSE p_queue || '@' || extract(epoch FROM p_run_at)::text END);
            RETURN QUERY SELECT v_id, true;
            RETURN;
        END IF;
    END LOOP;
    RAISE EXCEPTION 'taskq: the unique key % of queue % changed hands too often to enqueue',
        p_key, p_queue USING ERRCODE = '40001';
END
$$;

DROP FUNCTION {schema}.claim(text[], text[], integer, text, double precision, bigint[], uuid[],
    text[], text[], text[], double precision[]);
CREATE FUNCTION {schema}.claim(
    p_queues text[], p_tasks text[], p_limit integer, p_worker text, p_lease double precision,
    p_ids bigint[] DEFAULT NULL, p_tokens uuid[] DEFAULT NULL, p_kinds text[] DEFAULT NULL,
    p_results text[] DEFAULT NULL, p_errors text[] DEFAULT NULL,
    p_delays double precision[] DEFAULT NULL
) RETURNS TABLE (
    id bigint, task text, queue text, args text, attempts integer, max_attempts integer,
    lease_token uuid, priority smallint, lost boolean, wait_seconds double precision,
    meta text
)
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_sort = off
-- A plan that had to use a disabled node carries a huge cost, which would
-- trigger JIT compilation (a hundred milliseconds) for a sub-millisecond query.
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    -- A claim that found a limit's lock busy looks again after this long.
    c_busy_wait CONSTANT double precision := 0.02;
    v_queues text[] := p_queues;
    v_tasks text[] := p_tasks;
    v_paused text[];
    v_limited text[];
    v_limited_tasks text[];
    v_left integer := p_limit;
    v_take integer;
    v_count integer;
    v_got integer;
    v_start integer;
    v_queue text;
    v_task text;
    v_now timestamptz;
    v_running integer;
    v_budget record;
    v_row {schema}.queues;
    v_trow {schema}.tasks;
    v_rated boolean;
    v_blocked boolean := false;
    v_wait double precision;
    v_ttake integer;
    v_tgot integer;
    v_tnow timestamptz;
BEGIN
    IF cardinality(p_ids) > 0 THEN
        RETURN QUERY
        SELECT x, NULL::text, NULL::text, NULL::text, NULL::integer, NULL::integer,
            NULL::uuid, NULL::smallint, true, NULL::double precision, NULL::text
        FROM unnest({schema}.finish(p_ids, p_tokens, p_kinds, p_results, p_errors, p_delays))
            AS x;
    END IF;
    IF p_limit <= 0 THEN
        RETURN;
    END IF;
    -- Queues whose settings matter to a claim, and rate-limited tasks: both
    -- usually none, read from tiny tables.
    SELECT array_agg(q.name) FILTER (WHERE q.paused),
           array_agg(q.name) FILTER (WHERE NOT q.paused)
    INTO v_paused, v_limited
    FROM {schema}.queues AS q
    WHERE q.paused OR q.concurrency_limit IS NOT NULL OR q.rate_limit IS NOT NULL;
    SELECT array_agg(t.name) INTO v_limited_tasks
    FROM {schema}.tasks AS t WHERE t.rate_limit IS NOT NULL AND t.name = ANY(p_tasks);
    IF v_limited_tasks IS NOT NULL THEN
        v_tasks := array(SELECT x FROM unnest(p_tasks) AS x WHERE x <> ALL (v_limited_tasks));
    END IF;
    IF v_queues IS NULL THEN
        WITH RECURSIVE q AS (
            (SELECT j.queue FROM {schema}.jobs AS j WHERE j.state = 'queued'
             ORDER BY j.queue LIMIT 1)
            UNION ALL
            SELECT (SELECT j.queue FROM {schema}.jobs AS j
                    WHERE j.state = 'queued' AND j.queue > q.queue ORDER BY j.queue LIMIT 1)
            FROM q WHERE q.queue IS NOT NULL
        )
        SELECT array_agg(q.queue) INTO v_queues FROM q WHERE q.queue IS NOT NULL;
    END IF;
    IF v_paused IS NOT NULL AND v_queues IS NOT NULL THEN
        v_queues := array(SELECT x FROM unnest(v_queues) AS x WHERE x <> ALL (v_paused));
    END IF;
    v_count := coalesce(cardinality(v_queues), 0);
    v_start := CASE WHEN v_count > 1 THEN floor(random() * v_count)::integer ELSE 0 END;
    FOR i IN 0 .. v_count - 1 LOOP
        EXIT WHEN v_left <= 0;
        v_queue := v_queues[1 + (v_start + i) % v_count];
        v_take := v_left;
        v_rated := false;
        v_now := now();
        v_tnow := NULL;
        IF v_queue = ANY (v_limited) THEN
            -- Take turns with every other claim of this queue, then read the
            -- settings and state that the previous claim left.
            SELECT q.* INTO v_row FROM {schema}.queues AS q
            WHERE q.name = v_queue FOR UPDATE SKIP LOCKED;
            IF NOT FOUND THEN
                v_wait := least(v_wait, c_busy_wait);
                CONTINUE;
            END IF;
            CONTINUE WHEN v_row.paused;
            v_now := clock_timestamp();
            IF v_row.concurrency_limit IS NOT NULL THEN
                SELECT count(*) INTO v_running FROM {schema}.jobs AS j
                WHERE j.queue = v_queue AND j.state = 'running';
                IF v_row.concurrency_limit - v_running < v_take THEN
                    v_take := greatest(0, v_row.concurrency_limit - v_running);
                    v_blocked := true;
                END IF;
            END IF;
            IF v_row.rate_limit IS NOT NULL AND v_take > 0 THEN
                v_rated := true;
                v_budget := {schema}.rate_budget(v_row.rate_limit, v_row.rate_period,
                    v_row.rate_log_at, v_row.rate_log_n, v_now, v_take);
                IF v_budget.allowed < v_take THEN
                    v_take := v_budget.allowed;
                    v_wait := least(v_wait, v_budget.wait);
                END IF;
            END IF;
            CONTINUE WHEN v_take <= 0;
        END IF;
        v_got := 0;
        IF cardinality(v_tasks) > 0 THEN
            RETURN QUERY
            WITH picked AS (
                SELECT j.id FROM {schema}.jobs AS j
                WHERE j.state = 'queued' AND j.queue = v_queue
                    AND j.task = ANY(v_tasks) AND j.run_at <= now()
                ORDER BY j.priority DESC, j.run_at, j.id
                LIMIT v_take FOR UPDATE SKIP LOCKED
            )
            UPDATE {schema}.jobs AS j SET state = 'running', attempts = j.attempts + 1,
                worker_id = p_worker, lease_token = gen_random_uuid(),
                lease_expires_at = now() + make_interval(secs => p_lease), started_at = v_now
            FROM picked WHERE j.id = picked.id
            RETURNING j.id, j.task, j.queue, j.args::text, j.attempts, j.max_attempts,
                j.lease_token, j.priority, false, NULL::double precision, j.meta::text;
            GET DIAGNOSTICS v_got = ROW_COUNT;
        END IF;
        -- Rate-limited tasks, each under its own window.
        FOREACH v_task IN ARRAY coalesce(v_limited_tasks, '{}') LOOP
            EXIT WHEN v_take - v_got <= 0;
            CONTINUE WHEN NOT EXISTS (
                SELECT 1 FROM {schema}.jobs AS j
                WHERE j.state = 'queued' AND j.queue = v_queue AND j.task = v_task
                    AND j.run_at <= now());
            SELECT t.* INTO v_trow FROM {schema}.tasks AS t
            WHERE t.name = v_task FOR UPDATE SKIP LOCKED;
            IF NOT FOUND THEN
                v_wait := least(v_wait, c_busy_wait);
                CONTINUE;
            END IF;
            CONTINUE WHEN v_trow.rate_limit IS NULL;
            v_tnow := greatest(v_now, clock_timestamp());
            v_budget := {schema}.rate_budget(v_trow.rate_limit, v_trow.rate_period,
                v_trow.rate_log_at, v_trow.rate_log_n, v_tnow, v_take - v_got);
            v_ttake := v_budget.allowed;
            IF v_ttake < v_take - v_got THEN
                v_wait := least(v_wait, v_budget.wait);
            END IF;
            CONTINUE WHEN v_ttake <= 0;
            RETURN QUERY
            WITH picked AS (
                SELECT j.id FROM {schema}.jobs AS j
                WHERE j.state = 'queued' AND j.queue = v_queue AND j.task = v_task
                    AND j.run_at <= now()
                ORDER BY j.priority DESC, j.run_at, j.id
                LIMIT v_ttake FOR UPDATE SKIP LOCKED
            )
            UPDATE {schema}.jobs AS j SET state = 'running', attempts = j.attempts + 1,
                worker_id = p_worker, lease_token = gen_random_uuid(),
                lease_expires_at = now() + make_interval(secs => p_lease),
                started_at = v_tnow
            FROM picked WHERE j.id = picked.id
            RETURNING j.id, j.task, j.queue, j.args::text, j.attempts, j.max_attempts,
                j.lease_token, j.priority, false, NULL::double precision, j.meta::text;
            GET DIAGNOSTICS v_tgot = ROW_COUNT;
            IF v_tgot > 0 THEN
                UPDATE {schema}.tasks AS t SET rate_log_at = l.at, rate_log_n = l.n
                FROM {schema}.rate_log_add(v_trow.rate_period, v_trow.rate_log_at,
                    v_trow.rate_log_n, v_tnow, v_tgot) AS l
                WHERE t.name = v_task;
                v_got := v_got + v_tgot;
            END IF;
        END LOOP;
        IF v_rated AND v_got > 0 THEN
            -- One entry for the claim, at its latest start time (a rate-limited
            -- task's jobs start a moment after the others): an entry stamped
            -- late leaves the window late, which errs on the safe side.
            UPDATE {schema}.queues AS q SET rate_log_at = l.at, rate_log_n = l.n
            FROM {schema}.rate_log_add(v_row.rate_period, v_row.rate_log_at, v_row.rate_log_n,
                greatest(v_now, v_tnow), v_got) AS l
            WHERE q.name = v_queue;
        END IF;
        v_left := v_left - v_got;
    END LOOP;
    IF v_blocked OR v_wait IS NOT NULL THEN
        RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::integer,
            NULL::integer, NULL::uuid, NULL::smallint, NULL::boolean, v_wait, NULL::text;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION {schema}.finish(
    p_ids bigint[], p_tokens uuid[], p_kinds text[], p_results text[], p_errors text[],
    p_delays double precision[]
) RETURNS bigint[]
LANGUAGE plpgsql
SET jit = off
AS $$
DECLARE
    v_done bigint[];
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
            worker_id = NULL, lease_token = NULL, lease_expires_at = NULL
        FROM u
        WHERE u.kind IN ('retry', 'release') AND j.id = u.id AND j.lease_token = u.token
            AND NOT j.cancel_requested
        RETURNING j.id, j.queue, j.run_at
    ),
    finished AS (
        DELETE FROM {schema}.jobs AS j USING u
        WHERE j.id = u.id AND j.lease_token = u.token
            AND (u.kind IN ('succeeded', 'failed', 'cancelled') OR j.cancel_requested)
        RETURNING j.id, j.queue, j.task, j.args, j.priority, j.attempts, j.max_attempts,
            j.rescues, j.enqueued_at, j.started_at, j.worker_id, j.awaited, j.unique_key,
            j.meta,
            CASE WHEN u.kind IN ('retry', 'release') THEN 'cancelled' ELSE u.kind END AS kind,
            u.result,
            CASE WHEN u.kind IN ('retry', 'release') THEN jsonb_build_object('type',
                'taskq.JobCancelled', 'message', 'cancelled while it was running', 'traceback',
                '')::text ELSE u.error END AS error
    ),
    archived AS (
        INSERT INTO {schema}.history (id, queue, task, args, state, priority, attempts,
            max_attempts, rescues, enqueued_at, started_at, worker_id, result, error, unique_key,
            meta)
        SELECT id, queue, task, args, kind, priority, attempts, max_attempts, rescues,
            enqueued_at, started_at, worker_id, result::jsonb, error::jsonb, unique_key, meta
        FROM finished
        RETURNING id
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
        WHERE q.concurrency_limit IS NOT NULL
            AND q.name IN (SELECT f.queue FROM finished AS f
                           UNION SELECT r.queue FROM requeued AS r)
    )
    SELECT array(SELECT id FROM requeued UNION ALL SELECT id FROM archived)
    INTO v_done
    FROM told, woken, freed;
    RETURN array(SELECT x FROM unnest(p_ids) AS x WHERE x <> ALL (v_done));
END
$$;
