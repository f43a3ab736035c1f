-- object: function prune(double precision, integer)
--
-- Delete up to p_limit finished jobs older than the retention. Every worker
-- calls this every minute, so it must never read all of history: without
-- statistics the planner would pick a sequential scan (which reads the whole
-- table when nothing is old enough); the BRIN index visits only block ranges
-- that may hold old rows.
CREATE OR REPLACE FUNCTION {schema}.prune(p_retention double precision, p_limit integer)
RETURNS integer
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    v_deleted integer;
BEGIN
    DELETE FROM {schema}.history
    WHERE id IN (
        SELECT h.id FROM {schema}.history AS h
        WHERE h.finished_at < now() - make_interval(secs => p_retention)
        LIMIT p_limit
    );
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    RETURN v_deleted;
END
$$;
