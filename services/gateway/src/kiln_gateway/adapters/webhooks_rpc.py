"""The webhooks service, as the gateway asks it (core NATS request/reply on
``kiln.rpc.webhooks.<op>``): it owns the endpoints and the delivery logs."""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel, ValidationError

from kiln_contracts.webhooks import WebhookReply

from ..ports import WebhooksUnavailable


class NatsWebhooks:
    def __init__(self, nc: Callable[[], Client], *, timeout_s: float = 10.0) -> None:
        self._nc = nc
        self.timeout_s = timeout_s

    async def ask(self, subject: str, request: BaseModel) -> WebhookReply:
        data = request.model_dump_json().encode()
        try:
            msg = await self._nc().request(subject, data, timeout=self.timeout_s)
        except NoRespondersError as err:
            raise WebhooksUnavailable("no webhooks service is answering") from err
        except (NatsTimeoutError, TimeoutError) as err:
            raise WebhooksUnavailable(
                f"the webhooks service did not answer in {self.timeout_s} s"
            ) from err
        try:
            return WebhookReply.model_validate_json(msg.data)
        except ValidationError as err:
            raise WebhooksUnavailable(f"the webhooks service answered badly: {err}") from err
