"""The agent's per-iteration bookkeeping near iteration 1 and near iteration 200 of one build.

    uv run --frozen python bench/bookkeeping.py [--iterations 210] [--window 20] [--builds 3]
        [--output-chars 1500] [--text-chars 300] [--warmup 20] [--turn-cache-mb 64]

Bookkeeping is everything the agent does for an iteration except the model call and the tool:
record the tool result (advance the checkpoint kept from the last iteration, save it and take the
think lease in one statement), then think (the turns kept from earlier thinks and saves, build and
size the request, make the body ``AnthropicModel`` would send, save the reply with its new turns
and give the lease up in one statement, publish IterationCompleted and the ToolCall from the
outbox, mark it sent). A replica that has not
kept them reads the checkpoint and the turns added since. It runs on real Postgres and
NATS JetStream (embedded ones started here, unless NATS_URL / DATABASE_URL name running servers),
the real ``Agent`` with its Postgres store and bus subscribers, an instant model (one cheap
``glob`` call per turn, then ``end_turn``) and an instant fake sandbox that answers each ToolCall
at once with ``--output-chars`` of output.

A sample is the agent's handling of one ToolResult (the result recorded and the next iteration
thought), minus the time spent inside the model; it is broken down into the store's calls, the
publishes, building the request, and the rest. The early window is the iterations right after the
first (2 … window+1), the late one the window around iteration 200 (ending at 200 + window/2, or
at the last tool-calling iteration of a shorter build), both of the same build. A short warm-up
build runs first (cold connections and caches), then ``--builds`` measured builds one after the
other; each reports its own windows, and the last line takes the median over the builds of each
window's p50 (a shared machine's load drifts during a build):
``bookkeeping p50_iter1_ms=… p50_iter200_ms=… ratio=…`` (ratio = late / early).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln_agent import app, compaction, config
from kiln_agent.adapters.anthropic_model import request_body
from kiln_agent.adapters.postgres import SCHEMA, PostgresStore, migrations
from kiln_agent.checkpoint import Checkpoint, Turn
from kiln_agent.loop import Agent
from kiln_agent.ports import NO_LEASE_CHANGE, LeaseChange, ModelReply, ModelRequest
from kiln_agent.transitions import Rules
from kiln_contracts import (
    BuildCompleted,
    BuildLimits,
    BuildRequested,
    Envelope,
    ToolCall,
    ToolResult,
    Usage,
)
from kiln_devstack.infra import Infra
from kiln_runtime import config as kiln_config
from kiln_runtime.bus import Bus, Delivery
from kiln_runtime.db import create_pool
from kiln_runtime.errors import RetryLater
from kiln_runtime.settings import CommonSettings

TARGET_RATIO = 1.5


# ---------------------------------------------------------------------------- the instant parts


SIGNATURE = "EqQBCkYIBxgCKkD" + "x" * 300  # the size of a real thinking block's signature


class InstantModel:
    """One ``glob`` call per turn (a different pattern each time), ``end_turn`` at ``last``. The
    iteration is read from the request (1 + 2 per earlier iteration messages); usage is reported
    from the request's size, as the API would count it, so the agent's context sizing is real.
    The request's body is made as ``AnthropicModel`` makes it, as part of the bookkeeping."""

    def __init__(self, text_chars: int) -> None:
        self.text = ("Looking at the project layout before the next change. " * 100)[:text_chars]
        self.last = 1
        self.spent_s = 0.0

    async def complete(self, request: ModelRequest) -> ModelReply:
        request_body(request)  # the body AnthropicModel would send: the agent's work, counted
        began = time.perf_counter()
        n = (len(request.messages) + 1) // 2
        if n >= self.last:
            content: list[dict[str, Any]] = [{"type": "text", "text": "Done."}]
            stop = "end_turn"
        else:
            content = [
                # as the current models answer: a signed thinking block first (display omitted)
                {"type": "thinking", "thinking": "", "signature": SIGNATURE},
                {"type": "text", "text": f"{self.text} (step {n})"},
                {
                    "type": "tool_use",
                    "id": f"toolu_{n:04d}_{uuid.uuid4().hex[:8]}",
                    "name": "glob",
                    "input": {"pattern": f"src/**/*_{n}.py"},
                },
            ]
            stop = "tool_use"
        size = len(json.dumps(request.messages)) + len(json.dumps(request.tools))
        usage = Usage(input_tokens=50, output_tokens=100, cache_read_input_tokens=size // 4)
        reply = ModelReply(model=request.model, content=content, stop_reason=stop, usage=usage)
        self.spent_s += time.perf_counter() - began
        return reply


@dataclass
class Sample:
    iteration: int  # the iteration the handling thought
    total_s: float = 0.0  # the handling minus the model
    parts: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


_SAMPLE: contextvars.ContextVar[Sample | None] = contextvars.ContextVar("sample", default=None)


async def _timed(name: str, call: Any) -> Any:
    """Await ``call``, charging its time to ``name`` in the sample its handler is taking."""
    began = time.perf_counter()
    try:
        return await call
    finally:
        if (sample := _SAMPLE.get()) is not None:
            sample.parts[name].append(time.perf_counter() - began)


class TimedStore(PostgresStore):
    async def load(self, build_id: str) -> Checkpoint | None:
        return await _timed("load", super().load(build_id))

    async def turns(self, build_id: str, since: int = 0) -> list[Turn]:
        return await _timed("turns", super().turns(build_id, since))

    async def save(
        self, cp: Checkpoint, new_turns: list[Turn], lease: LeaseChange = NO_LEASE_CHANGE
    ) -> bool:
        return bool(await _timed("save", super().save(cp, new_turns, lease)))

    async def mark_sent(self, sent: dict[str, int]) -> None:
        await _timed("mark_sent", super().mark_sent(sent))

    async def take_lease(
        self, build_id: str, token: str, ttl_s: float
    ) -> tuple[float, Checkpoint | None]:
        return await _timed("take", super().take_lease(build_id, token, ttl_s))

    async def release_lease(self, build_id: str, token: str) -> None:
        await _timed("release", super().release_lease(build_id, token))


class TimedPublisher:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def publish(self, msg: Envelope) -> None:
        await _timed("publish", self.bus.publish(msg))


class TimedAgent(Agent):
    """The real agent, deaf to builds without the benchmark's prefix, timing each ToolResult."""

    prefix = ""
    samples: dict[str, list[Sample]]
    deferred = 0  # ToolResults redelivered later (the lease still held by the previous handler)

    async def build_requested(self, msg: BuildRequested, delivered: int = 1) -> None:
        if msg.build_id.startswith(self.prefix):
            await super().build_requested(msg, delivered)

    async def tool_result(self, msg: ToolResult) -> None:
        if not msg.build_id.startswith(self.prefix):
            return
        assert isinstance(self.model, InstantModel)
        sample = Sample(msg.iteration + 1)
        _SAMPLE.set(sample)
        began, in_model = time.perf_counter(), self.model.spent_s
        try:
            await super().tool_result(msg)
        except RetryLater:
            self.deferred += 1
            raise
        sample.total_s = time.perf_counter() - began - (self.model.spent_s - in_model)
        self.samples[msg.build_id].append(sample)


def _timed_requests() -> None:
    """Time each Messages request the agent builds (``compaction.model_request``), as the
    sample's part "request"."""
    build = compaction.model_request
    if getattr(build, "timed", False):
        return

    def timed(
        rules: Rules, tools: list[dict[str, Any]], cp: Checkpoint, turns: list[Turn]
    ) -> ModelRequest:
        began = time.perf_counter()
        try:
            return build(rules, tools, cp, turns)
        finally:
            if (sample := _SAMPLE.get()) is not None:
                sample.parts["request"].append(time.perf_counter() - began)

    timed.timed = True  # type: ignore[attr-defined]
    compaction.model_request = timed


# ---------------------------------------------------------------------------- the figures

PARTS = ("load", "turns", "save", "mark_sent", "take", "release", "publish", "request", "gc")

_gc_began = 0.0


def _gc_timer(phase: str, info: dict[str, int]) -> None:
    """Charge the garbage collector's passes to the sample being taken (they may also fall inside
    a timed part: the parts can overlap by that much)."""
    global _gc_began
    if phase == "start":
        _gc_began = time.perf_counter()
    elif (sample := _SAMPLE.get()) is not None:
        sample.parts["gc"].append(time.perf_counter() - _gc_began)


def p50_ms(samples: list[Sample]) -> float:
    return statistics.median(s.total_s for s in samples) * 1000


def breakdown(samples: list[Sample]) -> str:
    """The p50 of each part (ms, with how many calls an iteration makes) and of the rest."""
    parts = []
    for name in PARTS:
        calls = statistics.median(len(s.parts.get(name, [])) for s in samples)
        spent = statistics.median(sum(s.parts.get(name, [])) for s in samples) * 1000
        parts.append(f"{name} {calls:g}x {spent:.2f}")
    rest = statistics.median(
        s.total_s - sum(sum(v) for k, v in s.parts.items() if k != "gc") for s in samples
    )
    parts.append(f"other {rest * 1000:.2f}")
    return ", ".join(parts)


@dataclass
class Round:
    early: list[Sample]
    late: list[Sample]
    turns: int

    def describe(self, n: int) -> str:
        lines = [f"build {n}: {self.turns} turns stored, ratio {self.ratio:.2f}"]
        for name, samples in (("early", self.early), ("late", self.late)):
            first, last = samples[0].iteration, samples[-1].iteration
            lines.append(
                f"  {name:5} iterations {first}-{last}: p50 {p50_ms(samples):.2f} ms; "
                f"p50 ms by part: {breakdown(samples)}"
            )
        return "\n".join(lines)

    @property
    def ratio(self) -> float:
        return p50_ms(self.late) / p50_ms(self.early)


@dataclass
class Result:
    rounds: list[Round]
    deferred: int

    @property
    def p50_iter1_ms(self) -> float:
        return statistics.median(p50_ms(r.early) for r in self.rounds)

    @property
    def p50_iter200_ms(self) -> float:
        return statistics.median(p50_ms(r.late) for r in self.rounds)

    @property
    def ratio(self) -> float:
        return self.p50_iter200_ms / self.p50_iter1_ms

    def line(self) -> str:
        return (
            f"bookkeeping p50_iter1_ms={self.p50_iter1_ms:.2f} "
            f"p50_iter200_ms={self.p50_iter200_ms:.2f} ratio={self.ratio:.2f}"
        )


# ---------------------------------------------------------------------------- the run


async def run(
    nats_url: str,
    database_url: str,
    *,
    iterations: int = 210,
    window: int = 20,
    builds: int = 3,
    output_chars: int = 1500,
    text_chars: int = 300,
    warmup: int = 20,
    turn_cache_mb: float = 64.0,
) -> Result:
    if iterations < 2 * window + 2:
        raise SystemExit(f"--iterations must be at least {2 * window + 2} for --window {window}")
    _timed_requests()
    if _gc_timer not in gc.callbacks:
        gc.callbacks.append(_gc_timer)
    run_id = uuid.uuid4().hex[:8]
    prefix = f"bench-bk-{run_id}"
    settings = CommonSettings(nats_url=nats_url, ack_wait_s=60)
    pool = await create_pool(database_url, schema=SCHEMA, migrations=migrations(), max_size=5)
    model = InstantModel(text_chars)
    bus = Bus(settings, f"bench-agent-{run_id}")
    agent = TimedAgent(
        TimedStore(pool),
        model,
        TimedPublisher(bus),
        config.load(),
        kiln_config.default(),
        turn_cache_mb=turn_cache_mb,
    )
    agent.prefix, agent.samples = prefix, defaultdict(list)
    app.register(bus, agent, workers=4)

    sandbox = Bus(settings, f"bench-sandbox-{run_id}")
    output = ("src/pkg/module_%04d.py\n" * (output_chars // 22 + 1))[:output_chars]
    completed: set[str] = set()

    async def run_tool(call: ToolCall, _: Delivery) -> None:
        if call.build_id.startswith(prefix):
            await sandbox.publish(
                call.caused(
                    ToolResult,
                    call_id=call.call_id,
                    iteration=call.iteration,
                    output=output,
                    exit_code=0,
                )
            )

    async def on_completed(msg: BuildCompleted, _: Delivery) -> None:
        if msg.build_id.startswith(prefix):
            completed.add(msg.build_id)

    sandbox.consume(ToolCall, run_tool, max_workers=4)
    sandbox.consume(BuildCompleted, on_completed, max_workers=1)
    plan = [(f"{prefix}-warmup", warmup)] + [
        (f"{prefix}-{n}", iterations) for n in range(1, builds + 1)
    ]
    rounds: list[Round] = []
    for b in (bus, sandbox):
        await b.connect()
        await b.start()
    try:
        for build_id, n in plan:  # one build at a time
            model.last = n
            await bus.publish(
                BuildRequested(
                    build_id=build_id,
                    user_id="bench",
                    tier="pro",
                    idea_brief="A command-line tool that counts words, lines and characters.",
                    limits=BuildLimits(max_iterations=n + 5, max_cost_micro_usd=10**12),
                )
            )
            deadline = time.monotonic() + 60 + n * 2
            while build_id not in completed:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{build_id} did not complete: {len(agent.samples[build_id])}")
                await asyncio.sleep(0.05)
            if build_id.endswith("-warmup"):
                continue
            turns = await pool.fetchval("SELECT turns FROM builds WHERE build_id = $1", build_id)
            # the handling of the last ToolResult thinks the final iteration (end_turn): no
            # ToolCall in it, so it is left out
            samples = sorted(
                (s for s in agent.samples[build_id] if s.iteration < n), key=lambda s: s.iteration
            )
            end = min(samples[-1].iteration, 200 + window // 2)
            late = [s for s in samples if end - window < s.iteration <= end]
            rounds.append(Round(samples[:window], late, turns))
    finally:
        for b in (bus, sandbox):
            await b.stop()
        await pool.close()
    return Result(rounds, agent.deferred)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=210, help="Iterations of each build.")
    parser.add_argument("--window", type=int, default=20, help="Iterations per window.")
    parser.add_argument("--builds", type=int, default=3, help="Measured builds, one at a time.")
    parser.add_argument("--output-chars", type=int, default=1500, help="Output of each tool call.")
    parser.add_argument("--text-chars", type=int, default=300, help="Text of each model turn.")
    parser.add_argument("--warmup", type=int, default=20, help="Iterations of the warm-up build.")
    parser.add_argument(
        "--turn-cache-mb", type=float, default=64.0, help="The agent's turn cache (0: none)."
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data_dir = Path(tempfile.mkdtemp(prefix="kb-bk-", dir="/tmp"))
    infra = Infra(data_dir)
    try:
        nats_url = os.environ.get("NATS_URL") or infra.start_nats()
        database_url = os.environ.get("DATABASE_URL") or infra.start_postgres()
        result = asyncio.run(
            run(
                nats_url,
                database_url,
                iterations=args.iterations,
                window=args.window,
                builds=args.builds,
                output_chars=args.output_chars,
                text_chars=args.text_chars,
                warmup=args.warmup,
                turn_cache_mb=args.turn_cache_mb,
            )
        )
    finally:
        with contextlib.suppress(Exception):
            infra.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    for n, r in enumerate(result.rounds, 1):
        print(r.describe(n))
    print(f"{result.deferred} ToolResults deferred by a held lease")
    if result.ratio > TARGET_RATIO:
        print(f"ratio {result.ratio:.2f} is over the target of {TARGET_RATIO}", file=sys.stderr)
    sys.stdout.flush()
    print(result.line())


if __name__ == "__main__":
    main()
