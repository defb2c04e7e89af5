"""The budget's History port on the stream: an ordered (ephemeral, flow-controlled) consumer."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout
from pydantic import ValidationError

from kiln_contracts import Envelope, subjects
from kiln_runtime.consume import agreed_event_id
from kiln_runtime.errors import RetryLater
from kiln_runtime.replay import from_start

log = logging.getLogger(__name__)


class StreamHistory:
    """Replays kinds of messages from the start of the stream, in stream order."""

    def __init__(self, nc: Callable[[], Client], *, stall_s: float = 30.0) -> None:
        self._nc = nc
        self.stall_s = stall_s  # no message for this long before the end: the replay fails

    async def replay(self, kinds: Sequence[type[Envelope]]) -> AsyncIterator[Envelope]:
        by_kind = {k.kind: k for k in kinds}
        sub = await from_start(
            self._nc(),
            filter_subjects=[subjects.kind_filter(k) for k in by_kind],
            inactive_threshold_s=60.0,
        )
        if sub is None:
            return  # nothing of these kinds
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
