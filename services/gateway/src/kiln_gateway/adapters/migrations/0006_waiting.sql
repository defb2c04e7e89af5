-- What each build is waiting on (kiln_gateway.waiting): the service that acts next, on what,
-- since when, as JSON text; '{}' for nothing.
ALTER TABLE builds ADD COLUMN IF NOT EXISTS waiting text NOT NULL DEFAULT '{}';
