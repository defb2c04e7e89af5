"""The generated per-service NATS users on a real nats-server with auth.

The set-up step's user creates the streams (kiln_runtime.setup); each service's user runs its real
bus code (kiln_runtime.bus.Bus: the streams looked up, its own durable consumers, publish, ack,
requests with replies on its own inbox prefix) and the server refuses it everything that belongs
to another service or to the set-up step.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from kiln_budget.adapters.stream_history import StreamHistory
from kiln_contracts import (
    BY_KIND,
    BudgetGate,
    Envelope,
    TopUpRequested,
    WakeRequested,
    budget_id,
    gate_key,
    subjects,
)
from kiln_gateway.adapters.jetstream import JetStreamHistory
from kiln_runtime.bus import Bus, Delivery, inbox_prefix
from kiln_runtime.settings import CommonSettings
from kiln_runtime.setup import set_up

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy" / "nats"))
import render  # noqa: E402

NATS_SERVER = Path(sys.executable).parent / "nats-server"
DOC = render.load()
SERVICES: dict[str, dict[str, Any]] = DOC["services"]

# The smallest valid message of each kind (besides the envelope).
FIELDS: dict[str, dict[str, Any]] = {
    "build_requested": {"idea_brief": "a todo app"},
    "tool_call": {"call_id": "c1", "iteration": 1, "tool": "bash", "input": {"command": "true"}},
    "tool_result": {"call_id": "c1", "iteration": 1, "output": "ok"},
    "iteration_completed": {"iteration": 1, "model": "m", "usage": {}, "stop_reason": "tool_use"},
    "checkpoint_saved": {"iteration": 1, "reason": "files_changed"},
    "process_started": {
        "process_id": "bash_1",
        "call_id": "c1",
        "iteration": 1,
        "command": "sleep 9",
        "sandbox_id": "sb1",
    },
    "process_exited": {"process_id": "bash_1", "how": "exited", "exit_code": 0},
    "preview_available": {
        "process_id": "bash_1",
        "port": 8000,
        "provider": "local",
        "sandbox_id": "sb1",
        "url": "/v1/builds/b1/preview/8000/",
    },
    "preview_gone": {"process_id": "bash_1", "port": 8000},
    "snapshot_saved": {
        "snapshot_id": "s1",
        "iteration": 1,
        "reason": "files_changed",
        "files": 1,
        "bytes_total": 1,
        "bytes_uploaded": 1,
    },
    "sleep_requested": {"reason": "budget"},
    "wake_requested": {"reason": "manual"},
    "cancel_requested": {},
    "build_sleeping": {"reason": "budget"},
    "build_resumed": {"reason": "manual"},
    "agent_narrated": {"iteration": 1, "text": "hi"},
    "sandbox_started": {"sandbox_id": "x", "provider": "local"},
    "sandbox_restored": {"sandbox_id": "x", "provider": "local"},
    "sandbox_stopped": {"sandbox_id": "x", "provider": "local", "reason": "final"},
    "build_completed": {"summary": "done", "iterations": 1, "cost_micro_usd": 1},
    "build_failed": {"reason": "internal", "iterations": 1, "cost_micro_usd": 1},
    "build_cancelled": {"reason": "user", "iterations": 1, "cost_micro_usd": 1},
    "build_rejected": {
        "reason": "daily allowance used up",
        "spent_micro_usd": 2,
        "allowance_micro_usd": 1,
        "resets_at": "2030-01-01T00:00:00Z",
    },
    "top_up_requested": {"topup_id": "t1", "amount_micro_usd": 1},
    "send_user_message": {"message_id": "m1", "seq": 1, "text": "hi"},
    "build_continued": {
        "continuation": 1,
        "after": "completed",
        "message_id": "m1",
        "iterations": 1,
        "cost_micro_usd": 1,
    },
}
USER = "u1"


def sample(kind: str, build_id: str) -> Envelope:
    """The smallest ``kind`` for the build (a top-up: on the user's budget subject instead)."""
    if kind == TopUpRequested.kind:
        build_id = budget_id(USER)
    return BY_KIND[kind](build_id=build_id, user_id=USER, **FIELDS[kind])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    passwords: dict[str, str]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """nats-server with the generated config (deploy/nats/nats-server.conf) and random passwords."""
    names = [*SERVICES, *(DOC.get("setup") or {}), *(DOC.get("operators") or {})]
    specs = {**SERVICES, **(DOC.get("setup") or {}), **(DOC.get("operators") or {})}
    passwords = {name: secrets.token_hex(12) for name in names}
    env = {**os.environ, **{specs[n]["password_env"]: passwords[n] for n in names}}
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kiln-nats-") as store:
        proc = subprocess.Popen(
            [
                *(str(NATS_SERVER), "-c", str(render.CONF), "-a", "127.0.0.1", "-p", str(port)),
                *("-m", str(free_port()), "-js", "-sd", store),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = datetime.now(UTC) + timedelta(seconds=15)
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                if proc.poll() is not None or datetime.now(UTC) > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"nats-server did not start: {err}")
            server = Server(f"nats://127.0.0.1:{port}", passwords)
            asyncio.run(set_up(settings(server, "setup")))  # the streams, as the setup user
            yield server
        finally:
            proc.terminate()
            proc.wait(timeout=10)


async def until(predicate, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


def settings(server: Server, service: str) -> CommonSettings:
    return CommonSettings(
        nats_url=server.url,
        nats_user=service,
        nats_password=server.passwords[service],
        ack_wait_s=5,
    )


async def test_each_service_user_runs_its_own_flows(server, uid):
    received: dict[str, set[str]] = {name: set() for name in SERVICES}
    build_id = f"b{uid}"

    def recorder(service: str):
        async def handle(msg: Envelope, delivery: Delivery) -> None:
            if msg.build_id in (build_id, budget_id(USER)):
                received[service].add(msg.kind)

        return handle

    buses = {name: Bus(settings(server, name), name) for name in SERVICES}
    for name, spec in SERVICES.items():
        for kind in spec.get("consumes", []):
            buses[name].consume(BY_KIND[kind], recorder(name))
        for durable in spec.get("consumes_all", []):
            buses[name].consume_all(recorder(name), durable=durable)
        for durable, kinds in spec.get("consumes_kinds", {}).items():
            models = [BY_KIND[k] for k in kinds]
            buses[name].consume_kinds(models, recorder(name), durable=durable)
    try:
        for bus in buses.values():  # every user may look the streams up
            await bus.connect()
        for bus in buses.values():  # ... and its own durable consumers
            await bus.start()

        published: list[str] = []
        for name, spec in SERVICES.items():
            for kind in spec["publishes"]:
                await buses[name].publish(sample(kind, build_id))
                published.append(kind)

        expected = {
            name: set(spec.get("consumes", []))
            | {k for kinds in spec.get("consumes_kinds", {}).values() for k in kinds}
            | (set(published) if spec.get("consumes_all") else set())
            for name, spec in SERVICES.items()
        }
        await until(lambda: received == expected)

        # Acks are allowed: nothing stays pending on any service's consumers.
        async def settled() -> bool:
            for name in SERVICES:
                js = buses[name].nc.jetstream()
                for durable in render.durables(name, SERVICES[name]):
                    info = await js.consumer_info(subjects.STREAM, durable)
                    if info.num_ack_pending or info.num_pending:
                        return False
            return True

        deadline = asyncio.get_running_loop().time() + 15
        while not await settled():
            assert asyncio.get_running_loop().time() < deadline, "messages left unacked"
            await asyncio.sleep(0.1)

        # The gateway replays a build's history with an ordered consumer (SSE).
        sub = (
            await buses["gateway"]
            .nc.jetstream()
            .subscribe(subjects.build_filter(build_id), ordered_consumer=True)
        )
        of_the_build = [k for k in published if k != TopUpRequested.kind]
        replayed = [await sub.next_msg(timeout=5) for _ in of_the_build]
        assert [m.subject.rsplit(".", 1)[1] for m in replayed] == of_the_build
        await sub.unsubscribe()
        # ... and reads its checkpoints (where a fork's snapshot is) the same way
        checkpoints = await JetStreamHistory(buses["gateway"].nc).checkpoints(build_id)
        assert [c.iteration for c in checkpoints] == [1]

        # The budget replays its kinds from the stream (the rebuild of a lost Redis).
        kinds = [BY_KIND[k] for k in SERVICES["budget"]["consumes"]]
        history = StreamHistory(lambda: buses["budget"].nc)
        seen = [m.kind async for m in history.replay(kinds) if m.user_id == USER]
        assert sorted(seen) == sorted(SERVICES["budget"]["consumes"])

        # The budget schedules a wake-up with a JetStream message schedule.
        at = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        await buses["budget"].publish_at(sample("wake_requested", build_id), at, "reset")
        assert isinstance(sample("wake_requested", build_id), WakeRequested)

        # The budget gates: the budget writes them, the agent watches them, the gateway reads
        # them (the set-up step made the bucket).
        gate = BudgetGate(
            user_id="u1",
            state="closed",
            until=datetime.now(UTC) + timedelta(hours=1),
            reason="daily allowance used up",
        )
        kvs = {name: await buses[name].gates() for name in ("gateway", "agent", "budget")}
        watcher = await kvs["agent"].watchall()
        assert await watcher.updates(timeout=5) is None  # the bucket's current values: none
        await kvs["budget"].put(gate_key("u1"), gate.model_dump_json().encode())
        seen = await watcher.updates(timeout=5)
        assert seen is not None and BudgetGate.model_validate_json(seen.value) == gate
        await watcher.stop()
        for name in ("gateway", "agent"):
            entry = await kvs[name].get(gate_key("u1"))
            assert BudgetGate.model_validate_json(entry.value) == gate

        # Every service may dead-letter on its own kiln.dlq.<service>.> subject.
        for name, bus in buses.items():
            ack = await bus.nc.jetstream().publish(
                subjects.dlq_subject(name, "x"), b"{}", headers={"Kiln-Dlq-Reason": "test"}
            )
            assert ack.stream == subjects.DLQ_STREAM

        # Request/reply: the sandbox serves manifests and uploads, the snapshot restore plans.
        for name, spec in SERVICES.items():
            for subject in spec.get("serves", []):

                async def reply(msg: Any) -> None:
                    await msg.respond(b"pong:" + msg.data)

                await buses[name].nc.subscribe(subject, queue=name, cb=reply)
            await buses[name].nc.flush()
        for name, spec in SERVICES.items():
            for subject in spec.get("requests", []):
                answer = await request(buses[name].nc, subject)
                assert answer.data == b"pong:ping"
    finally:
        for bus in buses.values():
            with contextlib.suppress(Exception):
                await bus.stop()


async def request(nc: Client, subject: str) -> Any:
    """A request, asked again for up to 5 s while the server reports no responders: under a
    loaded suite a responder's interest was once not there yet for the first ask, although its
    connection had flushed the subscription. A refused permission stays refused."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        try:
            return await nc.request(subject, b"ping", timeout=5)
        except nats.errors.NoRespondersError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def refused(server: Server, user: str, action: str, subject: str) -> str:
    """Try ``action`` (pub or sub) on ``subject`` as ``user``; the server's refusal, or ''."""
    errors: list[str] = []
    got = asyncio.Event()

    async def on_error(err: Exception) -> None:
        errors.append(str(err))
        got.set()

    nc: Client = await nats.connect(
        server.url, user=user, password=server.passwords[user], error_cb=on_error
    )
    try:
        if action == "pub":
            await nc.publish(subject, b"{}", headers={"Nats-Msg-Id": uuid.uuid4().hex})
        else:
            await nc.subscribe(subject)
        await nc.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(got.wait(), timeout=3)
        return " ".join(errors)
    finally:
        await nc.close()


@pytest.mark.parametrize(
    ("user", "action", "subject"),
    [
        ("budget", "pub", "kiln.build.b1.tool_call"),
        ("sandbox", "pub", "kiln.build.b1.build_completed"),
        ("gateway", "pub", "kiln.build.b1.tool_result"),
        ("agent", "pub", "kiln.build.b1.snapshot_saved"),
        ("snapshot", "pub", "kiln.build.b1.sleep_requested"),
        ("webhooks", "pub", "kiln.build.b1.build_completed"),
        ("webhooks", "pub", "kiln.rpc.budget.status"),
        ("agent", "pub", "kiln.schedule.b1.reset"),
        ("budget", "pub", "kiln.dlq.agent.tool_result"),
        ("agent", "pub", "kiln.rpc.sandbox.upload"),
        ("budget", "pub", "$JS.API.STREAM.DELETE.KILN"),
        ("budget", "pub", "$JS.API.STREAM.PURGE.KILN"),
        (
            "sandbox",
            "pub",
            "$JS.API.CONSUMER.CREATE.KILN.agent-tool-result.kiln.build.*.tool_result",
        ),
        ("budget", "pub", "$JS.API.CONSUMER.CREATE.KILN.budget-tool-call.kiln.build.*.tool_call"),
        ("agent", "pub", "$JS.API.CONSUMER.MSG.NEXT.KILN.sandbox-tool-call"),
        ("agent", "pub", "$JS.API.CONSUMER.DELETE.KILN.sandbox-tool-call"),
        ("snapshot", "pub", "$JS.ACK.KILN.agent-tool-result.1.1.1.1.0"),
        ("snapshot", "pub", "$JS.API.CONSUMER.CREATE.KILN"),
        ("gateway", "pub", "kiln.build.b1.sleep_requested"),
        ("agent", "pub", "kiln.build.budget-x.top_up_requested"),
        ("gateway", "sub", "kiln.rpc.budget.status"),
        ("budget", "sub", "kiln.rpc.sandbox.manifest"),
        ("agent", "sub", "kiln.build.>"),
        ("gateway", "sub", "kiln.rpc.snapshot.restore_plan"),
        ("agent", "pub", "$KV.KILN_BUDGET_GATES.u1"),
        ("gateway", "pub", "$KV.KILN_BUDGET_GATES.u1"),
        ("sandbox", "pub", "$JS.API.STREAM.MSG.GET.KV_KILN_BUDGET_GATES"),
        ("snapshot", "pub", "$JS.API.STREAM.CREATE.KV_KILN_BUDGET_GATES"),
        ("agent", "pub", "$JS.API.STREAM.PURGE.KV_KILN_BUDGET_GATES"),
        # no service administers a stream: the set-up step's user does
        *(
            (service, "pub", f"$JS.API.STREAM.{op}.{stream}")
            for service in SERVICES
            for op in ("CREATE", "UPDATE", "DELETE")
            for stream in ("KILN", "KILN_DLQ", "KV_KILN_BUDGET_GATES")
        ),
        # ... and the set-up step's user does nothing else
        ("setup", "pub", "$JS.API.STREAM.DELETE.KILN"),
        ("setup", "pub", "$JS.API.STREAM.PURGE.KILN"),
        ("setup", "pub", "kiln.build.b1.build_requested"),
        ("setup", "sub", "kiln.build.>"),
        ("setup", "sub", "_INBOX_gateway.>"),
        # only the gateway starts builds (with the tier of the caller's account)
        *((s, "pub", "kiln.build.b1.build_requested") for s in SERVICES if s != "gateway"),
        # replies: a service's own inbox prefix only, never the shared _INBOX.> nor another's
        *((s, "sub", "_INBOX.>") for s in SERVICES),
        ("gateway", "sub", "_INBOX_snapshot.>"),
        ("snapshot", "sub", "_INBOX_sandbox.>"),
        ("sandbox", "sub", "_INBOX_snapshot.>"),
        ("agent", "sub", "_INBOX_gateway.>"),
        ("budget", "sub", ">"),
    ],
)
async def test_a_service_is_refused_what_belongs_to_another(server, user, action, subject):
    refusal = await refused(server, user, action, subject)
    assert "permissions violation" in refusal.lower(), f"{user} was allowed to {action} {subject}"


async def test_a_service_reads_no_other_services_replies(server, uid):
    """The snapshot service asks the sandbox for a manifest: the answer comes on the snapshot's
    inbox prefix, which no other service may read (the gateway tries, and gets nothing)."""
    buses = {name: Bus(settings(server, name), name) for name in ("snapshot", "sandbox", "gateway")}
    try:
        for bus in buses.values():
            await bus.connect()

        async def answer(msg: Any) -> None:
            await msg.respond(b"secret presigned URL for " + msg.data)

        await buses["sandbox"].nc.subscribe("kiln.rpc.sandbox.manifest", queue="sandbox", cb=answer)
        await buses["sandbox"].nc.flush()

        spied: list[bytes] = []
        errors: list[str] = []

        async def on_error(err: Exception) -> None:
            errors.append(str(err))

        async def on_spied(msg: Any) -> None:
            spied.append(msg.data)

        spy: Client = await nats.connect(
            server.url,
            user="gateway",
            password=server.passwords["gateway"],
            inbox_prefix=inbox_prefix("gateway"),
            error_cb=on_error,
        )
        try:
            await spy.subscribe(f"{inbox_prefix('snapshot')}.>", cb=on_spied)
            await spy.flush()
            reply = await request(buses["snapshot"].nc, "kiln.rpc.sandbox.manifest")
            assert reply.subject.startswith(f"{inbox_prefix('snapshot')}.")
            assert reply.data == b"secret presigned URL for ping"
            await until(lambda: bool(errors))
            assert "permissions violation" in " ".join(errors).lower()
            assert spied == []
        finally:
            await spy.close()
    finally:
        for bus in buses.values():
            with contextlib.suppress(Exception):
                await bus.stop()


async def test_a_wrong_password_is_refused(server):
    with pytest.raises(Exception, match=r"(?i)authoriz"):
        await nats.connect(
            server.url,
            user="agent",
            password="wrong",
            allow_reconnect=False,
            max_reconnect_attempts=0,
        )
