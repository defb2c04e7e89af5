"""The webhooks service, as the gateway asks it (core NATS request/reply on
``kiln.rpc.webhooks.<op>``): it owns the endpoints and the delivery logs."""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client
from pydantic import BaseModel, ValidationError

from kiln_contracts.webhooks import WebhookReply

from ..ports import WebhooksUnavailable
from . import nats_request


class NatsWebhooks:
    def __init__(self, nc: Callable[[], Client], *, timeout_s: float = 10.0) -> None:
        self._nc = nc
        self.timeout_s = timeout_s

    async def ask(self, subject: str, request: BaseModel) -> WebhookReply:
        data = await nats_request.request(
            self._nc(),
            subject,
            request,
            timeout_s=self.timeout_s,
            service="webhooks",
            unavailable=WebhooksUnavailable,
        )
        try:
            return WebhookReply.model_validate_json(data)
        except ValidationError as err:
            raise WebhooksUnavailable(f"the webhooks service answered badly: {err}") from err
