"""SIGKILL of the sandbox service in the middle of a tool call: the call is not re-run; the
redelivery (to a fresh process) waits out the dead process's lease and answers "interrupted"."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client

from kiln_contracts import ToolCall, ToolResult, subjects
from kiln_runtime.streams import ensure_streams
from kiln_sandbox.handlers import INTERRUPTED
from tests.integration.service_process import set_ack_wait, start_service

pytestmark = pytest.mark.integration


ACK_WAIT_S = 2.0
DURABLE = "sandbox-tool-call"
SERVICE = "kiln_sandbox"


def service_env(infra: dict[str, str], root: Path) -> dict[str, str]:
    return {
        "NATS_URL": infra["NATS_URL"],
        "DATABASE_URL": infra["DATABASE_URL"],
        "KILN_SANDBOX_ROOT": str(root),
        "KILN_SANDBOX_PROVIDER": "local",
        "KILN_ACK_WAIT_S": str(ACK_WAIT_S),
        "KILN_SANDBOX_LEASE_S": "2",
    }


async def test_sigkill_mid_call_yields_the_interrupted_result_and_no_rerun(infra, tmp_path, uid):
    root = tmp_path / "sandboxes"
    build_id = f"b{uid}"
    ws = root / build_id
    results: list[ToolResult] = []
    nc = Client()
    await nc.connect(infra["NATS_URL"])
    await ensure_streams(nc)

    async def cb(msg: Any) -> None:
        results.append(ToolResult.model_validate_json(msg.data))

    sub = await nc.subscribe(subjects.subject(build_id, ToolResult.kind), cb=cb)
    db = await asyncpg.connect(infra["DATABASE_URL"])
    # The durable is shared with the other sandbox tests; whoever created it chose its ack_wait.
    # A short one here so the redelivery comes quickly; the original is put back afterwards.
    restore_ack_wait = await set_ack_wait(nc, DURABLE, ACK_WAIT_S)
    first = await start_service(SERVICE, service_env(infra, root))
    second: asyncio.subprocess.Process | None = None
    try:
        call = ToolCall(
            build_id=build_id,
            user_id="u1",
            call_id="toolu_killed",
            iteration=1,
            tool="bash",
            input={"command": "echo $$ > pgid; echo run >> runs.txt; sleep 60"},
            timeout_s=120,
        )
        await nc.jetstream().publish(
            subjects.subject_of(call),
            call.model_dump_json().encode(),
            headers={"Nats-Msg-Id": str(call.event_id)},
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not (ws / "runs.txt").exists():  # the command is running
            assert first.returncode is None, "the service exited"
            assert loop.time() < deadline, "the call never started"
            await asyncio.sleep(0.05)
        row = await db.fetchrow(
            "SELECT status, owner FROM sandbox.calls WHERE build_id = $1 AND call_id = $2",
            build_id,
            call.call_id,
        )
        assert row is not None and row["status"] == "started" and row["owner"]

        first.send_signal(signal.SIGKILL)
        await first.wait()
        second = await start_service(SERVICE, service_env(infra, root))
        deadline = loop.time() + 60
        while not results:
            assert second.returncode is None, "the second service exited"
            assert loop.time() < deadline, "no result after the restart"
            await asyncio.sleep(0.05)
        assert results[0].is_error and results[0].output == INTERRUPTED
        assert results[0].call_id == call.call_id
        assert (ws / "runs.txt").read_text() == "run\n"  # it was not run again
        done = await db.fetchval(
            "SELECT status FROM sandbox.calls WHERE build_id = $1 AND call_id = $2",
            build_id,
            call.call_id,
        )
        assert done == "done"
    finally:
        with contextlib.suppress(Exception):
            os.killpg(int((ws / "pgid").read_text()), signal.SIGKILL)  # the orphaned command
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.kill()  # a clean SIGTERM stop is the entrypoint test's subject
                await proc.wait()
        if restore_ack_wait is not None:
            await set_ack_wait(nc, DURABLE, restore_ack_wait)
        await sub.unsubscribe()
        await nc.close()
        await db.close()
