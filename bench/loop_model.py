"""An Anthropic-compatible model server for the benchmarks: every build loops on one cheap tool.

    uv run --frozen python bench/loop_model.py --port 8766 [--latency-s 1.0] [--jitter 0.5]
        [--sigma 0] [--iterations 0]

Each reply is one ``list_dir`` tool_use (the path alternates between ``.`` and ``./`` so the
agent's repetition limit never trips) until the build has made ``iterations`` model calls
(0: forever), then ``end_turn``. Usage is a small constant, so no cost cap is reached. With
``--jitter j`` each call takes a latency drawn uniformly from ``latency × [1 - j, 1 + j]`` (the
same mean); with ``--sigma s`` (> 0) each call's latency is lognormal with median ``latency``
and shape ``s`` (``latency × e^(s·Z)``, Z standard normal), the long right tail of real model
calls: a few calls several times slower than the median, none faster than a fraction of it.
Without either, every call takes exactly ``latency``. Its collector is tuned as the services'
are (``kiln_runtime.collector``): thousands of requests held through their latency would
otherwise be walked by every young collection. ``/stats`` reports the mean latency drawn,
so a benchmark can say what throughput the latencies allow.

It is the scripted server (``kiln_devstack.model.server``: aiohttp, keep-alive) with this responder, plus timing: for every build it remembers when the last reply
left and, when the build's next request arrives, records the gap (everything Kiln did between
two model calls). ``GET /stats[/<since>]`` returns those gaps, the waits so far of the builds
whose next request has not come yet, and the reply times as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import re
import time
from collections import defaultdict
from typing import Any

from kiln_devstack.model.server import Recorded, ScriptedServer
from kiln_devstack.model.usage import response_body
from kiln_runtime import collector

BUILD = re.compile(r"\(Build ([^)\s]+)\.\)")
USAGE = {
    "input_tokens": 200,
    "output_tokens": 20,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
}


def build_of(request: dict[str, Any]) -> str:
    """The build id, from the agent's kickoff turn ("... (Build <id>.)")."""
    for m in request.get("messages") or []:
        content = m.get("content")
        blocks = [{"text": content}] if isinstance(content, str) else content or []
        for b in blocks:
            found = BUILD.search(str(b.get("text", "")))
            if found:
                return found.group(1)
    return "?"


class LoopModel(ScriptedServer):
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        iterations: int = 0,
        jitter: float = 0.0,
        sigma: float = 0.0,
    ) -> None:
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter must be between 0 and 1, not {jitter}")
        if sigma < 0 or (sigma and jitter):
            raise ValueError("sigma is >= 0, and not given together with jitter")
        # the fixed part is the server's own latency, the random part is slept in _arrived
        super().__init__(host, port, 0.0 if sigma else latency_s * (1 - jitter))
        self.median_s, self.sigma = latency_s, sigma
        self.spread_s = 2 * jitter * latency_s
        self.drawn: list[float] = []  # every call's latency, as drawn
        self.iterations = iterations
        self.responder = self.respond
        self.on_request = self._arrived
        self.sent_at: dict[str, float] = {}
        self.gaps: list[tuple[str, float, float]] = []  # (build, reply left, next request came)
        self.arrivals: dict[str, list[tuple[str, float]]] = defaultdict(list)  # build → (prefix, t)
        self.replies: list[float] = []
        self.hook: Any = None  # an async callable(build_id, prefix) for the recovery benchmark

    async def _arrived(self, seen: Recorded) -> None:
        now = seen.arrived_at  # its request line read: the server's own parsing is not Kiln's
        build = build_of(seen.request)
        self.arrivals[build].append((seen.prefix, now))
        last = self.sent_at.pop(build, None)
        if last is not None:
            self.gaps.append((build, last, now))
        if self.hook is not None:
            await self.hook(build, seen.prefix)
        if self.sigma:
            latency = random.lognormvariate(math.log(self.median_s), self.sigma)
            self.drawn.append(latency)
            await asyncio.sleep(latency)
        elif self.spread_s:
            extra = random.uniform(0.0, self.spread_s)
            self.drawn.append(self.latency_s + extra)
            await asyncio.sleep(extra)
        else:
            self.drawn.append(self.latency_s)

    def respond(self, request: dict[str, Any]) -> dict[str, Any]:
        messages = request.get("messages") or []
        n = sum(1 for m in messages if m.get("role") == "assistant")
        build = build_of(request)
        if self.iterations and n + 1 >= self.iterations:
            content: list[dict[str, Any]] = [{"type": "text", "text": f"Done after {n} turns."}]
            stop = "end_turn"
        else:
            path = "." if n % 2 == 0 else "./"
            content = [
                {"type": "tool_use", "id": f"toolu_{build}_{n}", "name": "list_dir",
                 "input": {"path": path}},
            ]  # fmt: skip
            stop = "tool_use"
        now = time.time()
        self.sent_at[build] = now
        self.replies.append(now)
        return response_body(request, content, stop, dict(USAGE), f"msg_{build}_{n}")

    def stats(self, since: float = 0.0) -> dict[str, Any]:
        now = time.time()
        return {
            "gaps_ms": [(b - a) * 1000 for _, a, b in self.gaps if a >= since],
            # builds whose reply left and whose next request has not come yet: their wait so far
            # (whenever it began: those waiting since before ``since`` have waited longest)
            "waiting_ms": [(now - a) * 1000 for a in self.sent_at.values()],
            "gap_spans": [g for g in self.gaps if g[1] >= since],  # (build, reply left, next came)
            "replies": [t for t in self.replies if t >= since],
            "requests": self.requests,
            "mean_latency_s": sum(self.drawn) / len(self.drawn) if self.drawn else 0.0,
        }

    async def _handle(
        self,
        method: str,
        path: str,
        body: bytes,
        arrived_at: float = 0.0,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        if method == "GET" and path.startswith("/stats"):  # /stats or /stats/<since, epoch s>
            tail = path.removeprefix("/stats").strip("/")
            return 200, self.stats(float(tail or 0)), {}
        return await super()._handle(method, path, body, arrived_at, headers)


async def serve(
    host: str, port: int, latency_s: float, iterations: int, jitter: float, sigma: float
) -> None:
    server = LoopModel(host, port, latency_s, iterations, jitter, sigma)
    await server.start()
    print(f"loop model listening on {server.url}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--latency-s", type=float, default=0.0)
    parser.add_argument("--jitter", type=float, default=0.0, help="Latency spread, 0..1.")
    parser.add_argument("--sigma", type=float, default=0.0, help="Lognormal latency's shape.")
    parser.add_argument("--iterations", type=int, default=0, help="Model calls per build (0: ∞).")
    args = parser.parse_args()
    collector.tune()  # as the services' collectors are: its CPU is the bench's, not Kiln's
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(args.host, args.port, args.latency_s, args.iterations, args.jitter, args.sigma)
        )


if __name__ == "__main__":
    main()
