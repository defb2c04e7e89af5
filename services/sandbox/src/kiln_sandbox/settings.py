"""The sandbox service's settings (environment variables)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kiln_runtime.settings import DatabaseSettings, env


class SandboxSettings(DatabaseSettings):
    sandbox_root: str = Field(
        default="./.kiln/sandboxes",
        validation_alias=env("KILN_SANDBOX_ROOT"),
        description="Where the local provider keeps one workspace directory per build.",
    )
    provider: Literal["local"] = Field(
        default="local",
        validation_alias=env("KILN_SANDBOX_PROVIDER"),
        description="Sandbox provider; 'local' (no security boundary) until the E2B adapter lands.",
    )
    max_workers: int = Field(default=32, ge=1, validation_alias=env("KILN_SANDBOX_MAX_WORKERS"))
