"""``python -m kiln_budget``: run the budget service (NATS_URL, REDIS_URL)."""

from __future__ import annotations

import asyncio

from kiln_runtime import log

from .bootstrap import run
from .settings import BudgetSettings


def main() -> None:
    settings = BudgetSettings()
    log.configure("budget", settings.log_level, settings.log_json)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
