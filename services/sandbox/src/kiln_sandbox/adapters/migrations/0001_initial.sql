-- The sandbox's ledger of tool calls and its build -> sandbox registry.
-- Every statement is IF NOT EXISTS or conditional: on a schema whose tables exist but that has
-- no schema_migrations table yet, this migration changes nothing and is recorded.
CREATE TABLE IF NOT EXISTS calls (
    build_id   text NOT NULL,
    call_id    text NOT NULL,
    status     text NOT NULL CHECK (status IN ('started', 'done')),
    result     jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (build_id, call_id)
);
ALTER TABLE calls ADD COLUMN IF NOT EXISTS owner text;
ALTER TABLE calls ADD COLUMN IF NOT EXISTS lease_until timestamptz;
CREATE TABLE IF NOT EXISTS sandboxes (
    build_id   text PRIMARY KEY,
    provider   text NOT NULL,
    sandbox_id text NOT NULL,
    state      text NOT NULL CHECK (state IN ('running', 'paused', 'stopped')),
    updated_at timestamptz NOT NULL DEFAULT now()
);
