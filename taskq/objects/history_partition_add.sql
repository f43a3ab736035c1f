-- object: function history_partition_add(timestamp with time zone, timestamp with time zone)
--
-- One time partition of history, [p_from, p_to), named after its lower bound
-- in UTC (history_YYYYMMDD_HHMMSS), with the indexes of history under names
-- of its own (<name>_pkey, _finished_at, _dead, _unique, _workflow,
-- _unsucceeded; a partitioned index this file does not know of yet is made
-- by the attach, under a name Postgres picks). Returns the name.
--
-- The table is made and indexed first, empty, then attached: ATTACH
-- PARTITION takes only a SHARE UPDATE EXCLUSIVE lock on history (reads and
-- writes go on), and an ACCESS EXCLUSIVE lock on history_default, whose rows
-- it reads to check that none belongs to the new range (few rows, and none
-- may: the caller starts new ranges after them). The lock_timeout keeps it
-- from waiting behind a long reader of history_default, which would make
-- every query of history that reaches that partition wait behind it.
--
-- SECURITY DEFINER: the application's role may hold only rights on the
-- tables (the deployment guide's grants), not the ownership that DDL needs.
-- It runs as the schema's owner, for a session whose user may write history.
CREATE OR REPLACE FUNCTION {schema}.history_partition_add(p_from timestamptz, p_to timestamptz)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '50ms'
AS $$
DECLARE
    v_name text := 'history_' || to_char(p_from AT TIME ZONE 'UTC', 'YYYYMMDD_HH24MISS');
    v_table text := '{schema}.' || quote_ident(v_name);
BEGIN
    IF NOT has_table_privilege(session_user, '{schema}.history', 'INSERT') THEN
        RAISE EXCEPTION 'permission denied to add a partition to history'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NOT p_from < p_to THEN
        RAISE EXCEPTION 'history partition [%, %) is empty', p_from, p_to;
    END IF;
    EXECUTE format('CREATE TABLE %s (LIKE {schema}.history INCLUDING DEFAULTS '
        'INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMPRESSION)', v_table);
    EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I PRIMARY KEY (id)', v_table,
        v_name || '_pkey');
    EXECUTE format('CREATE INDEX %I ON %s USING brin (finished_at) WITH (autosummarize = on)',
        v_name || '_finished_at', v_table);
    EXECUTE format('CREATE INDEX %I ON %s (queue, finished_at) WHERE state = ''failed''',
        v_name || '_dead', v_table);
    EXECUTE format('CREATE INDEX %I ON %s (queue, unique_key, finished_at) '
        'WHERE unique_key IS NOT NULL', v_name || '_unique', v_table);
    EXECUTE format('CREATE INDEX %I ON %s (workflow_id) WHERE workflow_id IS NOT NULL',
        v_name || '_workflow', v_table);
    EXECUTE format('CREATE INDEX %I ON %s (state, id) WHERE state <> ''succeeded''',
        v_name || '_unsucceeded', v_table);
    EXECUTE format('ALTER TABLE {schema}.history ATTACH PARTITION %s FOR VALUES FROM (%L) TO (%L)',
        v_table, p_from, p_to);
    RETURN v_name;
END
$$;
