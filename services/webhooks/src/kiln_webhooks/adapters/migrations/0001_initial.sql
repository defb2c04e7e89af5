-- Endpoints users register, and one delivery per (endpoint, event) with its attempts' state.
CREATE TABLE endpoints (
    id text PRIMARY KEY,
    user_id text NOT NULL,
    url text NOT NULL,
    event_types text[] NOT NULL,
    description text NOT NULL DEFAULT '',
    enabled boolean NOT NULL DEFAULT true,
    disabled_reason text,
    secret text NOT NULL,
    previous_secret text,
    previous_secret_expires_at timestamptz,
    secret_rotated_at timestamptz,
    failing_since timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX endpoints_user ON endpoints (user_id, created_at);

CREATE TABLE deliveries (
    id text PRIMARY KEY,  -- the webhook-id: 'msg_' || md5(endpoint id || '/' || event id)
    endpoint_id text NOT NULL REFERENCES endpoints (id) ON DELETE CASCADE,
    user_id text NOT NULL,
    build_id text NOT NULL,
    event_type text NOT NULL,
    event_id uuid NOT NULL,
    seq bigint NOT NULL,  -- the event's stream sequence: a build's deliveries go in this order
    body bytea NOT NULL,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until timestamptz,
    lease_token text,
    last_attempt_at timestamptz,
    last_status_code integer,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_order ON deliveries (endpoint_id, build_id, seq) WHERE status = 'pending';
CREATE INDEX deliveries_log ON deliveries (endpoint_id, created_at DESC);
