-- taskq schema, version 11: claims and write-backs on two connections.
--
-- No table changes. claim() is re-created from taskq/objects/: a claim that
-- carries no outcomes commits asynchronously (see the function), its
-- statements keep their generic plans, the jobs it starts are updated by id
-- instead of through a join (whose generic plan hashed the whole table on
-- every claim), and the rate-limited tasks are found without planning a
-- statement per call. Workers of this version
-- write outcomes back on a connection of their own instead of with the next
-- claim; claim() still takes outcomes from workers of earlier versions. This
-- version tells processes of version 10 that these objects are newer than
-- theirs, so that they leave them alone.
COMMENT ON COLUMN {schema}.jobs.lease_token IS
    'the running attempt''s lease: a fresh token from each claim, which every write-back '
    'names; claims commit asynchronously since version 11 (see claim())';
