"""The one place that wires the gateway's real adapters: the bus, Postgres, the stream, S3 and
the budget service's answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

from kiln_runtime import config as kiln_config
from kiln_runtime.bus import Bus
from kiln_runtime.db import create_pool
from kiln_runtime.gates import GateBucket
from kiln_runtime.health import Problems, bus_problems
from kiln_runtime.service import connect_with_retry

from . import builds
from .adapters.budget_rpc import NatsBudget
from .adapters.jetstream import JetStreamHistory
from .adapters.postgres import PgStore, migrations
from .adapters.s3_files import S3Files
from .adapters.webhooks_rpc import NatsWebhooks
from .ports import Budget, BuildStore, EventSource, Publish, SnapshotFiles, Webhooks
from .settings import GatewaySettings

log = logging.getLogger(__name__)


@dataclass
class Wiring:
    settings: GatewaySettings
    bus: Bus
    store: BuildStore
    events: EventSource
    publish: Publish
    config: kiln_config.KilnConfig
    files: SnapshotFiles
    budget: Budget
    token_secret: bytes
    pool: asyncpg.Pool | None = None
    webhooks: Webhooks | None = None

    def bus_problems(self) -> Problems:
        """The bus's health as a worker's /livez and /readyz see it (NATS, the consume loop)."""
        return bus_problems(self.bus, time.monotonic(), self.settings.health_stall_s)

    async def not_ready(self) -> list[str]:
        """Why the gateway cannot serve now: its bus, or Postgres not answering."""
        problems = list(self.bus_problems().not_ready)
        try:
            await asyncio.wait_for(self.store.ping(), timeout=2)
        except Exception:
            problems.append("Postgres does not answer")
        return problems


@contextlib.asynccontextmanager
async def running(settings: GatewaySettings) -> AsyncIterator[Wiring]:
    """Connect to NATS and Postgres; the caller registers consumers and starts the bus."""
    bus = Bus(settings, "gateway")
    pool: asyncpg.Pool | None = None
    files = S3Files(
        settings.s3_bucket,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.region,
        timeout_s=settings.s3_timeout_s,
        cached_manifests=settings.snapshot_manifest_cache,
    )
    try:
        await connect_with_retry(bus)
        gates = GateBucket(bus)  # the budget gates' bucket (POST /v1/builds reads it)
        await gates.open()
        await files.open()
        pool = await create_pool(
            settings.database_url, schema=settings.gateway_db_schema, migrations=migrations()
        )
        store = PgStore(pool)
        if settings.dev_api_key and settings.dev_user:
            await builds.ensure_dev_key(
                store, settings.dev_api_key, settings.dev_user, settings.dev_tier
            )
            log.info(
                "development API key for user %r (tier %s)", settings.dev_user, settings.dev_tier
            )
        yield Wiring(
            settings=settings,
            bus=bus,
            store=store,
            events=JetStreamHistory(bus.nc),
            publish=bus.publish,
            config=kiln_config.default(),
            files=files,
            budget=NatsBudget(lambda: bus.nc, gates, timeout_s=settings.gateway_budget_timeout_s),
            token_secret=(settings.token_secret or secrets.token_hex(32)).encode(),
            pool=pool,
            webhooks=NatsWebhooks(lambda: bus.nc, timeout_s=settings.gateway_webhooks_timeout_s),
        )
    finally:
        # Stop consuming first (handlers finish), then close the pool they use.
        with contextlib.suppress(Exception):
            await bus.stop()
        if pool is not None:
            await pool.close()
        with contextlib.suppress(Exception):
            await files.close()
