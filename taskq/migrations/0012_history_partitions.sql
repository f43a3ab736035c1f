-- taskq schema, version 12: history partitioned by time; autovacuum settings
-- for the tables that churn.
--
-- 1. history becomes a table partitioned by range of finished_at, so that
-- retention drops whole partitions (constant time per partition) instead of
-- deleting old rows one by one (see history_detach(), history_drop()):
-- - time partitions (history_YYYYMMDD_HHMMSS, named after their lower bound
--   in UTC) are made ahead of time by the workers' upkeep (history_extend(),
--   history_partition_add()), whose width follows the App's retention;
-- - history_default, the DEFAULT partition, takes every row outside them: the
--   finished steps of unfinished workflows that a dropped partition held,
--   and rows finished while no partition covered the time (before the first
--   upkeep, or after one that could not run). prune() deletes its old rows one
--   by one; there are few.
-- - An existing install keeps every row, in place, without copying: the old
--   table becomes the partition history_v11, FOR VALUES FROM (MINVALUE) TO
--   (the moment this migration holds the table's lock), dropped whole once
--   that moment is past the retention. Attaching it reads the table once to
--   check the bound, under this transaction's exclusive lock (measured: 7.4 s
--   for 10 million rows, 2.4 GB, from cache, Postgres 15); its indexes are
--   kept and renamed, none is built. An empty table (a new install) becomes
--   history_default instead, so no partition of the past is left behind.
--
-- A partitioned table cannot have a primary key on id alone (a unique
-- constraint must include the partition key). Each partition has its own
-- primary key on id; an id is in history at most once because a job moves
-- into history from jobs (whose primary key it had) in the statement that
-- deletes it there, and back out the same way (retries). Nothing relies on a
-- key over the whole table: no foreign key references history, no ON
-- CONFLICT names it, and job_checkpoints rows are deleted with their jobs
-- (prune(), history_drop(), purge). A lookup by id probes the primary key of
-- every partition: the upkeep keeps about seven in the retention, plus two
-- ahead and the DEFAULT partition.
--
-- The partitions' indexes are those history had, attached to partitioned
-- indexes of the same names; each partition's are named after it
-- (<partition>_pkey, _finished_at, _dead, _unique, _workflow, _unsucceeded).
--
-- 2. Autovacuum settings of the tables whose rows churn (below, each value
-- with the problem it prevents; docs/design.md, "Autovacuum").
--
-- Objects added with this version: history_partitions(), history_partition_add(),
-- history_extend(), history_detach(), history_drop(); changed: prune() (the
-- DEFAULT partition only).

-- No row may arrive while the table is converted: the bound of history_v11
-- is read after this lock, so every row in it finished before that bound.
LOCK TABLE {schema}.history IN ACCESS EXCLUSIVE MODE;
ALTER TABLE {schema}.history RENAME TO history_v11;
ALTER INDEX {schema}.history_pkey RENAME TO history_v11_pkey;
ALTER INDEX {schema}.history_finished_at RENAME TO history_v11_finished_at;
ALTER INDEX {schema}.history_dead RENAME TO history_v11_dead;
ALTER INDEX {schema}.history_unique RENAME TO history_v11_unique;
ALTER INDEX {schema}.history_workflow RENAME TO history_v11_workflow;
ALTER INDEX {schema}.history_unsucceeded RENAME TO history_v11_unsucceeded;

-- The same columns in the same order, NOT NULLs, defaults and the state CHECK.
CREATE TABLE {schema}.history (
    LIKE {schema}.history_v11
    INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMPRESSION
    INCLUDING COMMENTS
) PARTITION BY RANGE (finished_at);

-- The application's roles keep their rights: the grants of the old table are
-- given on the new one (queries reach the partitions through it), and its
-- owner owns it.
DO $grants$
DECLARE
    v_grant record;
    v_owner regrole := (SELECT c.relowner::regrole FROM pg_class AS c
                        WHERE c.oid = '{schema}.history_v11'::regclass);
BEGIN
    FOR v_grant IN
        SELECT a.privilege_type, a.is_grantable,
            CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(a.grantee::regrole::text) END
                AS grantee
        FROM pg_class AS c, aclexplode(c.relacl) AS a
        WHERE c.oid = '{schema}.history_v11'::regclass AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT %s ON {schema}.history TO %s%s', v_grant.privilege_type,
            v_grant.grantee, CASE WHEN v_grant.is_grantable THEN ' WITH GRANT OPTION' END);
    END LOOP;
    IF v_owner <> current_user::regrole THEN
        EXECUTE format('ALTER TABLE {schema}.history OWNER TO %s', v_owner);
    END IF;
END
$grants$;

DO $partitions$
BEGIN
    IF EXISTS (SELECT FROM {schema}.history_v11) THEN
        EXECUTE format(
            'ALTER TABLE {schema}.history ATTACH PARTITION {schema}.history_v11 '
            'FOR VALUES FROM (MINVALUE) TO (%L)', clock_timestamp());
        CREATE TABLE {schema}.history_default (
            LIKE {schema}.history
            INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMPRESSION
        );
        ALTER TABLE {schema}.history_default
            ADD CONSTRAINT history_default_pkey PRIMARY KEY (id);
        CREATE INDEX history_default_finished_at ON {schema}.history_default
            USING brin (finished_at) WITH (autosummarize = on);
        CREATE INDEX history_default_dead ON {schema}.history_default (queue, finished_at)
            WHERE state = 'failed';
        CREATE INDEX history_default_unique ON {schema}.history_default
            (queue, unique_key, finished_at) WHERE unique_key IS NOT NULL;
        CREATE INDEX history_default_workflow ON {schema}.history_default (workflow_id)
            WHERE workflow_id IS NOT NULL;
        CREATE INDEX history_default_unsucceeded ON {schema}.history_default (state, id)
            WHERE state <> 'succeeded';
    ELSE
        ALTER TABLE {schema}.history_v11 RENAME TO history_default;
        ALTER INDEX {schema}.history_v11_pkey RENAME TO history_default_pkey;
        ALTER INDEX {schema}.history_v11_finished_at RENAME TO history_default_finished_at;
        ALTER INDEX {schema}.history_v11_dead RENAME TO history_default_dead;
        ALTER INDEX {schema}.history_v11_unique RENAME TO history_default_unique;
        ALTER INDEX {schema}.history_v11_workflow RENAME TO history_default_workflow;
        ALTER INDEX {schema}.history_v11_unsucceeded RENAME TO history_default_unsucceeded;
    END IF;
END
$partitions$;
ALTER TABLE {schema}.history ATTACH PARTITION {schema}.history_default DEFAULT;

-- Partitioned indexes: each finds the partitions' index of the same
-- definition and attaches it (none is built).
-- Pruning by age, in history_default: a BRIN index finds old rows for a tiny
-- fraction of a btree's upkeep per insert (rows arrive in finished_at order).
CREATE INDEX history_finished_at ON {schema}.history USING brin (finished_at)
    WITH (autosummarize = on);
CREATE INDEX history_dead ON {schema}.history (queue, finished_at) WHERE state = 'failed';
CREATE INDEX history_unique ON {schema}.history (queue, unique_key, finished_at)
    WHERE unique_key IS NOT NULL;
CREATE INDEX history_workflow ON {schema}.history (workflow_id) WHERE workflow_id IS NOT NULL;
CREATE INDEX history_unsucceeded ON {schema}.history (state, id) WHERE state <> 'succeeded';

-- 2. Autovacuum. A queue table is small and churns: every job is inserted,
-- updated when it is claimed (and at each lease renewal while it runs) and
-- deleted when it ends, so its dead row versions soon outnumber its live
-- rows many times over. The defaults (a vacuum once dead rows pass 20% of
-- the table's size as last counted, throttled by cost_delay) wait for
-- 200,000 dead rows after a backlog of a million was counted, and then
-- vacuum slowly: meanwhile the claim's partial index (jobs_claim) keeps the
-- entries of claimed jobs at its head, where every claim starts walking, and
-- the table and its indexes grow with the churn. Its fillfactor stays 100:
-- a job's updates change indexed columns (state, lease_expires_at), so they
-- cannot be HOT updates whatever room a page has.
ALTER TABLE {schema}.jobs SET (
    -- A vacuum after a fixed number of dead rows, whatever the size last counted.
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000,
    -- Not throttled: the live table is small, so an unthrottled vacuum is
    -- short, and a throttled one falls behind a churn of thousands of jobs a
    -- second.
    autovacuum_vacuum_cost_delay = 0,
    -- Statistics that follow the backlog (other planners than the claim's,
    -- which pins its plan, read them: dashboard, why, bulk actions).
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 10000
);
-- One row per worker, updated at every heartbeat; one row per queue or task,
-- updated by every claim of a rate-limited queue or task (its rate log) or of
-- a queue with a per_key_limit (its key cursor). None of these updates
-- changes an indexed column, so each can be a HOT update (on the row's own
-- page, no new index entry) if that page has room: half of each page is
-- left for it, so that hundreds of queues or tasks do not fill their pages
-- and turn every update into a row version on another page. A vacuum after
-- a few hundred dead rows, unthrottled (these tables are a few pages).
ALTER TABLE {schema}.workers SET (
    fillfactor = 50, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 200,
    autovacuum_vacuum_cost_delay = 0
);
ALTER TABLE {schema}.queues SET (
    fillfactor = 50, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 200,
    autovacuum_vacuum_cost_delay = 0
);
ALTER TABLE {schema}.tasks SET (
    fillfactor = 50, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 200,
    autovacuum_vacuum_cost_delay = 0
);
