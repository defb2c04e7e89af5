"""The one place that wires the real adapters."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from kiln_runtime import config as kiln_config
from kiln_runtime.bus import Bus
from kiln_runtime.db import create_pool
from kiln_runtime.gates import GateBucket

from . import app, config
from .adapters.anthropic_model import AnthropicModel, ModelUnavailable
from .adapters.postgres import SCHEMA, PostgresStore, migrations
from .gates import BudgetGates
from .loop import Agent
from .settings import AgentSettings, MissingApiKey
from .stalls import Watch
from .watchdog import Watchdog


@dataclass
class Wiring:
    bus: Bus
    settings: AgentSettings
    pool: asyncpg.Pool | None = None
    model: AnthropicModel | None = None
    gates: BudgetGates | None = None
    watchdog: Watchdog | None = None
    agent: Agent | None = None

    async def start(self) -> None:
        """Read the budget gates, open the database and the model client, then register the
        subscribers (none before the gates' current values are in memory: fail closed)."""
        cfg = config.load(self.settings.agent_config)
        source = GateBucket(self.bus)
        await source.open()
        self.gates = BudgetGates(source)
        await self.gates.start(timeout_s=self.settings.agent_gates_timeout_s)
        self.pool = await create_pool(
            self.settings.database_url,
            schema=SCHEMA,
            migrations=migrations(),
            max_size=self.settings.agent_db_pool,
            reset_sessions=False,  # the store keeps no session state: no reset round trip
        )
        self.model = AnthropicModel.connect(
            base_url=self.settings.anthropic_base_url,
            api_key=self.settings.anthropic_api_key or "",
            timeout_s=self.settings.model_timeout_s,
            connections=self.settings.agent_workers,
            attempts=cfg.model_attempts,
            backoff_base_s=cfg.backoff_base_s,
            backoff_cap_s=cfg.backoff_cap_s,
        )
        kiln = kiln_config.default()
        try:
            await self.model.check_models(
                {
                    model: f"tier {name} {role}"
                    for name, tier in kiln.tiers.items()
                    for role, model in tier.models.items()
                }
            )
        except ModelUnavailable as err:
            raise SystemExit(f"kiln-agent: {err}") from err
        self.agent = agent = Agent(
            PostgresStore(self.pool),
            self.model,
            self.bus,
            cfg,
            kiln,
            lease_s=self.settings.agent_lease_s or self.settings.ack_wait_s,
            turn_cache_mb=self.settings.agent_turn_cache_mb,
            turn_cache_builds=(
                self.settings.agent_turn_cache_builds
                if self.settings.agent_turn_cache_builds is not None
                else 2 * self.settings.agent_workers
            ),
            budget_gates=self.gates,
        )
        app.register(self.bus, agent, workers=self.settings.agent_workers)
        self.watchdog = Watchdog(
            agent,
            Watch(self.settings.agent_watchdog_idle_s, self.settings.agent_watchdog_retries),
            interval_s=self.settings.agent_watchdog_interval_s,
        )
        self.watchdog.start()

    async def stop(self) -> None:
        if self.watchdog:
            await self.watchdog.stop()
        if self.gates:
            await self.gates.stop()
        if self.model:
            await self.model.close()
        if self.agent:
            await self.agent.store.clearing.settle()  # the outboxes published: cleared
        if self.pool:
            await self.pool.close()


def build(settings: AgentSettings) -> Wiring:
    if not settings.anthropic_api_key:
        raise MissingApiKey()
    return Wiring(Bus(settings, app.SERVICE), settings)
