"""Budget gates: the budget service's per-user decision whether a build may call the model.

One value per user (key = the user id) in the JetStream key-value bucket ``subjects.BUDGET_GATES``.
The budget service is its only writer: it closes a user's gate the moment the user's spend reaches
the allowance (until the reset), and opens it again on a top-up. The agent watches the bucket and
asks it before every model call and before it starts a build; the gateway reads it before it
accepts one. A closed gate whose ``until`` has passed is open, whoever reads it: the reset needs no
writer (the budget's scheduled WakeRequested wakes the sleeping builds at that time).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal, Self

from pydantic import Field, model_validator

from .messages import Id, MicroUsd, Model, utcnow

TOP_UP_HINT = "an operator can top up the allowance now (POST /v1/budget/top-up, admin key)"


class BudgetGate(Model):
    user_id: Id
    state: Literal["open", "closed"]
    until: datetime | None = Field(
        default=None,
        description="When closed: the reset (UTC), from which the gate is open again.",
    )
    reason: str = Field(default="", description="Why it is closed: 'daily allowance used up'...")
    spent_micro_usd: MicroUsd = Field(default=0, description="The period's spend when written.")
    allowance_micro_usd: MicroUsd = Field(default=0, description="The period's allowance.")
    updated_at: datetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _closed_until_a_time(self) -> Self:
        if self.state == "closed" and self.until is None:
            raise ValueError("a closed gate says until when")
        return self

    @classmethod
    def opened(cls, user_id: str) -> BudgetGate:
        return cls(user_id=user_id, state="open")

    def closed_at(self, now: datetime) -> bool:
        """Closed at ``now`` (a closed gate opens by itself at ``until``)."""
        return self.state == "closed" and self.until is not None and now < self.until

    def key(self) -> str:
        return gate_key(self.user_id)

    @property
    def sleep_reason(self) -> str:
        """The reason a build put to sleep at this gate is given (the budget's SleepRequested
        says the same)."""
        return (
            f"{self.reason}: spent {self.spent_micro_usd} of {self.allowance_micro_usd} micro-USD"
        )

    def refusal(self) -> str:
        """What a refused build is told: what is spent, when it resets, how to top up."""
        until = self.until.astimezone(UTC).isoformat() if self.until else "the next period"
        return f"{self.sleep_reason}; the allowance resets at {until}; {TOP_UP_HINT}"


def gate_key(user_id: str) -> str:
    """A user's key in the bucket (user ids are valid keys: letters, digits, '-', '_')."""
    return user_id
