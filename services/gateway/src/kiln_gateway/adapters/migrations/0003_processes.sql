-- Each build's background processes as the sandbox reports them (ProcessStarted, ProcessExited):
-- a JSON array, newest last, kept short (the projection keeps the latest 50).
ALTER TABLE builds ADD COLUMN IF NOT EXISTS processes text NOT NULL DEFAULT '[]';
