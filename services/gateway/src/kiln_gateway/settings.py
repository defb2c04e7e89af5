"""The gateway's settings (environment variables: ``KILN_`` + the field's name, or its alias)."""

from __future__ import annotations

from pydantic import AliasChoices, Field, field_validator

from kiln_runtime.settings import DatabaseSettings


class GatewaySettings(DatabaseSettings):
    gateway_host: str = "0.0.0.0"
    gateway_port: int = Field(default=8080, ge=0, le=65535)
    gateway_db_schema: str = "gateway"
    # A development key upserted at start-up (the local stack sets these).
    dev_api_key: str | None = None
    dev_user: str | None = None
    dev_tier: str = "pro"
    # The read-model projection's durable consumer.
    gateway_projection_durable: str = "gateway-projection"
    # Server-Sent Events: a comment line this often when nothing happens.
    sse_heartbeat_s: float = Field(default=15.0, gt=0)
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    # Builds inserted but not yet published (publish failed) are republished this often.
    republish_every_s: float = Field(default=30.0, gt=0)
    # How long GET /v1/budget waits for the budget service's answer (kiln.rpc.budget.status).
    gateway_budget_timeout_s: float = Field(default=5.0, gt=0)
    # How long /v1/webhooks... waits for the webhooks service's answer (kiln.rpc.webhooks.*);
    # registering a URL resolves its host first.
    gateway_webhooks_timeout_s: float = Field(default=10.0, gt=0)
    # S3: the snapshot service's bucket (read only), for the files archive.
    s3_endpoint_url: str | None = Field(
        default=None, validation_alias=AliasChoices("S3_ENDPOINT_URL", "KILN_S3_ENDPOINT_URL")
    )
    s3_bucket: str = "kiln-snapshots"
    region: str = Field(
        default="us-east-1", validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION")
    )
    s3_timeout_s: float = Field(default=30.0, gt=0)
    # The snapshot read endpoints: the largest file served (and diffed), the bytes one diff
    # reads at most, how many parsed manifests are kept in memory (they never change).
    snapshot_file_max_bytes: int = Field(default=1024 * 1024, gt=0)
    snapshot_diff_max_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    snapshot_manifest_cache: int = Field(default=64, ge=0)
    # Admin endpoints (/v1/admin/...) are off unless this is set.
    admin_api_key: str | None = None
    # Signs the short-lived event-stream tokens of the dashboard; random per process if unset
    # (set the same value on every replica).
    token_secret: str | None = None
    stream_token_ttl_s: int = Field(default=3600, ge=10)
    # Previews on the local provider (kiln_gateway.previews): how long a preview token lasts, and
    # ports the proxy never opens besides the gateway's own (the stack's other services), comma
    # separated: KILN_PREVIEW_REFUSED_PORTS=4222,5432.
    preview_token_ttl_s: int = Field(default=3600, ge=10)
    preview_refused_ports: str = ""

    @field_validator("preview_refused_ports")
    @classmethod
    def _ports(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            if not part.isdigit() or not 0 < int(part) < 65536:
                raise ValueError(f"not a TCP port: {part!r} (give ports as 4222,5432)")
        return value

    def refused_ports(self) -> frozenset[int]:
        """The ports of ``preview_refused_ports``."""
        return frozenset(int(p) for p in self.preview_refused_ports.split(",") if p.strip())

    # The AsyncAPI document served at /v1/asyncapi.json (default: contracts/schemas/asyncapi.json).
    asyncapi_path: str | None = None
