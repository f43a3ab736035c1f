-- taskq schema, version 8: fair sharing between tenants.
--
-- A job may carry a concurrency key (options(concurrency_key="tenant:42"));
-- a queue may set per_key_limit: at most that many running jobs per key, and
-- the claim takes turns between keys (see claim_keyed()). Jobs without a key
-- count as one more key there.
ALTER TABLE {schema}.jobs ADD COLUMN concurrency_key text;
-- key_cursor: the key served last, where the next claim's round-robin goes on.
ALTER TABLE {schema}.queues
    ADD COLUMN per_key_limit integer CHECK (per_key_limit > 0),
    ADD COLUMN key_cursor text;

-- The keyed claim's two probes: the next key with queued jobs (a loose index
-- scan) and a key's best job in claim order. Partial: jobs without a key,
-- nearly all jobs of most installs, are not in it, so they pay nothing for it.
CREATE INDEX jobs_keyed ON {schema}.jobs (queue, concurrency_key, priority DESC, run_at, id)
    WHERE state = 'queued' AND concurrency_key IS NOT NULL;

-- The claim's and the write-back's probes of the settings that matter to
-- them now include the per-key limit (partial indexes must match their
-- queries' predicates).
DROP INDEX {schema}.queues_restricted;
CREATE INDEX queues_restricted ON {schema}.queues (name)
    WHERE paused OR concurrency_limit IS NOT NULL OR rate_limit IS NOT NULL
        OR per_key_limit IS NOT NULL;
DROP INDEX {schema}.queues_limited;
CREATE INDEX queues_limited ON {schema}.queues (name)
    WHERE concurrency_limit IS NOT NULL OR per_key_limit IS NOT NULL;
