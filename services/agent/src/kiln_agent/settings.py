"""The agent's settings (environment variables: ``KILN_`` + the field's name, or its alias)."""

from __future__ import annotations

from pydantic import Field

from kiln_runtime.settings import DatabaseSettings


class AgentSettings(DatabaseSettings):
    anthropic_api_key: str | None = Field(default=None, validation_alias="ANTHROPIC_API_KEY")
    anthropic_base_url: str | None = Field(default=None, validation_alias="ANTHROPIC_BASE_URL")
    model_timeout_s: float = Field(default=600.0, gt=0)
    agent_config: str | None = None
    agent_workers: int = Field(default=128, ge=1)
    agent_lease_s: float | None = Field(
        default=None,
        gt=0,
        description="The think lease (renewed while a model call runs); default: ack_wait_s.",
    )
    agent_gates_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="How long start-up waits for the budget gates' current values (then fails).",
    )
    agent_db_pool: int = Field(default=20, ge=1)
    agent_uvloop: bool = Field(
        default=True,
        description="Run on uvloop's event loop (false: asyncio's own).",
    )
    agent_turn_cache_mb: float = Field(
        default=64.0,
        ge=0,
        description="Turns kept in memory across thinks (0: read every build's turns each time).",
    )
    agent_turn_cache_builds: int | None = Field(
        default=None,
        ge=0,
        description="The most builds whose turns and checkpoint are kept; default: twice "
        "KILN_AGENT_WORKERS, the builds a replica can be driving at once.",
    )
    agent_watchdog_idle_s: float = Field(
        default=600.0,
        gt=0,
        description="A build thinking or acting unchanged this long, with no model call running, "
        "is retried (then after twice, four times as long; an acting one after at least twice "
        "its tool timeout).",
    )
    agent_watchdog_retries: int = Field(
        default=2,
        ge=0,
        description="Retries of a build that stopped moving before it fails (reason stalled).",
    )
    agent_watchdog_interval_s: float = Field(
        default=30.0, gt=0, description="How often each replica looks for builds that stopped."
    )


class MissingApiKey(SystemExit):
    def __init__(self) -> None:
        super().__init__(
            "kiln-agent: ANTHROPIC_API_KEY is not set. Set it to an Anthropic API key, or set "
            "ANTHROPIC_BASE_URL to a compatible server (e.g. `python -m kiln_devstack.model.server "
            "--port 8765`, then ANTHROPIC_BASE_URL=http://127.0.0.1:8765 ANTHROPIC_API_KEY=any)."
        )
