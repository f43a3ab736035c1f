-- object: function history_detach(double precision)
-- requires: history_partitions
--
-- Retention, step one of two: detaches the oldest time partition of history
-- that ends before the retention (so every row in it is older), in constant
-- time whatever its size. Returns (detached, busy): the partition's name, or
-- in busy the name of one that could not be detached now; both NULL when no
-- partition is past the retention (or another session is at it). The caller
-- commits, calls again while one was detached, then history_drop().
--
-- DETACH PARTITION takes an ACCESS EXCLUSIVE lock on history until the
-- commit, and while it waits for that lock every statement that reads or
-- writes history (the workers' write-back among them) queues behind it. So
-- it waits at most lock_timeout (50 ms) for readers and writers that hold
-- history, then gives up and leaves the partition to a later round: a
-- report running for minutes postpones the drop, never the write-back for
-- more than that. (DETACH ... CONCURRENTLY would not block, but Postgres
-- refuses it on a table with a DEFAULT partition.)
--
-- Kept: the finished steps of a workflow that has not finished, however old
-- (its status, its retry and its remaining steps read them). They are copied
-- back into history in the same transaction, which routes them to
-- history_default now that no partition covers their time; prune() deletes
-- them from there once their workflow has finished (and is past the
-- retention). Found from the running workflows (their partial index) into
-- the partition's index on workflow_id: the cost follows the running
-- workflows, not the partition's size. The rest stays in the detached table,
-- marked for history_drop(), which deletes their recorded steps and drops it
-- in a transaction of its own, without any lock on history.
--
-- SECURITY DEFINER: see history_partition_add(); it runs for a session whose
-- user may delete from history.
CREATE OR REPLACE FUNCTION {schema}.history_detach(p_retention double precision)
RETURNS TABLE (detached text, busy text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '50ms'
SET enable_seqscan = off
AS $$
DECLARE
    v_name text;
BEGIN
    IF NOT has_table_privilege(session_user, '{schema}.history', 'DELETE') THEN
        RAISE EXCEPTION 'permission denied to drop partitions of history'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- One session at a time (see history_extend()): the others find it done.
    IF NOT pg_try_advisory_xact_lock(hashtextextended('taskq.history:{schema}', 0)) THEN
        RETURN QUERY SELECT NULL::text, NULL::text;
        RETURN;
    END IF;
    SELECT p.name INTO v_name FROM {schema}.history_partitions() AS p
    WHERE p.to_at <= now() - make_interval(secs => p_retention)
    ORDER BY p.to_at LIMIT 1;
    IF v_name IS NULL THEN
        RETURN QUERY SELECT NULL::text, NULL::text;
        RETURN;
    END IF;
    BEGIN
        EXECUTE format('ALTER TABLE {schema}.history DETACH PARTITION {schema}.%I', v_name);
    EXCEPTION WHEN lock_not_available THEN
        RETURN QUERY SELECT NULL::text, v_name;
        RETURN;
    END;
    EXECUTE format('INSERT INTO {schema}.history SELECT h.* FROM {schema}.%I AS h '
        'WHERE h.workflow_id IN (SELECT w.id FROM {schema}.workflows AS w '
        'WHERE w.finished_at IS NULL)', v_name);
    EXECUTE format('COMMENT ON TABLE {schema}.%I IS %L', v_name,
        'taskq: detached from history past the retention; history_drop() drops it');
    RETURN QUERY SELECT v_name, NULL::text;
END
$$;
