"""The schemas as the services created them before ``schema_migrations`` was kept: each start
re-ran this DDL (all ``IF NOT EXISTS``). A database made this way must upgrade to the migrations."""

from __future__ import annotations

AGENT = """
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
"""

GATEWAY = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_sha256  text PRIMARY KEY,
    user_id     text NOT NULL,
    tier        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE TABLE IF NOT EXISTS builds (
    build_id          text PRIMARY KEY,
    user_id           text NOT NULL,
    tier              text NOT NULL,
    idea_brief        text NOT NULL,
    understanding_qna jsonb NOT NULL DEFAULT '[]',
    limits            jsonb NOT NULL DEFAULT '{}',
    idempotency_key   text,
    request_sha256    text,
    published_at      timestamptz,
    status            text NOT NULL DEFAULT 'queued',
    iteration         integer NOT NULL DEFAULT 0,
    cost_micro_usd    bigint NOT NULL DEFAULT 0,
    last_snapshot_id  text,
    summary           text,
    reason            text,
    last_seq          bigint NOT NULL DEFAULT 0,
    terminal_seq      bigint,
    finished_at       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS builds_user_idempotency
    ON builds (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS builds_user_created ON builds (user_id, created_at DESC, build_id DESC);
CREATE INDEX IF NOT EXISTS builds_unpublished ON builds (created_at) WHERE published_at IS NULL;
ALTER TABLE builds ADD COLUMN IF NOT EXISTS project_id text;
ALTER TABLE builds ADD COLUMN IF NOT EXISTS project_version integer;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS key_id text;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS key_prefix text;
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_key_id ON api_keys (key_id) WHERE key_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS projects (
    project_id      text PRIMARY KEY,
    user_id         text NOT NULL,
    latest_version  integer NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS projects_user_created
    ON projects (user_id, created_at DESC, project_id DESC);
CREATE TABLE IF NOT EXISTS project_versions (
    project_id        text NOT NULL REFERENCES projects (project_id),
    version           integer NOT NULL,
    name              text NOT NULL,
    idea_brief        text NOT NULL,
    understanding_qna jsonb NOT NULL DEFAULT '[]',
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, version)
);
"""

SANDBOX = """
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
"""
