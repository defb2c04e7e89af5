"""The budget's Gates port on the JetStream key-value bucket KILN_BUDGET_GATES (one key per user).

Writes are compare-and-set on the key's last revision (``KeyValue.update(last=...)``: the server
refuses a write whose expected last subject sequence is not the key's); reads go to the stream's
leader (the bucket allows no direct gets), so a read sees the last write.
"""

from __future__ import annotations

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kiln_contracts import BudgetGate, gate_key
from kiln_runtime.bus import Bus


class KvGates:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._kv: KeyValue | None = None

    async def open(self) -> None:
        """Create or bind the bucket (after the bus has connected)."""
        self._kv = await self.bus.gates()

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("KvGates used before open()")
        return self._kv

    async def read(self, user_id: str) -> tuple[BudgetGate | None, int]:
        try:
            entry = await self.kv.get(gate_key(user_id))
        except KeyNotFoundError as err:  # never written (0), or deleted (its marker's revision)
            entry = err.entry
            return None, entry.revision if entry is not None and entry.revision else 0
        return BudgetGate.model_validate_json(entry.value or b"{}"), entry.revision or 0

    async def write(self, gate: BudgetGate, revision: int) -> bool:
        try:
            await self.kv.update(gate.key(), gate.model_dump_json().encode(), last=revision)
        except KeyWrongLastSequenceError:
            return False
        return True
