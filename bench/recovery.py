"""Recovery: SIGKILL the agent mid-build with a second replica running; time to the build's next
event, now from the other replica.

    uv run --frozen python bench/recovery.py [--ack-wait-s default,30] [--latency-s 0.3]

For each setting: a fresh nats-server and Postgres, ``python -m kiln_sandbox`` and two
``python -m kiln_agent`` replicas (the same durable consumers), each sending its model calls under
its own path prefix to ``bench/loop_model.py`` in this process (``--latency-s`` per call; every
reply one ``list_dir``). After the build's third model call, the next request that arrives is
answered by killing the replica that sent it (SIGKILL, mid-think: it holds the ToolResult it is
handling unacked, and the build's think lease). Measured from the kill:

* takeover_s: until the other replica's model request for the build arrives;
* seconds: until the build's next event is stored in the stream (the other replica's
  IterationCompleted, after its model call).

``default`` leaves KILN_ACK_WAIT_S unset (the runtime's default); a number sets it for both
replicas.
Ends with ``recovery seconds=… takeover_s=… ack_wait_s=…`` for the first setting, plus
``seconds_ack_wait_<N>=…`` for each further one.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

from _common import bench, connect, figures, kill, publish, until, watch
from loop_model import LoopModel

from kiln_contracts import BuildLimits, BuildRequested, subjects
from kiln_devstack.host import Process
from kiln_runtime.settings import CommonSettings


async def once(ack_wait: str, latency_s: float) -> dict[str, float]:
    with bench("recovery") as b:
        model = LoopModel(latency_s=latency_s)
        await model.start()
        extra = {} if ack_wait == "default" else {"KILN_ACK_WAIT_S": ack_wait}
        b.start("sandbox", ["-m", "kiln_sandbox"], **extra)
        replicas: dict[str, Process] = {
            f"/{name}": b.start(
                f"agent-{name}",
                ["-m", "kiln_agent"],
                ANTHROPIC_BASE_URL=f"{model.url}/{name}",
                ANTHROPIC_API_KEY="bench",
                **extra,
            )
            for name in ("replica-a", "replica-b")
        }
        build_id = f"rc-{uuid.uuid4().hex[:12]}"
        killed: dict[str, Any] = {}

        async def hook(build: str, prefix: str) -> None:
            if build == build_id and not killed and len(model.arrivals[build]) > 3:
                kill(replicas[prefix])
                killed.update(prefix=prefix, at=time.time())

        model.hook = hook
        nc = await connect(b.urls["NATS_URL"])
        try:
            seen = await watch(nc, subjects.build_filter(build_id))
            await publish(
                nc,
                BuildRequested(
                    build_id=build_id,
                    user_id="bench",
                    tier="pro",
                    idea_brief="A build that is interrupted.",
                    limits=BuildLimits(max_iterations=10_000),
                ),
            )
            await until(lambda: bool(killed), 120, "the kill")
            t0 = killed["at"]
            await until(lambda: any(s.at > t0 for s in seen), 300, "the build's next event")
            event = min((s for s in seen if s.at > t0), key=lambda s: s.at)
            other = [t for p, t in model.arrivals[build_id] if p != killed["prefix"] and t > t0]
            return {
                "seconds": event.at - t0,
                "takeover_s": (min(other) - t0) if other else float("nan"),
                "next_event": event.kind,  # type: ignore[dict-item]
            }
        finally:
            b.stop_all()
            await nc.close()
            await model.stop()


async def main(args: argparse.Namespace) -> None:
    settings = args.ack_wait_s.split(",")
    out: dict[str, float | str] = {}
    for i, setting in enumerate(settings):
        r = await once(setting, args.latency_s)
        default = CommonSettings().ack_wait_s
        ack = f"{default:g} (default)" if setting == "default" else setting
        print(
            f"KILN_ACK_WAIT_S={ack}: next event ({r['next_event']}) {r['seconds']:.2f} s after "
            f"the SIGKILL; the other replica called the model after {r['takeover_s']:.2f} s",
            flush=True,
        )
        if i == 0:
            out.update(
                seconds=r["seconds"],
                takeover_s=r["takeover_s"],
                ack_wait_s=f"{default:g}" if setting == "default" else setting,
            )
        else:
            out[f"seconds_ack_wait_{setting}"] = r["seconds"]
    print(figures("recovery", **out))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ack-wait-s", default="default,30", help="KILN_ACK_WAIT_S settings, comma-separated."
    )
    parser.add_argument("--latency-s", type=float, default=0.3, help="Model latency per call.")
    asyncio.run(main(parser.parse_args()))
