"""The budget service on real NATS and Redis: each iteration is charged exactly once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from kiln_budget import bootstrap, spending
from kiln_budget.adapters.clock import SystemClock
from kiln_budget.adapters.redis_store import RedisSpendStore
from kiln_budget.settings import BudgetSettings
from kiln_contracts import BuildCompleted, BuildRequested, IterationCompleted, Usage, subjects
from kiln_runtime import config as kiln_config

pytestmark = pytest.mark.integration


async def until(predicate: Callable[[], object], timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


async def until_async(predicate: Callable[[], object], timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():  # type: ignore[misc]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.05)


async def consumer_caught_up(wiring: bootstrap.Wiring, kind: str, seq: int) -> bool:
    """The service's durable consumer of ``kind`` has delivered and acked up to stream ``seq``."""
    durable = f"{wiring.bus.service}-{kind}".replace("_", "-")
    info = await wiring.bus.nc.jetstream().consumer_info(subjects.STREAM, durable)
    return info.ack_floor.stream_seq >= seq and not info.num_ack_pending


@pytest.fixture
async def budget(infra: dict[str, str], uid: str) -> AsyncIterator[bootstrap.Wiring]:
    settings = BudgetSettings(
        nats_url=infra["NATS_URL"], redis_url=infra["REDIS_URL"], ack_wait_s=5, max_deliver=3
    )
    wiring = bootstrap.build(settings, service=f"budget-{uid}")
    await wiring.bus.connect()
    await wiring.start()
    await wiring.bus.start()
    try:
        yield wiring
    finally:
        await wiring.bus.stop()
        await wiring.stop()


def iteration(uid: str, **usage: int) -> IterationCompleted:
    return IterationCompleted(
        build_id=f"b{uid}",
        user_id=f"u{uid}",
        iteration=1,
        model="claude-sonnet-4-5",
        usage=Usage(**usage),
        stop_reason="end_turn",
    )


async def test_iteration_charged_once_even_when_delivered_twice(
    budget: bootstrap.Wiring, uid: str
) -> None:
    deps = budget.deps
    event = iteration(
        uid,
        input_tokens=1000,
        output_tokens=100,
        cache_creation_input_tokens=200,
        cache_read_input_tokens=5000,
    )
    expected = 3000 + 1500 + 750 + 1500  # cache tokens priced at their own rates
    await budget.bus.publish(event)
    await until_async(lambda: spending.spent_build(deps, f"b{uid}"))
    assert await spending.spent_build(deps, f"b{uid}") == expected
    assert await spending.spent_today(deps, f"u{uid}") == expected
    assert await spending.spent_this_month(deps, f"u{uid}") == expected

    # The same event again under another Nats-Msg-Id (so the server does not drop it): the
    # consumer sees it, acks it, and charges nothing more.
    ack = await budget.bus.nc.jetstream().publish(
        subjects.subject_of(event),
        event.model_dump_json().encode(),
        headers={"Nats-Msg-Id": f"again-{event.event_id}"},
    )
    assert not ack.duplicate
    await until_async(lambda: consumer_caught_up(budget, event.kind, ack.seq))
    assert await spending.spent_build(deps, f"b{uid}") == expected
    assert await spending.spent_today(deps, f"u{uid}") == expected


async def test_two_replicas_charging_the_same_event_concurrently_charge_once(
    infra: dict[str, str], uid: str
) -> None:
    replicas = []
    for _ in range(2):
        store = RedisSpendStore(infra["REDIS_URL"])
        await store.open()
        replicas.append(spending.Deps(store, SystemClock(), kiln_config.default()))
    try:
        event = iteration(uid, input_tokens=7)
        applied = 0
        for _ in range(3):
            results = await asyncio.gather(
                *(spending.charge_iteration(d, event) for d in replicas for _ in range(4))
            )
            applied += sum(r.applied for r in results)
        assert applied == 1
        assert await spending.spent_build(replicas[0], f"b{uid}") == 21
        assert await spending.spent_today(replicas[1], f"u{uid}") == 21
    finally:
        for d in replicas:
            await d.store.close()  # type: ignore[attr-defined]


async def test_charge_goes_to_the_events_utc_day_and_month(infra: dict[str, str], uid: str) -> None:
    store = RedisSpendStore(infra["REDIS_URL"])
    await store.open()
    try:
        event = iteration(uid, output_tokens=2).model_copy(
            update={"occurred_at": datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC)}
        )
        deps = spending.Deps(store, SystemClock(), kiln_config.default())
        await spending.charge_iteration(deps, event)
        raw = store.redis
        assert await raw.get(f"kiln:spend:user:u{uid}:day:2024-12-31") == "30"
        assert await raw.get(f"kiln:spend:user:u{uid}:month:2024-12") == "30"
        assert await raw.get(f"kiln:spend:build:b{uid}") == "30"
        assert 0 < await raw.ttl(f"kiln:charged:{event.event_id}") <= 35 * 24 * 3600
    finally:
        await store.close()


async def test_running_builds_and_unknown_model_dead_letter(
    budget: bootstrap.Wiring, uid: str
) -> None:
    deps = budget.deps
    user = f"u{uid}"
    for n in range(2):
        await budget.bus.publish(
            BuildRequested(build_id=f"b{n}{uid}", user_id=user, idea_brief="x", tier="pro")
        )
    await until_async(
        lambda: _equals(spending.running_builds(deps, user), {f"b0{uid}", f"b1{uid}"})
    )
    await budget.bus.publish(
        BuildCompleted(
            build_id=f"b0{uid}", user_id=user, summary="ok", iterations=1, cost_micro_usd=0
        )
    )
    await until_async(lambda: _equals(spending.running_builds(deps, user), {f"b1{uid}"}))
    status = await spending.allowance(deps, user)
    assert (status.tier, status.spent_today_micro_usd) == ("pro", 0)
    assert status.allowance_today_micro_usd > 0

    bad = iteration(uid, input_tokens=1).model_copy(update={"model": "no-such-model"})
    await budget.bus.publish(bad)
    reason = await _dead_letter_reason(budget, str(bad.event_id))
    assert "no price for model 'no-such-model'" in reason
    assert await spending.spent_build(deps, f"b{uid}") == 0


async def _equals(awaitable: object, expected: object) -> bool:
    return await awaitable == expected  # type: ignore[misc]


async def _dead_letter_reason(wiring: bootstrap.Wiring, event_id: str) -> str:
    js = wiring.bus.nc.jetstream()
    deadline = asyncio.get_running_loop().time() + 15
    while asyncio.get_running_loop().time() < deadline:
        sub = await js.subscribe(
            f"kiln.dlq.{wiring.bus.service}.iteration_completed",
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        try:
            while True:
                msg = await sub.next_msg(timeout=0.5)
                if json.loads(msg.data).get("event_id") == event_id:
                    return str(msg.headers.get("Kiln-Dlq-Reason", "")) if msg.headers else ""
        except Exception:
            pass
        finally:
            await sub.unsubscribe()
    raise AssertionError(f"no dead letter for {event_id}")
