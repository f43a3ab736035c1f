-- taskq schema, version 10: concurrency keys on unique jobs and workflow steps.
--
-- No table changes: the objects enqueue_unique() (a concurrency key
-- argument, defaulting to none), workflow_enqueue() (a step's key) and
-- steps_ready() (a map's items take the map's key) are re-created from
-- taskq/objects/, and claim(), whose jobs of a limited queue now record their
-- start after the running counts that allowed it. This version tells processes of version 9 that these
-- objects are newer than theirs, so that they leave them alone.
COMMENT ON COLUMN {schema}.jobs.concurrency_key IS
    'the tenant (or other key) a queue''s per_key_limit counts the job under; '
    'set by enqueue, a unique enqueue, a workflow step, or a map''s items from the map';
