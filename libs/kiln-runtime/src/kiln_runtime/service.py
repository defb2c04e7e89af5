"""Run a service: connect, start its resources, consume until SIGTERM, then shut down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from . import collector
from .bus import Bus
from .health import Health, HealthServer, watch
from .memory import trim_after_work
from .retry import retry

log = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]


async def connect_with_retry(bus: Bus, attempts: int = 30) -> None:
    """Connect to NATS, retrying any error but a server too old for the bus."""

    def unreachable(err: BaseException, attempt: int) -> None:
        log.warning("NATS not reachable at %s (%s); retrying", bus.settings.nats_url, err)

    await retry(
        bus.connect,
        attempts=attempts,
        retry_on=(Exception,),
        base=0.2,
        cap=2.0,
        give_up=lambda err: type(err).__name__ == "ServerTooOld",
        on_retry=unreachable,
    )


async def _start(bus: Bus, start: Hook | None) -> None:
    await connect_with_retry(bus)
    if start:
        await start()
    await bus.start()


async def serve(bus: Bus, *, start: Hook | None = None, stop: Hook | None = None) -> None:
    """Start, consume until SIGINT/SIGTERM, then stop consuming, let handlers finish, and close.

    From the beginning to the end, the health checks (``kiln_runtime.health``) are served with
    the metrics on ``KILN_HEALTH_PORT``, if set."""
    health = Health(bus.settings.health_stall_s)
    heartbeat = asyncio.ensure_future(watch(bus, health))
    port = bus.settings.health_port
    server = HealthServer(port, health) if port else None
    try:
        await _serve(bus, start, stop)
    finally:
        heartbeat.cancel()
        if server is not None:
            server.close()


async def _serve(bus: Bus, start: Hook | None, stop: Hook | None) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stopping.set)
    # A SIGTERM while NATS or a database is still unreachable stops the service at once.
    starting = asyncio.ensure_future(_start(bus, start))
    await asyncio.wait(
        {starting, asyncio.ensure_future(stopping.wait())}, return_when="FIRST_COMPLETED"
    )
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        log.info("%s stopped before it finished starting", bus.service)
        return
    starting.result()
    collector.tune(bus.settings.gc_thresholds)
    trimmer = asyncio.ensure_future(
        trim_after_work(bus) if bus.settings.memory_trim else asyncio.sleep(0)
    )
    log.info("%s consuming from %s", bus.service, bus.settings.nats_url)
    await stopping.wait()
    log.info("%s shutting down", bus.service)
    trimmer.cancel()
    await bus.stop()
    if stop:
        await stop()
