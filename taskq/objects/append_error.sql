-- object: function append_error(jsonb, integer, jsonb)
--
-- The errors column of a job (the errors of its last attempts, oldest first)
-- with one attempt's error added: {"attempt", "type", "message", "traceback",
-- "at"}. Bounded, so a job retried a thousand times keeps a small row: the
-- newest 10 entries stay (older ones fall off the front), a traceback keeps
-- its last 4000 characters (the end of a Python traceback says what was
-- raised where; the front repeats the task's callers) and a message its
-- first 4000. A NULL error leaves the list as it is. last_error / error keep
-- the last error as the worker wrote it (up to 16,000 characters of each).
CREATE OR REPLACE FUNCTION {schema}.append_error(
    p_errors jsonb, p_attempt integer, p_error jsonb
) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT CASE WHEN p_error IS NULL THEN p_errors ELSE (
        SELECT jsonb_agg(e ORDER BY n)
        FROM jsonb_array_elements(l.errors) WITH ORDINALITY AS a(e, n)
        WHERE n > jsonb_array_length(l.errors) - 10)
    END
    FROM (SELECT coalesce(p_errors, '[]'::jsonb) || jsonb_build_array(jsonb_build_object(
        'attempt', p_attempt,
        'type', p_error -> 'type',
        'message', left(p_error ->> 'message', 4000),
        'traceback', CASE WHEN length(p_error ->> 'traceback') > 4000
            THEN E'...(truncated)...\n' || right(p_error ->> 'traceback', 4000)
            ELSE coalesce(p_error ->> 'traceback', '') END,
        'at', now())) AS errors) AS l
$$;
