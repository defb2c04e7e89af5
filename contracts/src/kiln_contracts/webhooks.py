"""Webhooks: what Kiln sends to the endpoints users register, and the request/reply messages the
gateway asks the webhooks service with (``kiln.rpc.webhooks.<op>``, core NATS, not persisted).

A delivery is an HTTP POST of a ``WebhookPayload`` (JSON) signed per the Standard Webhooks
specification: headers ``webhook-id`` (the delivery's id, the same on every attempt),
``webhook-timestamp`` (the attempt's Unix time) and ``webhook-signature`` (``v1,<base64>`` of
HMAC-SHA256 over ``id.timestamp.body`` with the endpoint's secret, one per secret in use while a
rotated one overlaps, separated by spaces).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import Field, JsonValue, StringConstraints

from .messages import (
    BuildCancelled,
    BuildCompleted,
    BuildContinued,
    BuildFailed,
    BuildRejected,
    BuildRequested,
    BuildResumed,
    BuildSleeping,
    Envelope,
    Id,
    IterationCompleted,
    Model,
    PreviewAvailable,
    PreviewGone,
)

# The event types an endpoint may ask for, and the message each one is made from.
EVENT_TYPES: Final[dict[str, type[Envelope]]] = {
    "build.started": BuildRequested,
    "build.sleeping": BuildSleeping,
    "build.resumed": BuildResumed,
    "build.continued": BuildContinued,
    "build.completed": BuildCompleted,
    "build.failed": BuildFailed,
    "build.cancelled": BuildCancelled,
    "build.rejected": BuildRejected,
    "build.iteration": IterationCompleted,
    "preview.available": PreviewAvailable,
    "preview.gone": PreviewGone,
}
TYPE_OF_KIND: Final[dict[str, str]] = {m.kind: t for t, m in EVENT_TYPES.items()}
# What an endpoint gets when it names no types: every one but the per-iteration event.
DEFAULT_EVENT_TYPES: Final = tuple(t for t in EVENT_TYPES if t != "build.iteration")

EventType = Literal[
    "build.started",
    "build.sleeping",
    "build.resumed",
    "build.continued",
    "build.completed",
    "build.failed",
    "build.cancelled",
    "build.rejected",
    "build.iteration",
    "preview.available",
    "preview.gone",
]
WebhookId = Annotated[str, StringConstraints(pattern=r"^wh_[a-f0-9]{32}$")]
DeliveryId = Annotated[str, StringConstraints(pattern=r"^msg_[a-f0-9]{32}$")]
Url = Annotated[str, StringConstraints(min_length=8, max_length=2000, pattern=r"^[^\x00-\x20]+$")]
Description = Annotated[str, StringConstraints(max_length=500, pattern=r"^[^\x00]*$")]
DeliveryStatus = Literal["pending", "delivered", "failed"]

# Request/reply subjects (core NATS), one per operation.
RPC_PREFIX: Final = "kiln.rpc.webhooks"
CREATE: Final = f"{RPC_PREFIX}.create"
LIST: Final = f"{RPC_PREFIX}.list"
GET: Final = f"{RPC_PREFIX}.get"
UPDATE: Final = f"{RPC_PREFIX}.update"
DELETE: Final = f"{RPC_PREFIX}.delete"
ROTATE: Final = f"{RPC_PREFIX}.rotate"
DELIVERIES: Final = f"{RPC_PREFIX}.deliveries"
REDELIVER: Final = f"{RPC_PREFIX}.redeliver"


class WebhookEvent(Model):
    """``data`` of a delivery: the build event it tells of."""

    build_id: Id
    kind: str = Field(description="The message's kind (its subject's last token).")
    event_id: uuid.UUID = Field(description="The message's event_id (unique per event).")
    sequence: int = Field(
        ge=1,
        description="The event's sequence in Kiln's stream: increases along a build's history; "
        "order a build's deliveries by it.",
    )
    message: dict[str, JsonValue] = Field(
        description="The message as on the bus (contracts/schemas/<kind>.json)."
    )


class WebhookPayload(Model):
    """The body of every delivery (Standard Webhooks' recommended shape)."""

    type: EventType
    timestamp: datetime = Field(description="When the event occurred.")
    data: WebhookEvent


class WebhookEndpoint(Model):
    """A registered endpoint, as its owner sees it (never its secret)."""

    id: WebhookId
    url: str
    event_types: list[EventType]
    description: str = ""
    enabled: bool
    disabled_reason: str | None = Field(
        default=None, description="Why Kiln disabled it (it kept failing), if it did."
    )
    failing_since: datetime | None = Field(
        default=None, description="The first failure since its last success."
    )
    created_at: datetime
    updated_at: datetime
    secret_rotated_at: datetime | None = None
    previous_secret_expires_at: datetime | None = Field(
        default=None, description="Until then deliveries are signed with the old secret too."
    )


class WebhookDelivery(Model):
    """One event for one endpoint, with the state of its attempts."""

    id: DeliveryId = Field(description="The webhook-id header: the same on every attempt.")
    endpoint_id: WebhookId
    build_id: Id
    event_type: EventType
    event_id: uuid.UUID
    sequence: int
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: datetime
    delivered_at: datetime | None = None


def _default_types() -> list[EventType]:
    return list(DEFAULT_EVENT_TYPES)  # type: ignore[arg-type]


class WebhookCreateRequest(Model):
    user_id: Id
    url: Url
    event_types: list[EventType] = Field(default_factory=lambda: _default_types())
    description: Description = ""


class WebhookRef(Model):
    """One endpoint of a user (get, delete)."""

    user_id: Id
    endpoint_id: str = Field(max_length=100)


class WebhookListRequest(Model):
    user_id: Id


class WebhookUpdateRequest(Model):
    user_id: Id
    endpoint_id: str = Field(max_length=100)
    url: Url | None = None
    event_types: list[EventType] | None = None
    description: Description | None = None
    enabled: bool | None = None


class WebhookRotateRequest(Model):
    user_id: Id
    endpoint_id: str = Field(max_length=100)
    overlap_s: int = Field(default=86_400, ge=0, le=7 * 86_400)


class WebhookDeliveriesRequest(Model):
    user_id: Id
    endpoint_id: str = Field(max_length=100)
    status: DeliveryStatus | None = None
    limit: int = Field(default=50, ge=1, le=200)
    before: datetime | None = Field(default=None, description="Older than this creation time.")


class WebhookRedeliverRequest(Model):
    user_id: Id
    endpoint_id: str = Field(max_length=100)
    delivery_id: str = Field(max_length=100)


class WebhookReply(Model):
    """Every answer of the webhooks service. ``code``: the HTTP status the gateway answers with
    (404 another user's or no such endpoint, 422 a refused URL ...) when ``ok`` is False."""

    ok: bool = True
    error: str = ""
    code: int = 200
    endpoint: WebhookEndpoint | None = None
    endpoints: list[WebhookEndpoint] = Field(default_factory=list)
    secret: str | None = Field(default=None, description="Only when created or rotated.")
    delivery: WebhookDelivery | None = None
    deliveries: list[WebhookDelivery] = Field(default_factory=list)


WEBHOOK_MODELS = (
    WebhookPayload,
    WebhookEndpoint,
    WebhookDelivery,
    WebhookCreateRequest,
    WebhookRef,
    WebhookListRequest,
    WebhookUpdateRequest,
    WebhookRotateRequest,
    WebhookDeliveriesRequest,
    WebhookRedeliverRequest,
    WebhookReply,
)
