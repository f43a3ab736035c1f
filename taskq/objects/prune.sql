-- object: function prune(double precision, integer)
--
-- Delete up to p_limit finished jobs older than the retention, with their
-- recorded steps (job_checkpoints), and up to p_limit workflows that finished
-- before the retention (their workflow_steps and workflow_edges rows go with
-- them, ON DELETE CASCADE). Every worker calls this every minute, so it must
-- never read all of history: without statistics the planner would pick a
-- sequential scan (which reads the whole table when nothing is old enough);
-- the BRIN indexes visit only block ranges that may hold old rows.
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
    v_deleted integer;
    v_workflows integer;
BEGIN
    -- The checkpoints go in the same statement: without it, the recorded
    -- steps of every job ever run would stay behind for ever.
    WITH gone AS (
        DELETE FROM {schema}.history
        WHERE id IN (
            SELECT h.id FROM {schema}.history AS h
            WHERE h.finished_at < v_cutoff
              AND (h.workflow_id IS NULL OR NOT EXISTS (
                  SELECT FROM {schema}.workflows AS w
                  WHERE w.id = h.workflow_id AND w.finished_at IS NULL))
            LIMIT p_limit
        )
        RETURNING id
    ), checkpoints AS (
        DELETE FROM {schema}.job_checkpoints
        WHERE job_id IN (SELECT id FROM gone)
    )
    SELECT count(*) INTO v_deleted FROM gone;

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
