"""What the budget's domain functions run on: the ports, the clock, the prices and the calendar."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime

from kiln_runtime.config import KilnConfig

from .periods import Calendar, UtcCalendar, as_utc
from .ports import Clock, Commands, Gates, History, SpendStore


@dataclass(frozen=True)
class Deps:
    store: SpendStore
    clock: Clock
    config: KilnConfig
    calendar: Calendar = field(default_factory=UtcCalendar)
    commands: Commands | None = None
    demo_allowance_micro_usd: int | None = None  # a fixed allowance per period (the demo)
    history: History | None = None  # the stream, to rebuild a store that lost its data
    rebuild_lock: asyncio.Lock = field(default_factory=asyncio.Lock, compare=False, repr=False)
    gates: Gates | None = None  # the users' budget gates (the key-value bucket)

    def now(self) -> datetime:
        return as_utc(self.clock.now())
