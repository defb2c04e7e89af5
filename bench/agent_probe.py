"""``python -m kiln_agent`` with a probe: every 0.5 s it writes the number of asyncio tasks in the
agent's event loop to the JSON file named by KILN_BENCH_PROBE (for bench/sleeping.py). Nothing
else differs from the service's own entrypoint."""

from __future__ import annotations

import asyncio
import json
import os

from kiln_agent.__main__ import run
from kiln_agent.settings import AgentSettings, MissingApiKey
from kiln_runtime import log


async def probe(path: str) -> None:
    while True:
        with open(path + ".tmp", "w") as f:  # noqa: ASYNC230 (a few bytes)
            json.dump({"tasks": len(asyncio.all_tasks())}, f)
        os.replace(path + ".tmp", path)
        await asyncio.sleep(0.5)


async def main() -> None:
    settings = AgentSettings()
    if not settings.anthropic_api_key:
        raise MissingApiKey()
    log.configure("agent", settings.log_level, settings.log_json)
    path = os.environ.get("KILN_BENCH_PROBE")
    task = asyncio.create_task(probe(path) if path else asyncio.sleep(0))
    try:
        await run(settings)
    finally:
        task.cancel()


if __name__ == "__main__":
    asyncio.run(main())
