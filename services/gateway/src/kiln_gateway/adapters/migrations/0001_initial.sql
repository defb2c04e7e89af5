-- The gateway's API keys, builds read model and projects.
-- Every statement is IF NOT EXISTS or conditional: on a schema whose tables exist but that has
-- no schema_migrations table yet, this migration changes nothing and is recorded.
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
