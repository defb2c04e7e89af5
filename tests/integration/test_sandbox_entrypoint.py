"""``python -m kiln_sandbox`` as the process supervisor runs it: env vars in, SIGTERM out."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import pytest
from nats.aio.client import Client

from kiln_contracts import ToolCall, ToolResult, subjects
from kiln_runtime.streams import ensure_streams

pytestmark = pytest.mark.integration


async def test_python_m_kiln_sandbox_runs_a_call_and_stops_cleanly(infra, tmp_path, uid):
    root = tmp_path / "sandboxes"
    env = {
        **os.environ,
        "NATS_URL": infra["NATS_URL"],
        "DATABASE_URL": infra["DATABASE_URL"],
        "KILN_SANDBOX_ROOT": str(root),
        "KILN_SANDBOX_PROVIDER": "local",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kiln_sandbox",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    build_id = f"b{uid}"
    results: list[ToolResult] = []
    nc = Client()
    await nc.connect(infra["NATS_URL"])
    await ensure_streams(nc)  # as any producer does; the service may not have started yet

    async def cb(msg: Any) -> None:
        results.append(ToolResult.model_validate_json(msg.data))

    sub = await nc.subscribe(subjects.subject(build_id, ToolResult.kind), cb=cb)
    err = b""
    try:
        call = ToolCall(
            build_id=build_id,
            user_id="u1",
            call_id="toolu_entry",
            iteration=1,
            tool="bash",
            input={"command": "echo from-the-service > proof.txt; cat proof.txt"},
        )
        await nc.jetstream().publish(
            subjects.subject_of(call),
            call.model_dump_json().encode(),
            headers={"Nats-Msg-Id": str(call.event_id)},
        )
        for _ in range(300):  # up to 30 s for start-up and the call
            if results or proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
    finally:
        await sub.unsubscribe()
        await nc.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert results, err.decode()[-3000:]
    assert results[0].output.strip() == "from-the-service"
    assert (root / build_id / "proof.txt").read_text() == "from-the-service\n"
    assert proc.returncode == 0, err.decode()[-3000:]
