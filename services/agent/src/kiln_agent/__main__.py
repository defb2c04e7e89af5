"""``python -m kiln_agent``: the agent service."""

from __future__ import annotations

import asyncio

from kiln_runtime import log
from kiln_runtime.service import serve

from .bootstrap import build
from .settings import AgentSettings


async def run(settings: AgentSettings) -> None:
    service = build(settings)
    await serve(service.bus, start=service.start, stop=service.stop)


def main() -> None:
    settings = AgentSettings()
    log.configure("agent", settings.log_level, settings.log_json)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
