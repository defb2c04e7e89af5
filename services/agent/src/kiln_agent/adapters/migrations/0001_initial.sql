-- The agent's checkpoints: a row per build and its append-only turns.
-- Every statement is IF NOT EXISTS or conditional: on a schema whose tables exist but that has
-- no schema_migrations table yet, this migration changes nothing and is recorded.
CREATE TABLE IF NOT EXISTS builds (
    build_id        text PRIMARY KEY,
    user_id         text NOT NULL,
    version         integer NOT NULL,
    status          text NOT NULL,
    iteration       integer NOT NULL,
    model           text NOT NULL,
    tier            text NOT NULL,
    limits          jsonb NOT NULL,
    cost_micro_usd  bigint NOT NULL,
    system          text NOT NULL,
    turns           integer NOT NULL,
    state           jsonb NOT NULL,
    outbox          jsonb NOT NULL DEFAULT '[]',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS builds_status ON builds (status);
ALTER TABLE builds ADD COLUMN IF NOT EXISTS lease_token text;
ALTER TABLE builds ADD COLUMN IF NOT EXISTS lease_until timestamptz;
CREATE TABLE IF NOT EXISTS turns (
    build_id  text NOT NULL,
    seq       integer NOT NULL,
    role      text NOT NULL,
    content   json NOT NULL,
    PRIMARY KEY (build_id, seq)
);
DO $$ BEGIN
    IF (SELECT data_type FROM information_schema.columns WHERE table_schema = current_schema()
        AND table_name = 'turns' AND column_name = 'content') = 'jsonb' THEN
        ALTER TABLE turns ALTER COLUMN content TYPE json;
    END IF;
END $$;
