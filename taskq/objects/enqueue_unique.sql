-- object: function enqueue_unique(text, text, text, smallint, timestamptz, integer, text, double precision, text, text)
--
-- Enqueue one job with a unique key (and its meta and concurrency key; the
-- key defaults to none, so producers of schema 8 keep calling it). Returns
-- the new job's id with created = true, or the live job holding the key (or,
-- with a window, the one that finished within it) with created = false.
--
-- The order of the steps closes the races: a live holder is looked for first;
-- then history (a holder that finished before that look is there by now,
-- because finishing moves a job to history in one transaction); then the
-- INSERT, whose unique index waits for a concurrent producer's uncommitted
-- row and skips it once committed (the loop then reads it); and with a window,
-- history once more after the INSERT, for a holder that finished while we
-- waited.
CREATE OR REPLACE FUNCTION {schema}.enqueue_unique(
    p_queue text, p_task text, p_args text, p_priority smallint, p_run_at timestamptz,
    p_max_attempts integer, p_key text, p_window double precision, p_meta text,
    p_concurrency_key text DEFAULT NULL
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
            unique_key, meta, concurrency_key)
        VALUES (p_queue, p_task, p_args::jsonb, p_priority, p_run_at, p_max_attempts, p_key,
            p_meta::jsonb, p_concurrency_key)
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
