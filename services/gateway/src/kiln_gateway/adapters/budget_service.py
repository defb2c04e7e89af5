"""The budget service as the gateway sees it over NATS: users' budget gates, read from the key-value
bucket the budget keeps (never its Redis), and top-ups, handed to it over request/reply."""

from __future__ import annotations

from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from kiln_contracts import BudgetGate, gate_key, subjects
from kiln_contracts.rpc import TopUpReply, TopUpRequest


class NatsBudget:
    def __init__(self, nc: Client, gates: KeyValue, *, timeout_s: float = 10.0) -> None:
        self.nc = nc
        self.gates = gates
        self.timeout_s = timeout_s

    async def gate(self, user_id: str) -> BudgetGate | None:
        try:
            entry = await self.gates.get(gate_key(user_id))
        except KeyNotFoundError:
            return None
        return BudgetGate.model_validate_json(entry.value or b"{}")

    async def top_up(self, request: TopUpRequest) -> TopUpReply:
        reply = await self.nc.request(
            subjects.BUDGET_TOP_UP, request.model_dump_json().encode(), timeout=self.timeout_s
        )
        return TopUpReply.model_validate_json(reply.data)
