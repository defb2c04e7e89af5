"""The agent's CPU per model call in the ``anthropic`` SDK's two HTTP transports, in one process.

    uv run --frozen python bench/model_client.py [--calls 3000] [--concurrency 50] [--rounds 3]

``bench/loop_model.py`` runs as its own process (no latency); this process makes ``--calls``
Messages calls, ``--concurrency`` at a time, sent the way ``AnthropicModel`` sends them (the
request as JSON bytes through the SDK's own POST; four clients of 16 connections each) and the
replies parsed into ``Message`` (``AnthropicModel`` itself keeps them as bytes), once with the
SDK's default transport (``DefaultAsyncHttpxClient``) and once with its aiohttp one
(``DefaultAioHttpClient``), alternating for ``--rounds`` rounds. CPU = this process's CPU time
over the calls / calls. The last line: ``model_client httpx_cpu_ms=… aiohttp_cpu_ms=… ratio=…``
(medians over the rounds; ratio = aiohttp / httpx).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import httpx
import pydantic_core
from anthropic.types import Message

from kiln_devstack.host import free_port

HERE = Path(__file__).resolve().parent
CLIENTS, PER_CLIENT = 4, 16


def body(i: int) -> bytes:
    return pydantic_core.to_json(
        {
            "model": "claude-sonnet-5-5",
            "max_tokens": 1024,
            "system": [{"type": "text", "text": f"(Build b{i % 200}.) You build apps."}],
            "tools": [],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 2000}]}],
        }
    )


async def cpu_per_call(url: str, transport: str, calls: int, concurrency: int) -> float:
    limits = anthropic.DEFAULT_CONNECTION_LIMITS.__class__(
        max_connections=PER_CLIENT, max_keepalive_connections=PER_CLIENT
    )
    make = (
        anthropic.DefaultAioHttpClient
        if transport == "aiohttp"
        else anthropic.DefaultAsyncHttpxClient
    )
    clients = [
        anthropic.AsyncAnthropic(
            api_key="k", base_url=url, max_retries=0, http_client=make(limits=limits, timeout=30)
        )
        for _ in range(CLIENTS)
    ]
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            reply = await clients[i % CLIENTS].post(
                "/v1/messages", cast_to=Message, content=body(i)
            )
            assert reply.content

    try:
        await asyncio.gather(*(one(i) for i in range(200)))  # connections opened, warm
        began = time.process_time()
        await asyncio.gather(*(one(i) for i in range(calls)))
        return (time.process_time() - began) / calls * 1000
    finally:
        for client in clients:
            await client.close()


async def measure(url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"httpx": [], "aiohttp": []}
    for n in range(args.rounds):
        for transport, ms in figures.items():
            ms.append(await cpu_per_call(url, transport, args.calls, args.concurrency))
            print(f"round {n + 1} {transport}: {ms[-1]:.3f} ms CPU per call", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(HERE / "loop_model.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{url}/stats", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        figures = asyncio.run(measure(url, args))
    finally:
        server.terminate()
        server.wait(10)
    httpx_ms, aiohttp_ms = (statistics.median(figures[t]) for t in ("httpx", "aiohttp"))
    print(
        f"model_client httpx_cpu_ms={httpx_ms:.3f} aiohttp_cpu_ms={aiohttp_ms:.3f} "
        f"ratio={aiohttp_ms / httpx_ms:.2f}"
    )


if __name__ == "__main__":
    main()
