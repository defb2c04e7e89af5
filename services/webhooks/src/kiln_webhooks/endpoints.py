"""The endpoints users register, as the gateway asks for them (one function per request; every
answer a ``WebhookReply``). Another user's endpoint does not exist for the caller (404)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kiln_contracts.webhooks import (
    WebhookCreateRequest,
    WebhookDeliveriesRequest,
    WebhookListRequest,
    WebhookRedeliverRequest,
    WebhookRef,
    WebhookReply,
    WebhookRotateRequest,
    WebhookUpdateRequest,
)

from . import signing, targets
from .ports import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    """What a target must be (``targets``) and how many endpoints a user may have."""

    allowed: tuple[targets.IpNetwork, ...] = ()
    allow_http: bool = False
    resolve_timeout_s: float = 3.0
    max_endpoints: int = 20


@dataclass
class Endpoints:
    store: Store
    policy: Policy
    wake: Callable[[], None] | None = None  # the dispatcher's: look for due deliveries now

    async def _check(self, url: str) -> WebhookReply | None:
        try:
            await targets.check_url(
                url,
                allowed=self.policy.allowed,
                allow_http=self.policy.allow_http,
                timeout_s=self.policy.resolve_timeout_s,
            )
        except targets.UnsafeTarget as err:
            return _problem(422, str(err))
        return None

    async def create(self, req: WebhookCreateRequest) -> WebhookReply:
        if (refused := await self._check(req.url)) is not None:
            return refused
        if await self.store.count_endpoints(req.user_id) >= self.policy.max_endpoints:
            return _problem(409, f"at most {self.policy.max_endpoints} webhook endpoints per user")
        secret = signing.new_secret()
        endpoint = await self.store.create_endpoint(
            f"wh_{uuid.uuid4().hex}",
            req.user_id,
            req.url,
            _unique(req.event_types),
            req.description,
            secret,
        )
        log.info("webhook %s registered for %s", endpoint.id, req.user_id)
        return WebhookReply(endpoint=endpoint, secret=secret, code=201)

    async def list(self, req: WebhookListRequest) -> WebhookReply:
        return WebhookReply(endpoints=await self.store.endpoints(req.user_id))

    async def get(self, req: WebhookRef) -> WebhookReply:
        endpoint = await self.store.endpoint(req.user_id, req.endpoint_id)
        return WebhookReply(endpoint=endpoint) if endpoint else _missing()

    async def update(self, req: WebhookUpdateRequest) -> WebhookReply:
        if await self.store.endpoint(req.user_id, req.endpoint_id) is None:
            return _missing()
        if req.url is not None and (refused := await self._check(req.url)) is not None:
            return refused
        endpoint = await self.store.update_endpoint(
            req.user_id,
            req.endpoint_id,
            url=req.url,
            event_types=_unique(req.event_types) if req.event_types is not None else None,
            description=req.description,
            enabled=req.enabled,
        )
        return WebhookReply(endpoint=endpoint) if endpoint else _missing()

    async def delete(self, req: WebhookRef) -> WebhookReply:
        if not await self.store.delete_endpoint(req.user_id, req.endpoint_id):
            return _missing()
        return WebhookReply(code=204)

    async def rotate(self, req: WebhookRotateRequest) -> WebhookReply:
        secret = signing.new_secret()
        endpoint = await self.store.rotate_secret(
            req.user_id, req.endpoint_id, secret, req.overlap_s
        )
        if endpoint is None:
            return _missing()
        return WebhookReply(endpoint=endpoint, secret=secret)

    async def deliveries(self, req: WebhookDeliveriesRequest) -> WebhookReply:
        found = await self.store.deliveries(
            req.user_id, req.endpoint_id, req.status, req.limit, req.before
        )
        return WebhookReply(deliveries=found) if found is not None else _missing()

    async def redeliver(self, req: WebhookRedeliverRequest) -> WebhookReply:
        delivery = await self.store.redeliver(req.user_id, req.endpoint_id, req.delivery_id)
        if delivery is None:
            return _problem(404, "webhook endpoint or delivery not found")
        if self.wake is not None:
            self.wake()
        return WebhookReply(delivery=delivery, code=202)


def _unique(types: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(types))


def _problem(code: int, error: str) -> WebhookReply:
    return WebhookReply(ok=False, code=code, error=error)


def _missing() -> WebhookReply:
    return _problem(404, "webhook endpoint not found")
