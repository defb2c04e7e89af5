"""The budget service, as the gateway asks it: a user's allowance (core NATS request/reply) and
the user's budget gate (read from the key-value bucket the budget keeps, never from its Redis)."""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client

from kiln_contracts import BudgetGate, subjects
from kiln_contracts.rpc import BudgetStatus, BudgetStatusReply, BudgetStatusRequest
from kiln_runtime.gates import GateBucket

from ..ports import BudgetUnavailable
from .nats_request import request


class NatsBudget:
    def __init__(
        self, nc: Callable[[], Client], gates: GateBucket, *, timeout_s: float = 5.0
    ) -> None:
        self._nc = nc
        self.gates = gates
        self.timeout_s = timeout_s

    async def gate(self, user_id: str) -> BudgetGate | None:
        gate, _ = await self.gates.read(user_id)
        return gate

    async def status(self, user_id: str, tier: str) -> BudgetStatus:
        data = await request(
            self._nc(),
            subjects.BUDGET_STATUS,
            BudgetStatusRequest(user_id=user_id, tier=tier),
            timeout_s=self.timeout_s,
            service="budget",
            unavailable=BudgetUnavailable,
        )
        reply = BudgetStatusReply.model_validate_json(data)
        if not reply.ok or reply.status is None:
            raise BudgetUnavailable(reply.error or "the budget service gave no status")
        return reply.status
