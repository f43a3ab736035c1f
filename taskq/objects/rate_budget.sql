-- object: function rate_budget(integer, double precision, timestamptz[], integer[], timestamptz, integer)
--
-- Admit up to p_want starts under a sliding-window rate limit: at most
-- p_limit starts in any p_period seconds. The caller holds the row lock of the
-- queue or task that owns the window (p_at, p_n: one entry per earlier claim).
-- Returns how many may start now and, when that is fewer than wanted, the
-- seconds until the window frees a start: when its oldest entry leaves it
-- (or, if empty, the entry that this claim is about to add).
CREATE OR REPLACE FUNCTION {schema}.rate_budget(
    p_limit integer, p_period double precision, p_at timestamptz[], p_n integer[],
    p_now timestamptz, p_want integer, OUT allowed integer, OUT wait double precision
)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_used integer := 0;
    v_oldest timestamptz;
    v_cut timestamptz := p_now - make_interval(secs => p_period);
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_at), 0) LOOP
        IF p_at[i] > v_cut THEN
            v_used := v_used + p_n[i];
            v_oldest := least(v_oldest, p_at[i]);
        END IF;
    END LOOP;
    allowed := greatest(0, least(p_want, p_limit - v_used));
    wait := NULL;
    IF allowed < p_want THEN
        wait := greatest(0.001, extract(epoch FROM
            coalesce(v_oldest, p_now) + make_interval(secs => p_period) - p_now)::double precision);
    END IF;
END
$$;
