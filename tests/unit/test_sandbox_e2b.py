"""The E2B adapter's lifecycle and snapshot paths against ``FakeE2B`` (the SDK surface it uses),
and the service on top of it: a sandbox that disappears mid-build is restored from the latest
snapshot and the call completes. Blobs come from (and go to) a small HTTP server on this host,
fetched by ``curl`` inside the (fake) sandbox as on E2B."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kiln_contracts import (
    Download,
    ProcessExited,
    RestorePlanReply,
    SandboxRestored,
    SandboxStarted,
    SandboxStopped,
    SnapshotSaved,
    ToolCall,
    ToolResult,
)
from kiln_devstack.sandbox import FakeE2B, MemoryRegistry
from kiln_sandbox.adapters.e2b import E2BProvider
from kiln_sandbox.bootstrap import ConfigError, make_provider
from kiln_sandbox.handlers import SandboxService
from kiln_sandbox.ports import SandboxError, SandboxGone
from kiln_sandbox.settings import SandboxSettings
from kiln_sandbox.workspace import Workspace
from tests.unit.test_sandbox_handlers import (
    FakeBus,
    FakeCalls,
    FakeRestorer,
    _until_gone,
    _wait_for,
)


class Blobs(ThreadingHTTPServer):
    store: dict[str, bytes]


class _Handler(BaseHTTPRequestHandler):
    server: Blobs

    def do_GET(self) -> None:
        data = self.server.store.get(self.path)
        self.send_response(200 if data is not None else 404)
        self.send_header("Content-Length", str(len(data or b"")))
        self.end_headers()
        self.wfile.write(data or b"")

    def do_PUT(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.server.store[self.path] = self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def blobs() -> Iterator[tuple[str, dict[str, bytes]]]:
    server = Blobs(("127.0.0.1", 0), _Handler)
    server.store = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.store
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake(tmp_path: Path) -> FakeE2B:
    return FakeE2B(tmp_path / "e2b")


def provider(fake: FakeE2B, **kw: Any) -> E2BProvider:
    return E2BProvider(api_key="e2b_test", sdk=fake, **kw)


def test_e2b_needs_an_api_key_with_a_clear_error(monkeypatch):
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="E2B_API_KEY"):
        make_provider(SandboxSettings(sandbox_provider="e2b"))
    made = make_provider(
        SandboxSettings(sandbox_provider="e2b", e2b_api_key="k", e2b_template="node")
    )
    assert isinstance(made, E2BProvider) and made.template == "node"


async def test_create_connect_pause_kill_and_gone(fake):
    p = provider(fake, template="kiln-node", idle_timeout_s=600)
    sb = await p.create("b1", user_id="u1")
    st = fake.sandboxes[sb.sandbox_id]
    assert st.metadata == {"kiln_build_id": "b1", "kiln_user_id": "u1"}
    assert st.template == "kiln-node" and st.timeout == 600
    assert fake.api_keys == {"e2b_test"}

    await sb.write("a.txt", b"hello")
    await p.pause("b1", sb.sandbox_id)
    assert st.state == "paused"
    with pytest.raises(SandboxGone):  # a handle from before the pause finds it not running
        await sb.read("a.txt")
    again = await p.connect("b1", sb.sandbox_id)  # connect resumes it, files intact
    assert st.state == "running" and await again.read("a.txt") == b"hello"

    await p.stop("b1", sb.sandbox_id)
    await p.stop("b1", sb.sandbox_id)  # idempotent
    await p.pause("b1", sb.sandbox_id)  # pausing a gone sandbox is not an error
    with pytest.raises(SandboxGone):
        await p.connect("b1", sb.sandbox_id)


async def test_a_long_command_extends_the_sandbox_timeout_first(fake):
    p = provider(fake, idle_timeout_s=60)
    sb = await p.create("b1")
    result = await sb.run("echo ok", timeout_s=120, max_output=100)
    assert result.head == b"ok\n" and result.exit_code == 0
    assert "set_timeout 180" in fake.sandboxes[sb.sandbox_id].calls


async def test_a_sandbox_killed_mid_command_is_reported_gone(fake):
    p = provider(fake)
    sb = await p.create("b1")
    running = asyncio.create_task(sb.run("sleep 30", timeout_s=60, max_output=100))
    st = fake.sandboxes[sb.sandbox_id]
    for _ in range(250):  # up to 5 s for the command to start
        if st.pgids:
            break
        await asyncio.sleep(0.02)
    fake.expire(sb.sandbox_id)
    with pytest.raises(SandboxGone):
        await asyncio.wait_for(running, timeout=10)


async def test_an_sdk_call_that_hangs_times_out_with_a_clear_error(fake, monkeypatch):
    p = provider(fake, request_timeout_s=0.1, slack_s=0.1)
    sb = await p.create("b1")

    async def hang(*args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(30)

    monkeypatch.setattr(fake, "connect", hang)
    with pytest.raises(SandboxError, match="no answer from E2B"):
        await p.connect("b1", sb.sandbox_id)


async def test_manifest_and_upload_run_inside_the_sandbox(fake, blobs):
    base, store = blobs
    p = provider(fake)
    sb = Workspace(await p.create("b1"))
    await sb.write("src/app.py", b"print('hi')\n")
    await sb.write("node_modules/x/big.js", b"x")
    await sb.write("weird name.txt", b"spaces\n")
    await sb.run("chmod 755 src/app.py", timeout_s=10, max_output=100)

    entries = await sb.manifest(["node_modules"])
    assert [(e.path, e.size, e.mode) for e in entries] == [
        ("src/app.py", 12, 0o755),
        ("weird name.txt", 7, 0o644),
    ]
    digest = hashlib.sha256(b"print('hi')\n").hexdigest()
    assert entries[0].sha256 == digest

    assert await sb.upload("src/app.py", digest, f"{base}/blob/{digest}") == 12
    assert store[f"/blob/{digest}"] == b"print('hi')\n"
    with pytest.raises(SandboxError, match="changed since the manifest"):
        await sb.upload("src/app.py", "0" * 64, f"{base}/blob/zero")
    with pytest.raises(SandboxError, match="outside"):
        await sb.upload("../x", digest, f"{base}/blob/x")


def _call(build_id: str, call_id: str, command: str) -> ToolCall:
    return ToolCall(
        build_id=build_id,
        user_id="u1",
        call_id=call_id,
        iteration=1,
        tool="bash",
        input={"command": command},
    )


async def test_a_sandbox_that_disappears_mid_build_is_restored_and_the_call_completes(
    fake, blobs, uid
):
    base, store = blobs
    content = b"restored from the snapshot\n"
    digest = hashlib.sha256(content).hexdigest()
    store[f"/blob/{digest}"] = content
    plan = RestorePlanReply(
        snapshot_id="snap-9",
        files=[Download(path="src/a.txt", sha256=digest, mode=0o600, url=f"{base}/blob/{digest}")],
    )
    restorer = FakeRestorer(plan)
    bus = FakeBus()
    svc = SandboxService(provider(fake), MemoryRegistry(), FakeCalls(), bus, restorer)
    build_id = f"b{uid}"

    first = await svc.handle_tool_call(_call(build_id, "c1", "mkdir src; echo v1 > src/a.txt"))
    assert not first.is_error, first.output
    record = await svc.registry.get(build_id)
    assert record is not None and record.provider == "e2b"
    assert len(bus.of(SandboxStarted)) == 1 and restorer.asked == []

    fake.expire(record.sandbox_id)  # E2B's timeout, a crash, a kill: it is gone, with its files

    second = await svc.handle_tool_call(
        _call(build_id, "c2", "cat src/a.txt; stat -c %a src/a.txt")
    )
    assert not second.is_error, second.output
    assert second.output == "restored from the snapshot\n600\n"
    assert restorer.asked == [build_id]
    restored = bus.of(SandboxRestored)
    assert len(restored) == 1 and restored[0].from_snapshot == "snap-9"
    assert restored[0].provider == "e2b" and restored[0].sandbox_id != record.sandbox_id
    now = await svc.registry.get(build_id)
    assert now is not None and now.sandbox_id == restored[0].sandbox_id and now.state == "running"
    assert [r.call_id for r in bus.of(ToolResult)] == ["c1", "c2"]


async def test_sleep_pauses_and_final_kills_the_e2b_sandbox(fake, uid):
    bus = FakeBus()
    svc = SandboxService(provider(fake), MemoryRegistry(), FakeCalls(), bus)
    build_id = f"b{uid}"
    await svc.handle_tool_call(_call(build_id, "c1", "echo hi > a.txt"))
    record = await svc.registry.get(build_id)
    assert record is not None
    st = fake.sandboxes[record.sandbox_id]

    def saved(reason: str, snapshot_id: str) -> SnapshotSaved:
        return SnapshotSaved(
            build_id=build_id,
            user_id="u1",
            snapshot_id=snapshot_id,
            iteration=1,
            reason=reason,
            files=1,
            bytes_total=3,
            bytes_uploaded=3,
        )

    await svc.handle_snapshot_saved(saved("sleep", "s1"))
    assert st.state == "paused"
    woke = await svc.handle_tool_call(_call(build_id, "c2", "cat a.txt"))  # resumes it
    assert woke.output == "hi\n" and st.state == "running"
    await svc.handle_snapshot_saved(saved("final", "s2"))
    assert st.state == "killed"
    assert [e.reason for e in bus.of(SandboxStopped)] == [
        "build sleeping (snapshot s1)",
        "final snapshot s2 saved",
    ]


class SlowFirstCreate(E2BProvider):
    """The first ``create`` waits until the test lets it go on."""

    def __init__(self, fake: FakeE2B) -> None:
        super().__init__(api_key="e2b_test", sdk=fake)
        self.creating = asyncio.Event()
        self.go_on = asyncio.Event()

    async def create(self, build_id: str, *, user_id: str = "") -> Any:
        if not self.creating.is_set():
            self.creating.set()
            await self.go_on.wait()
        return await super().create(build_id, user_id=user_id)


async def test_two_replicas_making_a_builds_sandbox_at_once_keep_one(fake):
    """Parallel calls of one build on two replicas, both finding no sandbox: the one recorded
    first is the build's; the other replica stops its own and runs its call in that one."""
    registry, calls = MemoryRegistry(), FakeCalls()
    slow = SlowFirstCreate(fake)
    one = SandboxService(slow, registry, calls, FakeBus(), owner="one")
    two = SandboxService(provider(fake), registry, calls, FakeBus(), owner="two")

    def write(call_id: str, name: str) -> ToolCall:
        return ToolCall(
            build_id="b1", user_id="u1", call_id=call_id, iteration=1, tool="write_file",
            input={"path": name, "content": call_id},
        )  # fmt: skip

    first = asyncio.create_task(one.handle_tool_call(write("c1", "one.txt")))
    await slow.creating.wait()
    done = await two.handle_tool_call(write("c2", "two.txt"))  # makes and records its own
    assert not done.is_error
    slow.go_on.set()
    result = await first
    assert not result.is_error, result.output

    record = await registry.get("b1")
    assert record is not None and record.state == "running"
    alive = [i for i, st in fake.sandboxes.items() if st.state == "running"]
    assert alive == [record.sandbox_id]  # the second one made was stopped
    kept = await provider(fake).connect("b1", record.sandbox_id)
    assert await kept.read("one.txt") == b"c1" and await kept.read("two.txt") == b"c2"


async def test_background_processes_stop_before_a_pause_and_are_lost_with_their_sandbox(fake, uid):
    bus = FakeBus()
    plan = RestorePlanReply(snapshot_id="snap-1", files=[])
    svc = SandboxService(provider(fake), MemoryRegistry(), FakeCalls(), bus, FakeRestorer(plan))
    build_id = f"b{uid}"

    def bg(call_id: str, command: str, iteration: int = 1) -> ToolCall:
        return ToolCall(
            build_id=build_id,
            user_id="u1",
            call_id=call_id,
            iteration=iteration,
            tool="bash",
            input={"command": command, "run_in_background": True},
        )

    started = await svc.handle_tool_call(bg("c1", "echo $$ > ../server.pid; exec sleep 300"))
    assert "bash_1" in started.output, started.output
    record = await svc.registry.get(build_id)
    assert record is not None and record.has_processes
    home = fake.sandboxes[record.sandbox_id].home
    pid = int(await _wait_for(home / "server.pid"))
    read = await svc.handle_tool_call(
        ToolCall(build_id=build_id, user_id="u1", call_id="c2", iteration=1,
                 tool="bash_output", input={"bash_id": "bash_1"})
    )  # fmt: skip
    assert "bash_1 (echo $$ > ../server.pid; exec sleep 300): running" in read.output

    sleep = SnapshotSaved(
        build_id=build_id, user_id="u1", snapshot_id="s1", iteration=1, reason="sleep",
        files=0, bytes_total=0, bytes_uploaded=0,
    )  # fmt: skip
    await svc.handle_snapshot_saved(sleep)
    await _until_gone(pid)  # stopped before the pause: E2B would freeze it, not stop it
    assert fake.sandboxes[record.sandbox_id].calls[-1] == "pause"
    assert [(e.process_id, e.how) for e in bus.of(ProcessExited)] == [("bash_1", "stopped")]

    # woken: a second process, then the sandbox disappears; the build goes on in a fresh one
    woken = await svc.handle_tool_call(bg("c3", "exec sleep 300", iteration=2))
    assert "bash_2" in woken.output
    assert "bash_1 (echo $$ > ../server.pid; exec sleep 300): build sleeping" in woken.output
    fake.expire(record.sandbox_id)
    after = await svc.handle_tool_call(_call(build_id, "c4", "echo fresh").model_copy(
        update={"iteration": 2}
    ))  # fmt: skip
    assert after.output.startswith("fresh\n"), after.output
    assert "bash_2 (exec sleep 300): its sandbox went away" in after.output
    assert "bash_1" not in after.output  # told once
    assert [(e.process_id, e.how) for e in bus.of(ProcessExited)] == [
        ("bash_1", "stopped"),
        ("bash_2", "lost"),
    ]
    gone = await svc.handle_tool_call(
        ToolCall(build_id=build_id, user_id="u1", call_id="c5", iteration=2,
                 tool="bash_output", input={"bash_id": "bash_2"})
    )  # fmt: skip
    assert "lost" in gone.output and "gone with it" in gone.output
