"""A service as a separate process (``python -m <module>``) for the tests that kill one, and
what they share: a durable consumer's ack_wait, polling."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from typing import Any

from nats.aio.client import Client
from nats.js.errors import NotFoundError

from kiln_contracts import subjects


async def set_ack_wait(nc: Client, durable: str, ack_wait_s: float) -> float | None:
    """Set the shared durable's ack_wait; its previous value (None if it did not exist yet)."""
    jsm = nc.jsm()
    try:
        info = await jsm.consumer_info(subjects.STREAM, durable)
    except NotFoundError:
        return None
    before = info.config.ack_wait
    config = info.config
    config.ack_wait = ack_wait_s
    await jsm.add_consumer(subjects.STREAM, config)
    return before


async def start_service(module: str, env: Mapping[str, str]) -> asyncio.subprocess.Process:
    """``python -m module`` with this process's environment plus ``env``, its output discarded."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def wait_for(predicate: Any, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.1)
