"""The bus on a real nats-server: explicit acks, dedup by event_id, dead letters, redelivery."""

from __future__ import annotations

import asyncio
import json

import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from kiln_contracts import CancelRequested, subjects
from kiln_runtime.bus import Bus
from kiln_runtime.errors import PermanentError
from kiln_runtime.settings import CommonSettings

pytestmark = pytest.mark.integration


async def until(predicate, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


async def dead_letters(bus: Bus, service: str) -> list[tuple[str, bytes]]:
    js = bus.nc.jetstream()
    sub = await js.subscribe(
        f"kiln.dlq.{service}.>",
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    out = []
    try:
        while True:
            msg = await sub.next_msg(timeout=1)
            out.append((msg.headers.get("Kiln-Dlq-Reason", ""), msg.data))
    except Exception:
        pass
    await sub.unsubscribe()
    return out


async def test_consume_dedup_dead_letter_and_retry(infra, uid):
    service = f"t{uid}"
    settings = CommonSettings(nats_url=infra["NATS_URL"], ack_wait_s=5, max_deliver=3)
    bus = Bus(settings, service)
    seen: list[CancelRequested] = []
    attempts: dict[str, int] = {}

    async def handle(event: CancelRequested, delivery) -> None:
        if event.reason == "poison":
            raise PermanentError("poisoned on purpose")
        if event.reason == "flaky":
            attempts[event.build_id] = delivery.num_delivered
            if delivery.num_delivered < 2:
                raise RuntimeError("transient")
        seen.append(event)

    bus.consume(CancelRequested, handle, max_workers=4)
    await bus.connect()
    await bus.start()
    try:
        ok = CancelRequested(build_id=f"b{uid}", user_id="u1", reason="ok")
        await bus.publish(ok)
        await bus.publish(ok)  # same event_id: dropped by the server
        await bus.publish(CancelRequested(build_id=f"f{uid}", user_id="u1", reason="flaky"))
        await bus.publish(CancelRequested(build_id=f"p{uid}", user_id="u1", reason="poison"))
        # invalid payloads straight onto the subject, as a foreign producer might
        js = bus.nc.jetstream()
        await js.publish(subjects.subject(f"x{uid}", "cancel_requested"), b"{not json")
        bad_version = json.loads(ok.model_dump_json()) | {"schema_version": 99}
        bad_version["build_id"] = f"v{uid}"
        await js.publish(
            subjects.subject(f"v{uid}", "cancel_requested"), json.dumps(bad_version).encode()
        )
        await until(lambda: len(seen) == 2)
        await until(lambda: attempts.get(f"f{uid}") == 2)
        await asyncio.sleep(0.5)
        assert sorted(e.reason for e in seen) == ["flaky", "ok"]

        dlq = await dead_letters(bus, service)
        reasons = sorted(r for r, _ in dlq)
        assert len(dlq) == 3, reasons
        assert any("poisoned on purpose" in r for r in reasons)
        assert any("invalid cancel_requested" in r for r in reasons)
        assert any("schema_version" in r for r in reasons)
    finally:
        await bus.stop()


async def test_old_server_is_refused_with_a_clear_error():
    from kiln_runtime.bus import ServerTooOld, ensure_streams

    class Version:
        major, minor = 2, 9

        def __str__(self) -> str:
            return "2.9.0"

    class FakeClient:
        connected_server_version = Version()

    with pytest.raises(ServerTooOld, match="too old"):
        await ensure_streams(FakeClient())  # type: ignore[arg-type]
