"""The budget gates' bucket (JetStream key-value KILN_BUDGET_GATES) for the agent, read only.

``watch`` is nats-py's KV watch (an ordered push consumer that delivers the last value of every
key, then each change; it recreates itself after a gap or a reconnect); ``read`` is one get,
answered by the stream's leader (the bucket allows no direct gets), so it sees the last write.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import ValidationError

from kiln_contracts import BudgetGate, gate_key
from kiln_runtime.bus import Bus

from ..gates import GateUpdate

log = logging.getLogger(__name__)


class KvGateSource:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._kv: KeyValue | None = None

    async def open(self) -> None:
        """Create or bind the bucket (after the bus has connected)."""
        self._kv = await self.bus.gates()

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("KvGateSource used before open()")
        return self._kv

    def connected(self) -> bool:
        return bool(self.bus.nc.is_connected)

    def stopping(self) -> bool:
        return bool(self.bus.draining or self.bus.nc.is_closed)

    async def watch(self) -> AsyncIterator[GateUpdate | None]:
        watcher = await self.kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    yield None  # the current values are all delivered
                    continue
                revision = entry.revision or 0
                if entry.operation in (KV_DEL, KV_PURGE):
                    yield entry.key, None, revision
                    continue
                try:
                    gate = BudgetGate.model_validate_json(entry.value or b"")
                except ValidationError as err:  # not the budget's writing: keep what is known
                    log.error("invalid budget gate %r ignored: %s", entry.key, err)
                    continue
                yield entry.key, gate, revision
        finally:
            await watcher.stop()

    async def read(self, user_id: str) -> tuple[BudgetGate | None, int]:
        try:
            entry = await self.kv.get(gate_key(user_id))
        except KeyNotFoundError as err:
            found = err.entry
            return None, (found.revision or 0) if found is not None else 0
        return BudgetGate.model_validate_json(entry.value or b""), entry.revision or 0
