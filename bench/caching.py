"""A long scripted build run in-process, through the anthropic SDK against the scripted server, to
measure prompt caching (``bench/prompt_caching.py`` and the agent's tests).

The agent is the real one (real request building, compaction, checkpoint logic) on an in-memory
store; the sandbox is a loopback that answers each ToolCall with ``output_chars`` of output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kiln_agent import config as agent_config
from kiln_agent.adapters.anthropic_model import AnthropicModel
from kiln_agent.adapters.memory import MemoryStore
from kiln_agent.loop import Agent
from kiln_contracts import (
    BuildCompleted,
    BuildFailed,
    BuildLimits,
    BuildRequested,
    Envelope,
    IterationCompleted,
    ToolCall,
    ToolResult,
)
from kiln_devstack.model.long_script import LongScript
from kiln_devstack.model.server import Recorded, ScriptedServer
from kiln_runtime import config as kiln_config


@dataclass
class CacheReport:
    requests: int
    prefix_unchanged: int = 0
    changed_at: list[int] = field(default_factory=list)
    input_tokens: int = 0
    cache_read: int = 0
    cache_write: int = 0
    compactions: int = 0
    summaries: int = 0
    summary_charged: int = 0
    completed: bool = False
    failed: str = ""

    @property
    def total_input(self) -> int:
        return self.input_tokens + self.cache_read + self.cache_write

    @property
    def read_ratio(self) -> float:
        return self.cache_read / self.total_input if self.total_input else 0.0

    def line(self) -> str:
        return (
            f"prompt_caching requests={self.requests} prefix_unchanged={self.prefix_unchanged}/"
            f"{self.requests - 1} input={self.input_tokens} cache_write={self.cache_write} "
            f"cache_read={self.cache_read} read_ratio={self.read_ratio:.3f} "
            f"compactions={self.compactions}"
        )


def blocks(request: dict[str, Any]) -> tuple[list[bytes], list[int]]:
    """The request as the cache sees it (tools, system, message blocks), each block's bytes
    without its cache_control marker (the marker moves; the content must not), and the indices
    of the marked blocks."""
    out: list[bytes] = []
    marked: list[int] = []
    items: list[dict[str, Any]] = list(request.get("tools") or [])
    items += list(request.get("system") or [])
    for m in request.get("messages") or []:
        items += [{"role": m["role"], **b} for b in m["content"]]
    for i, item in enumerate(items):
        if "cache_control" in item:
            marked.append(i)
        clean = {k: v for k, v in item.items() if k != "cache_control"}
        out.append(json.dumps(clean, separators=(",", ":"), ensure_ascii=False).encode())
    return out, marked


def prefix_kept(previous: Recorded, current: Recorded) -> bool:
    """Whether ``current`` starts with ``previous`` up to its last cache breakpoint, byte for
    byte (cache_control markers aside)."""
    before, marked = blocks(previous.request)
    after, _ = blocks(current.request)
    end = (max(marked) + 1) if marked else 0
    return after[:end] == before[:end]


def is_summary(rec: Recorded) -> bool:
    """A summarising call (the agent sends it without tools), not a turn of the build."""
    return not rec.request.get("tools")


def report(recorded: list[Recorded]) -> CacheReport:
    """Usage over every call (summarising ones too); the prefix compared between the build's
    turns (``requests``) only."""
    turns = [rec for rec in recorded if not is_summary(rec)]
    out = CacheReport(requests=len(turns), summaries=len(recorded) - len(turns))
    for rec in recorded:
        usage = rec.usage
        out.input_tokens += usage.get("input_tokens", 0)
        out.cache_read += usage.get("cache_read_input_tokens", 0)
        out.cache_write += usage.get("cache_creation_input_tokens", 0)
    for i, rec in enumerate(turns):
        if i:
            if prefix_kept(turns[i - 1], rec):
                out.prefix_unchanged += 1
            else:
                out.changed_at.append(i + 1)
    marks = [_marks(rec) for rec in turns]
    out.compactions = sum(1 for a, b in zip([(0, 0, ""), *marks], marks, strict=False) if a != b)
    return out


class Loopback:
    """The publisher: keeps every message; ToolCalls wait in ``calls`` for the driver."""

    def __init__(self) -> None:
        self.sent: list[Envelope] = []
        self.calls: list[ToolCall] = []
        self.seen: set[object] = set()

    async def publish(self, msg: Envelope) -> None:
        if msg.event_id in self.seen:
            return  # the bus drops a repeat of an event id
        self.seen.add(msg.event_id)
        self.sent.append(msg)
        if isinstance(msg, ToolCall):
            self.calls.append(msg)


async def run(
    iterations: int = 50,
    parallel: int = 2,
    output_chars: int = 400,
    window: int | None = None,
    write_chars: int = 0,
) -> CacheReport:
    """Run one scripted build of ``iterations`` model calls; ``window`` is the model's context
    window, for the agent and the server alike (a small one makes compaction happen);
    ``write_chars``: each turn also writes a file that long."""
    server = ScriptedServer()
    server.record = True
    server.window = window
    server.responder = LongScript(iterations, parallel, server.model.usage, write_chars).respond
    await server.start()
    cfg = agent_config.load()
    if window is not None:
        cfg = cfg.model_copy(update={"context_windows": {"default": window}})
    model = AnthropicModel.connect(base_url=server.url, api_key="scripted", timeout_s=30)
    store, pub = MemoryStore(), Loopback()
    agent = Agent(store, model, pub, cfg, kiln_config.default())
    try:
        build = BuildRequested(
            build_id="bench-cache",
            user_id="bench",
            tier="pro",
            idea_brief="A long build.",
            limits=BuildLimits(max_iterations=max(50, iterations)),
        )
        await agent.build_requested(build)
        while pub.calls:
            call = pub.calls.pop(0)
            line = f"step output for {call.call_id}; "
            output = (line * (output_chars // len(line) + 1))[:output_chars]
            await agent.tool_result(
                call.caused(
                    ToolResult, call_id=call.call_id, iteration=call.iteration, output=output
                )
            )
        out = report(server.recorded)
        out.completed = any(isinstance(m, BuildCompleted) for m in pub.sent)
        out.failed = next(
            (f"{m.reason}: {m.detail}" for m in pub.sent if isinstance(m, BuildFailed)), ""
        )
        out.summary_charged = sum(
            1 for m in pub.sent if isinstance(m, IterationCompleted) and m.purpose == "summary"
        )
        return out
    finally:
        await model.close()
        await server.stop()


def _marks(rec: Recorded) -> tuple[int, int, str]:
    """What compaction did to a request: its cleared tool results, its cleared tool inputs, and
    the summary it opens with (a change = a compaction)."""
    results = inputs = 0
    summary = ""
    for m in rec.request.get("messages") or []:
        for b in m["content"]:
            if b.get("type") == "tool_result" and str(b.get("content", "")).endswith(
                "of old output cleared]"
            ):
                results += 1
            elif b.get("type") == "tool_use" and "characters cleared from this old call" in str(
                b.get("input")
            ):
                inputs += 1
            elif b.get("type") == "text" and "was summarised" in str(b.get("text")):
                summary = str(b["text"])
    return results, inputs, summary
