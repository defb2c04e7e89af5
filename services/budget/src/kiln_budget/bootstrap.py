"""The one place that wires the budget's real adapters (tests pass fakes or overrides)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kiln_runtime import config as kiln_config
from kiln_runtime.bus import Bus
from kiln_runtime.config import KilnConfig
from kiln_runtime.service import serve

from . import app
from .adapters.bus_commands import BusCommands
from .adapters.clock import SystemClock
from .adapters.redis_store import RedisSpendStore
from .periods import Calendar, ShortCalendar, UtcCalendar
from .ports import Clock
from .settings import BudgetSettings
from .spending import Deps


@dataclass
class Wiring:
    bus: Bus
    deps: Deps
    start: Callable[[], Awaitable[None]]
    stop: Callable[[], Awaitable[None]]


def calendar_of(settings: BudgetSettings) -> Calendar:
    if settings.period_s is None:
        return UtcCalendar()
    return ShortCalendar(settings.period_s, settings.periods_per_cycle)


def build(
    settings: BudgetSettings,
    *,
    service: str = "budget",
    clock: Clock | None = None,
    config: KilnConfig | None = None,
    calendar: Calendar | None = None,
) -> Wiring:
    """Wire the service; nothing connects until ``start()`` / ``bus.connect()``."""
    store = RedisSpendStore(settings.redis_url, timeout_s=settings.redis_timeout_s)
    bus = Bus(settings, service)
    deps = Deps(
        store=store,
        clock=clock or SystemClock(),
        config=config or kiln_config.default(),
        calendar=calendar or calendar_of(settings),
        commands=BusCommands(bus),
        demo_allowance_micro_usd=settings.demo_allowance_micro_usd,
    )
    app.register(bus, deps, max_workers=settings.workers)
    return Wiring(bus=bus, deps=deps, start=store.open, stop=store.close)


async def run(settings: BudgetSettings) -> None:
    wiring = build(settings)
    await serve(wiring.bus, start=wiring.start, stop=wiring.stop)
