"""The E2B adapter's lifecycle and snapshot paths through the real ``e2b`` SDK against the local
E2B-compatible server (``kiln_devstack.e2b_server``), and the service on top of it: a sandbox
that disappears mid-build is restored from the latest snapshot and the call completes; what the
SDK raises when a sandbox is killed, paused, unreachable or stuck is handled. Blobs come from
(and go to) a small HTTP server on this host, fetched by ``curl`` inside the sandbox as on E2B."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client import REGISTRY

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
from kiln_devstack.e2b_server import E2BServer
from kiln_devstack.sandbox import MemoryRegistry
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
async def e2b(e2b_server: E2BServer) -> AsyncIterator[E2BServer]:
    before = set(e2b_server.sandboxes)
    yield e2b_server
    for sandbox_id in set(e2b_server.sandboxes) - before:  # what the test left running
        if e2b_server.sandboxes[sandbox_id].state != "killed":
            await e2b_server.kill(sandbox_id)


def provider(server: E2BServer, **kw: Any) -> E2BProvider:
    """The adapter on the real SDK, pointed at the local server by the SDK's own settings."""
    return E2BProvider(api_key="e2b_test", api_url=server.url, sandbox_url=server.url, **kw)


def test_e2b_needs_an_api_key_with_a_clear_error(monkeypatch):
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="E2B_API_KEY"):
        make_provider(SandboxSettings(sandbox_provider="e2b"))
    made = make_provider(
        SandboxSettings(sandbox_provider="e2b", e2b_api_key="k", e2b_template="node")
    )
    assert isinstance(made, E2BProvider) and made.template == "node"


async def test_create_connect_pause_kill_and_gone(e2b):
    p = provider(e2b, template="kiln-node", idle_timeout_s=600)
    sb = await p.create("b1", user_id="u1")
    st = e2b.sandboxes[sb.sandbox_id]
    assert st.metadata == {"kiln_build_id": "b1", "kiln_user_id": "u1"}
    assert st.template == "kiln-node" and st.calls[0] == "create timeout=600"
    assert st.idempotency_key is not None and "e2b_test" in e2b.api_keys

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


async def test_a_long_command_extends_the_sandbox_timeout_first(e2b):
    p = provider(e2b, idle_timeout_s=60)
    sb = await p.create("b1")
    result = await sb.run("echo ok", timeout_s=120, max_output=100)
    assert result.head == b"ok\n" and result.exit_code == 0
    assert "set_timeout 180" in e2b.sandboxes[sb.sandbox_id].calls


async def _started(server: E2BServer, sandbox_id: str, sb: Any, command: str) -> Any:
    """A task running ``command`` in ``sb``, once the server runs it."""
    box = server.sandboxes[sandbox_id]
    before = len(box.procs)
    running = asyncio.create_task(sb.run(command, timeout_s=60, max_output=100))
    for _ in range(500):  # up to 10 s for the command to start
        if len(box.procs) > before:
            break
        await asyncio.sleep(0.02)
    return running


async def test_a_sandbox_killed_mid_command_is_reported_gone(e2b):
    p = provider(e2b)
    sb = await p.create("b1")
    running = await _started(e2b, sb.sandbox_id, sb, "sleep 30")
    await e2b.kill(sb.sandbox_id)  # the connection drops; the SDK's health probe says gone
    with pytest.raises(SandboxGone):
        await asyncio.wait_for(running, timeout=20)


async def test_a_sandbox_unreachable_mid_command_is_treated_as_gone(e2b):
    p = provider(e2b)
    sb = await p.create("b1")
    e2b.hang_health(sb.sandbox_id)  # the SDK's probe gets no answer: SandboxUnreachable
    running = await _started(e2b, sb.sandbox_id, sb, "sleep 30")
    await e2b.kill(sb.sandbox_id)
    with pytest.raises(SandboxGone, match="could not be reached"):
        await asyncio.wait_for(running, timeout=30)
    e2b.hang_health(sb.sandbox_id, False)


async def test_a_pause_from_outside_mid_command_is_treated_as_gone(e2b):
    p = provider(e2b)
    sb = await p.create("b1")
    running = await _started(e2b, sb.sandbox_id, sb, "sleep 30")
    await e2b.pause(sb.sandbox_id)  # the stream is cancelled: the SDK's TimeoutException
    with pytest.raises(SandboxGone, match="cancelled"):
        await asyncio.wait_for(running, timeout=20)
    await p.stop("b1", sb.sandbox_id)


async def test_a_stream_that_ends_without_its_end_event_is_treated_as_gone(e2b):
    p = provider(e2b)
    sb = await p.create("b1")
    running = await _started(e2b, sb.sandbox_id, sb, "sleep 30")
    e2b.drop_streams(sb.sandbox_id)
    with pytest.raises(SandboxGone, match="without its end"):
        await asyncio.wait_for(running, timeout=20)
    await p.stop("b1", sb.sandbox_id)


async def test_a_command_envd_kills_at_its_deadline_is_timed_out_and_its_group_killed(e2b):
    """The SDK does not enforce ``timeout`` itself here; envd's kill at the deadline arrives as
    exit -1 "signal: killed", which is a timed-out call, and the command's own session (out of
    envd's reach) is killed after it."""
    p = provider(e2b)
    sb = await p.create("b1")
    e2b.cut_deadlines(sb.sandbox_id, 1.0)
    result = await sb.run("echo $$ > ../cmd.pid; exec sleep 300", timeout_s=30, max_output=100)
    assert result.timed_out and result.exit_code is None
    e2b.cut_deadlines(sb.sandbox_id, None)
    probe = await sb.run(
        "kill -0 $(cat ../cmd.pid) 2>/dev/null && echo alive || echo dead", timeout_s=10,
        max_output=100,
    )  # fmt: skip
    assert probe.head == b"dead\n"
    await p.stop("b1", sb.sandbox_id)


async def test_a_chatty_login_shell_does_not_confuse_the_parsing(e2b):
    p = provider(e2b)
    sb = Workspace(await p.create("b1"))
    profile = e2b.home(sb.sandbox_id) / ".bash_profile"
    profile.write_text('echo "Welcome to the sandbox!"; echo "a motd" >&2; printf "\\0--\\0"\n')
    result = await sb.run("echo ok", timeout_s=10, max_output=100)
    assert result.head == b"ok\n" and result.exit_code == 0
    await sb.write("a.txt", b"hi\n")
    assert [e.path for e in await sb.manifest([])] == ["a.txt"]
    assert (await sb.locate("a.txt")).info is not None
    await p.stop("b1", sb.sandbox_id)


async def test_the_keep_alive_is_capped_at_the_plans_maximum_lifetime(e2b):
    p = provider(e2b, idle_timeout_s=60, max_lifetime_s=100)
    sb = await p.create("b1")
    await sb.run("echo ok", timeout_s=120, max_output=100)
    assert "set_timeout 100" in e2b.sandboxes[sb.sandbox_id].calls
    long = provider(e2b, idle_timeout_s=90_000)  # more than E2B allows: capped, not refused
    made = await long.create("b1")
    assert e2b.sandboxes[made.sandbox_id].calls[0] == "create timeout=3600"
    await p.stop("b1", sb.sandbox_id)
    await long.stop("b1", made.sandbox_id)


async def test_creation_survives_429_and_503_and_reports_a_busy_service(e2b):
    p = provider(e2b)
    before = set(e2b.sandboxes)
    e2b.refuse_creates(429, 503)  # the SDK retries (with the same idempotency key)
    sb = await p.create("b1")
    assert set(e2b.sandboxes) - before == {sb.sandbox_id}
    e2b.refuse_creates(503, 503, 503, 503)
    with pytest.raises(SandboxError, match="503"):
        await p.create("b1")
    assert set(e2b.sandboxes) - before == {sb.sandbox_id}
    await p.stop("b1", sb.sandbox_id)


async def test_an_sdk_call_that_hangs_times_out_with_a_clear_error(e2b):
    sb = await provider(e2b).create("b1")  # made at ordinary timeouts (a loaded machine)
    p = provider(e2b, request_timeout_s=0.2, slack_s=0.1)
    e2b.stalled.add("connect")
    try:
        with pytest.raises(SandboxError, match=r"no answer from E2B|timed out"):
            await p.connect("b1", sb.sandbox_id)
    finally:
        e2b.stalled.discard("connect")
    await p.stop("b1", sb.sandbox_id)


async def test_manifest_and_upload_run_inside_the_sandbox(e2b, blobs):
    base, store = blobs
    p = provider(e2b)
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

    # one command per upload (the script confines the path itself), symlinks leading out refused
    calls = e2b.sandboxes[sb.sandbox_id].calls
    before = calls.count("process.Start")
    assert await sb.upload("src/app.py", digest, f"{base}/blob/again") == 12
    assert calls.count("process.Start") - before == 1
    await sb.run("ln -s /etc/hostname out.txt", timeout_s=10, max_output=100)
    with pytest.raises(SandboxError, match="outside the workspace"):
        await sb.upload("out.txt", digest, f"{base}/blob/out")
    assert "/blob/out" not in store

    # a read is one command with its confinement (no locate first), a large file two
    ws = sb  # the build's Workspace over the E2B machine
    before = len(calls)
    found, data = await ws.fetch("src/app.py", 1 << 20)
    assert data == b"print('hi')\n" and found.real == "src/app.py"
    assert calls[before:] == ["process.Start"]
    await sb.run("head -c 1100000 /dev/zero > big.bin", timeout_s=10, max_output=100)
    before = len(calls)
    found, data = await ws.fetch("big.bin", 2 << 20)
    assert data is not None and len(data) == 1_100_000
    assert calls[before:] == ["process.Start", "files.read"]
    with pytest.raises(SandboxError, match="outside the workspace"):
        await ws.fetch("out.txt", 1 << 20)  # the symlink to /etc/hostname: nothing read
    found, data = await ws.fetch("src", 1 << 20)
    assert found.info is not None and found.info.is_dir and data is None

    # a write is one command too (a large file: located, then the file API)
    before = len(calls)
    found = await ws.store("src/new/mod.py", b"x = 1\n")
    assert found.info is None and calls[before:] == ["process.Start"]
    assert (await ws.fetch("src/new/mod.py", 1 << 10))[1] == b"x = 1\n"
    found = await ws.store("src/app.py", b"print('again')\n")  # overwritten, its mode kept
    assert found.info is not None and found.info.mode == 0o755
    assert (await ws.stat("src/app.py")).mode == 0o755  # type: ignore[union-attr]
    before = len(calls)
    await ws.store("big2.bin", b"\0" * 100_000)
    assert calls[before:] == ["process.Start", "files.write"]
    with pytest.raises(SandboxError, match="outside the workspace"):
        await ws.store("out.txt", b"no")
    with pytest.raises(SandboxError, match="outside the workspace"):
        await ws.store("../escape.txt", b"no")
    assert (await ws.store("src", b"no")).info.is_dir  # type: ignore[union-attr]


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
    e2b, blobs, uid
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
    svc = SandboxService(provider(e2b), MemoryRegistry(), FakeCalls(), bus, restorer)
    build_id = f"b{uid}"

    first = await svc.handle_tool_call(_call(build_id, "c1", "mkdir src; echo v1 > src/a.txt"))
    assert not first.is_error, first.output
    record = await svc.registry.get(build_id)
    assert record is not None and record.provider == "e2b"
    assert len(bus.of(SandboxStarted)) == 1 and restorer.asked == []

    await e2b.expire(
        record.sandbox_id
    )  # E2B's timeout, a crash, a kill: it is gone, with its files

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


async def test_a_running_sandbox_is_used_again_without_asking_the_api(e2b, uid):
    """Within the reuse window a call makes no API request before its own; each connect pushes
    the timeout past the idle time by the window, so every call still leaves the idle time. A
    pause by Kiln drops the handle (the next call resumes); a sandbox lost from outside costs
    the call in flight an error result, and the next call runs in a fresh one."""
    bus = FakeBus()
    plan = RestorePlanReply(snapshot_id="snap-1", files=[])
    p = provider(e2b, idle_timeout_s=600, reuse_s=60)
    svc = SandboxService(p, MemoryRegistry(), FakeCalls(), bus, FakeRestorer(plan))
    build_id = f"b{uid}"

    def connected(how: str) -> float:
        return REGISTRY.get_sample_value("kiln_e2b_connects_total", {"how": how}) or 0.0

    before = {how: connected(how) for how in ("reused", "api")}
    calls = [_call(build_id, f"c{i}", f"echo {i} >> log.txt") for i in range(1, 6)]
    for call in calls:
        assert not (await svc.handle_tool_call(call)).is_error
    record = await svc.registry.get(build_id)
    assert record is not None
    box = e2b.sandboxes[record.sandbox_id]

    # the first call made it; the second connected (the timeout pushed 600 + 60 s ahead); the
    # other three asked nothing
    def connects() -> list[str]:
        return [c for c in box.calls if c.startswith(("connect", "resume"))]

    assert box.calls[0] == "create timeout=600" and connects() == ["connect timeout=660"]
    assert {how: connected(how) - n for how, n in before.items()} == {"reused": 3, "api": 1}

    def saved(reason: str) -> SnapshotSaved:
        return SnapshotSaved(
            build_id=build_id, user_id="u1", snapshot_id=f"s-{reason}", iteration=1,
            reason=reason, files=1, bytes_total=10, bytes_uploaded=10,
        )  # fmt: skip

    await svc.handle_snapshot_saved(saved("sleep"))  # paused: the handle is dropped
    woke = await svc.handle_tool_call(_call(build_id, "c6", "cat log.txt"))
    assert woke.output == "1\n2\n3\n4\n5\n" and box.state == "running"
    assert connects() == ["connect timeout=660", "resume timeout=660"]

    await e2b.kill(record.sandbox_id)  # lost from outside while its handle is kept
    lost = await svc.handle_tool_call(_call(build_id, "c7", "echo seven"))
    assert lost.is_error and "went away" in lost.output, lost.output
    fresh = await svc.handle_tool_call(_call(build_id, "c8", "echo eight"))
    assert fresh.output == "eight\n" and not fresh.is_error
    restored = bus.of(SandboxRestored)
    assert len(restored) == 1 and restored[0].sandbox_id != record.sandbox_id
    await svc.handle_snapshot_saved(saved("final"))


async def test_the_reuse_window_fits_under_the_plans_maximum_lifetime(e2b):
    assert provider(e2b, idle_timeout_s=600, reuse_s=60, max_lifetime_s=3600).reuse_s == 60
    assert provider(e2b, idle_timeout_s=3570, reuse_s=60, max_lifetime_s=3600).reuse_s == 30
    short = provider(e2b, idle_timeout_s=3600, reuse_s=60, max_lifetime_s=3600)
    assert short.reuse_s == 0  # no room: every call connects
    sb = await short.create("b1")
    await short.connect("b1", sb.sandbox_id, running=True)
    await short.connect("b1", sb.sandbox_id, running=True)
    connects = [c for c in e2b.sandboxes[sb.sandbox_id].calls if c.startswith("connect")]
    assert connects == ["connect timeout=3600"] * 2
    await short.stop("b1", sb.sandbox_id)


async def test_sleep_pauses_and_final_kills_the_e2b_sandbox(e2b, uid):
    bus = FakeBus()
    svc = SandboxService(provider(e2b), MemoryRegistry(), FakeCalls(), bus)
    build_id = f"b{uid}"
    await svc.handle_tool_call(_call(build_id, "c1", "echo hi > a.txt"))
    record = await svc.registry.get(build_id)
    assert record is not None
    st = e2b.sandboxes[record.sandbox_id]

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

    def __init__(self, server: E2BServer) -> None:
        super().__init__(api_key="e2b_test", api_url=server.url, sandbox_url=server.url)
        self.creating = asyncio.Event()
        self.go_on = asyncio.Event()

    async def create(self, build_id: str, *, user_id: str = "") -> Any:
        if not self.creating.is_set():
            self.creating.set()
            await self.go_on.wait()
        return await super().create(build_id, user_id=user_id)


async def test_two_replicas_making_a_builds_sandbox_at_once_keep_one(e2b, uid):
    """Parallel calls of one build on two replicas, both finding no sandbox: the one recorded
    first is the build's; the other replica stops its own and runs its call in that one."""
    registry, calls = MemoryRegistry(), FakeCalls()
    slow = SlowFirstCreate(e2b)
    one = SandboxService(slow, registry, calls, FakeBus(), owner="one")
    two = SandboxService(provider(e2b), registry, calls, FakeBus(), owner="two")

    def write(call_id: str, name: str) -> ToolCall:
        return ToolCall(
            build_id=f"b{uid}", user_id="u1", call_id=call_id, iteration=1, tool="write_file",
            input={"path": name, "content": call_id},
        )  # fmt: skip

    first = asyncio.create_task(one.handle_tool_call(write("c1", "one.txt")))
    await slow.creating.wait()
    done = await two.handle_tool_call(write("c2", "two.txt"))  # makes and records its own
    assert not done.is_error
    slow.go_on.set()
    result = await first
    assert not result.is_error, result.output

    record = await registry.get(f"b{uid}")
    assert record is not None and record.state == "running"
    alive = [i for i in e2b.running() if e2b.sandboxes[i].metadata["kiln_build_id"] == f"b{uid}"]
    assert alive == [record.sandbox_id]  # the second one made was stopped
    kept = await provider(e2b).connect(f"b{uid}", record.sandbox_id)
    assert await kept.read("one.txt") == b"c1" and await kept.read("two.txt") == b"c2"


async def test_a_sandbox_made_but_never_recorded_is_found_by_its_metadata_and_killed(e2b, uid):
    """A replica crashed between creating a sandbox and recording it: the next creation for
    that build kills it."""
    build_id = f"b{uid}"
    orphan = await provider(e2b).create(build_id, user_id="u1")
    svc = SandboxService(provider(e2b), MemoryRegistry(), FakeCalls(), FakeBus())
    done = await svc.handle_tool_call(_call(build_id, "c1", "echo hi"))
    assert not done.is_error, done.output
    record = await svc.registry.get(build_id)
    assert record is not None and record.sandbox_id != orphan.sandbox_id
    assert e2b.sandboxes[orphan.sandbox_id].state == "killed"
    assert e2b.sandboxes[record.sandbox_id].state == "running"


async def test_a_resume_refused_as_needing_a_reboot_restores_a_fresh_sandbox(e2b, uid):
    """GuestUnresponsive on resume: that sandbox is killed, the build goes on in a fresh one
    restored from the latest snapshot."""
    plan = RestorePlanReply(snapshot_id="snap-2", files=[])
    bus, restorer = FakeBus(), FakeRestorer(plan)
    svc = SandboxService(provider(e2b), MemoryRegistry(), FakeCalls(), bus, restorer)
    build_id = f"b{uid}"
    await svc.handle_tool_call(_call(build_id, "c1", "echo hi > a.txt"))
    record = await svc.registry.get(build_id)
    assert record is not None
    sleep = SnapshotSaved(
        build_id=build_id, user_id="u1", snapshot_id="s1", iteration=1, reason="sleep",
        files=1, bytes_total=3, bytes_uploaded=3,
    )  # fmt: skip
    await svc.handle_snapshot_saved(sleep)
    assert e2b.sandboxes[record.sandbox_id].state == "paused"
    e2b.guest_unresponsive(record.sandbox_id)
    woke = await svc.handle_tool_call(_call(build_id, "c2", "echo awake"))
    assert woke.output.startswith("awake"), woke.output
    assert e2b.sandboxes[record.sandbox_id].state == "killed"
    restored = bus.of(SandboxRestored)
    assert len(restored) == 1 and restored[0].from_snapshot == "snap-2"
    assert restorer.asked == [build_id]


async def test_background_processes_stop_before_a_pause_and_are_lost_with_their_sandbox(e2b, uid):
    bus = FakeBus()
    plan = RestorePlanReply(snapshot_id="snap-1", files=[])
    # every call connects, so the loss is found before the call after it runs (with handles
    # reused, the call in flight would be told the sandbox went away: the next test)
    p = provider(e2b, reuse_s=0)
    svc = SandboxService(p, MemoryRegistry(), FakeCalls(), bus, FakeRestorer(plan))
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
    home = e2b.home(record.sandbox_id)
    pid = e2b.host_pid(record.sandbox_id, int(await _wait_for(home / "server.pid")))
    assert pid is not None
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
    assert e2b.sandboxes[record.sandbox_id].calls[-1] == "pause"
    assert [(e.process_id, e.how) for e in bus.of(ProcessExited)] == [("bash_1", "stopped")]

    # woken: a second process, then the sandbox disappears; the build goes on in a fresh one
    woken = await svc.handle_tool_call(bg("c3", "exec sleep 300", iteration=2))
    assert "bash_2" in woken.output
    assert "bash_1 (echo $$ > ../server.pid; exec sleep 300): build sleeping" in woken.output
    await e2b.expire(record.sandbox_id)
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
