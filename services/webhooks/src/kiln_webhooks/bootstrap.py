"""The one place that wires the webhooks service's real adapters (tests pass overrides)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from kiln_contracts.webhooks import WebhookReply
from kiln_runtime.bus import Bus
from kiln_runtime.rpc import Responder
from kiln_runtime.service import serve

from . import app, metrics, targets
from .adapters.http import HttpSender
from .adapters.postgres import PgStore
from .deliveries import Dispatcher
from .endpoints import Endpoints, Policy
from .settings import WebhooksSettings

log = logging.getLogger(__name__)

BACKLOG_EVERY_S = 10.0


@dataclass
class Wiring:
    """The wired service. ``start()`` after ``bus.connect()``, before ``bus.start()``."""

    settings: WebhooksSettings
    bus: Bus
    store: PgStore
    sender: HttpSender
    dispatcher: Dispatcher
    endpoints: Endpoints
    _responders: list[Responder[Any, WebhookReply]] = field(default_factory=list)
    _backlog: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.store.open()
        await self.sender.open()
        self._responders = app.responders(self.endpoints)
        for responder in self._responders:
            await responder.start(self.bus.nc)
        self.dispatcher.start()
        self._backlog = asyncio.create_task(self._watch_backlog())

    async def _watch_backlog(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                metrics.BACKLOG.set(await self.store.backlog())
            await asyncio.sleep(BACKLOG_EVERY_S)

    async def stop(self) -> None:
        for responder in self._responders:
            await responder.stop()
        self._responders = []
        if self._backlog is not None:
            self._backlog.cancel()
        await self.dispatcher.stop(self.settings.shutdown_grace_s)
        await self.sender.close()
        await self.store.close()


def build(settings: WebhooksSettings, *, service: str = "webhooks") -> Wiring:
    """Wire the service; nothing connects until ``bus.connect()`` / ``start()``."""
    allowed = targets.networks(settings.webhooks_allowed_networks)
    bus = Bus(settings, service)
    store = PgStore(settings.database_url, settings.webhooks_db_schema)
    sender = HttpSender(
        allowed=allowed,
        allow_http=settings.webhooks_allow_http,
        connect_timeout_s=settings.webhooks_connect_timeout_s,
        response_timeout_s=settings.webhooks_response_timeout_s,
        max_response_bytes=settings.webhooks_max_response_bytes,
        resolve_timeout_s=settings.webhooks_resolve_timeout_s,
    )
    dispatcher = Dispatcher(
        store=store,
        sender=sender,
        schedule=settings.retry_schedule(),
        disable_after_s=settings.webhooks_disable_after_s,
        concurrency=settings.webhooks_concurrency,
        poll_s=settings.webhooks_poll_s,
        lease_s=settings.webhooks_lease_s,
    )
    policy = Policy(
        allowed=allowed,
        allow_http=settings.webhooks_allow_http,
        resolve_timeout_s=settings.webhooks_resolve_timeout_s,
        max_endpoints=settings.webhooks_max_endpoints,
    )
    endpoints = Endpoints(store, policy, wake=dispatcher.wake)
    app.register(bus, store, durable=settings.webhooks_durable, wake=dispatcher.wake)
    return Wiring(settings, bus, store, sender, dispatcher, endpoints)


async def run(settings: WebhooksSettings) -> None:
    wiring = build(settings)
    await serve(wiring.bus, start=wiring.start, stop=wiring.stop)
