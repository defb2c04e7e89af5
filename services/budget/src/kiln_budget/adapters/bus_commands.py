"""The budget's Commands port on the bus: publish now, or later with a JetStream message schedule."""

from __future__ import annotations

from datetime import datetime

from kiln_contracts import Envelope
from kiln_runtime.bus import Bus

from ..periods import rfc3339


class BusCommands:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def publish(self, msg: Envelope) -> None:
        await self.bus.publish(msg)

    async def publish_at(self, msg: Envelope, at: datetime, name: str) -> None:
        # kiln.schedule.<build>.<name>, "Nats-Schedule: @at <UTC>": the server stores the schedule
        # in the stream and publishes the message to its kiln.build.* subject at that time (a time
        # in the past fires at once); a budget restart loses nothing.
        await self.bus.publish_at(msg, rfc3339(at), name)
