-- object: function claim(text[], text[], integer, text, double precision, bigint[], uuid[], text[], text[], text[], double precision[])
-- requires: finish, rate_budget, rate_log_add, claim_keyed
--
-- The claim. SKIP LOCKED lets many workers claim at once without waiting on
-- each other's rows; the ORDER BY ... LIMIT walks the jobs_claim index in
-- claim order and stops after p_limit rows, so a deep backlog costs nothing.
--
-- The planner story this function guards against: autovacuum often analyzes
-- a queue table while it is nearly empty; with such statistics the planner
-- prefers a bitmap scan plus a sort of the whole backlog (measured: 7.5 ms to
-- claim 10 of 20,000 jobs, against 0.2 ms for the ordered index scan). The
-- SET clauses make the ordered index scan the only sensible plan whatever
-- the statistics say.
--
-- The jobs a claim starts are updated by id (id = ANY(ARRAY(the pick))),
-- never through a join: a join planned without knowing the pick's size
-- (statements in a function keep one generic plan) could hash the whole
-- table to find ten rows, a cost that grows with the backlog.
--
-- Several queues (p_queues), or all of them (NULL: the queues that have
-- queued jobs, found with one index probe per queue), are served one queue
-- at a time, starting from a random one so that none is always served last.
-- Priority orders jobs within a queue.
--
-- Only tasks the worker can run are taken: a job of a task it does not know
-- waits for a worker that does (rolling deploys).
--
-- Queue settings and task rate limits:
-- - a paused queue gives nothing;
-- - a queue with a concurrency limit or a rate limit is claimed under its
--   settings row's lock, so claims of that queue from every worker on every
--   host take turns, and each sees the running count and the rate window that
--   the previous one left. Unlimited queues take no lock;
-- - jobs of a rate-limited task are claimed under that task's row lock, after
--   the queue's other due jobs;
-- - a queue with a per_key_limit (fair sharing between tenants) is claimed
--   under its settings row's lock too, and its jobs are picked by
--   claim_keyed(): round-robin between concurrency keys from the queue's
--   key_cursor, at most per_key_limit running per key. Every other queue
--   keeps the plain ordered index scan.
-- Those locks are taken with SKIP LOCKED: a claim never waits for another
-- (two claims taking the same rows in different orders would deadlock); it
-- passes over the queue or task and says to look again very soon.
--
-- A claim can carry finished outcomes (p_ids ... p_delays, as for finish()),
-- written back before the claim in the same transaction. Workers of this
-- version never send any: they write outcomes back on a connection of their
-- own, so that a claim and a write-back run side by side on two backends
-- (workers of schema versions up to 10 still do, during a rolling deploy).
--
-- A claim without outcomes commits asynchronously (synchronous_commit off
-- for its transaction): it does not wait for its WAL to be flushed. What a
-- crash of Postgres can then lose is only the last fraction of a second of
-- claims (at most three times wal_writer_delay): those jobs are queued again
-- after recovery, as if never claimed, and the fence drops the outcome of
-- the attempt that ran. Nothing that ran with such a claim can commit
-- first: an outcome, a lease renewal and a ctx.transaction() all commit
-- synchronously, and a flush of their WAL flushes the claim's, which comes
-- earlier in the log. Enqueues and outcomes keep the server's durability.
--
-- Rows returned: jobs (lost = false, with their meta, and for a workflow
-- step its workflow, name and parents' results); lost outcomes
-- (lost = true: outcomes whose lease was no longer held); and a row with
-- lost = NULL when a limit held jobs back (or the claim filled a queue's
-- concurrency limit): wait_seconds is when to look again
-- (a rate window frees a start, or a lock was busy); NULL means when a
-- running job of a limited queue ends, which finish() announces.
CREATE OR REPLACE FUNCTION {schema}.claim(
    p_queues text[], p_tasks text[], p_limit integer, p_worker text, p_lease double precision,
    p_ids bigint[] DEFAULT NULL, p_tokens uuid[] DEFAULT NULL, p_kinds text[] DEFAULT NULL,
    p_results text[] DEFAULT NULL, p_errors text[] DEFAULT NULL,
    p_delays double precision[] DEFAULT NULL
) RETURNS TABLE (
    id bigint, task text, queue text, args text, attempts integer, max_attempts integer,
    lease_token uuid, priority smallint, lost boolean, wait_seconds double precision,
    meta text, inputs text, workflow_id bigint, step text
)
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_sort = off
-- The statements' generic plans are the ones the settings above force;
-- planning a custom plan for each call would cost more than running it.
SET plan_cache_mode = force_generic_plan
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
    v_per_key integer;
    v_ids bigint[];
    v_held boolean;
    v_cursor text;
BEGIN
    IF cardinality(p_ids) > 0 THEN
        RETURN QUERY
        SELECT x, NULL::text, NULL::text, NULL::text, NULL::integer, NULL::integer,
            NULL::uuid, NULL::smallint, true, NULL::double precision, NULL::text, NULL::text,
            NULL::bigint, NULL::text
        FROM unnest({schema}.finish(p_ids, p_tokens, p_kinds, p_results, p_errors, p_delays))
            AS x;
    END IF;
    IF p_limit <= 0 THEN
        RETURN;
    END IF;
    IF coalesce(cardinality(p_ids), 0) = 0 THEN
        -- A claim alone commits without waiting for its WAL to reach the disk
        -- (see above): the worker's next write, the job's outcome, waits for
        -- both, since WAL is flushed in order.
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    -- Queues whose settings matter to a claim, and rate-limited tasks: both
    -- usually none, read from tiny tables.
    SELECT array_agg(q.name) FILTER (WHERE q.paused),
           array_agg(q.name) FILTER (WHERE NOT q.paused)
    INTO v_paused, v_limited
    FROM {schema}.queues AS q
    WHERE q.paused OR q.concurrency_limit IS NOT NULL OR q.rate_limit IS NOT NULL
        OR q.per_key_limit IS NOT NULL;
    SELECT array_agg(t.name) INTO v_limited_tasks
    FROM {schema}.tasks AS t WHERE t.rate_limit IS NOT NULL;
    IF v_limited_tasks IS NOT NULL THEN
        v_limited_tasks := array(SELECT x FROM unnest(v_limited_tasks) AS x WHERE x = ANY(p_tasks));
        v_limited_tasks := nullif(v_limited_tasks, '{}');
    END IF;
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
        v_per_key := NULL;
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
            v_per_key := v_row.per_key_limit;
            IF v_row.concurrency_limit IS NOT NULL THEN
                SELECT count(*) INTO v_running FROM {schema}.jobs AS j
                WHERE j.queue = v_queue AND j.state = 'running';
                -- Filling the last slots holds jobs back too: said now, the
                -- worker waits for a slot to free instead of claiming again
                -- at once, to be held back while its ended jobs are written.
                IF v_row.concurrency_limit - v_running <= v_take THEN
                    v_take := greatest(0, v_row.concurrency_limit - v_running);
                    v_blocked := true;
                END IF;
            END IF;
            -- The start time comes after the count that allowed the start, so
            -- that no job's recorded start precedes the end of the job whose
            -- slot it took (the count's snapshot may be much later than the
            -- lock on a busy server).
            v_now := clock_timestamp();
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
        IF cardinality(v_tasks) > 0 AND v_per_key IS NOT NULL THEN
            SELECT k.ids, k.held, k.cursor INTO v_ids, v_held, v_cursor
            FROM {schema}.claim_keyed(v_queue, v_tasks, v_take, v_per_key, v_row.key_cursor)
                AS k;
            v_now := clock_timestamp();  -- after claim_keyed()'s running counts, as above
            v_blocked := v_blocked OR v_held;
            IF v_cursor IS DISTINCT FROM v_row.key_cursor THEN
                UPDATE {schema}.queues AS q SET key_cursor = v_cursor WHERE q.name = v_queue;
                v_row.key_cursor := v_cursor;
            END IF;
            RETURN QUERY
            UPDATE {schema}.jobs AS j SET state = 'running', attempts = j.attempts + 1,
                worker_id = p_worker, lease_token = gen_random_uuid(),
                lease_expires_at = now() + make_interval(secs => p_lease), started_at = v_now
            WHERE j.id = ANY(ARRAY(
                SELECT i.id FROM {schema}.jobs AS i
                    WHERE i.id = ANY(v_ids) AND i.state = 'queued'
                    FOR UPDATE SKIP LOCKED))
            RETURNING j.id, j.task, j.queue, j.args::text, j.attempts, j.max_attempts,
                j.lease_token, j.priority, false, NULL::double precision, j.meta::text,
                j.inputs::text, j.workflow_id, j.step;
            GET DIAGNOSTICS v_got = ROW_COUNT;
        ELSIF cardinality(v_tasks) > 0 THEN
            RETURN QUERY
            UPDATE {schema}.jobs AS j SET state = 'running', attempts = j.attempts + 1,
                worker_id = p_worker, lease_token = gen_random_uuid(),
                lease_expires_at = now() + make_interval(secs => p_lease), started_at = v_now
            WHERE j.id = ANY(ARRAY(
                SELECT i.id FROM {schema}.jobs AS i
                    WHERE i.state = 'queued' AND i.queue = v_queue
                    AND i.task = ANY(v_tasks) AND i.run_at <= now()
                    ORDER BY i.priority DESC, i.run_at, i.id
                    LIMIT v_take FOR UPDATE SKIP LOCKED))
            RETURNING j.id, j.task, j.queue, j.args::text, j.attempts, j.max_attempts,
                j.lease_token, j.priority, false, NULL::double precision, j.meta::text,
                j.inputs::text, j.workflow_id, j.step;
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
            IF v_per_key IS NOT NULL THEN
                SELECT k.ids, k.held, k.cursor INTO v_ids, v_held, v_cursor
                FROM {schema}.claim_keyed(v_queue, ARRAY[v_task], v_ttake, v_per_key,
                    v_row.key_cursor) AS k;
                v_blocked := v_blocked OR v_held;
                IF v_cursor IS DISTINCT FROM v_row.key_cursor THEN
                    UPDATE {schema}.queues AS q SET key_cursor = v_cursor
                    WHERE q.name = v_queue;
                    v_row.key_cursor := v_cursor;
                END IF;
                RETURN QUERY
                UPDATE {schema}.jobs AS j SET state = 'running', attempts = j.attempts + 1,
                    worker_id = p_worker, lease_token = gen_random_uuid(),
                    lease_expires_at = now() + make_interval(secs => p_lease),
                    started_at = v_tnow
                WHERE j.id = ANY(ARRAY(
                    SELECT i.id FROM {schema}.jobs AS i
                        WHERE i.id = ANY(v_ids) AND i.state = 'queued'
                        FOR UPDATE SKIP LOCKED))
                RETURNING j.id, j.task, j.queue, j.args::text, j.attempts, j.max_attempts,
                    j.lease_token, j.priority, false, NULL::double precision, j.meta::text,
                    j.inputs::text, j.workflow_id, j.step;
                GET DIAGNOSTICS v_tgot = ROW_COUNT;
            ELSE
                RETURN QUERY
                UPDATE {schema}.jobs AS j SET state = 'running', attempts = j.attempts + 1,
                    worker_id = p_worker, lease_token = gen_random_uuid(),
                    lease_expires_at = now() + make_interval(secs => p_lease),
                    started_at = v_tnow
                WHERE j.id = ANY(ARRAY(
                    SELECT i.id FROM {schema}.jobs AS i
                        WHERE i.state = 'queued' AND i.queue = v_queue AND i.task = v_task
                        AND i.run_at <= now()
                        ORDER BY i.priority DESC, i.run_at, i.id
                        LIMIT v_ttake FOR UPDATE SKIP LOCKED))
                RETURNING j.id, j.task, j.queue, j.args::text, j.attempts, j.max_attempts,
                    j.lease_token, j.priority, false, NULL::double precision, j.meta::text,
                    j.inputs::text, j.workflow_id, j.step;
                GET DIAGNOSTICS v_tgot = ROW_COUNT;
            END IF;
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
            NULL::integer, NULL::uuid, NULL::smallint, NULL::boolean, v_wait, NULL::text,
            NULL::text, NULL::bigint, NULL::text;
    END IF;
END
$$;
