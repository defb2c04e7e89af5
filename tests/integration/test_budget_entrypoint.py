"""``python -m kiln_budget`` as the process supervisor runs it: env vars in, SIGTERM out."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client

from kiln_contracts import IterationCompleted, Usage, subjects
from kiln_runtime.streams import ensure_streams

pytestmark = pytest.mark.integration


async def test_python_m_kiln_budget_charges_and_stops_cleanly(infra, uid):
    env = {**os.environ, "NATS_URL": infra["NATS_URL"], "REDIS_URL": infra["REDIS_URL"]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kiln_budget",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    nc = Client()
    await nc.connect(infra["NATS_URL"])
    await ensure_streams(nc)
    redis = aioredis.from_url(infra["REDIS_URL"], decode_responses=True)
    event = IterationCompleted(
        build_id=f"b{uid}",
        user_id=f"u{uid}",
        iteration=1,
        model="claude-haiku-4-5",
        usage=Usage(input_tokens=10, output_tokens=2),
        stop_reason="end_turn",
    )
    spent = None
    err = b""
    try:
        await nc.jetstream().publish(
            subjects.subject_of(event),
            event.model_dump_json().encode(),
            headers={"Nats-Msg-Id": str(event.event_id)},
        )
        for _ in range(300):  # up to 30 s for start-up and the charge
            spent = await redis.get(f"kiln:spend:build:b{uid}")
            if spent is not None or proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
        await redis.aclose()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert spent == "20", err.decode()[-3000:]
    assert proc.returncode == 0, err.decode()[-3000:]
