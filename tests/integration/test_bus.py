"""The bus on a real nats-server: explicit acks, dedup by event_id, dead letters, redelivery."""

from __future__ import annotations

import asyncio
import json

import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from kiln_contracts import CancelRequested, subjects
from kiln_runtime.bus import Bus
from kiln_runtime.errors import PermanentError, RetryLater
from kiln_runtime.settings import CommonSettings

pytestmark = pytest.mark.integration


async def until(predicate, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


async def dead_letters(bus: Bus, service: str, uid: str = "") -> list[tuple[str, bytes]]:
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
            if uid in msg.headers.get("Kiln-Original-Subject", ""):  # not another test's
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
        if not event.build_id.endswith(uid):
            return  # another test's, on the session's stream
        if event.reason == "poison":
            raise PermanentError("poisoned on purpose")
        if event.reason == "later":  # never handled: dead-lettered at its last delivery
            raise RetryLater("its sandbox is on its way", delay_s=0.1)
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
        await bus.publish(CancelRequested(build_id=f"l{uid}", user_id="u1", reason="later"))
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
        await asyncio.sleep(1.0)
        assert sorted(e.reason for e in seen) == ["flaky", "ok"]

        dlq = await dead_letters(bus, service, uid)
        reasons = sorted(r for r, _ in dlq)
        assert len(dlq) == 4, reasons
        # the last delivery's reason with the count, not a bare "gave up"
        assert "gave up after 3 deliveries: its sandbox is on its way" in reasons
        assert any("poisoned on purpose" in r for r in reasons)
        assert any("invalid cancel_requested" in r for r in reasons)
        assert any("schema_version" in r for r in reasons)
    finally:
        await bus.stop()


async def test_old_server_is_refused_with_a_clear_error():
    from kiln_runtime.streams import ServerTooOld, ensure_streams

    class Version:
        major, minor = 2, 9

        def __str__(self) -> str:
            return "2.9.0"

    class FakeClient:
        connected_server_version = Version()

    with pytest.raises(ServerTooOld, match="too old"):
        await ensure_streams(FakeClient())  # type: ignore[arg-type]


async def _consumer_state(bus: Bus, durable: str) -> tuple[int, int]:
    info = await bus.nc.jetstream().consumer_info(subjects.STREAM, durable)
    return info.num_pending, info.num_ack_pending


async def test_handlers_running_past_the_ack_wait_are_not_redelivered(infra, uid):
    """Messages whose handlers each run three ack waits are marked in progress meanwhile (from
    one task for all of them): each is handled once, at its first delivery, and acked."""
    service = f"h{uid}"
    bus = Bus(CommonSettings(nats_url=infra["NATS_URL"], ack_wait_s=1.0), service)
    deliveries: list[tuple[str, int]] = []

    async def slow(event: CancelRequested, delivery) -> None:
        if not event.build_id.endswith(uid):
            return  # a new durable also replays earlier tests' messages
        deliveries.append((event.build_id, delivery.num_delivered))
        await asyncio.sleep(3.0)

    bus.consume(CancelRequested, slow, max_workers=8)
    await bus.connect()
    await bus.start()
    try:
        ids = [f"b{i}{uid}" for i in range(5)]
        for build_id in ids:
            await bus.publish(CancelRequested(build_id=build_id, user_id="u"))
        deadline = asyncio.get_running_loop().time() + 30
        while await _consumer_state(bus, f"{service}-cancel-requested") != (0, 0):
            assert asyncio.get_running_loop().time() < deadline, "not all acked"
            await asyncio.sleep(0.2)
        assert sorted(deliveries) == [(b, 1) for b in sorted(ids)]
        assert bus.heartbeats.held == {}
    finally:
        await bus.stop()


async def test_sigterm_lets_a_handler_in_flight_finish(infra, uid):
    service = f"g{uid}"
    bus = Bus(CommonSettings(nats_url=infra["NATS_URL"], ack_wait_s=30), service)
    started, finished = asyncio.Event(), []

    async def slow(event: CancelRequested, delivery) -> None:
        if event.build_id != f"s{uid}":
            return  # a new durable also replays earlier tests' messages
        started.set()
        await asyncio.sleep(1.0)
        finished.append(event.build_id)

    bus.consume(CancelRequested, slow)
    await bus.connect()
    await bus.start()
    await bus.publish(CancelRequested(build_id=f"s{uid}", user_id="u"))
    await asyncio.wait_for(started.wait(), 15)
    await bus.stop(grace_s=10)  # what serve() does on SIGTERM
    assert finished == [f"s{uid}"]

    probe = Bus(CommonSettings(nats_url=infra["NATS_URL"]), service)
    await probe.connect()
    try:
        assert await _consumer_state(probe, f"{service}-cancel-requested") == (0, 0)
    finally:
        await probe.stop()


async def test_a_handler_still_running_at_the_deadline_is_handed_back_at_once(infra, uid):
    service = f"h{uid}"
    settings = CommonSettings(nats_url=infra["NATS_URL"], ack_wait_s=60)
    first = Bus(settings, service)
    started = asyncio.Event()

    async def stuck(event: CancelRequested, delivery) -> None:
        if event.build_id != f"s{uid}":
            return
        started.set()
        await asyncio.sleep(3600)

    first.consume(CancelRequested, stuck)
    await first.connect()
    await first.start()
    await first.publish(CancelRequested(build_id=f"s{uid}", user_id="u"))
    await asyncio.wait_for(started.wait(), 15)
    await first.stop(grace_s=0.2)

    deliveries: list[int] = []

    async def record(event: CancelRequested, delivery) -> None:
        if event.build_id == f"s{uid}":
            deliveries.append(delivery.num_delivered)

    second = Bus(settings, service)
    second.consume(CancelRequested, record)
    await second.connect()
    await second.start()
    try:
        # Handed back with a nak: redelivered long before the 60 s ack_wait would expire.
        await until(lambda: deliveries == [2], timeout=20)
    finally:
        await second.stop(grace_s=1)


async def test_every_message_comes_through_kilns_own_pull_loop(infra, uid):
    """Every message is handed over by the consumer's own pull loop, which counts it."""
    bus = Bus(CommonSettings(nats_url=infra["NATS_URL"]), f"p{uid}")
    seen: list[str] = []

    async def handle(event: CancelRequested, delivery) -> None:
        seen.append(event.build_id)

    bus.consume(CancelRequested, handle, max_workers=4)
    await bus.connect()
    await bus.start()
    try:
        ids = [f"pl{uid}-{i}" for i in range(5)]
        for build_id in ids:
            await bus.publish(CancelRequested(build_id=build_id, user_id="u1", reason="x"))
        await until(lambda: set(ids) <= set(seen))
        (puller,) = bus.pullers.values()
        mine = [b for b in seen if b.startswith(f"pl{uid}-")]
        assert puller.delivered >= len(mine) == len(ids)
    finally:
        await bus.stop()
