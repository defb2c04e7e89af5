"""A build's history from the stream: an ordered (ephemeral, flow-controlled) push consumer."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig, DeliverPolicy

from kiln_contracts import subjects

from ..ports import StoredEvent


class JetStreamHistory:
    def __init__(self, nc: Client) -> None:
        self.nc = nc

    async def history(
        self, build_id: str, after_seq: int, idle_s: float
    ) -> AsyncGenerator[StoredEvent | None, None]:
        config = (
            ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_seq + 1
            )
            if after_seq > 0
            else ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        )
        sub = await self.nc.jetstream().subscribe(
            subjects.build_filter(build_id),
            stream=subjects.STREAM,
            ordered_consumer=True,
            config=config,
            inactive_threshold=30.0,
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=idle_s)
                except NatsTimeout:
                    yield None
                    continue
                kind = msg.subject.rsplit(".", 1)[-1]
                yield StoredEvent(seq=msg.metadata.sequence.stream, kind=kind, data=msg.data)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
