-- object: function history_drop()
--
-- Retention, step two: drops the partitions that history_detach() detached
-- (marked by its comment; also those a crash left between the two steps),
-- with the recorded steps (job_checkpoints) of their jobs, except the jobs
-- that history_detach() kept in history. Returns how many it dropped.
--
-- The detached tables are no longer part of history: this takes no lock on
-- it, and nothing can move their rows meanwhile (a retry of a dead letter
-- in one of them no longer finds it). The checkpoints are found by the
-- range of ids in the table (its primary key gives both ends) and checked
-- against it: the cost follows the checkpoints recorded by jobs in that
-- range, none at all for jobs that never called ctx.step().
--
-- SECURITY DEFINER: see history_partition_add(); it runs for a session whose
-- user may delete from history.
CREATE OR REPLACE FUNCTION {schema}.history_drop()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
SET enable_seqscan = off
AS $$
DECLARE
    v_name text;
    v_low bigint;
    v_high bigint;
    v_dropped integer := 0;
BEGIN
    IF NOT has_table_privilege(session_user, '{schema}.history', 'DELETE') THEN
        RAISE EXCEPTION 'permission denied to drop partitions of history'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NOT pg_try_advisory_xact_lock(hashtextextended('taskq.history:{schema}', 0)) THEN
        RETURN 0;
    END IF;
    FOR v_name IN
        SELECT c.relname FROM pg_class AS c
        WHERE c.relnamespace = '{schema}'::regnamespace AND c.relkind = 'r'
            AND NOT c.relispartition AND c.relname LIKE 'history\_%'
            AND obj_description(c.oid, 'pg_class')
                = 'taskq: detached from history past the retention; history_drop() drops it'
        ORDER BY c.relname
    LOOP
        EXECUTE format('SELECT min(id), max(id) FROM {schema}.%I', v_name) INTO v_low, v_high;
        IF v_low IS NOT NULL THEN
            EXECUTE format('DELETE FROM {schema}.job_checkpoints AS c '
                'WHERE c.job_id BETWEEN $1 AND $2 '
                'AND EXISTS (SELECT FROM {schema}.%I AS h WHERE h.id = c.job_id) '
                'AND NOT EXISTS (SELECT FROM {schema}.history AS k WHERE k.id = c.job_id)',
                v_name) USING v_low, v_high;
        END IF;
        EXECUTE format('DROP TABLE {schema}.%I', v_name);
        v_dropped := v_dropped + 1;
    END LOOP;
    RETURN v_dropped;
END
$$;
