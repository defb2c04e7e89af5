"""The sandbox service on a real NATS JetStream, Postgres and S3 API (moto)."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import boto3
import pytest
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from kiln_contracts import (
    BY_KIND,
    Download,
    Envelope,
    ManifestReply,
    ManifestRequest,
    ProcessExited,
    ProcessStarted,
    RestorePlanReply,
    RestorePlanRequest,
    SandboxRestored,
    SandboxStarted,
    SandboxStopped,
    SnapshotSaved,
    ToolCall,
    ToolResult,
    Upload,
    UploadReply,
    UploadRequest,
    stable_id,
    subjects,
)
from kiln_sandbox.bootstrap import Wiring, build
from kiln_sandbox.handlers import INTERRUPTED
from kiln_sandbox.settings import SandboxSettings
from tests.integration.wirings import started

pytestmark = pytest.mark.integration


async def until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


async def history(nc: Client, build_id: str) -> list[Envelope]:
    """Every message of a build's history in the stream, in order."""
    sub = await nc.jetstream().subscribe(
        subjects.build_filter(build_id),
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    out: list[Envelope] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=0.5)
            _, kind = subjects.parse(msg.subject)
            out.append(BY_KIND[kind].model_validate_json(msg.data))
    except Exception:
        pass
    await sub.unsubscribe()
    return out


@pytest.fixture(scope="module")
async def runtime(infra, tmp_path_factory) -> Wiring:
    root = tmp_path_factory.mktemp("sandboxes")
    settings = SandboxSettings(
        nats_url=infra["NATS_URL"],
        database_url=infra["DATABASE_URL"],
        sandbox_root=str(root),
        ack_wait_s=5,
    )
    async with started(build(settings)) as rt:
        yield rt


class Results:
    """Every ToolResult published for a build, including repeats the stream drops as duplicates."""

    def __init__(self) -> None:
        self.seen: list[ToolResult] = []

    async def watch(self, nc: Client, build_id: str) -> Any:
        async def cb(msg: Any) -> None:
            self.seen.append(ToolResult.model_validate_json(msg.data))

        return await nc.subscribe(subjects.subject(build_id, ToolResult.kind), cb=cb)


def workspace(rt: Wiring, build_id: str) -> Path:
    return Path(rt.settings.sandbox_root) / build_id


def read_text(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


async def test_a_tool_call_becomes_a_tool_result_on_the_bus(runtime, uid):
    build_id = f"b{uid}"
    call = ToolCall(
        build_id=build_id,
        user_id="u1",
        call_id="toolu_write",
        iteration=1,
        tool="write_file",
        input={"path": "app/hello.py", "content": "print('hi')\n"},
    )
    await runtime.bus.publish(call)
    events: list[Envelope] = []

    async def poll() -> None:
        nonlocal events
        events = await history(runtime.bus.nc, build_id)

    for _ in range(60):
        await poll()
        if any(isinstance(e, ToolResult) for e in events):
            break
    results = [e for e in events if isinstance(e, ToolResult)]
    assert len(results) == 1
    result = results[0]
    assert not result.is_error, result.output
    assert result.event_id == stable_id(build_id, "tool_result", "toolu_write")
    assert result.causation_id == call.event_id
    assert result.files_changed == ["app/hello.py"]
    started = [e for e in events if isinstance(e, SandboxStarted)]
    assert len(started) == 1 and started[0].provider == "local"
    assert read_text(workspace(runtime, build_id) / "app/hello.py") == "print('hi')\n"


async def test_the_same_call_twice_and_a_redelivery_run_once(runtime, uid):
    build_id = f"b{uid}"
    results = Results()
    sub = await results.watch(runtime.bus.nc, build_id)
    call = ToolCall(
        build_id=build_id,
        user_id="u1",
        call_id="toolu_append",
        iteration=1,
        tool="bash",
        input={"command": "echo ran >> runs.txt; wc -l < runs.txt"},
    )
    try:
        await runtime.bus.publish(call)
        await until(lambda: len(results.seen) == 1)
        # the agent republishing the same call with a new event id
        await runtime.bus.publish(call.with_id(stable_id("republish", uid)))
        # and a redelivery of the very same message (past the server's dedup)
        await runtime.bus.nc.jetstream().publish(
            subjects.subject_of(call),
            call.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"redelivery-{uid}"},
        )
        await until(lambda: len(results.seen) == 3)
    finally:
        await sub.unsubscribe()
    assert results.seen[0] == results.seen[1] == results.seen[2]
    assert results.seen[0].output.strip() == "1"
    assert read_text(workspace(runtime, build_id) / "runs.txt") == "ran\n"
    # the repeats carried the same event id, so the stream holds one result
    stored = [e for e in await history(runtime.bus.nc, build_id) if isinstance(e, ToolResult)]
    assert len(stored) == 1


async def test_a_call_found_started_comes_back_as_interrupted(runtime, infra, uid):
    build_id = f"b{uid}"
    conn = await asyncpg.connect(infra["DATABASE_URL"])
    try:
        await conn.execute(
            "INSERT INTO sandbox.calls (build_id, call_id, status) VALUES ($1, $2, 'started')",
            build_id,
            "toolu_crashed",
        )
    finally:
        await conn.close()
    results = Results()
    sub = await results.watch(runtime.bus.nc, build_id)
    call = ToolCall(
        build_id=build_id,
        user_id="u1",
        call_id="toolu_crashed",
        iteration=2,
        tool="bash",
        input={"command": "echo ran >> runs.txt"},
    )
    try:
        await runtime.bus.publish(call)
        await until(lambda: len(results.seen) == 1)
    finally:
        await sub.unsubscribe()
    result = results.seen[0]
    assert result.is_error and result.output == INTERRUPTED
    assert result.event_id == stable_id(build_id, "tool_result", "toolu_crashed")
    assert read_text(workspace(runtime, build_id) / "runs.txt") is None


async def test_manifest_upload_restore_and_stop_after_the_final_snapshot(runtime, infra, uid):
    build_id = f"b{uid}"
    results = Results()
    sub = await results.watch(runtime.bus.nc, build_id)
    script = (
        "mkdir -p src __pycache__ .cache/x && printf 'hello' > src/a.txt && "
        "printf '#!/bin/sh\\necho hi\\n' > run.sh && chmod 755 run.sh && "
        "echo junk > __pycache__/a.pyc && echo junk > .cache/x/y"
    )
    try:
        await runtime.bus.publish(
            ToolCall(
                build_id=build_id,
                user_id="u1",
                call_id="toolu_files",
                iteration=1,
                tool="bash",
                input={"command": script},
            )
        )
        await until(lambda: len(results.seen) == 1)
    finally:
        await sub.unsubscribe()
    assert not results.seen[0].is_error, results.seen[0].output

    nc = runtime.bus.nc
    raw = await nc.request(
        subjects.SANDBOX_MANIFEST,
        ManifestRequest(build_id=build_id, excludes=["__pycache__", ".cache"])
        .model_dump_json()
        .encode(),
        timeout=10,
    )
    manifest = ManifestReply.model_validate_json(raw.data)
    assert manifest.ok, manifest.error
    by_path = {e.path: e for e in manifest.entries}
    assert set(by_path) == {"src/a.txt", "run.sh"}
    assert by_path["src/a.txt"].sha256 == hashlib.sha256(b"hello").hexdigest()
    assert by_path["src/a.txt"].size == 5
    assert by_path["run.sh"].mode == 0o755

    bucket = f"kiln-test-{uid}"
    s3 = boto3.client("s3", endpoint_url=infra["S3_ENDPOINT_URL"], region_name="us-east-1")
    await asyncio.to_thread(s3.create_bucket, Bucket=bucket)
    uploads = []
    for entry in manifest.entries:
        url = await asyncio.to_thread(
            s3.generate_presigned_url,
            "put_object",
            Params={"Bucket": bucket, "Key": f"blobs/{entry.sha256}"},
            ExpiresIn=600,
        )
        uploads.append(Upload(path=entry.path, sha256=entry.sha256, url=url))
    raw = await nc.request(
        subjects.SANDBOX_UPLOAD,
        UploadRequest(build_id=build_id, uploads=uploads).model_dump_json().encode(),
        timeout=30,
    )
    reply = UploadReply.model_validate_json(raw.data)
    assert reply.ok, reply.error
    assert reply.uploaded == 2 and reply.bytes_uploaded == sum(e.size for e in manifest.entries)
    obj = await asyncio.to_thread(
        s3.get_object, Bucket=bucket, Key=f"blobs/{by_path['src/a.txt'].sha256}"
    )
    assert obj["Body"].read() == b"hello"

    # a stale sha256 is refused before anything is sent
    stale = Upload(path="src/a.txt", sha256="0" * 64, url=uploads[0].url)
    raw = await nc.request(
        subjects.SANDBOX_UPLOAD,
        UploadRequest(build_id=build_id, uploads=[stale]).model_dump_json().encode(),
        timeout=30,
    )
    bad = UploadReply.model_validate_json(raw.data)
    assert not bad.ok and "changed since the manifest" in bad.error
    # invalid requests get an error reply, not silence
    raw = await nc.request(subjects.SANDBOX_MANIFEST, b'{"nope": 1}', timeout=10)
    assert not ManifestReply.model_validate_json(raw.data).ok

    # the sandbox vanishes (an E2B sandbox expires): the next call restores the snapshot first
    await asyncio.to_thread(shutil.rmtree, workspace(runtime, build_id))

    async def restore_plan(msg: Any) -> None:
        request = RestorePlanRequest.model_validate_json(msg.data)
        assert request.build_id == build_id
        files = [
            Download(
                path=e.path,
                sha256=e.sha256,
                mode=e.mode,
                url=s3.generate_presigned_url(
                    "get_object", Params={"Bucket": bucket, "Key": f"blobs/{e.sha256}"}
                ),
            )
            for e in manifest.entries
        ]
        await msg.respond(
            RestorePlanReply(snapshot_id="snap-1", files=files).model_dump_json().encode()
        )

    plan_sub = await nc.subscribe(subjects.SNAPSHOT_RESTORE_PLAN, cb=restore_plan)
    results = Results()
    sub = await results.watch(nc, build_id)
    try:
        await runtime.bus.publish(
            ToolCall(
                build_id=build_id,
                user_id="u1",
                call_id="toolu_after_expiry",
                iteration=2,
                tool="bash",
                input={"command": "cat src/a.txt; ./run.sh"},
            )
        )
        await until(lambda: len(results.seen) == 1)
    finally:
        await sub.unsubscribe()
        await plan_sub.unsubscribe()
    assert results.seen[0].output == "hellohi\n", results.seen[0].output
    restored = [e for e in await history(nc, build_id) if isinstance(e, SandboxRestored)]
    assert len(restored) == 1 and restored[0].from_snapshot == "snap-1"

    final = SnapshotSaved(
        build_id=build_id,
        user_id="u1",
        snapshot_id="snap-final",
        iteration=2,  # the build's last iteration (a later call's would leave it running)
        reason="final",
        files=2,
        bytes_total=reply.bytes_uploaded,
        bytes_uploaded=reply.bytes_uploaded,
    )
    await runtime.bus.publish(final)
    await runtime.bus.publish(final.with_id(stable_id("again", uid)))
    stopped: list[SandboxStopped] = []
    for _ in range(60):
        stopped = [e for e in await history(nc, build_id) if isinstance(e, SandboxStopped)]
        if stopped:
            break
    assert len(stopped) == 1 and stopped[0].provider == "local"
    # the workspace stays for downloads
    assert read_text(workspace(runtime, build_id) / "src/a.txt") == "hello"


async def test_background_processes_and_read_before_edit_over_the_bus(runtime, uid):
    """A background process started once for a redelivered call, read, listed as events, stopped
    at the build's sleep (real NATS and Postgres); edit_file after a read_file."""
    build_id = f"b{uid}"
    results = Results()
    sub = await results.watch(runtime.bus.nc, build_id)

    def call(call_id: str, tool: str, iteration: int = 1, **tool_input: Any) -> ToolCall:
        return ToolCall(
            build_id=build_id,
            user_id="u1",
            call_id=call_id,
            iteration=iteration,
            tool=tool,  # type: ignore[arg-type]
            input=tool_input,
        )

    def result(call_id: str) -> ToolResult:
        return next(r for r in results.seen if r.call_id == call_id)

    start = call(
        "toolu_bg", "bash", command="echo $$ >> pids.txt; echo serving; exec sleep 300",
        run_in_background=True,
    )  # fmt: skip
    try:
        await runtime.bus.publish(start)
        await until(lambda: len(results.seen) == 1)
        await runtime.bus.nc.jetstream().publish(  # a redelivery, past the server's dedup
            subjects.subject_of(start),
            start.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"redelivery-{uid}"},
        )
        await until(lambda: len(results.seen) == 2)
        assert results.seen[0] == results.seen[1]
        assert "Command running in background with ID: bash_1" in results.seen[0].output
        pids = workspace(runtime, build_id) / "pids.txt"
        await until(lambda: bool(read_text(pids)))
        await asyncio.sleep(0.2)
        assert len((read_text(pids) or "").split()) == 1  # started once

        for n in range(20):  # the output, as the model polls it
            await runtime.bus.publish(call(f"toolu_out{n}", "bash_output", bash_id="bash_1"))
            await until(lambda n=n: any(r.call_id == f"toolu_out{n}" for r in results.seen))
            if "serving" in result(f"toolu_out{n}").output:
                break
        assert "serving" in result(f"toolu_out{n}").output

        await runtime.bus.publish(call("toolu_w", "write_file", path="a.txt", content="one\n"))
        await runtime.bus.publish(call("toolu_sed", "bash", command="sed -i s/one/two/ a.txt"))
        await runtime.bus.publish(
            call("toolu_e1", "edit_file", path="a.txt", old_string="two", new_string="three")
        )
        await until(lambda: any(r.call_id == "toolu_e1" for r in results.seen))
        assert "changed since you last read it" in result("toolu_e1").output
        await runtime.bus.publish(call("toolu_r", "read_file", path="a.txt"))
        await runtime.bus.publish(
            call("toolu_e2", "edit_file", path="a.txt", old_string="two", new_string="three")
        )
        await until(lambda: any(r.call_id == "toolu_e2" for r in results.seen))
        assert not result("toolu_e2").is_error, result("toolu_e2").output
        assert read_text(workspace(runtime, build_id) / "a.txt") == "three\n"

        sleep = SnapshotSaved(
            build_id=build_id, user_id="u1", snapshot_id="s-sleep", iteration=1,
            reason="sleep", files=1, bytes_total=1, bytes_uploaded=1,
        )  # fmt: skip
        await runtime.bus.publish(sleep)
        woken = call("toolu_woken", "bash", iteration=2, command="echo awake")
        for _ in range(100):
            events = await history(runtime.bus.nc, build_id)
            if any(isinstance(e, SandboxStopped) for e in events):
                break
        await runtime.bus.publish(woken)
        await until(lambda: any(r.call_id == "toolu_woken" for r in results.seen))
    finally:
        await sub.unsubscribe()
    out = result("toolu_woken").output
    assert out.startswith("awake\n") and "bash_1 (echo $$ >> pids.txt;" in out, out
    events = await history(runtime.bus.nc, build_id)
    started = [e for e in events if isinstance(e, ProcessStarted)]
    exited = [e for e in events if isinstance(e, ProcessExited)]
    assert [(e.process_id, e.call_id) for e in started] == [("bash_1", "toolu_bg")]
    assert [(e.process_id, e.how) for e in exited] == [("bash_1", "stopped")]
    kinds = [e.kind for e in events]
    assert kinds.index("process_exited") < kinds.index("sandbox_stopped")
