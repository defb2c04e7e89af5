"""The budget gates' bucket, JetStream key-value KILN_BUDGET_GATES (one key per user).

The budget writes it, the agent watches it, the gateway reads it (``kiln_contracts.gates`` holds
the gate itself). Writes are compare-and-set on the key's last revision (``KeyValue.update(last=)``:
the server refuses a write whose expected last subject sequence is not the key's). Reads go to the
stream's leader (the bucket allows no direct gets), so a read sees the last write. ``watch`` is
nats-py's KV watch: an ordered push consumer that delivers the last value of every key, then each
change, and recreates itself after a gap or a reconnect.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import ValidationError

from kiln_contracts import BudgetGate, gate_key

from .bus import Bus

log = logging.getLogger(__name__)

# (key, the gate or None when deleted, revision)
GateUpdate = tuple[str, BudgetGate | None, int]


class GateBucket:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._kv: KeyValue | None = None

    async def open(self) -> None:
        """Create or bind the bucket (after the bus has connected)."""
        self._kv = await self.bus.gates()

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("GateBucket used before open()")
        return self._kv

    def connected(self) -> bool:
        return bool(self.bus.nc.is_connected)

    def stopping(self) -> bool:
        return bool(self.bus.draining or self.bus.nc.is_closed)

    async def read(self, user_id: str) -> tuple[BudgetGate | None, int]:
        """The user's gate and its revision: ``(None, 0)`` if never written, ``(None, the delete
        marker's revision)`` if deleted."""
        try:
            entry = await self.kv.get(gate_key(user_id))
        except KeyNotFoundError as err:
            found = err.entry
            return None, (found.revision or 0) if found is not None else 0
        return BudgetGate.model_validate_json(entry.value or b"{}"), entry.revision or 0

    async def write(self, gate: BudgetGate, revision: int) -> bool:
        """Write ``gate`` if the key is still at ``revision``; False if it has moved."""
        try:
            await self.kv.update(gate.key(), gate.model_dump_json().encode(), last=revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def watch(self) -> AsyncIterator[GateUpdate | None]:
        """Every key's last value, then ``None`` (the current values are all delivered), then
        each change. A value that is not a gate is logged and skipped."""
        watcher = await self.kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    yield None
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
