-- A build forked from another: the source build, the iteration and the source's snapshot it
-- starts from (NULL snapshot: the source had none by then, an empty workspace).
ALTER TABLE builds ADD COLUMN IF NOT EXISTS fork_of text;
ALTER TABLE builds ADD COLUMN IF NOT EXISTS fork_iteration integer;
ALTER TABLE builds ADD COLUMN IF NOT EXISTS fork_snapshot_id text;
