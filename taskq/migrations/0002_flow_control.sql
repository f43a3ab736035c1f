-- taskq schema, version 2: unique jobs, queue settings (pause, cluster-wide
-- concurrency and rate limits), task rate limits and cron slots.

-- Unique jobs: at most one live (queued or running) job per queue and key.
-- The partial unique index is the guarantee; enqueue_unique() below is the
-- race-free way in. Finished jobs keep their key in history so that a unique
-- window can also count recently finished ones.
ALTER TABLE {schema}.jobs ADD COLUMN unique_key text;
ALTER TABLE {schema}.history ADD COLUMN unique_key text;
CREATE UNIQUE INDEX jobs_unique ON {schema}.jobs (queue, unique_key)
    WHERE unique_key IS NOT NULL;
CREATE INDEX history_unique ON {schema}.history (queue, unique_key, finished_at)
    WHERE unique_key IS NOT NULL;

-- Running jobs by queue: the rescue scans it for expired leases (running rows
-- are few, bounded by the workers' total concurrency) and a claim on a queue
-- with a concurrency limit counts that queue's running jobs with it.
DROP INDEX {schema}.jobs_lease;
CREATE INDEX jobs_running ON {schema}.jobs (queue, lease_expires_at) WHERE state = 'running';

-- Per-queue settings, shared by every worker. A queue without a row has none:
-- not paused, no limits. rate_log holds the sliding window of a rate limit:
-- one (start time, jobs started) pair per claim within the last rate_period.
CREATE TABLE {schema}.queues (
    name              text        PRIMARY KEY,
    paused            boolean     NOT NULL DEFAULT false,
    concurrency_limit integer     CHECK (concurrency_limit > 0),
    rate_limit        integer     CHECK (rate_limit > 0),
    rate_period       double precision CHECK (rate_period > 0),
    rate_log_at       timestamptz[] NOT NULL DEFAULT '{}',
    rate_log_n        integer[]   NOT NULL DEFAULT '{}',
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((rate_limit IS NULL) = (rate_period IS NULL))
);
-- Every claim asks which queues have settings that matter to it, and every
-- write-back which have a concurrency limit: index probes of (usually) empty
-- partial indexes, never a scan, whatever the planner settings.
CREATE INDEX queues_restricted ON {schema}.queues (name)
    WHERE paused OR concurrency_limit IS NOT NULL OR rate_limit IS NOT NULL;
CREATE INDEX queues_limited ON {schema}.queues (name) WHERE concurrency_limit IS NOT NULL;

-- Task rate limits come from @app.task(rate_limit=...), written by workers
-- when they register, with the same sliding window as queues.
ALTER TABLE {schema}.tasks
    ADD COLUMN rate_limit integer CHECK (rate_limit > 0),
    ADD COLUMN rate_period double precision CHECK (rate_period > 0),
    ADD COLUMN rate_log_at timestamptz[] NOT NULL DEFAULT '{}',
    ADD COLUMN rate_log_n integer[] NOT NULL DEFAULT '{}';
CREATE INDEX tasks_rate_limited ON {schema}.tasks (name) WHERE rate_limit IS NOT NULL;

-- Cron entries as the workers last registered them, and the newest slot of
-- each that has been handled. Firing a slot moves last_slot forward with a
-- conditional UPDATE (only from an older slot), in the same transaction as the
-- job's INSERT: however many workers try, one of them moves it and makes the
-- job, the others change nothing.
CREATE TABLE {schema}.crons (
    name          text        PRIMARY KEY,
    expression    text        NOT NULL,
    timezone      text        NOT NULL,
    task          text        NOT NULL,
    queue         text        NOT NULL,
    args          jsonb       NOT NULL DEFAULT '{}',
    priority      smallint    NOT NULL DEFAULT 0,
    missed        text        NOT NULL,
    last_slot     timestamptz NOT NULL,
    last_job_id   bigint,
    registered_at timestamptz NOT NULL DEFAULT now()
);

-- Enqueue one job with a unique key. Returns the new job's id with
-- created = true, or the live job holding the key (or, with a window, the one
-- that finished within it) with created = false.
--
-- The order of the steps closes the races: a live holder is looked for first;
-- then history (a holder that finished before that look is there by now,
-- because finishing moves a job to history in one transaction); then the
-- INSERT, whose unique index waits for a concurrent producer's uncommitted
-- row and skips it once committed (the loop then reads it); and with a window,
-- history once more after the INSERT, for a holder that finished while we
-- waited.
CREATE FUNCTION {schema}.enqueue_unique(
    p_queue text, p_task text, p_args text, p_priority smallint, p_run_at timestamptz,
    p_max_attempts integer, p_key text, p_window double precision
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
            unique_key)
        VALUES (p_queue, p_task, p_args::jsonb, p_priority, p_run_at, p_max_attempts, p_key)
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

-- Admit up to p_want starts under a sliding-window rate limit: at most
-- p_limit starts in any p_period seconds. The caller holds the row lock of the
-- queue or task that owns the window (p_at, p_n: one entry per earlier claim).
-- Returns how many may start now and, when that is fewer than wanted, the
-- seconds until the window frees a start: when its oldest entry leaves it
-- (or, if empty, the entry that this claim is about to add).
CREATE FUNCTION {schema}.rate_budget(
    p_limit integer, p_period double precision, p_at timestamptz[], p_n integer[],
    p_now timestamptz, p_want integer, OUT allowed integer, OUT wait double precision
)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_used integer := 0;
    v_oldest timestamptz;
    v_cut timestamptz := p_now - make_interval(secs => p_period);
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_at), 0) LOOP
        IF p_at[i] > v_cut THEN
            v_used := v_used + p_n[i];
            v_oldest := least(v_oldest, p_at[i]);
        END IF;
    END LOOP;
    allowed := greatest(0, least(p_want, p_limit - v_used));
    wait := NULL;
    IF allowed < p_want THEN
        wait := greatest(0.001, extract(epoch FROM
            coalesce(v_oldest, p_now) + make_interval(secs => p_period) - p_now)::double precision);
    END IF;
END
$$;

-- The window after p_started starts at p_now, with the entries that left it
-- dropped. An entry younger than a 64th of the period is merged into the new
-- one and takes its (later) time: those starts then leave the window a little
-- late, which errs on the safe side, and the window never holds more than
-- about 64 entries however many claims a period sees.
CREATE FUNCTION {schema}.rate_log_add(
    p_period double precision, p_at timestamptz[], p_n integer[], p_now timestamptz,
    p_started integer, OUT at timestamptz[], OUT n integer[]
)
LANGUAGE sql IMMUTABLE AS $$
    WITH kept AS (
        SELECT a, c, ord, a > p_now - make_interval(secs => p_period / 64) AS recent
        FROM unnest(p_at, p_n) WITH ORDINALITY AS u(a, c, ord)
        WHERE a > p_now - make_interval(secs => p_period)
    )
    SELECT coalesce(array_agg(a ORDER BY ord) FILTER (WHERE NOT recent), '{}') || p_now,
           coalesce(array_agg(c ORDER BY ord) FILTER (WHERE NOT recent), '{}')
               || (p_started + coalesce(sum(c) FILTER (WHERE recent), 0))::integer
    FROM kept
$$;

-- Claim, as in version 1, now also honouring queue settings and task rate
-- limits:
-- - a paused queue gives nothing;
-- - a queue with a concurrency limit or a rate limit is claimed under its
--   settings row's lock, so claims of that queue from every worker on every
--   host take turns, and each sees the running count and the rate window that
--   the previous one left. Unlimited queues take no lock;
-- - jobs of a rate-limited task are claimed under that task's row lock, after
--   the queue's other due jobs.
-- Those locks are taken with SKIP LOCKED: a claim never waits for another
-- (two claims taking the same rows in different orders would deadlock); it
-- passes over the queue or task and says to look again very soon.
--
-- Besides job rows (lost = false) and lost outcomes (lost = true), a row with
-- lost = NULL says that a limit held jobs back: wait_seconds is when to look
-- again (a rate window frees a start, or a lock was busy); NULL means when a
-- running job of a limited queue ends, which finish() announces.
DROP FUNCTION {schema}.claim(text[], text[], integer, text, double precision, bigint[], uuid[],
    text[], text[], text[], double precision[]);
CREATE FUNCTION {schema}.claim(
    p_queues text[], p_tasks text[], p_limit integer, p_worker text, p_lease double precision,
    p_ids bigint[] DEFAULT NULL, p_tokens uuid[] DEFAULT NULL, p_kinds text[] DEFAULT NULL,
    p_results text[] DEFAULT NULL, p_errors text[] DEFAULT NULL,
    p_delays double precision[] DEFAULT NULL
) RETURNS TABLE (
    id bigint, task text, queue text, args text, attempts integer, max_attempts integer,
    lease_token uuid, priority smallint, lost boolean, wait_seconds double precision
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
            NULL::uuid, NULL::smallint, true, NULL::double precision
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
                j.lease_token, j.priority, false, NULL::double precision;
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
                j.lease_token, j.priority, false, NULL::double precision;
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
            NULL::integer, NULL::uuid, NULL::smallint, NULL::boolean, v_wait;
    END IF;
END
$$;

-- finish() as in version 1, plus: finished jobs keep their unique key in
-- history, and a job of a queue with a concurrency limit that ends (or goes
-- back to the queue) announces the freed slot, so that workers held back by
-- the limit claim at once instead of at their next poll.
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
            CASE WHEN u.kind IN ('retry', 'release') THEN 'cancelled' ELSE u.kind END AS kind,
            u.result,
            CASE WHEN u.kind IN ('retry', 'release') THEN jsonb_build_object('type',
                'taskq.JobCancelled', 'message', 'cancelled while it was running', 'traceback',
                '')::text ELSE u.error END AS error
    ),
    archived AS (
        INSERT INTO {schema}.history (id, queue, task, args, state, priority, attempts,
            max_attempts, rescues, enqueued_at, started_at, worker_id, result, error, unique_key)
        SELECT id, queue, task, args, kind, priority, attempts, max_attempts, rescues,
            enqueued_at, started_at, worker_id, result::jsonb, error::jsonb, unique_key
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

-- Handle one cron slot: move the entry's last_slot forward to p_slot (only
-- from an older slot) and, with p_make, enqueue its job in the same
-- transaction (its run_at is the slot). Returns the new job's id; 0 when the slot was skipped on
-- purpose (a missed slot under the entry's policy); NULL when the slot had
-- already been handled (by another worker, or by this one); -1 when the
-- entry is not recorded at all.
CREATE FUNCTION {schema}.cron_fire(
    p_name text, p_slot timestamptz, p_make boolean, p_task text, p_queue text, p_args text,
    p_priority smallint, p_max_attempts integer
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    UPDATE {schema}.crons SET last_slot = p_slot
    WHERE name = p_name AND last_slot < p_slot;
    IF NOT FOUND THEN
        -- -1: the entry's row is gone (deleted by hand); the caller records it again.
        RETURN CASE WHEN EXISTS (SELECT 1 FROM {schema}.crons WHERE name = p_name)
            THEN NULL ELSE -1 END;
    END IF;
    IF NOT p_make THEN
        RETURN 0;
    END IF;
    -- run_at is the slot itself: due at once, and it says which slot made the job.
    INSERT INTO {schema}.jobs (queue, task, args, priority, max_attempts, run_at)
    VALUES (p_queue, p_task, p_args::jsonb, p_priority, p_max_attempts, least(p_slot, now()))
    RETURNING id INTO v_id;
    UPDATE {schema}.crons SET last_job_id = v_id WHERE name = p_name;
    PERFORM pg_notify({enqueued_channel}, p_queue);
    RETURN v_id;
END
$$;
