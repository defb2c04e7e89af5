"""A build's history from the stream: an ordered (ephemeral, flow-controlled) push consumer."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig, DeliverPolicy

from kiln_contracts import CheckpointSaved, subjects
from kiln_runtime.replay import from_start

from ..ports import Checkpoint, StoredEvent


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

    async def checkpoints(self, build_id: str, timeout_s: float = 5.0) -> list[Checkpoint]:
        """The build's CheckpointSaved events on the stream so far, in stream order. An ordered
        consumer created here for its creation answer (how many messages it has to deliver: the
        gateway's NATS user may create one, not look it up afterwards), as the budget's replay."""
        sub = await from_start(
            self.nc,
            filter_subject=subjects.subject(build_id, CheckpointSaved.kind),
            inactive_threshold_s=30.0,
        )
        if sub is None:
            return []  # none
        out = []
        try:
            while True:
                msg = await sub.next_msg(timeout=timeout_s)
                event = CheckpointSaved.model_validate_json(msg.data)
                out.append(
                    Checkpoint(
                        seq=msg.metadata.sequence.stream,
                        iteration=event.iteration,
                        snapshot_id=str(event.event_id),
                    )
                )
                if not msg.metadata.num_pending:  # the last one stored when it was delivered
                    return out
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
