"""The one place that wires the real adapters: Postgres, the provider, the bus."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from kiln_runtime.bus import Bus
from kiln_runtime.db import create_pool
from kiln_runtime.service import serve

from .adapters.local import LocalProvider
from .adapters.nats_rpc import NatsRestorer
from .adapters.pg_processes import PgProcesses
from .adapters.postgres import SCHEMA, PgCallStore, PgReads, PgRegistry, migrations
from .app import SERVICE, SandboxApp
from .handlers import SandboxService
from .ports import Provider
from .settings import SandboxSettings


class ConfigError(RuntimeError):
    """The service cannot start with this configuration; the message says what to set."""


def make_provider(settings: SandboxSettings) -> Provider:
    if settings.sandbox_provider == "local":
        return LocalProvider(settings.sandbox_root)
    if settings.sandbox_provider == "e2b":
        if not settings.e2b_api_key:
            raise ConfigError(
                "KILN_SANDBOX_PROVIDER=e2b needs E2B_API_KEY (an API key from e2b.dev); "
                "or set KILN_SANDBOX_PROVIDER=local for development"
            )
        from .adapters.e2b import E2BProvider  # imported only when used: the SDK is large

        return E2BProvider(
            api_key=settings.e2b_api_key,
            template=settings.e2b_template,
            workdir=settings.e2b_workdir,
            idle_timeout_s=settings.e2b_idle_timeout_s,
            request_timeout_s=settings.e2b_request_timeout_s,
            max_lifetime_s=settings.e2b_max_lifetime_s,
            reuse_s=settings.e2b_reuse_s,
            api_url=settings.e2b_api_url,
            sandbox_url=settings.e2b_sandbox_url,
        )
    raise ConfigError(f"unknown sandbox provider {settings.sandbox_provider!r}")


@dataclass
class Wiring:
    """The wired service: ``start`` after the bus connects, ``stop`` after it stops consuming."""

    settings: SandboxSettings
    bus: Bus
    app: SandboxApp
    pool: asyncpg.Pool | None = None
    provider: Provider | None = field(default=None)

    async def start(self) -> None:
        # The adapters never change session state (no SET, LISTEN, advisory lock or cursor):
        # no reset query each time a connection goes back to the pool.
        self.pool = await create_pool(
            self.settings.database_url, schema=SCHEMA, migrations=migrations(), reset_sessions=False
        )
        if self.provider is None:
            self.provider = make_provider(self.settings)
        self.app.service = SandboxService(
            self.provider,
            PgRegistry(self.pool),
            PgCallStore(self.pool),
            self.bus,
            NatsRestorer(self.bus.nc),
            lease_s=self.settings.sandbox_lease_s,
            exec_log=Path(self.settings.sandbox_exec_log)
            if self.settings.sandbox_exec_log
            else None,
            processes=PgProcesses(self.pool),
            reads=PgReads(self.pool),
        )
        await self.app.start_rpc()

    async def stop(self) -> None:
        await self.app.stop_rpc()
        if self.provider is not None:
            await self.provider.close()
        if self.pool is not None:
            await self.pool.close()


def build(settings: SandboxSettings, *, service: str = SERVICE) -> Wiring:
    bus = Bus(settings, service)
    app = SandboxApp(bus, max_workers=settings.sandbox_max_workers)
    # Built here, not at start, so a bad configuration fails before anything connects.
    return Wiring(settings=settings, bus=bus, app=app, provider=make_provider(settings))


async def run(settings: SandboxSettings) -> None:
    runtime = build(settings)
    await serve(runtime.bus, start=runtime.start, stop=runtime.stop)
