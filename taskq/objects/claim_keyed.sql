-- object: function claim_keyed(text, text[], integer, integer, text)
--
-- The pick of a queue with a per_key_limit (fair sharing between tenants):
-- which of its due jobs to start, at most p_limit, with at most p_per_key
-- running per concurrency key. claim() calls it under the queue's settings
-- row lock, so no other claim changes the running counts meanwhile, then
-- locks and starts the rows it names and keeps the returned cursor.
--
-- Round-robin: keys are visited in text order, starting after p_cursor (the
-- key served last by the previous claim) and wrapping around; each visit
-- takes that key's best due job (priority, run_at, id) if the key is under
-- its limit. So a tenant with 100,000 queued jobs and one with 10 take turns:
-- the small one's first job starts at the next claim. Priority orders jobs
-- within a key, not across keys. Each step is an index probe: the next key
-- (jobs_keyed, a loose index scan), its best job (jobs_keyed), and the
-- running counts per key are read once (jobs_running, bounded by the
-- queue's running jobs). A claim costs a probe per key visited, not per job
-- queued; keys at their limit are passed over (at most once around after the
-- last job taken).
--
-- Jobs without a key are one more key (NULL), with the same limit, whose turn
-- comes after the last key of each round. They are found among the first
-- c_window queued jobs of the queue in claim order (jobs_claim): jobs_keyed
-- leaves them out so that they cost nothing in queues without a per-key
-- limit, and walking the whole backlog for them would cost every claim of
-- an all-keyed queue its whole backlog. So give every job of a shared queue
-- a key; one without a key behind more than c_window others waits until they
-- have moved up.
--
-- held is true when a key at its limit kept a due job back: the claim then
-- says to look again when a running job of the queue ends (finish()
-- announces it).
CREATE OR REPLACE FUNCTION {schema}.claim_keyed(
    p_queue text, p_tasks text[], p_limit integer, p_per_key integer, p_cursor text,
    OUT ids bigint[], OUT held boolean, OUT cursor text
)
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_sort = off
SET jit = off
AS $$
DECLARE
    c_window CONSTANT integer := 100;
    v_keys text[];
    v_counts integer[];
    v_key text := p_cursor;
    v_at integer;
    v_running integer;
    v_id bigint;
    v_wraps integer := 0;
BEGIN
    ids := '{}';
    held := false;
    cursor := p_cursor;
    SELECT coalesce(array_agg(r.k), '{}'), coalesce(array_agg(r.n), '{}')
    INTO v_keys, v_counts
    FROM (SELECT j.concurrency_key AS k, count(*)::integer AS n FROM {schema}.jobs AS j
          WHERE j.state = 'running' AND j.queue = p_queue GROUP BY 1) AS r;
    WHILE cardinality(ids) < p_limit LOOP
        IF v_key IS NOT NULL THEN
            -- The next key after v_key; none left: the no-key turn, then wrap.
            SELECT j.concurrency_key INTO v_key FROM {schema}.jobs AS j
            WHERE j.state = 'queued' AND j.queue = p_queue AND j.concurrency_key IS NOT NULL
                AND j.concurrency_key > v_key
            ORDER BY j.concurrency_key LIMIT 1;
        ELSE
            SELECT j.concurrency_key INTO v_key FROM {schema}.jobs AS j
            WHERE j.state = 'queued' AND j.queue = p_queue AND j.concurrency_key IS NOT NULL
            ORDER BY j.concurrency_key LIMIT 1;
            -- Once around with nothing taken: every key is at its limit or has
            -- no due job for these tasks.
            v_wraps := v_wraps + 1;
            EXIT WHEN v_wraps > 1;
        END IF;
        v_at := array_position(v_keys, v_key);
        v_running := CASE WHEN v_at IS NULL THEN 0 ELSE v_counts[v_at] END;
        v_id := NULL;
        IF v_key IS NOT NULL THEN
            IF v_running < p_per_key THEN
                SELECT j.id INTO v_id FROM {schema}.jobs AS j
                WHERE j.state = 'queued' AND j.queue = p_queue
                    AND j.concurrency_key IS NOT NULL AND j.concurrency_key = v_key
                    AND j.task = ANY(p_tasks) AND j.run_at <= now() AND j.id <> ALL(ids)
                ORDER BY j.priority DESC, j.run_at, j.id LIMIT 1;
            ELSIF NOT held THEN
                held := EXISTS (
                    SELECT 1 FROM {schema}.jobs AS j
                    WHERE j.state = 'queued' AND j.queue = p_queue
                        AND j.concurrency_key IS NOT NULL AND j.concurrency_key = v_key
                        AND j.task = ANY(p_tasks) AND j.run_at <= now());
            END IF;
        ELSE
            -- The no-key turn (v_key is NULL here: past the last key).
            SELECT w.id INTO v_id FROM (
                SELECT j.id, j.concurrency_key, j.task, j.priority, j.run_at
                FROM {schema}.jobs AS j
                WHERE j.state = 'queued' AND j.queue = p_queue
                ORDER BY j.priority DESC, j.run_at, j.id LIMIT c_window
            ) AS w
            WHERE w.concurrency_key IS NULL AND w.task = ANY(p_tasks) AND w.run_at <= now()
                AND w.id <> ALL(ids)
            ORDER BY w.priority DESC, w.run_at, w.id LIMIT 1;
            IF v_id IS NOT NULL AND v_running >= p_per_key THEN
                held := true;
                v_id := NULL;
            END IF;
        END IF;
        IF v_id IS NOT NULL THEN
            ids := ids || v_id;
            cursor := v_key;
            v_wraps := 0;
            IF v_at IS NULL THEN
                v_keys := v_keys || v_key;
                v_counts := v_counts || 1;
            ELSE
                v_counts[v_at] := v_running + 1;
            END IF;
        END IF;
    END LOOP;
END
$$;
