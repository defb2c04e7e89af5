-- Each build's previews (PreviewAvailable, PreviewGone): a JSON array, one entry per port with
-- the newest event's state; the local preview proxy reads it (kiln_gateway.previews).
ALTER TABLE builds ADD COLUMN IF NOT EXISTS previews text NOT NULL DEFAULT '[]';
