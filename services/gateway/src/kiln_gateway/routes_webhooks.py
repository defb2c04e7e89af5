"""``/v1/webhooks``: the caller's webhook endpoints and their delivery logs.

The webhooks service owns both (Postgres schema ``webhooks``); each route asks it over request/
reply (``kiln.rpc.webhooks.<op>``, ``adapters.webhooks_rpc``) with the caller's user id, so
another user's endpoint is a 404 there as here. The secret is shown once: when the endpoint is
created and when it is rotated.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from kiln_contracts import webhooks as wh
from kiln_contracts.webhooks import (
    DeliveryStatus,
    EventType,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookReply,
)

from .deps import Me, Rt
from .ports import WebhooksUnavailable
from .problems import responses

router = APIRouter(tags=["webhooks"])

EndpointId = Annotated[str, Path(max_length=100)]


class CreateWebhook(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"url": "https://example.com/kiln", "event_types": ["build.completed"]}]
        },
    )

    url: wh.Url = Field(description="https (http only where the operator allows it).")
    event_types: list[EventType] = Field(
        default_factory=lambda: list(wh.DEFAULT_EVENT_TYPES),  # type: ignore[arg-type]
        max_length=len(wh.EVENT_TYPES),
        description="Default: every type but build.iteration.",
    )
    description: wh.Description = ""


class UpdateWebhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: wh.Url | None = None
    event_types: list[EventType] | None = Field(default=None, max_length=len(wh.EVENT_TYPES))
    description: wh.Description | None = None
    enabled: bool | None = Field(
        default=None, description="true also clears a disabled_reason Kiln set."
    )


class RotateSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overlap_s: int = Field(
        default=86_400,
        ge=0,
        le=7 * 86_400,
        description="For this long deliveries are signed with the old secret too.",
    )


class WebhookWithSecret(BaseModel):
    endpoint: WebhookEndpoint
    secret: str = Field(description="whsec_...: shown only now; verify signatures with it.")


class WebhookList(BaseModel):
    webhooks: list[WebhookEndpoint]


class DeliveryList(BaseModel):
    deliveries: list[WebhookDelivery]
    next_before: datetime | None = Field(
        default=None, description="Pass as ?before= for the next (older) page."
    )


async def _ask(rt: Rt, subject: str, request: BaseModel) -> WebhookReply:
    if rt.webhooks is None:
        raise HTTPException(503, "webhooks are not available")
    try:
        reply = await rt.webhooks.ask(subject, request)
    except WebhooksUnavailable as err:
        raise HTTPException(503, str(err)) from err
    if not reply.ok:
        code = reply.code if 400 <= reply.code < 500 else 503
        raise HTTPException(code, reply.error or "the webhooks service failed")
    return reply


def _endpoint(reply: WebhookReply) -> WebhookEndpoint:
    if reply.endpoint is None:
        raise HTTPException(503, "the webhooks service gave no endpoint")
    return reply.endpoint


@router.post(
    "/v1/webhooks",
    status_code=201,
    response_model=WebhookWithSecret,
    responses=responses(401, 409, 413, 422, 503),
)
async def create_webhook(body: CreateWebhook, rt: Rt, me: Me) -> WebhookWithSecret:
    """Register an endpoint for the caller's builds' events; its secret is shown only now."""
    request = wh.WebhookCreateRequest(
        user_id=me.user_id, url=body.url, event_types=body.event_types, description=body.description
    )
    reply = await _ask(rt, wh.CREATE, request)
    return WebhookWithSecret(endpoint=_endpoint(reply), secret=reply.secret or "")


@router.get("/v1/webhooks", response_model=WebhookList, responses=responses(401, 503))
async def list_webhooks(rt: Rt, me: Me) -> WebhookList:
    """The caller's endpoints, oldest first."""
    reply = await _ask(rt, wh.LIST, wh.WebhookListRequest(user_id=me.user_id))
    return WebhookList(webhooks=reply.endpoints)


@router.get(
    "/v1/webhooks/{endpoint_id}",
    response_model=WebhookEndpoint,
    responses=responses(401, 404, 422, 503),
)
async def get_webhook(endpoint_id: EndpointId, rt: Rt, me: Me) -> WebhookEndpoint:
    """One endpoint (never its secret)."""
    reply = await _ask(rt, wh.GET, wh.WebhookRef(user_id=me.user_id, endpoint_id=endpoint_id))
    return _endpoint(reply)


@router.patch(
    "/v1/webhooks/{endpoint_id}",
    response_model=WebhookEndpoint,
    responses=responses(401, 404, 413, 422, 503),
)
async def update_webhook(
    endpoint_id: EndpointId, body: UpdateWebhook, rt: Rt, me: Me
) -> WebhookEndpoint:
    """Change the URL, the event types, the description; enable or disable it."""
    request = wh.WebhookUpdateRequest(
        user_id=me.user_id, endpoint_id=endpoint_id, **body.model_dump(exclude_none=True)
    )
    return _endpoint(await _ask(rt, wh.UPDATE, request))


@router.delete(
    "/v1/webhooks/{endpoint_id}", status_code=204, responses=responses(401, 404, 422, 503)
)
async def delete_webhook(endpoint_id: EndpointId, rt: Rt, me: Me) -> Response:
    """Remove the endpoint and its delivery log; nothing more is sent to it."""
    await _ask(rt, wh.DELETE, wh.WebhookRef(user_id=me.user_id, endpoint_id=endpoint_id))
    return Response(status_code=204)


@router.post(
    "/v1/webhooks/{endpoint_id}/rotate-secret",
    response_model=WebhookWithSecret,
    responses=responses(401, 404, 413, 422, 503),
)
async def rotate_secret(
    endpoint_id: EndpointId, rt: Rt, me: Me, body: RotateSecret | None = None
) -> WebhookWithSecret:
    """A new secret (shown only now); the old one signs too until the overlap ends."""
    overlap = (body or RotateSecret()).overlap_s
    request = wh.WebhookRotateRequest(
        user_id=me.user_id, endpoint_id=endpoint_id, overlap_s=overlap
    )
    reply = await _ask(rt, wh.ROTATE, request)
    return WebhookWithSecret(endpoint=_endpoint(reply), secret=reply.secret or "")


@router.get(
    "/v1/webhooks/{endpoint_id}/deliveries",
    response_model=DeliveryList,
    responses=responses(401, 404, 422, 503),
)
async def list_deliveries(
    endpoint_id: EndpointId,
    rt: Rt,
    me: Me,
    status: DeliveryStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: datetime | None = None,
) -> DeliveryList:
    """The endpoint's delivery log, newest first: status, attempts, the last response."""
    request = wh.WebhookDeliveriesRequest(
        user_id=me.user_id, endpoint_id=endpoint_id, status=status, limit=limit, before=before
    )
    found = (await _ask(rt, wh.DELIVERIES, request)).deliveries
    more = len(found) == limit
    return DeliveryList(deliveries=found, next_before=found[-1].created_at if more else None)


@router.post(
    "/v1/webhooks/{endpoint_id}/deliveries/{delivery_id}/redeliver",
    status_code=202,
    response_model=WebhookDelivery,
    responses=responses(401, 404, 422, 503),
)
async def redeliver(
    endpoint_id: EndpointId,
    delivery_id: Annotated[str, Path(max_length=100)],
    rt: Rt,
    me: Me,
) -> WebhookDelivery:
    """Send the delivery again now, with the same webhook-id (a new round of retries; for a
    disabled endpoint, once it is enabled)."""
    request = wh.WebhookRedeliverRequest(
        user_id=me.user_id, endpoint_id=endpoint_id, delivery_id=delivery_id
    )
    reply = await _ask(rt, wh.REDELIVER, request)
    if reply.delivery is None:
        raise HTTPException(503, "the webhooks service gave no delivery")
    return reply.delivery
