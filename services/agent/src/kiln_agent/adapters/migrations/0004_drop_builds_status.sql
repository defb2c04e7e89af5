-- No query looks builds up by status alone (the watchdog's sweep has builds_moving): the index
-- only cost every save an index entry of its own.
DROP INDEX IF EXISTS builds_status;
