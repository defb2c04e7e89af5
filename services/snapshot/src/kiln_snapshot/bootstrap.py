"""The one place that wires the snapshot's real adapters."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from kiln_contracts.rpc import RestorePlanReply, RestorePlanRequest
from kiln_runtime.bus import Bus
from kiln_runtime.rpc import Responder
from kiln_runtime.service import serve

from . import app, gc
from .adapters.s3 import S3Store
from .adapters.sandbox_rpc import NatsSandbox
from .settings import SnapshotSettings
from .snapshots import Deps


@dataclass
class Wiring:
    """The wired service. ``start()`` after ``bus.connect()``, before ``bus.start()``."""

    bus: Bus
    deps: Deps
    store: S3Store
    settings: SnapshotSettings
    _restore_plans: Responder[RestorePlanRequest, RestorePlanReply] | None = field(
        default=None, repr=False
    )
    _gc: asyncio.Task[None] | None = field(default=None, repr=False)
    _gc_stop: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    async def start(self) -> None:
        await self.store.open()
        self._restore_plans = app.restore_plan_responder(self.deps)
        await self._restore_plans.start(self.bus.nc)
        if self.settings.snapshot_gc_interval_s > 0:
            self._gc = asyncio.create_task(
                gc.run_periodically(
                    self.store,
                    self.settings.snapshot_gc_interval_s,
                    self._gc_stop,
                    keep=self.settings.snapshot_keep,
                    grace_s=self.settings.snapshot_gc_grace_s,
                    max_snapshot_s=self.settings.snapshot_max_s,
                    sweep_s=self.settings.snapshot_gc_sweep_s,
                )
            )

    async def stop(self) -> None:
        if self._gc is not None:
            self._gc_stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._gc, timeout=30)
            self._gc = None
        if self._restore_plans is not None:
            await self._restore_plans.stop()
            self._restore_plans = None
        await self.store.close()


def make_store(settings: SnapshotSettings) -> S3Store:
    return S3Store(
        settings.s3_bucket,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.region,
        connect_timeout_s=settings.s3_connect_timeout_s,
        read_timeout_s=settings.s3_read_timeout_s,
        max_attempts=settings.s3_max_attempts,
        presign_expiry_s=settings.presign_expiry_s,
    )


def build(settings: SnapshotSettings, *, service: str = "snapshot") -> Wiring:
    """Wire the service; nothing connects until ``bus.connect()`` / ``start()``."""
    bus = Bus(settings, service)
    store = make_store(settings)
    sandbox = NatsSandbox(
        lambda: bus.nc,
        manifest_timeout_s=settings.manifest_timeout_s,
        upload_timeout_s=settings.upload_timeout_s,
    )
    deps = Deps(
        store=store,
        sandbox=sandbox,
        publisher=bus,
        excludes=list(settings.snapshot_excludes),
        upload_batch=settings.upload_batch,
        keep=settings.snapshot_keep,
        max_snapshot_s=settings.snapshot_max_s,
        gc_sweep_s=settings.snapshot_gc_sweep_s,
    )
    app.register(bus, deps, max_workers=settings.snapshot_workers)
    return Wiring(bus=bus, deps=deps, store=store, settings=settings)


async def run(settings: SnapshotSettings) -> None:
    wiring = build(settings)
    await serve(wiring.bus, start=wiring.start, stop=wiring.stop)
