"""Sleeping builds: many builds asleep cost the agent no memory growth, no task and no sandbox.

    uv run --frozen python bench/sleeping.py [--builds 10000] [--warmup 200]

A nats-server and Postgres of the benchmark's own, ``python -m kiln_sandbox`` (local provider),
the agent as ``bench/agent_probe.py`` (``python -m kiln_agent`` plus a probe that writes its
asyncio task count to a file) and ``bench/loop_model.py`` in this process answering at once
(every reply one ``list_dir``). Every build is requested; at its first ToolCall this process
publishes a SleepRequested for it (as the budget service would); the agent puts the build to
sleep at the end of its iteration (CheckpointSaved(sleep), BuildSleeping). This process stands in
for the snapshot service: it answers CheckpointSaved(sleep) with SnapshotSaved(sleep) (nothing is
uploaded), on which the sandbox service pauses the build's sandbox.

``--warmup`` builds go to sleep first; then the agent's RSS and task count are the baseline.
Then ``--builds`` more go to sleep, and once every one has (and its sandbox is no longer
running) they are measured again. sandboxes_alive counts the sandbox registry's rows
(``sandbox.sandboxes``) still ``running``.

Ends with ``sleeping builds=… rss_growth_mb=… tasks_growth=… sandboxes_alive=…``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path

import asyncpg
from _common import Bench, Seen, bench, connect, figures, publish, rss_mb, until, watch
from loop_model import LoopModel

from kiln_contracts import (
    BuildLimits,
    BuildRequested,
    CheckpointSaved,
    SleepRequested,
    SnapshotSaved,
    ToolCall,
    stable_id,
    subjects,
)

HERE = Path(__file__).resolve().parent


async def main(args: argparse.Namespace) -> None:
    with bench("sleeping") as b:
        model = LoopModel()
        await model.start()
        nc = await connect(b.urls["NATS_URL"])
        try:
            print(figures("sleeping", **await run(b, nc, model, args)))
        finally:
            b.stop_all()
            await nc.close()
            await model.stop()


async def run(
    b: Bench, nc: object, model: LoopModel, args: argparse.Namespace
) -> dict[str, float | int]:
    probe = b.data_dir / "probe.json"
    b.start("sandbox", ["-m", "kiln_sandbox"])
    agent = b.start(
        "agent",
        [str(HERE / "agent_probe.py")],
        ANTHROPIC_BASE_URL=model.url,
        ANTHROPIC_API_KEY="bench",
        KILN_BENCH_PROBE=str(probe),
    )
    asked: set[str] = set()
    sleeping: set[str] = set()

    async def on_call(s: Seen) -> None:
        if s.build_id not in asked:
            asked.add(s.build_id)
            call = ToolCall.model_validate(s.data)
            await publish(
                nc,  # type: ignore[arg-type]
                call.caused(SleepRequested, reason="benchmark: allowance used up").with_id(
                    stable_id(s.build_id, "bench-sleep")
                ),
            )

    async def on_checkpoint(s: Seen) -> None:
        if s.data["reason"] == "sleep":
            cp = CheckpointSaved.model_validate(s.data)
            await publish(
                nc,  # type: ignore[arg-type]
                cp.caused(
                    SnapshotSaved,
                    snapshot_id=f"bench-{cp.event_id}",
                    iteration=cp.iteration,
                    reason="sleep",
                    files=0,
                    bytes_total=0,
                    bytes_uploaded=0,
                ).with_id(stable_id(cp.event_id, "bench-snapshot")),
            )

    def on_sleeping(s: Seen) -> None:
        sleeping.add(s.build_id)

    await watch(nc, subjects.kind_filter("tool_call"), on_call)  # type: ignore[arg-type]
    await watch(nc, subjects.kind_filter("checkpoint_saved"), on_checkpoint)  # type: ignore[arg-type]
    await watch(nc, subjects.kind_filter("build_sleeping"), on_sleeping)  # type: ignore[arg-type]
    pg = await asyncpg.connect(b.urls["DATABASE_URL"])

    mine: list[str] = []

    async def running() -> int:
        """This run's builds whose sandbox is still running."""
        try:
            return int(
                await pg.fetchval(
                    "SELECT count(*) FROM sandbox.sandboxes "
                    "WHERE state = 'running' AND build_id = ANY($1::text[])",
                    mine,
                )
            )
        except asyncpg.UndefinedTableError:
            return 0

    async def put_to_sleep(n: int) -> list[str]:
        ids = [f"sl-{uuid.uuid4().hex[:12]}" for _ in range(n)]
        mine.extend(ids)
        started = time.monotonic()
        limits = BuildLimits(max_iterations=10_000)
        for chunk in range(0, n, 200):
            await asyncio.gather(
                *(
                    publish(
                        nc,  # type: ignore[arg-type]
                        BuildRequested(
                            build_id=i, user_id="bench", tier="pro", idea_brief="x", limits=limits
                        ),
                    )
                    for i in ids[chunk : chunk + 200]
                )
            )
        want = set(ids)
        await until(
            lambda: want <= sleeping or not agent.alive(), 300 + n / 5, f"{n} builds to sleep"
        )
        b.check(agent)
        for _ in range(240):  # pausing follows asynchronously: up to 2 minutes
            if not await running():
                break
            await asyncio.sleep(0.5)
        print(f"{n} builds asleep in {time.monotonic() - started:.0f} s", flush=True)
        return ids

    async def measure() -> tuple[float, int]:
        await asyncio.sleep(3)  # let the last handlers finish and the probe write
        return rss_mb(agent.popen.pid), int(json.loads(probe.read_text())["tasks"])

    try:
        await put_to_sleep(args.warmup)
        rss0, tasks0 = await measure()
        print(f"baseline after {args.warmup} builds: RSS {rss0:.1f} MB, {tasks0} tasks")
        await put_to_sleep(args.builds)
        rss1, tasks1 = await measure()
        alive = await running()
        print(f"after {args.builds} more: RSS {rss1:.1f} MB, {tasks1} tasks, {alive} running")
    finally:
        await pg.close()
    return {
        "builds": args.builds,
        "rss_growth_mb": rss1 - rss0,
        "tasks_growth": tasks1 - tasks0,
        "sandboxes_alive": alive,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=200)
    asyncio.run(main(parser.parse_args()))
