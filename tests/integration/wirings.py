"""Test helpers: a worker service's wiring started as its entrypoint starts it, and the sandbox's
own restore path run against a fresh sandbox."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import nats

from kiln_contracts import ForkOrigin
from kiln_devstack.sandbox import MemoryRegistry
from kiln_sandbox.adapters.nats_rpc import NatsRestorer
from kiln_sandbox.handlers import SandboxService
from kiln_sandbox.ports import Provider
from kiln_sandbox.workspace import Workspace


class _Wiring(Protocol):
    @property
    def bus(self) -> Any: ...
    def start(self) -> Awaitable[None]: ...
    def stop(self) -> Awaitable[None]: ...


W = TypeVar("W", bound=_Wiring)


@contextlib.asynccontextmanager
async def started(wiring: W) -> AsyncIterator[W]:
    """``wiring`` connected, started and consuming (as ``kiln_runtime.service.serve`` does);
    stopped in the reverse order after."""
    await wiring.bus.connect()
    await wiring.start()
    await wiring.bus.start()
    try:
        yield wiring
    finally:
        await wiring.bus.stop()
        await wiring.stop()


async def restore_fresh(
    nats_url: str, provider: Provider, build: str, origin: ForkOrigin | None = None
) -> tuple[str | None, Path]:
    """Restore ``build`` into a fresh sandbox of ``provider`` by the sandbox's own restore path
    (the snapshot service answering over NATS): what ``restore`` returned, and the sandbox's
    root."""
    fresh = await provider.create(build)
    nc = await nats.connect(nats_url)
    try:
        restoring = SandboxService(
            provider,
            MemoryRegistry(),
            None,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            NatsRestorer(nc, timeout_s=10),
        )
        return await restoring.sandboxes.restore(build, Workspace(fresh), origin), Path(fresh.root)
    finally:
        await nc.close()
