"""The budget's and the API keys' response and request bodies."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from .budget import BudgetView
from .model import ApiKey
from .schemas import Body, Ident, Name


class BudgetOut(BaseModel):
    user_id: str
    tier: str
    day: str = Field(examples=["2025-06-01"])
    month: str = Field(examples=["2025-06"])
    spent_today_micro_usd: int
    spent_month_micro_usd: int
    monthly_budget_micro_usd: int
    daily_allowance_micro_usd: int = Field(
        description="What is left of the month (top-ups included) before today, over the days "
        "left (today included), plus today's top-ups."
    )
    remaining_today_micro_usd: int
    per_build_cap_micro_usd: int
    concurrent_builds: int
    period_end: str = Field(description="When today's allowance resets (UTC, RFC 3339).")
    topups_micro_usd: int = Field(description="Top-ups credited this month.")
    source: str = Field(description="'budget': the budget service's figure for the current period.")
    sleeping_builds: list[str] = Field(description="The caller's builds asleep right now.")

    @classmethod
    def of(cls, v: BudgetView) -> BudgetOut:
        return cls(**v.__dict__)


class CreateKey(Body):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"user_id": "alice", "tier": "pro"}]}
    )

    user_id: Ident
    tier: Name = "free"


class KeyOut(BaseModel):
    key_id: str
    key_prefix: str
    user_id: str
    tier: str
    created_at: datetime
    revoked_at: datetime | None = None

    @classmethod
    def of(cls, k: ApiKey) -> KeyOut:
        return cls(**k.__dict__)


class KeyCreated(KeyOut):
    api_key: str = Field(description="Shown once; only its hash is stored.")


class KeyList(BaseModel):
    keys: list[KeyOut]
