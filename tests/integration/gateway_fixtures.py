"""The in-process gateway of the gateway tests (uvicorn on a free port over real NATS and
Postgres) and the helpers those tests share: polling, the ``Gateway`` handle, an SSE parser."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from nats.js.api import ConsumerConfig, DeliverPolicy

from kiln_contracts import subjects
from kiln_gateway import builds
from kiln_gateway.app import create_app
from kiln_gateway.bootstrap import Wiring
from kiln_gateway.settings import GatewaySettings
from kiln_runtime.bus import Bus
from kiln_runtime.settings import CommonSettings


async def until(predicate, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Gateway:
    url: str
    rt: Wiring
    bus: Bus  # a separate connection, as another producer

    def client(self, key: str | None = None, **headers: str) -> httpx.AsyncClient:
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10)

    async def key(self, user: str, tier: str = "pro") -> str:
        key = f"key-{user}"
        await builds.ensure_dev_key(self.rt.store, key, user, tier)
        return key

    async def history(self, build_id: str) -> list[tuple[int, str]]:
        """(stream sequence, kind) of every message of the build on the stream."""
        sub = await self.bus.nc.jetstream().subscribe(
            subjects.build_filter(build_id),
            stream=subjects.STREAM,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        out = []
        try:
            while True:
                msg = await sub.next_msg(timeout=0.5)
                out.append((msg.metadata.sequence.stream, msg.subject.rsplit(".", 1)[-1]))
        except Exception:
            pass
        finally:
            await sub.unsubscribe()
        return out


@contextlib.asynccontextmanager
async def running_gateway(
    infra: dict[str, str], bus_name: str, **settings: Any
) -> AsyncIterator[Gateway]:
    """A gateway served on a free port over the test NATS and Postgres, ``settings`` on top,
    with a second bus connection named ``bus_name``; stopped on exit."""
    port = free_port()
    app = create_app(
        GatewaySettings(
            nats_url=infra["NATS_URL"],
            database_url=infra["DATABASE_URL"],
            gateway_port=port,
            **settings,
        )
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    deadline = asyncio.get_running_loop().time() + 60
    while not server.started:
        if task.done():
            task.result()
        assert asyncio.get_running_loop().time() < deadline, "gateway did not start"
        await asyncio.sleep(0.05)
    bus = Bus(CommonSettings(nats_url=infra["NATS_URL"]), bus_name)
    await bus.connect()
    try:
        yield Gateway(f"http://127.0.0.1:{port}", app.state.runtime, bus)
    finally:
        await bus.stop()
        server.should_exit = True
        await asyncio.wait_for(task, 30)


async def read_sse(lines: AsyncIterator[str], count: int | None = None) -> list[dict[str, str]]:
    """Parse SSE events (and heartbeat comments as {"comment": ...}) until ``count`` events or EOF."""
    out: list[dict[str, str]] = []
    current: dict[str, str] = {}
    async for line in lines:
        if line.startswith(":"):
            out.append({"comment": line[1:].strip()})
        elif line == "":
            if "event" in current:
                out.append(current)
                if count is not None and sum("event" in e for e in out) >= count:
                    return out
            current = {}
        else:
            field, _, value = line.partition(":")
            current[field] = value.removeprefix(" ")
    return out
