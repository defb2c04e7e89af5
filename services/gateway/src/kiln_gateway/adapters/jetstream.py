"""A build's history from the stream: an ordered (ephemeral, flow-controlled) push consumer."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from kiln_contracts import CheckpointSaved, subjects

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
        js = self.nc.jetstream()
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=subjects.subject(build_id, CheckpointSaved.kind),
            deliver_subject=self.nc.new_inbox(),
            ack_policy=AckPolicy.NONE,
            max_deliver=1,
            flow_control=True,
            idle_heartbeat=5.0,
            num_replicas=1,
            mem_storage=True,
            inactive_threshold=30.0,
        )
        created = await js.add_consumer(subjects.STREAM, config)
        if not created.num_pending:
            return []  # none (the server drops the idle consumer)
        sub = await js.subscribe_bind(subjects.STREAM, config, created.name, ordered_consumer=True)
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
