-- object: function history_partitions()
--
-- The time partitions of history with their bounds, oldest first (the
-- DEFAULT partition is not one of them). Read from the catalog, so that
-- nothing else has to be kept in step with it: the bound expression, printed
-- in UTC, parsed back. MINVALUE (the partition history_v11 that migration 12
-- made of an existing table) reads as -infinity.
CREATE OR REPLACE FUNCTION {schema}.history_partitions()
RETURNS TABLE (name text, from_at timestamptz, to_at timestamptz)
LANGUAGE sql
STABLE
SET TimeZone = 'UTC'
SET DateStyle = 'ISO'
AS $$
    SELECT c.relname::text,
        CASE WHEN b[1] = 'MINVALUE' THEN '-infinity' ELSE btrim(b[1], '''')::timestamptz END,
        CASE WHEN b[2] = 'MAXVALUE' THEN 'infinity' ELSE btrim(b[2], '''')::timestamptz END
    FROM pg_catalog.pg_inherits AS i
    JOIN pg_catalog.pg_class AS c ON c.oid = i.inhrelid,
    LATERAL pg_catalog.regexp_match(pg_catalog.pg_get_expr(c.relpartbound, c.oid),
        '^FOR VALUES FROM \((.*)\) TO \((.*)\)$') AS b
    WHERE i.inhparent = '{schema}.history'::regclass AND b IS NOT NULL
    ORDER BY 2
$$;
