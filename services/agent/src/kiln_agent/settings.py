"""The agent's settings (environment variables)."""

from __future__ import annotations

from pydantic import Field

from kiln_runtime.settings import DatabaseSettings, env


class AgentSettings(DatabaseSettings):
    anthropic_api_key: str | None = Field(default=None, validation_alias=env("ANTHROPIC_API_KEY"))
    anthropic_base_url: str | None = Field(default=None, validation_alias=env("ANTHROPIC_BASE_URL"))
    model_timeout_s: float = Field(
        default=600.0, gt=0, validation_alias=env("KILN_MODEL_TIMEOUT_S")
    )
    agent_config: str | None = Field(default=None, validation_alias=env("KILN_AGENT_CONFIG"))
    workers: int = Field(default=128, ge=1, validation_alias=env("KILN_AGENT_WORKERS"))
    lease_s: float | None = Field(
        default=None,
        gt=0,
        validation_alias=env("KILN_AGENT_LEASE_S"),
        description="The think lease (renewed while a model call runs); default: ack_wait_s.",
    )
    gates_timeout_s: float = Field(
        default=30.0,
        gt=0,
        validation_alias=env("KILN_AGENT_GATES_TIMEOUT_S"),
        description="How long start-up waits for the budget gates' current values (then fails).",
    )
    db_pool_size: int = Field(default=20, ge=1, validation_alias=env("KILN_AGENT_DB_POOL"))
    turn_cache_mb: float = Field(
        default=64.0,
        ge=0,
        validation_alias=env("KILN_AGENT_TURN_CACHE_MB"),
        description="Turns kept in memory across thinks (0: read every build's turns each time).",
    )
    turn_cache_builds: int | None = Field(
        default=None,
        ge=0,
        validation_alias=env("KILN_AGENT_TURN_CACHE_BUILDS"),
        description="The most builds whose turns and checkpoint are kept; default: twice "
        "KILN_AGENT_WORKERS, the builds a replica can be driving at once.",
    )


class MissingApiKey(SystemExit):
    def __init__(self) -> None:
        super().__init__(
            "kiln-agent: ANTHROPIC_API_KEY is not set. Set it to an Anthropic API key, or set "
            "ANTHROPIC_BASE_URL to a compatible server (e.g. `python -m kiln_agent.scripted_server "
            "--port 8765`, then ANTHROPIC_BASE_URL=http://127.0.0.1:8765 ANTHROPIC_API_KEY=any)."
        )
