-- object: function cron_fire(text, timestamptz, boolean, text, text, text, smallint, integer)
--
-- Handle one cron slot: move the entry's last_slot forward to p_slot (only
-- from an older slot) and, with p_make, enqueue its job in the same
-- transaction (its run_at is the slot). Returns the new job's id; 0 when the
-- slot was skipped on purpose (a missed slot under the entry's policy); NULL
-- when the slot had already been handled (by another worker, or by this one);
-- -1 when the entry is not recorded at all.
--
-- Firing a slot moves last_slot forward with a conditional UPDATE, in the same
-- transaction as the job's INSERT: however many workers try, one of them moves
-- it and makes the job, the others change nothing.
CREATE OR REPLACE FUNCTION {schema}.cron_fire(
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
