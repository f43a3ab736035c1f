-- object: function prune(double precision, integer)
-- requires: history_partitions
--
-- Retention, row by row, for what dropping partitions does not reach (see
-- history_detach()): deletes up to p_limit rows of history_default older
-- than the retention, with their recorded steps (job_checkpoints), and up to
-- p_limit workflows that finished before the retention (their
-- workflow_steps and workflow_edges rows go with them, ON DELETE CASCADE).
--
-- history_default holds the finished steps of unfinished workflows that
-- dropped partitions held, and rows finished while no partition covered the
-- time; the rows it can hold that are older than every time partition are
-- those. So the delete reads history below the oldest partition's lower
-- bound (and the cutoff) only: Postgres prunes every time partition from
-- the statement, and a partition past the retention that is not dropped yet
-- (its drop waits for a reader) is never emptied row by row. Every worker
-- calls this every minute, so it must never read all of history: without
-- statistics the planner would pick a sequential scan (which reads the whole
-- partition when nothing is old enough); the BRIN indexes visit only block
-- ranges that may hold old rows.
--
-- The finished steps of a workflow that has not finished are kept, however
-- old: the workflow's status, its retry and its remaining steps read them.
-- One probe of the workflows primary key per candidate row; a plain job
-- (workflow_id NULL) costs nothing more.
CREATE OR REPLACE FUNCTION {schema}.prune(p_retention double precision, p_limit integer)
RETURNS integer
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    v_cutoff timestamptz := now() - make_interval(secs => p_retention);
    v_before timestamptz;
    v_deleted integer := 0;
    v_workflows integer;
BEGIN
    v_before := least(v_cutoff, (SELECT min(p.from_at) FROM {schema}.history_partitions() AS p));
    -- -infinity: the oldest partition is history_v11, which holds every row
    -- older than its upper bound, so history_default holds none.
    IF v_before > '-infinity' THEN
        -- The checkpoints go in the same statement: without it, the recorded
        -- steps of every job ever run would stay behind for ever. The
        -- finished_at conditions on the outer rows let Postgres prune the
        -- time partitions from its probes by id too.
        WITH gone AS (
            DELETE FROM {schema}.history AS d
            USING (
                SELECT h.id, h.finished_at FROM {schema}.history AS h
                WHERE h.finished_at < v_before
                  AND (h.workflow_id IS NULL OR NOT EXISTS (
                      SELECT FROM {schema}.workflows AS w
                      WHERE w.id = h.workflow_id AND w.finished_at IS NULL))
                LIMIT p_limit
            ) AS old
            WHERE d.id = old.id AND d.finished_at = old.finished_at
                AND d.finished_at < v_before
            RETURNING d.id
        ), checkpoints AS (
            DELETE FROM {schema}.job_checkpoints
            WHERE job_id IN (SELECT id FROM gone)
        )
        SELECT count(*) INTO v_deleted FROM gone;
    END IF;

    DELETE FROM {schema}.workflows
    WHERE id IN (
        SELECT w.id FROM {schema}.workflows AS w
        WHERE w.finished_at < v_cutoff
        LIMIT p_limit
    );
    GET DIAGNOSTICS v_workflows = ROW_COUNT;
    -- The caller calls again while a call deleted p_limit rows of either kind.
    RETURN greatest(v_deleted, v_workflows);
END
$$;
