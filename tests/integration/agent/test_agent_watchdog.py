"""No build stuck forever, on a NATS server and database of this module's own with an agent
process (``python -m kiln_agent``, the watchdog's settings from the environment) and a sandbox in
the test that cannot get a sandbox for some calls: their ToolCalls are dead letters. The build
whose sandbox comes back is retried and completes; the other fails with reason ``stalled``."""

from __future__ import annotations

import asyncio
import collections
import json
import os
from pathlib import Path

import asyncpg
import pytest
from nats.aio.client import Client

from kiln_contracts import BuildFailed, BuildLimits, BuildRequested, Envelope, ToolCall
from kiln_runtime.bus import Bus, Delivery
from kiln_runtime.dead_letters import list_dead_letters
from kiln_runtime.errors import PermanentError
from kiln_runtime.settings import CommonSettings
from tests.integration.agent.conftest import until
from tests.integration.agent.test_agent_durability import Replica, pg  # noqa: F401  (fixture)
from tests.unit.test_agent_fakes import Workspace

pytestmark = pytest.mark.integration


async def test_a_dead_lettered_tool_call_is_retried_then_the_build_fails_as_stalled(
    own_nats: str,
    own_db: str,
    pg: asyncpg.Pool,  # noqa: F811
    scripted,
    uid: str,
    tmp_path: Path,
) -> None:
    back, lost = f"back{uid}", f"lost{uid}"
    env = {
        **os.environ,
        "NATS_URL": own_nats,
        "DATABASE_URL": own_db,
        "ANTHROPIC_BASE_URL": scripted.url,
        "ANTHROPIC_API_KEY": "test",
        "KILN_ACK_WAIT_S": "2",
        "KILN_AGENT_WATCHDOG_IDLE_S": "1",
        "KILN_AGENT_WATCHDOG_RETRIES": "1",
        "KILN_AGENT_WATCHDOG_INTERVAL_S": "0.3",
    }
    agent = Replica("watchdog", env, tmp_path)

    # the sandbox: no sandbox to be had for `lost`, ever, nor for `back`'s first calls
    sandbox = Bus(CommonSettings(nats_url=own_nats), "sandbox")
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    sent: list[ToolCall] = []
    ran: list[str] = []
    events: list[Envelope] = []

    async def run_tool(call: ToolCall, _: Delivery) -> None:
        sent.append(call)
        if call.build_id == lost or (call.build_id == back and call.iteration == 1 and
                                     sum(c.call_id == call.call_id for c in sent) == 1):  # fmt: skip
            raise PermanentError("could not create a sandbox: the API key was refused")
        ran.append(call.call_id)
        await sandbox.publish(await asyncio.to_thread(ws.run, call))

    async def watch(event: Envelope, _: Delivery) -> None:
        events.append(event)

    sandbox.consume(ToolCall, run_tool, max_workers=8)
    sandbox.consume_all(watch, durable="watch", max_workers=4)
    await sandbox.connect()
    await sandbox.start()
    try:
        await until(agent.ready, timeout=60, what="the agent started")
        limits = BuildLimits(tool_timeout_s=0.2)
        for build_id in (back, lost):
            await sandbox.publish(
                BuildRequested(
                    build_id=build_id, user_id="u1", tier="pro", idea_brief="stats", limits=limits
                )
            )

        async def status(build_id: str) -> str | None:
            return await pg.fetchval("SELECT status FROM builds WHERE build_id = $1", build_id)

        deadline = asyncio.get_running_loop().time() + 90
        while (await status(back), await status(lost)) != ("completed", "failed"):
            assert asyncio.get_running_loop().time() < deadline, (
                f"{back}: {await status(back)}, {lost}: {await status(lost)}\n"
                + agent.log.read_text()[-3000:]
            )
            await asyncio.sleep(0.1)

        # `back`: its first calls were dead letters, sent again under new ids, and ran once
        firsts = [c for c in sent if c.build_id == back and c.iteration == 1]
        assert len({c.call_id for c in firsts}) < len(firsts) == len({c.event_id for c in firsts})
        assert [c for c, n in collections.Counter(ran).items() if n > 1] == []
        # `lost`: sent once and retried once (KILN_AGENT_WATCHDOG_RETRIES), then failed
        lost_calls = [c for c in sent if c.build_id == lost]
        per_call = collections.Counter(c.call_id for c in lost_calls)
        assert set(per_call.values()) == {2}
        await until(lambda: any(isinstance(e, BuildFailed) for e in events), what="BuildFailed")
        [failed] = [e for e in events if isinstance(e, BuildFailed)]
        assert (failed.build_id, failed.reason, failed.iterations) == (lost, "stalled", 1)
        assert "no result for" in failed.detail and "retried 1 time" in failed.detail
        state = json.loads(await pg.fetchval("SELECT state FROM builds WHERE build_id = $1", lost))
        assert state["detail"].startswith("stalled: no progress for")
        # and every one of those ToolCalls is a dead letter, with its reason
        nc = Client()
        await nc.connect(own_nats)
        try:
            letters = await list_dead_letters(nc, service="sandbox", kind="tool_call")
        finally:
            await nc.close()
        dead = len(lost_calls) + len(firsts) - len({c.call_id for c in firsts})
        assert len(letters) == dead
        assert all("API key was refused" in d.reason for d in letters)
    finally:
        agent.kill()
        ws.close()
        await sandbox.stop()
