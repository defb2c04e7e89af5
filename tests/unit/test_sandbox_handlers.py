"""The sandbox service's domain with in-memory fakes (no broker, no database)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiln_contracts import (
    BuildCancelled,
    BuildFailed,
    Download,
    Envelope,
    ManifestRequest,
    PreviewAvailable,
    PreviewGone,
    ProcessExited,
    ProcessStarted,
    RestorePlanReply,
    SandboxRestored,
    SandboxStarted,
    SandboxStopped,
    SnapshotSaved,
    ToolCall,
    ToolResult,
    Upload,
    UploadRequest,
    stable_id,
)
from kiln_devstack.sandbox import MemoryRegistry
from kiln_runtime.db import waits_out_outages
from kiln_runtime.errors import RetryLater
from kiln_sandbox.adapters.local import LocalProvider, LocalSandbox
from kiln_sandbox.handlers import INTERRUPTED, SandboxService
from kiln_sandbox.ports import SandboxError
from kiln_sandbox.records import CallRecord, SandboxRecord
from kiln_sandbox.workspace import Workspace


class FakeCalls:
    """The ledger in memory; leases on a monotonic clock."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], CallRecord] = {}
        self.until: dict[tuple[str, str], float] = {}
        self.renewals: list[str] = []
        self.iterations: dict[tuple[str, str], int] = {}

    async def get(self, build_id: str, call_id: str) -> CallRecord | None:
        row = self.rows.get((build_id, call_id))
        if row is None:
            return None
        left = self.until.get((build_id, call_id), 0.0) - time.monotonic()
        return CallRecord(row.status, row.result, row.owner, max(0.0, left))

    async def begin(self, build_id: str, call_id: str, owner: str, lease_s: float) -> bool:
        if (build_id, call_id) in self.rows:
            return False
        self.rows[(build_id, call_id)] = CallRecord("started", None, owner)
        self.until[(build_id, call_id)] = time.monotonic() + lease_s
        return True

    async def claim(
        self, build_id: str, call_id: str, owner: str, lease_s: float, iteration: int = 0
    ) -> CallRecord | None:
        if await self.begin(build_id, call_id, owner, lease_s):
            self.iterations[(build_id, call_id)] = iteration
            return None
        return await self.get(build_id, call_id)

    async def last_iteration(self, build_id: str) -> int:
        return max((n for (b, _), n in self.iterations.items() if b == build_id), default=0)

    async def release(self, build_id: str, call_id: str, owner: str) -> None:
        row = self.rows.get((build_id, call_id))
        if row is not None and row.owner == owner and row.status == "started":
            del self.rows[(build_id, call_id)]
            self.iterations.pop((build_id, call_id), None)

    async def renew(self, build_id: str, call_id: str, owner: str, lease_s: float) -> None:
        self.renewals.append(call_id)
        row = self.rows.get((build_id, call_id))
        if row is not None and row.owner == owner and row.status == "started":
            self.until[(build_id, call_id)] = time.monotonic() + lease_s

    async def finish(self, build_id: str, call_id: str, result: dict[str, Any]) -> None:
        owner = self.rows[(build_id, call_id)].owner
        self.rows[(build_id, call_id)] = CallRecord("done", result, owner)


class FakeBus:
    def __init__(self) -> None:
        self.published: list[Envelope] = []

    async def publish(self, msg: Envelope) -> None:
        self.published.append(msg)

    def of(self, cls: type) -> list[Any]:
        return [m for m in self.published if isinstance(m, cls)]


@pytest.fixture
async def svc(tmp_path: Path):
    provider = LocalProvider(tmp_path / "sandboxes")
    service = SandboxService(provider, MemoryRegistry(), FakeCalls(), FakeBus())
    yield service
    await provider.close()


def bus(svc: SandboxService) -> FakeBus:
    assert isinstance(svc.bus, FakeBus)
    return svc.bus


def workspace_file(svc: SandboxService, build_id: str, name: str) -> str | None:
    assert isinstance(svc.provider, LocalProvider)
    path = svc.provider.root / build_id / name
    return path.read_text() if path.exists() else None


def tool_call(uid: str, call_id: str = "toolu_1", **fields: Any) -> ToolCall:
    fields.setdefault("tool", "bash")
    fields.setdefault("input", {"command": "echo line >> log.txt; wc -l < log.txt"})
    fields.setdefault("iteration", 1)
    return ToolCall(build_id=f"b{uid}", user_id="u1", call_id=call_id, **fields)


async def test_first_call_creates_the_sandbox_and_publishes_the_result(svc, uid):
    call = tool_call(uid)
    result = await svc.handle_tool_call(call)
    assert result.event_id == stable_id(call.build_id, "tool_result", call.call_id)
    assert result.causation_id == call.event_id
    assert result.output.strip() == "1" and result.exit_code == 0
    assert result.files_changed == ["log.txt"]
    started = bus(svc).of(SandboxStarted)
    assert len(started) == 1 and started[0].provider == "local"
    assert bus(svc).of(ToolResult) == [result]
    record = await svc.registry.get(call.build_id)
    assert record is not None and record.state == "running"


async def test_the_same_call_twice_runs_once_and_republishes_the_same_result(svc, uid):
    call = tool_call(uid)
    first = await svc.handle_tool_call(call)
    again = await svc.handle_tool_call(call)
    redelivered_with_new_id = await svc.handle_tool_call(call.with_id(stable_id("other", uid)))
    assert first == again == redelivered_with_new_id
    assert workspace_file(svc, call.build_id, "log.txt") == "line\n"
    assert len(bus(svc).of(SandboxStarted)) == 1
    assert [r.event_id for r in bus(svc).of(ToolResult)] == [first.event_id] * 3


async def test_a_result_is_stored_through_a_store_outage_not_lost_to_interrupted(svc, uid):
    calls = svc.calls
    finish = calls.finish
    down = [ConnectionRefusedError("Connect call failed"), ConnectionResetError("reset")]

    async def flaky(build_id: str, call_id: str, result: dict[str, Any]) -> None:
        if down:  # Postgres down for the first two tries
            raise down.pop()
        await finish(build_id, call_id, result)

    calls.finish = waits_out_outages(flaky)  # as PgCallStore.finish does
    call = tool_call(uid)
    result = await svc.handle_tool_call(call)
    assert not down and result.output.strip() == "1" and not result.is_error
    again = await svc.handle_tool_call(call)  # a redelivery: the stored result, not "interrupted"
    assert again == result and workspace_file(svc, call.build_id, "log.txt") == "line\n"


async def test_a_call_found_started_is_reported_interrupted_not_rerun(svc, uid):
    call = tool_call(uid)
    await svc.calls.begin(call.build_id, call.call_id, "dead-replica", 0.0)  # crashed mid-run
    result = await svc.handle_tool_call(call)
    assert result.is_error and result.output == INTERRUPTED
    assert result.event_id == stable_id(call.build_id, "tool_result", call.call_id)
    assert workspace_file(svc, call.build_id, "log.txt") is None
    # and from now on that error is the stored result
    assert await svc.handle_tool_call(call) == result


async def test_a_call_this_replica_claimed_but_never_began_is_run_on_its_redelivery(svc, uid):
    call = tool_call(uid)
    registry_get = svc.registry.get
    release = svc.calls.release
    down = [ConnectionResetError("the database went away")]

    async def flaky_get(build_id: str):  # type: ignore[no-untyped-def]
        if down:
            raise down.pop()
        return await registry_get(build_id)

    async def no_release(*args: Any) -> None:
        raise ConnectionRefusedError("the database is down")

    # the first delivery: claimed, then the database goes: nothing run, the claim not given back
    svc.registry.get, svc.calls.release = flaky_get, no_release
    with pytest.raises(ConnectionError):
        await svc.handle_tool_call(call)
    assert workspace_file(svc, call.build_id, "log.txt") is None
    svc.calls.release = release
    # its redelivery to the same replica: run now, not reported interrupted
    result = await svc.handle_tool_call(call)
    assert not result.is_error and result.output.strip() == "1"
    # another replica (or this one after a restart) finding a claim of this one's: interrupted
    other = tool_call(uid, call_id="toolu_2")
    await svc.calls.begin(other.build_id, other.call_id, svc.owner, 0.0)
    svc._begun.add((other.build_id, other.call_id))  # it began to run it, then lost the result
    assert (await svc.handle_tool_call(other)).output == INTERRUPTED


class SlowToCreate(LocalProvider):
    """Creating a sandbox waits until the test lets it go on."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.creating = asyncio.Event()
        self.go_on = asyncio.Event()

    async def create(self, build_id: str, *, user_id: str = "") -> LocalSandbox:
        self.creating.set()
        await self.go_on.wait()
        return await super().create(build_id, user_id=user_id)


async def test_a_crash_while_the_sandbox_is_created_leaves_the_call_to_be_run(tmp_path, uid):
    calls, registry = FakeCalls(), MemoryRegistry()
    slow = SlowToCreate(tmp_path / "a")
    first = SandboxService(slow, registry, calls, FakeBus(), owner="replica-a")
    second = SandboxService(LocalProvider(tmp_path / "b"), registry, calls, FakeBus(), owner="b")
    call = tool_call(uid)
    stuck = asyncio.create_task(first.handle_tool_call(call))
    await slow.creating.wait()
    # Were replica-a SIGKILLed now, nothing says the call started: its redelivery runs it.
    assert await calls.get(call.build_id, call.call_id) is None
    result = await second.handle_tool_call(call)
    assert not result.is_error and result.output.strip() == "1"
    # replica-a, let go on, finds the call taken and asks for a redelivery, which republishes.
    slow.go_on.set()
    with pytest.raises(RetryLater):
        await stuck
    assert await first.handle_tool_call(call) == result
    assert workspace_file(second, call.build_id, "log.txt") == "line\n"
    await slow.close()
    await second.provider.close()


async def test_calls_to_a_stopped_build_are_not_run(svc, uid):
    await svc.handle_tool_call(tool_call(uid, "c1", input={"command": "true"}))
    await svc.handle_build_ended(
        BuildCancelled(
            build_id=f"b{uid}", user_id="u1", reason="user", iterations=1, cost_micro_usd=0
        )
    )
    result = await svc.handle_tool_call(tool_call(uid, "c2"))
    assert result.is_error and "stopped" in result.output
    assert workspace_file(svc, f"b{uid}", "log.txt") is None


async def test_sleep_pauses_final_stops_and_both_are_idempotent(svc, uid):
    call = tool_call(uid)
    await svc.handle_tool_call(call)

    def snap(reason: str) -> SnapshotSaved:
        return SnapshotSaved(
            build_id=call.build_id,
            user_id="u1",
            snapshot_id=f"s-{reason}",
            iteration=1,
            reason=reason,  # type: ignore[arg-type]
            files=1,
            bytes_total=5,
            bytes_uploaded=5,
        )

    await svc.handle_snapshot_saved(snap("files_changed"))
    assert bus(svc).of(SandboxStopped) == []

    sleep = snap("sleep")
    await svc.handle_snapshot_saved(sleep)
    await svc.handle_snapshot_saved(sleep)
    assert (await svc.registry.get(call.build_id)).state == "paused"
    assert len(bus(svc).of(SandboxStopped)) == 1

    # a woken build's next call resumes the same sandbox (no new SandboxStarted)
    await svc.handle_tool_call(tool_call(uid, "c2", input={"command": "cat log.txt"}))
    assert (await svc.registry.get(call.build_id)).state == "running"
    assert len(bus(svc).of(SandboxStarted)) == 1

    final = snap("final")
    await svc.handle_snapshot_saved(final)
    await svc.handle_snapshot_saved(final)
    stopped = bus(svc).of(SandboxStopped)
    assert len(stopped) == 2 and "final" in stopped[-1].reason
    assert (await svc.registry.get(call.build_id)).state == "stopped"
    # the local provider keeps the workspace for downloads
    assert workspace_file(svc, call.build_id, "log.txt") == "line\n"


async def test_build_failed_stops_the_sandbox(svc, uid):
    await svc.handle_tool_call(tool_call(uid, input={"command": "true"}))
    failed = BuildFailed(
        build_id=f"b{uid}", user_id="u1", reason="internal", iterations=1, cost_micro_usd=0
    )
    await svc.handle_build_ended(failed)
    await svc.handle_build_ended(failed)
    assert len(bus(svc).of(SandboxStopped)) == 1
    # a build without a sandbox: nothing to stop, nothing published
    await svc.handle_build_ended(failed.model_copy(update={"build_id": f"x{uid}"}))
    assert len(bus(svc).of(SandboxStopped)) == 1


async def test_a_vanished_workspace_is_replaced_by_a_fresh_sandbox(svc, uid):
    await svc.handle_tool_call(tool_call(uid, "c1", input={"command": "true"}))
    await svc.registry.put(SandboxRecord(f"b{uid}", "local", "gone-sandbox", "running"))
    result = await svc.handle_tool_call(tool_call(uid, "c2", input={"command": "echo ok"}))
    assert result.output.strip() == "ok"
    assert (await svc.registry.get(f"b{uid}")).sandbox_id == f"b{uid}"


async def test_manifest_and_upload_errors(svc, uid):
    reply = await svc.manifest(ManifestRequest(build_id=f"none{uid}"))
    assert not reply.ok and "no sandbox" in reply.error

    call = tool_call(
        uid,
        input={"command": "mkdir -p a __pycache__ && echo hi > a/x.txt && echo c > __pycache__/c"},
    )
    await svc.handle_tool_call(call)
    reply = await svc.manifest(ManifestRequest(build_id=call.build_id, excludes=["__pycache__"]))
    assert reply.ok, reply.error
    assert [(e.path, e.size, e.sha256, e.mode) for e in reply.entries] == [
        ("a/x.txt", 3, hashlib.sha256(b"hi\n").hexdigest(), 0o644),
    ]

    bad = await svc.upload(
        UploadRequest(
            build_id=call.build_id,
            uploads=[Upload(path="a/x.txt", sha256="0" * 64, url="http://127.0.0.1:9/x")],
        )
    )
    assert not bad.ok and "changed since the manifest" in bad.error and bad.uploaded == 0
    escape = await svc.upload(
        UploadRequest(
            build_id=call.build_id,
            uploads=[Upload(path="../x", sha256="0" * 64, url="http://127.0.0.1:9/x")],
        )
    )
    assert not escape.ok and "outside" in escape.error


class FakeRestorer:
    def __init__(self, plan: RestorePlanReply | None) -> None:
        self.plan = plan
        self.asked: list[str] = []

    async def restore_plan(self, build_id: str) -> RestorePlanReply | None:
        self.asked.append(build_id)
        return self.plan


async def test_a_gone_sandbox_is_restored_from_the_latest_snapshot(tmp_path, uid):
    blobs = {"/blob/a": b"restored\n", "/blob/run": b"#!/bin/sh\necho hi\n"}
    http = httpx.AsyncClient(
        transport=httpx.MockTransport(
            lambda req: (
                httpx.Response(200, content=blobs[req.url.path])
                if req.url.path in blobs
                else httpx.Response(404)
            )
        )
    )
    provider = LocalProvider(tmp_path / "sandboxes", http=http)
    plan = RestorePlanReply(
        snapshot_id="snap-7",
        files=[
            Download(
                path="src/a.txt",
                sha256=hashlib.sha256(blobs["/blob/a"]).hexdigest(),
                mode=0o644,
                url="http://s3.test/blob/a",
            ),
            Download(
                path="run.sh",
                sha256=hashlib.sha256(blobs["/blob/run"]).hexdigest(),
                mode=0o755,
                url="http://s3.test/blob/run",
            ),
        ],
    )
    restorer = FakeRestorer(plan)
    svc = SandboxService(provider, MemoryRegistry(), FakeCalls(), FakeBus(), restorer)
    try:
        # a brand-new build: nothing to restore, no question asked
        await svc.handle_tool_call(tool_call(uid, "c1", input={"command": "true"}))
        assert restorer.asked == []
        await svc.registry.put(SandboxRecord(f"b{uid}", "local", "expired", "running"))
        result = await svc.handle_tool_call(
            tool_call(uid, "c2", input={"command": "cat src/a.txt && ./run.sh"})
        )
        assert result.output == "restored\nhi\n", result.output
        assert restorer.asked == [f"b{uid}"]
        restored = bus(svc).of(SandboxRestored)
        assert len(restored) == 1 and restored[0].from_snapshot == "snap-7"

        # a corrupt blob fails the restore before the call is recorded: it is retried, not lost
        plan2 = plan.model_copy(
            update={"files": [plan.files[0].model_copy(update={"sha256": "0" * 64})]}
        )
        svc.restorer = FakeRestorer(plan2)
        await svc.registry.put(SandboxRecord(f"b{uid}", "local", "expired-again", "running"))
        with pytest.raises(SandboxError, match="sha256"):
            await svc.handle_tool_call(tool_call(uid, "c3", input={"command": "true"}))
        assert await svc.calls.get(f"b{uid}", "c3") is None
    finally:
        await provider.close()


async def test_cancelling_a_build_kills_its_running_command(svc, uid):
    call = tool_call(uid, input={"command": "echo started; sleep 60"}, timeout_s=120)
    running = asyncio.create_task(svc.handle_tool_call(call))
    for _ in range(200):
        if await svc.registry.get(call.build_id) is not None and svc.provider._groups:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.02)
    await svc.handle_build_ended(
        BuildCancelled(
            build_id=call.build_id, user_id="u1", reason="user", iterations=1, cost_micro_usd=0
        )
    )
    result = await asyncio.wait_for(running, timeout=10)
    assert result.exit_code == -9 and "started" in result.output


async def test_a_redelivery_to_a_second_replica_waits_while_the_first_still_runs_it(tmp_path, uid):
    provider = LocalProvider(tmp_path / "sandboxes")
    registry, calls = MemoryRegistry(), FakeCalls()
    first = SandboxService(provider, registry, calls, FakeBus(), owner="replica-1", lease_s=0.3)
    second_bus = FakeBus()
    second = SandboxService(provider, registry, calls, second_bus, owner="replica-2", lease_s=0.3)
    call = tool_call(uid, input={"command": "sleep 1; echo ran >> runs.txt"})
    try:
        running = asyncio.create_task(first.handle_tool_call(call))
        for _ in range(250):
            if await calls.get(call.build_id, call.call_id) is not None:
                break
            await asyncio.sleep(0.02)
        # the lease (0.3 s) is renewed while the 1 s command runs: never reported interrupted
        retries = 0
        while not running.done():
            with pytest.raises(RetryLater) as err:
                await second.handle_tool_call(call)
            assert 0 < err.value.delay_s <= 0.6
            retries += 1
            await asyncio.sleep(0.1)
        assert retries >= 3
        done = await running
        assert not done.is_error and workspace_file(first, call.build_id, "runs.txt") == "ran\n"
        assert await second.handle_tool_call(call) == done  # the stored result, not a re-run
        assert workspace_file(first, call.build_id, "runs.txt") == "ran\n"

        # a replica that died mid-run: retried until its lease runs out, then "interrupted"
        ghost = tool_call(uid, "toolu_ghost")
        await calls.begin(ghost.build_id, ghost.call_id, "replica-dead", 0.3)
        with pytest.raises(RetryLater):
            await second.handle_tool_call(ghost)
        deadline = time.monotonic() + 5
        while True:
            try:
                result = await second.handle_tool_call(ghost)
                break
            except RetryLater:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert result.is_error and result.output == INTERRUPTED
    finally:
        await provider.close()


class FlakyBus(FakeBus):
    """A bus whose first publish fails after the ledger was written (a crash in between)."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def publish(self, msg: Envelope) -> None:
        if self.failures and isinstance(msg, ToolResult):
            self.failures -= 1
            raise ConnectionError("the stream did not answer")
        await super().publish(msg)


async def test_a_result_stored_but_not_published_is_republished_with_its_event_id(tmp_path, uid):
    provider = LocalProvider(tmp_path / "sandboxes")
    calls, flaky = FakeCalls(), FlakyBus()
    svc = SandboxService(provider, MemoryRegistry(), calls, flaky)
    call = tool_call(uid)
    try:
        with pytest.raises(ConnectionError):
            await svc.handle_tool_call(call)
        stored = await calls.get(call.build_id, call.call_id)
        assert stored is not None and stored.status == "done"  # 'done' before the publish
        result = await svc.handle_tool_call(call)  # the redelivery
    finally:
        await provider.close()
    assert flaky.of(ToolResult) == [result]
    assert result.event_id == stable_id(call.build_id, "tool_result", call.call_id)
    assert result.output.strip() == "1"  # the stored result of the one run
    assert workspace_file(svc, call.build_id, "log.txt") == "line\n"


async def test_the_lease_is_renewed_only_for_a_call_still_running_after_a_third_of_it(
    tmp_path, uid
):
    provider = LocalProvider(tmp_path / "sandboxes")
    calls = FakeCalls()
    svc = SandboxService(provider, MemoryRegistry(), calls, FakeBus(), lease_s=0.6)
    try:
        await svc.handle_tool_call(tool_call(uid, "quick", input={"command": "true"}))
        await svc.handle_tool_call(tool_call(uid, "slow", input={"command": "sleep 0.7"}))
    finally:
        await provider.close()
    assert "quick" not in calls.renewals
    assert calls.renewals.count("slow") >= 2


def final_snapshot(build_id: str, iteration: int, snapshot_id: str = "s-final") -> SnapshotSaved:
    return SnapshotSaved(
        build_id=build_id,
        user_id="u1",
        snapshot_id=snapshot_id,
        iteration=iteration,
        reason="final",
        files=1,
        bytes_total=5,
        bytes_uploaded=5,
    )


async def test_a_continued_build_gets_a_fresh_sandbox_restored_from_its_final_snapshot(
    tmp_path, uid
):
    blob = b"from the final snapshot\n"
    http = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda req: httpx.Response(200, content=blob))
    )
    provider = LocalProvider(tmp_path / "sandboxes", http=http)
    plan = RestorePlanReply(
        snapshot_id="s-final",
        files=[
            Download(path="kept.txt", sha256=hashlib.sha256(blob).hexdigest(), mode=0o644,
                     url="http://s3.test/blob")
        ],
    )  # fmt: skip
    restorer = FakeRestorer(plan)
    svc = SandboxService(provider, MemoryRegistry(), FakeCalls(), FakeBus(), restorer)
    build = f"b{uid}"
    try:
        await svc.handle_tool_call(tool_call(uid, "c1", input={"command": "true"}, iteration=3))
        await svc.handle_snapshot_saved(final_snapshot(build, 4))  # completed at iteration 4
        stopped = await svc.registry.get(build)
        assert stopped is not None and (stopped.state, stopped.iteration) == ("stopped", 4)
        # a call of the run that ended is still not run
        late = await svc.handle_tool_call(tool_call(uid, "c-late", iteration=4))
        assert late.is_error and "stopped" in late.output
        # the build continued: iteration 5 runs in a fresh sandbox with the final snapshot's files
        result = await svc.handle_tool_call(
            tool_call(uid, "c5", input={"command": "cat kept.txt"}, iteration=5)
        )
        assert (result.is_error, result.output) == (False, "from the final snapshot\n")
        assert restorer.asked == [build]
        [restored] = bus(svc).of(SandboxRestored)
        assert restored.from_snapshot == "s-final"
        running = await svc.registry.get(build)
        assert running is not None and (running.state, running.iteration) == ("running", None)
        # its own end stops it again, with its own iteration
        await svc.handle_snapshot_saved(final_snapshot(build, 6, "s-final-2"))
        again = await svc.registry.get(build)
        assert again is not None and (again.state, again.iteration) == ("stopped", 6)
        assert len(bus(svc).of(SandboxStopped)) == 2
    finally:
        await provider.close()


async def test_an_end_that_comes_after_the_build_continued_leaves_its_sandbox_running(svc, uid):
    build = f"b{uid}"
    await svc.handle_tool_call(tool_call(uid, "c1", input={"command": "true"}, iteration=2))
    # the continuation's first call runs before the first run's final snapshot is handled
    await svc.handle_tool_call(tool_call(uid, "c4", input={"command": "true"}, iteration=4))
    await svc.handle_snapshot_saved(final_snapshot(build, 3))
    await svc.handle_build_ended(
        BuildCancelled(build_id=build, user_id="u1", reason="r", iterations=3, cost_micro_usd=0)
    )
    record = await svc.registry.get(build)
    assert record is not None and record.state == "running"
    assert bus(svc).of(SandboxStopped) == []
    assert not (await svc.handle_tool_call(tool_call(uid, "c5", iteration=5))).is_error


# ---------------------------------------------------------------------------- background processes


def _background(uid: str, call_id: str, command: str, iteration: int = 1) -> ToolCall:
    return tool_call(
        uid, call_id, input={"command": command, "run_in_background": True}, iteration=iteration
    )


async def _wait_for(path: Path) -> str:
    deadline = time.monotonic() + 20
    while not (text := await asyncio.to_thread(_text, path)).strip():
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.05)
    return text


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] == "Z"


async def _until_gone(pid: int) -> None:
    deadline = time.monotonic() + 20
    while not _gone(pid):
        assert time.monotonic() < deadline, f"process {pid} is still running"
        await asyncio.sleep(0.05)


async def test_a_redelivered_call_that_started_a_process_starts_no_second_one(svc, uid):
    call = _background(uid, "bg1", "echo $$ >> pids.txt; exec sleep 300")
    first = await svc.handle_tool_call(call)
    assert "bash_1" in first.output and not first.is_error
    again = await svc.handle_tool_call(call)
    assert again == first
    root = svc.provider.root / f"b{uid}"  # type: ignore[attr-defined]
    pids = (await _wait_for(root / "pids.txt")).split()
    assert len(pids) == 1
    assert [e.process_id for e in bus(svc).of(ProcessStarted)] == ["bash_1"]
    record = await svc.registry.get(f"b{uid}")
    assert record is not None and record.has_processes
    # the build's end stops it, once
    failed = BuildFailed(
        build_id=f"b{uid}", user_id="u1", reason="internal", iterations=1, cost_micro_usd=0
    )
    await svc.handle_build_ended(failed)
    await svc.handle_build_ended(failed)
    await _until_gone(int(pids[0]))
    assert [(e.process_id, e.how) for e in bus(svc).of(ProcessExited)] == [("bash_1", "stopped")]


async def test_an_interrupted_call_that_started_a_process_says_which(svc, uid):
    call = _background(uid, "bg1", "sleep 300")
    await svc.handle_tool_call(call)
    svc.calls.rows.pop((call.build_id, call.call_id))  # type: ignore[attr-defined]
    await svc.calls.begin(call.build_id, call.call_id, "dead-replica", 0.0)  # type: ignore[attr-defined]
    result = await svc.handle_tool_call(call)
    assert result.is_error and result.output.startswith(INTERRUPTED)
    assert "background process bash_1" in result.output and "kill_shell" in result.output
    await svc.processes.stop_all(None, call, "test over")


async def test_sleep_stops_processes_and_the_call_after_the_wake_is_told(svc, uid):
    await svc.handle_tool_call(_background(uid, "bg1", "echo $$ > server.pid; exec sleep 300"))
    root = svc.provider.root / f"b{uid}"  # type: ignore[attr-defined]
    pid = int(await _wait_for(root / "server.pid"))
    out = await svc.handle_tool_call(tool_call(uid, "c2", input={"command": "echo busy"}))
    assert "no longer running" not in out.output  # nothing to report while it runs
    sleep = SnapshotSaved(
        build_id=f"b{uid}",
        user_id="u1",
        snapshot_id="s-sleep",
        iteration=1,
        reason="sleep",
        files=1,
        bytes_total=1,
        bytes_uploaded=1,
    )
    await svc.handle_snapshot_saved(sleep)
    await _until_gone(pid)
    (exited,) = bus(svc).of(ProcessExited)
    assert exited.how == "stopped" and "sleeping" in exited.reason
    # woken: the next call's result tells the model, once
    woken = await svc.handle_tool_call(
        tool_call(uid, "c3", input={"command": "echo hi"}, iteration=2)
    )
    assert woken.output.startswith("hi\n")
    assert "background processes no longer running: bash_1 (echo $$ > server.pid;" in woken.output
    later = await svc.handle_tool_call(
        tool_call(uid, "c4", input={"command": "echo hi"}, iteration=2)
    )
    assert later.output == "hi\n"


async def test_a_sandbox_that_cannot_stop_its_processes_is_still_paused(svc, uid, monkeypatch):
    await svc.handle_tool_call(_background(uid, "bg1", "exec sleep 300"))
    real = svc.processes._sh

    async def broken(*args: Any, **kwargs: Any) -> str:
        raise SandboxError("the process wrapper failed (exit 90)")

    monkeypatch.setattr(svc.processes, "_sh", broken)
    sleep = SnapshotSaved(
        build_id=f"b{uid}", user_id="u1", snapshot_id="s-sleep", iteration=1, reason="sleep",
        files=1, bytes_total=1, bytes_uploaded=1,
    )  # fmt: skip
    await svc.handle_snapshot_saved(sleep)
    record = await svc.registry.get(f"b{uid}")
    assert record is not None and record.state == "paused"
    assert len(bus(svc).of(SandboxStopped)) == 1
    assert bus(svc).of(ProcessExited) == []  # not stopped: still recorded live
    monkeypatch.setattr(svc.processes, "_sh", real)
    assert (
        await svc.processes.stop_all(
            Workspace(await svc.provider.connect(f"b{uid}", f"b{uid}")), sleep, "test over"
        )
        == 1
    )


# ---------------------------------------------------------------------------- previews


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _until_preview(svc: SandboxService, uid: str) -> PreviewAvailable:
    """Tool calls of the build until one has seen the server listen (each looks at the others)."""
    deadline = time.monotonic() + 30
    n = 0
    while not bus(svc).of(PreviewAvailable):
        assert time.monotonic() < deadline, "the server's port was never seen"
        n += 1
        await svc.handle_tool_call(tool_call(uid, f"look{n}", input={"command": "true"}))
        await asyncio.sleep(0.05)
    (seen,) = bus(svc).of(PreviewAvailable)
    return seen


async def test_a_listening_process_is_a_preview_until_the_build_sleeps(svc, uid):
    port = _free_port()
    await svc.handle_tool_call(
        _background(uid, "srv", f"exec python3 -m http.server {port} --bind 127.0.0.1")
    )
    seen = await _until_preview(svc, uid)
    assert (seen.port, seen.process_id, seen.provider) == (port, "bash_1", "local")
    assert seen.url == f"/v1/builds/b{uid}/preview/{port}/"
    assert seen.traffic_access_token is None
    # looking again sees the same port: nothing new
    await svc.handle_tool_call(tool_call(uid, "again", input={"command": "true"}))
    assert len(bus(svc).of(PreviewAvailable)) == 1 and bus(svc).of(PreviewGone) == []
    sleep = SnapshotSaved(
        build_id=f"b{uid}", user_id="u1", snapshot_id="s-sleep", iteration=1, reason="sleep",
        files=1, bytes_total=1, bytes_uploaded=1,
    )  # fmt: skip
    await svc.handle_snapshot_saved(sleep)
    (gone,) = bus(svc).of(PreviewGone)
    assert (gone.port, gone.process_id) == (port, "bash_1") and "stopped" in gone.reason
    published = bus(svc).published
    assert published.index(gone) < published.index(bus(svc).of(ProcessExited)[0])


async def test_a_port_no_longer_listened_on_is_gone_and_the_e2b_host_is_the_url(svc, uid):
    port = _free_port()
    script = (
        "import socket,time,os\n"
        f"s=socket.socket();s.bind(('127.0.0.1',{port}));s.listen()\n"
        "while not os.path.exists('close'): time.sleep(0.05)\n"
        "s.close()\ntime.sleep(300)\n"
    )
    await svc.handle_tool_call(
        tool_call(uid, "w", tool="write_file", input={"path": "srv.py", "content": script})
    )
    await svc.handle_tool_call(_background(uid, "srv", "exec python3 srv.py"))
    await _until_preview(svc, uid)
    await svc.handle_tool_call(tool_call(uid, "close", input={"command": "touch close"}))
    deadline = time.monotonic() + 30
    n = 0
    while not bus(svc).of(PreviewGone):
        assert time.monotonic() < deadline, "the closed port was never seen gone"
        n += 1
        await svc.handle_tool_call(tool_call(uid, f"gone{n}", input={"command": "true"}))
        await asyncio.sleep(0.05)
    (gone,) = bus(svc).of(PreviewGone)
    assert (gone.port, gone.reason) == (port, "no longer listening")
    assert bus(svc).of(ProcessExited) == []  # the process itself still runs
    await svc.handle_build_ended(
        BuildFailed(build_id=f"b{uid}", user_id="u1", reason="internal", iterations=1,
                    cost_micro_usd=0)
    )  # fmt: skip
    assert len(bus(svc).of(PreviewGone)) == 1  # its port was gone already


def test_the_e2b_machine_gives_the_sdks_host_and_traffic_token():
    from kiln_sandbox.adapters.e2b import E2BProvider, E2BSandbox

    class Sdk:
        sandbox_id = "sbx1"
        traffic_access_token = "tok"
        files = commands = None

        def get_host(self, port: int) -> str:
            return f"{port}-sbx1.e2b.app"

    machine = E2BSandbox(E2BProvider(api_key="k", sdk=object()), Sdk())  # type: ignore[arg-type]
    target = machine.preview(3000)
    assert (target.provider, target.url, target.traffic_access_token) == (
        "e2b", "https://3000-sbx1.e2b.app/", "tok"
    )  # fmt: skip
