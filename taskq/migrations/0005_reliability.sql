-- taskq schema, version 5: progress, every attempt's error, and the tokens
-- that let a worker recognise its own committed outcome.
--
-- All columns are nullable without a default: adding them rewrites no rows,
-- and a job that never reports progress or fails costs nothing more.
--
-- progress: the last progress the running task reported
--   ({"fraction": 0.5, "message": "...", "at": "<timestamp>"}), written by an
--   UPDATE fenced by the lease token; carried into history when the job ends,
--   kept across retries, cleared by a manual re-run. NULL: none reported.
ALTER TABLE {schema}.jobs ADD COLUMN progress jsonb;
ALTER TABLE {schema}.history ADD COLUMN progress jsonb;

-- errors: the errors of the job's last attempts, oldest first, at most 10
--   ({"attempt": n, "type", "message", "traceback" (truncated), "at"}),
--   appended by finish() for retried and failed attempts and by the rescue
--   (taskq.LeaseExpired, taskq.PoisonJob). NULL: no attempt failed (or the
--   job ended before version 5). last_error / error stay as they were.
ALTER TABLE {schema}.jobs ADD COLUMN errors jsonb;
ALTER TABLE {schema}.history ADD COLUMN errors jsonb;

-- The lease token of the attempt whose outcome was written, so that a worker
-- whose write-back committed but whose reply was lost (the connection broke
-- in between) can tell, when it sends the outcome again and finds its lease
-- gone, that the outcome is its own rather than a lost lease:
-- - requeued_by: the token of the attempt whose outcome (retry or release)
--   last put the job back in the queue; NULL after an enqueue, a rescue or a
--   manual re-run. Kept by the claim and carried into history.
-- - history.lease_token: the token of the attempt whose outcome ended the
--   job; NULL when the job ended otherwise (rescue, cancel while queued).
ALTER TABLE {schema}.jobs ADD COLUMN requeued_by uuid;
ALTER TABLE {schema}.history ADD COLUMN requeued_by uuid;
ALTER TABLE {schema}.history ADD COLUMN lease_token uuid;

-- Objects changed in this release (re-created from taskq/objects/ after this
-- file): finish(), and append_error() (new).
