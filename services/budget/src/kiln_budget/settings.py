"""The budget service's settings (environment variables)."""

from __future__ import annotations

from pydantic import Field

from kiln_runtime.settings import CommonSettings, env


class BudgetSettings(CommonSettings):
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", validation_alias=env("REDIS_URL", "KILN_REDIS_URL")
    )
    redis_timeout_s: float = Field(default=5.0, gt=0, validation_alias=env("KILN_REDIS_TIMEOUT_S"))
    workers: int = Field(default=8, ge=1, le=64, validation_alias=env("KILN_BUDGET_WORKERS"))
