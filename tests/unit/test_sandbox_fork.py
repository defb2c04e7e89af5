"""A fork's sandbox, with fakes: its first sandbox is restored from the snapshot its ToolCalls
name (``restore_from``: the restorer is asked with the fork's origin), a build that is no fork
asks nothing, and a fork's sandbox that is gone later is restored the same way (the fork's own
latest snapshot, the snapshot service's business)."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from kiln_contracts import ForkOrigin, RestorePlanReply, SandboxRestored, SandboxStarted
from kiln_contracts.rpc import Download
from kiln_devstack.sandbox import MemoryRegistry
from kiln_runtime.errors import RetryLater
from kiln_sandbox.adapters.local import LocalProvider
from kiln_sandbox.handlers import SandboxService
from kiln_sandbox.records import SandboxRecord
from tests.unit.test_sandbox_handlers import FakeBus, FakeCalls, bus, tool_call

ORIGIN = ForkOrigin(build_id="source", iteration=3, snapshot_id="snap-3")


class ForkRestorer:
    def __init__(self, plan: RestorePlanReply) -> None:
        self.plan = plan
        self.asked: list[tuple[str, ForkOrigin | None]] = []

    async def restore_plan(
        self, build_id: str, fork: ForkOrigin | None = None
    ) -> RestorePlanReply | None:
        self.asked.append((build_id, fork))
        return self.plan


async def test_a_forks_first_sandbox_is_restored_from_its_sources_snapshot(tmp_path, uid):
    data = b"from iteration 3\n"
    http = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda req: httpx.Response(200, content=data))
    )
    provider = LocalProvider(tmp_path / "sandboxes", http=http)
    plan = RestorePlanReply(
        snapshot_id="fork-first",
        files=[
            Download(
                path="app.py",
                sha256=hashlib.sha256(data).hexdigest(),
                mode=0o644,
                url="http://s3.test/blob",
            )
        ],
    )
    restorer = ForkRestorer(plan)
    svc = SandboxService(provider, MemoryRegistry(), FakeCalls(), FakeBus(), restorer)
    try:
        # a build that is no fork: a fresh, empty sandbox, nothing asked
        plain = await svc.handle_tool_call(tool_call(f"p{uid}", "c0", input={"command": "ls"}))
        assert plain.output == "(no output)" or plain.output.strip() == "", plain.output
        assert restorer.asked == []
        # the fork's first call (of iteration 4): restored first, then run
        first = tool_call(
            uid, "c1", iteration=4, input={"command": "cat app.py"}, restore_from=ORIGIN
        )
        result = await svc.handle_tool_call(first)
        assert result.output == data.decode(), result.output
        assert restorer.asked == [(f"b{uid}", ORIGIN)]
        [restored] = [m for m in bus(svc).of(SandboxRestored) if m.build_id == f"b{uid}"]
        assert restored.from_snapshot == "fork-first"
        assert not [m for m in bus(svc).of(SandboxStarted) if m.build_id == f"b{uid}"]
        # the same call again: its stored result, no second restore
        again = await svc.handle_tool_call(first)
        assert again.output == result.output and len(restorer.asked) == 1
        # gone later: restored again, with the origin still given
        await svc.registry.put(SandboxRecord(f"b{uid}", "local", "expired", "running"))
        later = tool_call(
            uid, "c2", iteration=5, input={"command": "cat app.py"}, restore_from=ORIGIN
        )
        assert (await svc.handle_tool_call(later)).output == data.decode()
        assert restorer.asked[-1] == (f"b{uid}", ORIGIN)
    finally:
        await provider.close()


async def test_a_fork_is_not_given_an_empty_sandbox_when_no_plan_comes(tmp_path, uid):
    class Silent(ForkRestorer):
        async def restore_plan(
            self, build_id: str, fork: ForkOrigin | None = None
        ) -> RestorePlanReply | None:
            self.asked.append((build_id, fork))
            return None  # no snapshot service answered

    provider = LocalProvider(tmp_path / "sandboxes")
    restorer = Silent(RestorePlanReply())
    svc = SandboxService(provider, MemoryRegistry(), FakeCalls(), FakeBus(), restorer)
    try:
        call = tool_call(uid, "c1", iteration=4, input={"command": "ls"}, restore_from=ORIGIN)
        with pytest.raises(RetryLater, match="no restore plan for fork"):
            await svc.handle_tool_call(call)
        assert await svc.calls.get(f"b{uid}", "c1") is None  # left to be run on redelivery
        assert await svc.registry.get(f"b{uid}") is None
        assert not bus(svc).published
    finally:
        await provider.close()
