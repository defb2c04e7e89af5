"""The one place that wires the budget's real adapters (tests pass fakes or overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln_contracts.rpc import BudgetStatusReply, BudgetStatusRequest
from kiln_runtime import config as kiln_config
from kiln_runtime.bus import Bus
from kiln_runtime.config import KilnConfig
from kiln_runtime.gates import GateBucket
from kiln_runtime.rpc import Responder
from kiln_runtime.service import serve

from . import app
from .adapters.bus_commands import BusCommands
from .adapters.clock import SystemClock
from .adapters.redis_store import RedisSpendStore
from .adapters.stream_history import StreamHistory
from .periods import Calendar, ShortCalendar, UtcCalendar
from .ports import Clock
from .settings import BudgetSettings
from .spending import Deps


@dataclass
class Wiring:
    """The wired service. ``start()`` after ``bus.connect()``, before ``bus.start()``."""

    bus: Bus
    deps: Deps
    store: RedisSpendStore
    gates: GateBucket
    _status: Responder[BudgetStatusRequest, BudgetStatusReply] | None = field(
        default=None, repr=False
    )

    async def start(self) -> None:
        await self.store.open()
        await self.gates.open()
        self._status = app.status_responder(self.deps)
        await self._status.start(self.bus.nc)

    async def stop(self) -> None:
        if self._status is not None:
            await self._status.stop()
            self._status = None
        await self.store.close()


def calendar_of(settings: BudgetSettings) -> Calendar:
    if settings.budget_period_s is None:
        return UtcCalendar()
    return ShortCalendar(settings.budget_period_s, settings.budget_periods_per_cycle)


def build(
    settings: BudgetSettings,
    *,
    service: str = "budget",
    clock: Clock | None = None,
    config: KilnConfig | None = None,
    calendar: Calendar | None = None,
) -> Wiring:
    """Wire the service; nothing connects until ``bus.connect()`` / ``start()``."""
    store = RedisSpendStore(settings.redis_url, timeout_s=settings.redis_timeout_s)
    bus = Bus(settings, service)
    gates = GateBucket(bus)
    deps = Deps(
        store=store,
        clock=clock or SystemClock(),
        config=config or kiln_config.default(),
        calendar=calendar or calendar_of(settings),
        commands=BusCommands(bus),
        demo_allowance_micro_usd=settings.demo_allowance_micro_usd,
        history=StreamHistory(lambda: bus.nc),
        gates=gates,
    )
    app.register(bus, deps, max_workers=settings.budget_workers)
    return Wiring(bus=bus, deps=deps, store=store, gates=gates)


async def run(settings: BudgetSettings) -> None:
    wiring = build(settings)
    await serve(wiring.bus, start=wiring.start, stop=wiring.stop)
