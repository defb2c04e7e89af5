-- Each call records its iteration, and a stopped sandbox the iteration its build had reached when
-- it was stopped: a call of a later iteration (the build continued) gets a fresh sandbox restored
-- from the latest snapshot, one of that iteration or before (a call of the ended run) is not run.
ALTER TABLE calls ADD COLUMN IF NOT EXISTS iteration integer;
UPDATE calls SET iteration = (result ->> 'iteration')::integer
    WHERE iteration IS NULL AND result IS NOT NULL AND result ? 'iteration';
ALTER TABLE sandboxes ADD COLUMN IF NOT EXISTS iteration integer;
UPDATE sandboxes s SET iteration = coalesce(
        (SELECT max(c.iteration) FROM calls c WHERE c.build_id = s.build_id), 0)
    WHERE s.state = 'stopped' AND s.iteration IS NULL;
