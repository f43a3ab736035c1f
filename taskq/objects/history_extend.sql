-- object: function history_extend(double precision, double precision)
-- requires: history_partitions, history_partition_add
--
-- The workers' upkeep: adds the next time partition of history while the
-- partitions do not reach p_ahead seconds past now; returns its name, or
-- NULL when none is needed (or another session is adding one). The caller
-- calls again until NULL: one partition per transaction, so that the lock
-- the attach takes is held for one attach only.
--
-- A new partition continues the newest one, up to the next multiple of
-- p_width seconds since the epoch (daily partitions end at midnight UTC).
-- When no partition covers now (a new install, or no upkeep for a while),
-- the rows finished since are in history_default and must stay there: the
-- new partition starts at the multiple of p_width before now, or just after
-- the newest such row. So partitions of different widths (Apps with
-- different retentions) follow each other without overlapping.
CREATE OR REPLACE FUNCTION {schema}.history_extend(p_width double precision, p_ahead double precision)
RETURNS text
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
    v_last timestamptz;
    v_from timestamptz;
    v_newest timestamptz;
BEGIN
    IF NOT p_width >= 1 THEN
        RAISE EXCEPTION 'history partitions are at least 1 second wide, not %', p_width;
    END IF;
    SELECT max(p.to_at) INTO v_last FROM {schema}.history_partitions() AS p;
    IF v_last >= v_now + make_interval(secs => p_ahead) THEN
        RETURN NULL;
    END IF;
    -- Upkeep of history's partitions is one session at a time; the others
    -- find it done at their next round. Under the lock, read again: another
    -- session may have added the partition since.
    IF NOT pg_try_advisory_xact_lock(hashtextextended('taskq.history:{schema}', 0)) THEN
        RETURN NULL;
    END IF;
    SELECT max(p.to_at) INTO v_last FROM {schema}.history_partitions() AS p;
    IF v_last >= v_now + make_interval(secs => p_ahead) THEN
        RETURN NULL;
    END IF;
    IF v_last > v_now THEN
        v_from := v_last;
    ELSE
        v_from := greatest(v_last,
            to_timestamp(floor(extract(epoch FROM v_now) / p_width) * p_width));
        -- Only history_default can hold them (no partition reaches past
        -- v_last); read through history, whose rights every role has.
        SELECT max(h.finished_at) INTO v_newest FROM {schema}.history AS h
        WHERE h.finished_at >= v_from;
        IF v_newest IS NOT NULL THEN
            v_from := date_trunc('second', v_newest) + interval '1 second';
        END IF;
    END IF;
    RETURN {schema}.history_partition_add(v_from,
        to_timestamp((floor(extract(epoch FROM v_from) / p_width) + 1) * p_width));
END
$$;
