-- The watchdog's sweep: builds that want to move (thinking, acting), oldest change first.
CREATE INDEX IF NOT EXISTS builds_moving ON builds (updated_at)
    WHERE status IN ('thinking', 'acting');
