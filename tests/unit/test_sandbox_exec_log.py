"""The sandbox's execution log: one line per real execution, none for a repeat."""

from __future__ import annotations

import json
from pathlib import Path

from kiln_devstack.sandbox import MemoryRegistry
from kiln_sandbox.adapters.local import LocalProvider
from kiln_sandbox.handlers import SandboxService
from tests.unit.test_sandbox_handlers import FakeBus, FakeCalls, tool_call


async def test_each_execution_is_logged_once(tmp_path: Path, uid: str) -> None:
    log = tmp_path / "exec.jsonl"
    provider = LocalProvider(tmp_path / "sandboxes")
    svc = SandboxService(provider, MemoryRegistry(), FakeCalls(), FakeBus(), exec_log=log)
    try:
        first, second = tool_call(uid, "toolu_1"), tool_call(uid, "toolu_2")
        await svc.handle_tool_call(first)
        await svc.handle_tool_call(first)  # a redelivery: the stored result, no execution
        await svc.handle_tool_call(second)
    finally:
        await provider.close()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(x["build_id"], x["call_id"]) for x in lines] == [
        (first.build_id, "toolu_1"),
        (second.build_id, "toolu_2"),
    ]
    assert all(x["owner"] == svc.owner and x["tool"] == "bash" for x in lines)
