"""Reading the stream from its start: an ordered consumer (ephemeral, flow-controlled, no acks)
that ends once it has delivered what the stream held when it was made."""

from __future__ import annotations

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from kiln_contracts import subjects


async def from_start(
    nc: Client,
    *,
    inactive_threshold_s: float,
    filter_subject: str | None = None,
    filter_subjects: list[str] | None = None,
) -> JetStreamContext.PushSubscription | None:
    """An ordered consumer of the stream's messages on the filter, from the first. It is created
    here for its creation answer, how many messages it has to deliver (a service's NATS user may
    create one, not look it up afterwards): the reader stops at the message whose
    ``metadata.num_pending`` is 0. None when there is nothing to deliver (the server drops the
    idle consumer)."""
    js = nc.jetstream()
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=filter_subject,
        filter_subjects=filter_subjects,
        deliver_subject=nc.new_inbox(),
        ack_policy=AckPolicy.NONE,
        max_deliver=1,
        flow_control=True,
        idle_heartbeat=5.0,
        num_replicas=1,
        mem_storage=True,
        inactive_threshold=inactive_threshold_s,
    )
    created = await js.add_consumer(subjects.STREAM, config)
    if not created.num_pending:
        return None
    return await js.subscribe_bind(subjects.STREAM, config, created.name, ordered_consumer=True)
