"""The gateway's settings (environment variables)."""

from __future__ import annotations

from pydantic import Field

from kiln_runtime.settings import DatabaseSettings, env


class GatewaySettings(DatabaseSettings):
    host: str = Field(default="0.0.0.0", validation_alias=env("KILN_GATEWAY_HOST"))
    port: int = Field(default=8080, ge=0, le=65535, validation_alias=env("KILN_GATEWAY_PORT"))
    db_schema: str = Field(default="gateway", validation_alias=env("KILN_GATEWAY_DB_SCHEMA"))
    # A development key upserted at start-up (the local stack sets these).
    dev_api_key: str | None = Field(default=None, validation_alias=env("KILN_DEV_API_KEY"))
    dev_user: str | None = Field(default=None, validation_alias=env("KILN_DEV_USER"))
    dev_tier: str = Field(default="pro", validation_alias=env("KILN_DEV_TIER"))
    # The read-model projection's durable consumer.
    projection_durable: str = Field(
        default="gateway-projection", validation_alias=env("KILN_GATEWAY_PROJECTION_DURABLE")
    )
    # Server-Sent Events: a comment line this often when nothing happens.
    sse_heartbeat_s: float = Field(default=15.0, gt=0, validation_alias=env("KILN_SSE_HEARTBEAT_S"))
    max_body_bytes: int = Field(
        default=1024 * 1024, gt=0, validation_alias=env("KILN_MAX_BODY_BYTES")
    )
    # Builds inserted but not yet published (publish failed) are republished this often.
    republish_every_s: float = Field(
        default=30.0, gt=0, validation_alias=env("KILN_REPUBLISH_EVERY_S")
    )
