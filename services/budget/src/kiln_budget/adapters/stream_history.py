"""The budget's History port on the stream: an ordered (ephemeral, flow-controlled) consumer."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from kiln_contracts import Envelope, subjects
from kiln_runtime.consume import agreed_event_id
from kiln_runtime.errors import RetryLater

log = logging.getLogger(__name__)


class StreamHistory:
    """Replays kinds of messages from the start of the stream, in stream order."""

    def __init__(self, nc: Callable[[], Client], *, stall_s: float = 30.0) -> None:
        self._nc = nc
        self.stall_s = stall_s  # no message for this long before the end: the replay fails

    async def replay(self, kinds: Sequence[type[Envelope]]) -> AsyncIterator[Envelope]:
        by_kind = {k.kind: k for k in kinds}
        js = self._nc().jetstream()
        # An ordered consumer (as ``js.subscribe(ordered_consumer=True)`` makes one), created
        # here for its creation answer: how many messages it has to deliver (the budget's NATS
        # user may create it, not look it up afterwards).
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            filter_subjects=[subjects.kind_filter(k) for k in by_kind],
            deliver_subject=self._nc().new_inbox(),
            ack_policy=AckPolicy.NONE,
            max_deliver=1,
            flow_control=True,
            idle_heartbeat=5.0,
            num_replicas=1,
            mem_storage=True,
            inactive_threshold=60.0,
        )
        created = await js.add_consumer(subjects.STREAM, config)
        if not created.num_pending:
            return  # nothing of these kinds (the server drops the idle consumer)
        sub = await js.subscribe_bind(subjects.STREAM, config, created.name, ordered_consumer=True)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=self.stall_s)
                except NatsTimeout as err:
                    raise RetryLater(f"the stream's replay stalled for {self.stall_s} s") from err
                kind = msg.subject.rsplit(".", 1)[-1]
                model = by_kind.get(kind)
                if model is not None:
                    try:
                        event = model.model_validate_json(msg.data)
                    except ValidationError:
                        seq = msg.metadata.sequence.stream
                        log.info("not replayed: an invalid %s (seq %s)", kind, seq)
                    else:
                        if "event_id" not in event.model_fields_set:  # as the consumers name it
                            seq = msg.metadata.sequence.stream
                            event = event.with_id(agreed_event_id(msg.headers, seq))
                        yield event
                if not msg.metadata.num_pending:  # the last one stored when it was delivered
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
