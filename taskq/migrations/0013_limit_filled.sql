-- taskq schema, version 13: a claim that fills a queue's concurrency limit says so.
--
-- No table changes. claim() is re-created from taskq/objects/: a claim that
-- takes the last free slots of a queue's concurrency limit returns the row
-- that says a limit holds jobs back, as a claim that found the limit full
-- does. A worker then waits for a slot to free (its own write-back, or the
-- notification finish() sends) instead of claiming again at once and being
-- held back by its own ended jobs, which count as running until written back.
COMMENT ON COLUMN {schema}.queues.concurrency_limit IS
    'most jobs of the queue running at once, on all workers; a claim that fills it '
    'says so (schema version 13, see claim())';
