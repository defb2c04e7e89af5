"""The agent's CPU to build a model call's request body, at iteration 1 and deep into a build.

    uv run --frozen python bench/request_body.py [--iterations 1,100,200] [--calls 200]
        [--rounds 5] [--output-chars 1500] [--text-chars 300] [--compacted]

A build's turns as the bookkeeping benchmark makes them (each iteration: a signed thinking block,
``--text-chars`` of text and a ``glob`` call; its result, ``--output-chars`` long), then the real
request (``context.build_request``, the agent's default configuration) turned into the bytes sent,
two ways, alternated ``--rounds`` times: ``whole``, the whole request encoded at every call
(``pydantic_core.to_json`` of every field and message); ``joined``, what ``AnthropicModel`` sends
(``request_body``: each turn sent unchanged carries its JSON, encoded once, and the body is joined
from it). Both bodies are checked to be the same JSON. ``--compacted``: every turn but the last
ten is before the clearing watermark, as after a compaction. CPU = this process's CPU time per call,
the request's building included; the median over the rounds. One line per size, then
``request_body iterations=… whole_ms=… joined_ms=… ratio=…`` for the largest (ratio = joined /
whole).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import pydantic_core

from kiln_agent import config as agent_config
from kiln_agent.adapters.anthropic_model import request_body, request_fields
from kiln_agent.checkpoint import Checkpoint, Turn
from kiln_agent.context import build_request
from kiln_agent.ports import ModelRequest
from kiln_agent.tools import definitions
from kiln_contracts import BuildLimits

SIGNATURE = "EqQBCkYIBxgCKkD" + "x" * 300  # the size of a real thinking block's signature


def turns_of(iterations: int, text_chars: int, output_chars: int) -> list[Turn]:
    text = ("Looking at the project layout before the next change. " * 100)[:text_chars]
    turns = [Turn(0, "user", [{"type": "text", "text": "Build a tool. (Build b1.)"}], 0)]
    for n in range(1, iterations + 1):
        call = f"toolu_{n:04d}"
        turns.append(Turn(len(turns), "assistant", [
            {"type": "thinking", "thinking": "", "signature": SIGNATURE},
            {"type": "text", "text": f"{text} (step {n})"},
            {"type": "tool_use", "id": call, "name": "glob", "input": {"pattern": f"*_{n}.py"}},
        ], n))  # fmt: skip
        output = (f"src/module_{n}.py\n" * output_chars)[:output_chars]
        turns.append(Turn(len(turns), "user", [
            {"type": "tool_result", "tool_use_id": call, "content": output, "is_error": False},
        ], n))  # fmt: skip
    return turns


def whole(request: ModelRequest) -> bytes:
    """The request encoded whole, every message included."""
    return pydantic_core.to_json({**request_fields(request), "messages": request.messages})


def cpu_per_call(encode: Any, cp: Checkpoint, turns: list[Turn], calls: int) -> float:
    cfg = agent_config.load()
    tools = definitions(cfg.narrate_description)
    began = time.process_time()
    for _ in range(calls):
        encode(build_request(cp, turns, tools, cfg))
    return (time.process_time() - began) / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", default="1,100,200", help="Build sizes, in iterations.")
    parser.add_argument("--calls", type=int, default=200, help="Requests per size and round.")
    parser.add_argument("--rounds", type=int, default=5, help="Alternations of the two ways.")
    parser.add_argument("--output-chars", type=int, default=1500, help="Each tool result.")
    parser.add_argument("--text-chars", type=int, default=300, help="Each reply's text.")
    parser.add_argument("--compacted", action="store_true", help="All but 10 turns cleared.")
    args = parser.parse_args()
    line = ""
    for size in [int(s) for s in args.iterations.split(",")]:
        cp = Checkpoint("b1", "u1", "pro", "claude-sonnet-5-5", BuildLimits(), "You build apps.")
        turns = turns_of(size, args.text_chars, args.output_chars)
        cp.turns = len(turns)
        if args.compacted:
            cp.state.compacted_before = max(0, len(turns) - 10)
        request = build_request(cp, turns, definitions("n"), agent_config.load())
        assert json.loads(request_body(request)) == json.loads(whole(request))
        ways: dict[str, list[float]] = {"whole": [], "joined": []}
        for _ in range(args.rounds):
            ways["whole"].append(cpu_per_call(whole, cp, turns, args.calls))
            ways["joined"].append(cpu_per_call(request_body, cp, turns, args.calls))
        w, j = statistics.median(ways["whole"]), statistics.median(ways["joined"])
        kib = len(request_body(request)) / 1024
        print(f"iterations={size}: {kib:.0f} KiB, whole {w:.3f} ms, joined {j:.3f} ms", flush=True)
        line = (
            f"request_body iterations={size} kib={kib:.0f} whole_ms={w:.3g} joined_ms={j:.3g} "
            f"ratio={j / w:.3g}"
        )
    print(line)


if __name__ == "__main__":
    main()
