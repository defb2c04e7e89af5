"""The sandbox service's settings (environment variables: ``KILN_`` + the field's name, or its
alias)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kiln_runtime.settings import DatabaseSettings


class SandboxSettings(DatabaseSettings):
    sandbox_root: str = Field(
        default="./.kiln/sandboxes",
        description="Where the local provider keeps one workspace directory per build.",
    )
    sandbox_provider: Literal["local", "e2b"] = Field(
        default="local",
        description="'e2b' (one E2B sandbox per build; needs E2B_API_KEY) or 'local' "
        "(a directory and subprocesses on this host: no security boundary).",
    )
    sandbox_max_workers: int = Field(default=32, ge=1)
    sandbox_uvloop: bool = Field(
        default=True,
        description="Run on uvloop's event loop (false: asyncio's own).",
    )
    sandbox_exec_log: str | None = Field(
        default=None,
        description="A file to append one JSON line to for every tool execution (an audit "
        "trail; the chaos test reads it to prove no call ran twice).",
    )
    sandbox_lease_s: float = Field(
        default=30.0,
        gt=0,
        description="A running call's lease, renewed every third of it; a redelivery of a call "
        "whose lease is fresh (another replica runs it) is retried later, not reported "
        "interrupted.",
    )
    e2b_api_key: str | None = Field(default=None, validation_alias="E2B_API_KEY")
    e2b_template: str | None = Field(
        default=None, description="E2B template name or id (default: E2B's 'base')."
    )
    e2b_workdir: str = "/home/user/workspace"
    e2b_idle_timeout_s: int = Field(
        default=900,
        ge=60,
        le=86_400,
        description="Each call pushes the sandbox's E2B timeout this far ahead (keep-alive); "
        "a build idle for longer loses its sandbox and is restored from its snapshot.",
    )
    e2b_request_timeout_s: float = Field(default=30.0, gt=0)
    e2b_reuse_s: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description="A sandbox connected to within this long is used again without asking "
        "E2B's API; each connect pushes its timeout this much further (0: connect every call).",
    )
    e2b_max_lifetime_s: int = Field(
        default=3600,
        ge=60,
        le=86_400,
        description="The longest timeout ever asked of E2B (keep-alive included): the plan's "
        "maximum sandbox lifetime (1 h on the base plan, 24 h on pro).",
    )
    e2b_api_url: str | None = Field(
        default=None,
        validation_alias="E2B_API_URL",
        description="E2B's API (the SDK's own setting); a local E2B-compatible server in "
        "development (kiln_devstack.e2b_server).",
    )
    e2b_sandbox_url: str | None = Field(
        default=None,
        validation_alias="E2B_SANDBOX_URL",
        description="Where the SDK reaches envd (the SDK's own setting); with E2B_API_URL.",
    )
