-- taskq schema, version 7: what the dashboard's jobs page reads by index.
--
-- The failed and cancelled tabs list history newest first (keyset on id).
-- Without this index they walk the primary key past every succeeded row;
-- when failures are rare (one in a thousand) a page of them would read the
-- whole table. Partial: succeeded rows, nearly all of history, are not in
-- it, so the finish path pays for it only on the jobs that did not succeed.
CREATE INDEX history_unsucceeded ON {schema}.history (state, id) WHERE state <> 'succeeded';

-- The waiting tab lists workflow steps waiting for their parents, newest
-- first. The primary key would walk past every queued job to reach them.
-- Only steps created waiting pay for it (a workflow's enqueue), never a
-- plain job, and a claim never touches it.
CREATE INDEX jobs_waiting ON {schema}.jobs (id) WHERE state = 'waiting';
