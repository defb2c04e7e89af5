"""``python -m kiln_agent`` with a probe: every 0.5 s it writes the number of asyncio tasks in the
agent's event loop to the JSON file named by KILN_BENCH_PROBE (for bench/sleeping.py).

For an experiment only (bench/concurrency.py --pull-batch): KILN_BENCH_PULL_BATCH=N makes the
bus fetch at most N messages per pull request instead of min(max_workers, 64). Nothing else
differs from the service's own entrypoint."""

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
    if os.environ.get("KILN_BENCH_PULL_BATCH"):
        from faststream.nats import PullSub

        from kiln_runtime import bus

        batch = int(os.environ["KILN_BENCH_PULL_BATCH"])
        bus.PullSub = lambda batch_size, timeout: PullSub(batch_size=batch, timeout=timeout)  # type: ignore[assignment,misc]
    path = os.environ.get("KILN_BENCH_PROBE")
    task = asyncio.create_task(probe(path) if path else asyncio.sleep(0))
    try:
        await run(settings)
    finally:
        task.cancel()


if __name__ == "__main__":
    asyncio.run(main())
