"""Overshoot: how far past the allowance 20 concurrent builds of one user spend.

    uv run --frozen python bench/overshoot.py [--builds 20] [--allowance-calls 100]
        [--latency-s 1.0] [--jitter 0.5] [--before REF]

A fresh nats-server, Postgres and Redis per run; ``python -m kiln_budget`` (a fixed allowance of
``--allowance-calls`` model calls, a "day" of 11.6 days: no reset during the run) and
``python -m kiln_agent`` as processes; ``bench/loop_model.py``'s server in this process (every reply
one ``list_dir``; it adds thinking tokens as the API would, so calls differ a little in cost,
each priced from the usage it served at the pro tier's model's price in ``kiln.yaml``, as the
budget prices it; ``--latency-s`` per call, spread by ``--jitter``), and a fake sandbox in this process that answers every ToolCall at once. All
builds are requested together and loop until the allowance is used up; the run ends once every
build is asleep and nothing has reached the model server for three call latencies.

* calls: model calls the server answered (each one is money spent, whether or not its reply was
  kept); calls_to_allowance: the replies, in the order they left the server, until their cost
  reached the allowance (``--allowance-calls`` calls without thinking tokens).
* past_calls / past_micro_usd: spent past the allowance (calls − calls_to_allowance; the cost of
  every call answered − the allowance).
* spent_at: the reply that used the allowance up (the ``calls_to_allowance``-th); limit: the budget's decision (its first SleepRequested stored: it closes the
  user's gate just before); charge_lag_ms: from the one to the other.
* in_flight_when_spent: calls sent before spent_at and answered after it (already running when
  the money ran out); started_in_lag: calls sent between spent_at and the limit (the window the
  charge takes); started_after_limit: calls sent after the limit (what a gate must stop).
* uncharged_calls: calls without an IterationCompleted (their reply was dropped: the build was
  put to sleep while the call ran; a woken build makes the call again).

``--before REF`` runs the budget and the agent first from the sources of commit REF (``git
archive``; the same environment, PYTHONPATH in front) and prints its line as ``overshoot_before``.
REF's agent must accept this tree's model server and REF's prices must be this tree's (the calls
are priced here): a commit from after the scripted server moved to kiln_devstack (0b8e53f) and
with the same ``kiln.yaml`` prices.
The last line is the working tree's: ``overshoot builds=… calls=… past_calls=… …``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tarfile
import tempfile
import time
import uuid
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

from _common import bench, connect, fake_sandbox, figures, publish, stored, wait_port
from loop_model import USAGE, LoopModel

from kiln_contracts import (
    BuildLimits,
    BuildRequested,
    Usage,
)
from kiln_runtime import config as kiln_config

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("contracts", "libs/kiln-runtime", "services/agent", "services/budget")
TIER = "pro"


class PricedLoopModel(LoopModel):
    """The loop model, remembering when each reply left and what it cost (priced from the usage
    it served, thinking tokens included)."""

    def __init__(self, price: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.price = price
        self.served: list[tuple[float, int]] = []  # (reply left, micro-USD)

    def _as_served(self, request: Any, checked: Any, response: Any) -> Any:
        served = super()._as_served(request, checked, response)
        self.served.append((time.time(), self.price(Usage.model_validate(served["usage"]))))
        return served


def sources_of(ref: str, into: Path) -> str:
    """PYTHONPATH for the services as they were at ``ref`` (extracted into ``into``)."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, *SOURCES], cwd=ROOT, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return os.pathsep.join(str(into / s / "src") for s in SOURCES)


async def run(args: argparse.Namespace, pythonpath: str | None) -> dict[str, Any]:
    config = kiln_config.default()  # the pro tier's model at today's price, as the budget charges
    model_id = config.tier(TIER).models["agent"]

    def price(usage: Usage) -> int:
        return config.cost(model_id, usage, datetime.now(UTC)).micro_usd

    allowance = args.allowance_calls * price(Usage(**USAGE))  # calls without thinking tokens
    user = f"bench-{uuid.uuid4().hex[:8]}"
    extra = {"PYTHONPATH": pythonpath} if pythonpath else {}
    with bench("overshoot") as b:
        redis_url = os.environ.get("REDIS_URL") or b.infra.start_redis()
        model = PricedLoopModel(price, latency_s=args.latency_s, jitter=args.jitter)
        await model.start()
        nc = await connect(b.urls["NATS_URL"])

        await fake_sandbox(nc)
        budget = b.start(
            "budget",
            ["-m", "kiln_budget"],
            REDIS_URL=redis_url,
            KILN_BUDGET_PERIOD_S=str(10**6),
            KILN_BUDGET_DEMO_ALLOWANCE_USD=str(allowance / 1_000_000),
            **extra,
        )
        agent = b.start(
            "agent",
            ["-m", "kiln_agent"],
            ANTHROPIC_BASE_URL=model.url,
            ANTHROPIC_API_KEY="bench",
            **extra,
        )
        try:
            wait_port(model.url)
            await asyncio.sleep(3)  # both services consuming (their start-up is not measured)
            b.check(budget)
            b.check(agent)
            limits = BuildLimits(max_iterations=10_000)
            ids = [f"os-{uuid.uuid4().hex[:12]}" for _ in range(args.builds)]
            await asyncio.gather(
                *(
                    publish(
                        nc,
                        BuildRequested(
                            build_id=i, user_id=user, tier=TIER, idea_brief="x", limits=limits
                        ),
                    )
                    for i in ids
                )
            )
            deadline = time.monotonic() + 300
            quiet_s = 3 * args.latency_s * (1 + args.jitter)
            while True:
                await asyncio.sleep(0.5)
                b.check(agent)
                b.check(budget)
                asleep = {s.build_id for s in await stored(nc, "kiln.build.*.build_sleeping")}
                last = max((t for ts in model.arrivals.values() for _, t in ts), default=0.0)
                if asleep >= set(ids) and time.time() - last > quiet_s:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"{len(asleep)} of {len(ids)} builds asleep after 300 s")
            sleeps = await stored(nc, "kiln.build.*.sleep_requested")
            iterations = await stored(nc, "kiln.build.*.iteration_completed")
        finally:
            b.stop_all()
            await nc.close()
            await model.stop()
    limit = min(s.at for s in sleeps)
    arrivals = sorted(t for ts in model.arrivals.values() for _, t in ts)
    served = sorted(model.served)
    calls = len(arrivals)
    total, to_allowance, spent_at = 0, len(served), served[-1][0]
    for n, (left, cost) in enumerate(served, 1):
        total += cost
        if total >= allowance:
            to_allowance, spent_at = n, left
            break
    spent = sum(cost for _, cost in served)
    return {
        "builds": args.builds,
        "calls": calls,
        "calls_to_allowance": to_allowance,
        "past_calls": calls - to_allowance,
        "past_micro_usd": spent - allowance,
        "in_flight_when_spent": sum(1 for t in arrivals if t <= spent_at) - to_allowance,
        "started_in_lag": sum(1 for t in arrivals if spent_at < t <= limit),
        "started_after_limit": sum(1 for t in arrivals if t > limit),
        "charge_lag_ms": (limit - spent_at) * 1000,
        "uncharged_calls": calls - len(iterations),
        "call_micro_usd": round(spent / max(1, len(served))),
    }


async def main(args: argparse.Namespace) -> None:
    if args.before:
        with tempfile.TemporaryDirectory(prefix="kiln-before-") as tmp:
            before = await run(args, sources_of(args.before, Path(tmp)))
        print(figures("overshoot_before", ref=args.before, **before), flush=True)
    print(figures("overshoot", **await run(args, None)), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=20)
    parser.add_argument("--allowance-calls", type=int, default=100)
    parser.add_argument("--latency-s", type=float, default=1.0)
    parser.add_argument("--jitter", type=float, default=0.5)
    parser.add_argument("--before", help="also run the budget and the agent of this commit")
    asyncio.run(main(parser.parse_args()))
