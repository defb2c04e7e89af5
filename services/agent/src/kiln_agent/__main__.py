"""``python -m kiln_agent``: the agent service."""

from __future__ import annotations

import asyncio

from .settings import AgentSettings, MissingApiKey


async def run(settings: AgentSettings) -> None:
    from kiln_runtime.service import serve

    from .bootstrap import build

    service = build(settings)
    await serve(service.bus, start=service.start, stop=service.stop)


def main() -> None:
    settings = AgentSettings()
    if not settings.anthropic_api_key:
        raise MissingApiKey()  # before the heavy imports: fail fast with the fix in the message
    from kiln_runtime import log

    log.configure("agent", settings.log_level, settings.log_json)
    if settings.agent_uvloop:
        import uvloop

        uvloop.run(run(settings))
    else:
        asyncio.run(run(settings))


if __name__ == "__main__":
    main()
