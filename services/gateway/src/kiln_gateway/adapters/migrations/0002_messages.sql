-- The users' messages to their builds, numbered per build (seq 1, 2, ...) and published as
-- SendUserMessage once stored; and how many times each build has continued (projected).
CREATE TABLE IF NOT EXISTS messages (
    message_id       text PRIMARY KEY,
    build_id         text NOT NULL,
    seq              integer NOT NULL,
    user_id          text NOT NULL,
    text             text NOT NULL,
    idempotency_key  text,
    request_sha256   text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    published_at     timestamptz,
    UNIQUE (build_id, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_build_idempotency
    ON messages (build_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_unpublished ON messages (created_at) WHERE published_at IS NULL;
ALTER TABLE builds ADD COLUMN IF NOT EXISTS continuations integer NOT NULL DEFAULT 0;
