"""Sleeping builds: many builds asleep cost the agent no memory growth, no task and no sandbox.

    uv run --frozen python bench/sleeping.py [--builds 10000] [--warmup 200] [--rate 0]
        [--tracemalloc]

A nats-server and Postgres of the benchmark's own, ``python -m kiln_sandbox`` (local provider),
the agent as ``bench/agent_probe.py`` (``python -m kiln_agent`` plus a probe that writes its
asyncio task count to a file) and ``bench/loop_model.py`` in this process answering at once
(every reply one ``list_dir``). Every build is requested; during its first model call, before the
reply leaves, this process publishes a SleepRequested for it (as the budget service does when a
charge uses the allowance up); the agent puts the build to sleep at the end of that iteration
(CheckpointSaved(sleep), BuildSleeping). This process stands in for the snapshot service: it answers CheckpointSaved(sleep) with SnapshotSaved(sleep) (nothing is
uploaded), on which the sandbox service pauses the build's sandbox.

``--warmup`` builds go to sleep first; then the agent's RSS and task count are the baseline.
Then ``--builds`` more go to sleep, and once every one has (and its sandbox is no longer
running) they are measured again. sandboxes_alive counts the sandbox registry's rows
(``sandbox.sandboxes``) still ``running``.

``--rate N`` requests at most N builds a second (0: all at once, in chunks of 200), so that how
many builds are in flight at once, and with it the allocator's high-water mark, stays bounded.
Besides RSS the probe reports the objects the garbage collector tracks and the allocator's live
blocks (``sys.getallocatedblocks``): Python-level state kept per build grows those, a high-water
mark the process keeps from a peak grows only RSS. ``--tracemalloc`` runs the agent with
allocation tracing (slower) and prints the 15 source lines whose live memory grew the most
between the two measurements.

Ends with ``sleeping builds=… rss_growth_mb=… tasks_growth=… sandboxes_alive=…
objects_growth=… blocks_growth=… seconds=… iterations_per_build=… agent_cpu_ms_per_build=…
sandbox_cpu_ms_per_build=…`` (seconds: the ``--builds`` going to sleep; iterations: the mean
iteration they slept at; CPU: user + system of the agent's and the sandbox service's processes
over those seconds, per build).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import tracemalloc
import uuid
from pathlib import Path

import asyncpg
import psutil
from _common import Bench, Seen, bench, connect, figures, publish, rss_mb, until, watch
from loop_model import LoopModel

from kiln_contracts import (
    BuildLimits,
    BuildRequested,
    CheckpointSaved,
    SleepRequested,
    SnapshotSaved,
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
    sandbox = b.start("sandbox", ["-m", "kiln_sandbox"])
    agent = b.start(
        "agent",
        [str(HERE / "agent_probe.py")],
        ANTHROPIC_BASE_URL=model.url,
        ANTHROPIC_API_KEY="bench",
        KILN_BENCH_PROBE=str(probe),
        KILN_BENCH_TRACEMALLOC="1" if args.tracemalloc else "0",
    )
    asked: set[str] = set()

    async def ask_sleep(build_id: str, _prefix: str) -> None:
        """During the build's first model call (before its reply leaves), as the budget service
        does when a charge uses the allowance up: the build sleeps at the end of that iteration."""
        if build_id != "?" and build_id not in asked:
            asked.add(build_id)
            await publish(
                nc,  # type: ignore[arg-type]
                SleepRequested(
                    build_id=build_id, user_id="bench", reason="benchmark: allowance used up"
                ).with_id(stable_id(build_id, "bench-sleep")),
            )

    model.hook = ask_sleep
    sleeping: set[str] = set()

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
        step = 200 if not args.rate else max(1, int(args.rate / 10))  # 10 chunks a second
        for chunk in range(0, n, step):
            began = time.monotonic()
            await asyncio.gather(
                *(
                    publish(
                        nc,  # type: ignore[arg-type]
                        BuildRequested(
                            build_id=i, user_id="bench", tier="pro", idea_brief="x", limits=limits
                        ),
                    )
                    for i in ids[chunk : chunk + step]
                )
            )
            if args.rate:
                await asyncio.sleep(max(0.0, step / args.rate - (time.monotonic() - began)))
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

    async def measure(label: str) -> dict[str, float]:
        snap = probe.with_name(f"{probe.name}.snap-{label}")
        snap.touch()
        await asyncio.sleep(3)  # let the last handlers finish and the probe write
        await until(lambda: not snap.exists(), 120, "the probe's snapshot")
        got = json.loads(probe.read_text())
        return {"rss": rss_mb(agent.popen.pid), **got}

    try:
        await put_to_sleep(args.warmup)
        m0 = await measure("before")
        print(f"baseline after {args.warmup} builds: {describe(m0)}")
        cpu0, t0 = cpu_s(agent.popen.pid, sandbox.popen.pid), time.monotonic()
        await put_to_sleep(args.builds)
        seconds = time.monotonic() - t0
        cpu = [b - a for a, b in zip(cpu0, cpu_s(agent.popen.pid, sandbox.popen.pid), strict=True)]
        m1 = await measure("after")
        alive = await running()
        iterations = float(
            await pg.fetchval(
                "SELECT avg(iteration) FROM agent.builds WHERE build_id = ANY($1::text[])",
                mine[args.warmup :],
            )
        )
        print(f"after {args.builds} more: {describe(m1)}, {alive} running")
    finally:
        await pg.close()
    if args.tracemalloc:
        print_growth(probe)
    return {
        "builds": args.builds,
        "rss_growth_mb": m1["rss"] - m0["rss"],
        "tasks_growth": int(m1["tasks"] - m0["tasks"]),
        "sandboxes_alive": alive,
        "objects_growth": int(m1["objects"] - m0["objects"]),
        "blocks_growth": int(m1["blocks"] - m0["blocks"]),
        "seconds": round(seconds),
        "iterations_per_build": round(iterations, 2),
        "agent_cpu_ms_per_build": cpu[0] * 1000 / args.builds,
        "sandbox_cpu_ms_per_build": cpu[1] * 1000 / args.builds,
    }


def cpu_s(*pids: int) -> list[float]:
    """User + system CPU seconds of each process so far."""
    return [sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids]


def describe(m: dict[str, float]) -> str:
    return (
        f"RSS {m['rss']:.1f} MB, {m['tasks']:.0f} tasks, {m['objects']:.0f} gc-tracked objects, "
        f"{m['blocks']:.0f} allocated blocks"
    )


def print_growth(probe: Path) -> None:
    before = tracemalloc.Snapshot.load(str(probe.with_suffix(".before.tracemalloc")))
    after = tracemalloc.Snapshot.load(str(probe.with_suffix(".after.tracemalloc")))
    total = sum(s.size_diff for s in after.compare_to(before, "filename"))
    print(f"traced Python memory grew {total / 2**20:.2f} MB; the 15 lines that grew the most:")
    for stat in after.compare_to(before, "lineno")[:15]:
        print(
            f"  {stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks  {stat.traceback}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--rate", type=float, default=0, help="Builds requested per second.")
    parser.add_argument("--tracemalloc", action="store_true", help="Trace the agent's memory.")
    asyncio.run(main(parser.parse_args()))
