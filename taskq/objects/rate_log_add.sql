-- object: function rate_log_add(double precision, timestamptz[], integer[], timestamptz, integer)
--
-- The window after p_started starts at p_now, with the entries that left it
-- dropped. An entry younger than a 64th of the period is merged into the new
-- one and takes its (later) time: those starts then leave the window a little
-- late, which errs on the safe side, and the window never holds more than
-- about 64 entries however many claims a period sees.
CREATE OR REPLACE FUNCTION {schema}.rate_log_add(
    p_period double precision, p_at timestamptz[], p_n integer[], p_now timestamptz,
    p_started integer, OUT at timestamptz[], OUT n integer[]
)
LANGUAGE sql IMMUTABLE AS $$
    WITH kept AS (
        SELECT a, c, ord, a > p_now - make_interval(secs => p_period / 64) AS recent
        FROM unnest(p_at, p_n) WITH ORDINALITY AS u(a, c, ord)
        WHERE a > p_now - make_interval(secs => p_period)
    )
    SELECT coalesce(array_agg(a ORDER BY ord) FILTER (WHERE NOT recent), '{}') || p_now,
           coalesce(array_agg(c ORDER BY ord) FILTER (WHERE NOT recent), '{}')
               || (p_started + coalesce(sum(c) FILTER (WHERE recent), 0))::integer
    FROM kept
$$;
