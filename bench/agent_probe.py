"""``python -m kiln_agent`` with a probe: every 0.5 s it writes the number of asyncio tasks in the
agent's event loop, the live Python objects the collector tracks and the allocator's live blocks
to the JSON file named by KILN_BENCH_PROBE (for bench/sleeping.py). With KILN_BENCH_TRACEMALLOC=1
it also traces allocations and, whenever a file ``<probe>.snap-<label>`` appears, dumps a
tracemalloc snapshot to ``<probe>.<label>.tracemalloc`` and removes the request. Nothing else
differs from the service's own entrypoint."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import tracemalloc
from pathlib import Path

from kiln_agent.__main__ import run
from kiln_agent.settings import AgentSettings, MissingApiKey
from kiln_runtime import log


async def probe(path: str) -> None:
    out = Path(path)
    while True:
        figures = {
            "tasks": len(asyncio.all_tasks()),
            "objects": len(gc.get_objects()),
            "blocks": sys.getallocatedblocks(),
        }
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(figures))
        os.replace(tmp, out)
        for request in out.parent.glob(out.name + ".snap-*"):
            label = request.name.rsplit(".snap-", 1)[1]
            if tracemalloc.is_tracing():
                gc.collect()
                tracemalloc.take_snapshot().dump(str(out.with_suffix(f".{label}.tracemalloc")))
            request.unlink()
        await asyncio.sleep(0.5)


async def main() -> None:
    settings = AgentSettings()
    if not settings.anthropic_api_key:
        raise MissingApiKey()
    log.configure("agent", settings.log_level, settings.log_json)
    if os.environ.get("KILN_BENCH_TRACEMALLOC") == "1":
        tracemalloc.start(8)
    path = os.environ.get("KILN_BENCH_PROBE")
    task = asyncio.create_task(probe(path) if path else asyncio.sleep(0))
    try:
        await run(settings)
    finally:
        task.cancel()


if __name__ == "__main__":
    if AgentSettings().agent_uvloop:  # as the service's entrypoint runs
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
