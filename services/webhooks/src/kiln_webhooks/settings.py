"""The webhooks service's settings (environment variables: ``KILN_`` + the field's name, or its
alias)."""

from __future__ import annotations

from pydantic import Field, model_validator

from kiln_runtime.settings import DatabaseSettings

# Standard Webhooks' suggested schedule: after the first attempt, 5 s, 5 min, 30 min, 2 h, 5 h,
# 10 h and 10 h (eight attempts over about 27 h).
DEFAULT_RETRY_SCHEDULE = "5,300,1800,7200,18000,36000,36000"


class WebhooksSettings(DatabaseSettings):
    webhooks_db_schema: str = "webhooks"
    # The durable consumer of the kinds endpoints may ask for, in stream order.
    webhooks_durable: str = "webhooks-events"
    # Seconds to wait before each retry after a failed attempt (comma-separated; each is jittered
    # by +-20 %). The number of entries is the number of retries; then the delivery has failed.
    webhooks_retry_schedule_s: str = DEFAULT_RETRY_SCHEDULE
    # An endpoint whose every delivery has failed for this long is disabled, with a reason.
    webhooks_disable_after_s: float = Field(default=5 * 86_400.0, gt=0)
    # Deliveries sent at once (over all endpoints).
    webhooks_concurrency: int = Field(default=16, ge=1, le=512)
    # How often the dispatcher looks for deliveries that have come due.
    webhooks_poll_s: float = Field(default=1.0, gt=0)
    # A claimed delivery is another replica's to retry after this long (a replica that died
    # mid-attempt): keep it above the whole attempt's timeout.
    webhooks_lease_s: float = Field(default=60.0, gt=0)
    # One attempt: the TCP (and TLS) connection, then the response (headers and body).
    webhooks_connect_timeout_s: float = Field(default=5.0, gt=0)
    webhooks_response_timeout_s: float = Field(default=15.0, gt=0)
    # At most this much of a response body is read (and the first 500 characters kept).
    webhooks_max_response_bytes: int = Field(default=4096, ge=0, le=1024 * 1024)
    # Addresses a target may resolve to although they are loopback, private or link-local
    # (comma-separated CIDRs, e.g. "127.0.0.1/32" for development; empty in production).
    webhooks_allowed_networks: str = ""
    # Also accept http:// targets (development and tests); production endpoints must be https.
    webhooks_allow_http: bool = False
    # How long registration waits for a target's DNS answer.
    webhooks_resolve_timeout_s: float = Field(default=3.0, gt=0)
    # A user may register this many endpoints.
    webhooks_max_endpoints: int = Field(default=20, ge=1)

    @model_validator(mode="after")
    def _lease_outlasts_an_attempt(self) -> WebhooksSettings:
        attempt = self.webhooks_connect_timeout_s + self.webhooks_response_timeout_s
        if self.webhooks_lease_s <= attempt:
            raise ValueError(
                f"KILN_WEBHOOKS_LEASE_S ({self.webhooks_lease_s}) must be above the connect and "
                f"response timeouts together ({attempt}): else a slow attempt is sent twice"
            )
        self.retry_schedule()  # a malformed schedule fails at start, not at the first failure
        return self

    def retry_schedule(self) -> list[float]:
        parts = [p.strip() for p in self.webhooks_retry_schedule_s.split(",") if p.strip()]
        return [max(0.0, float(p)) for p in parts]
