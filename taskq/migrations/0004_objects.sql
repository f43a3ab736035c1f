-- taskq schema, version 4: the checksums of the schema's functions (and views).
--
-- From this version on, functions and views are not written in numbered
-- migrations: each is one file in taskq/objects/, created again after the
-- numbered migrations whenever the checksum of its text differs from the one
-- recorded here (see taskq/objects/__init__.py for the rules).
CREATE TABLE {schema}.objects (
    name       text        PRIMARY KEY,
    -- sha256 (hex) of the file's text with the schema name filled in.
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
-- Every process that opens an App compares its checksums with these, and its
-- role may hold rights only on the tables that existed when they were granted
-- (GRANT ... ON ALL TABLES covers the tables of that moment): reading the
-- checksums of taskq's own source gives nothing away.
GRANT SELECT ON {schema}.objects TO PUBLIC;
