"""The budget service on real NATS and Redis: each iteration is charged exactly once, and the
spend comes back after Redis loses it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest

from kiln_budget import allowance, bootstrap, spending
from kiln_budget.adapters.clock import SystemClock
from kiln_budget.adapters.redis_store import RedisSpendStore
from kiln_budget.deps import Deps
from kiln_budget.settings import BudgetSettings
from kiln_contracts import (
    BuildCompleted,
    BuildContinued,
    BuildRequested,
    Envelope,
    IterationCompleted,
    TopUpRequested,
    Usage,
    subjects,
)
from kiln_contracts.rpc import BudgetStatus, BudgetStatusReply, BudgetStatusRequest
from kiln_runtime import config as kiln_config
from tests.integration.wirings import started

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
    async with started(bootstrap.build(settings, service=f"budget-{uid}")) as wiring:
        yield wiring


def iteration(uid: str, it: int = 1, **usage: int) -> IterationCompleted:
    return IterationCompleted(
        build_id=f"b{uid}",
        user_id=f"u{uid}",
        iteration=it,
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


async def opened(infra: dict[str, str]) -> RedisSpendStore:
    """The store, taken as intact (these tests charge through the domain, with no stream to
    rebuild from): what a rebuild from an empty stream leaves."""
    store = RedisSpendStore(infra["REDIS_URL"])
    await store.open()
    if not await store.intact():
        assert await store.finish_rebuild(await store.begin_rebuild())
    return store


async def test_two_replicas_charging_the_same_event_concurrently_charge_once(
    infra: dict[str, str], uid: str
) -> None:
    replicas = []
    for _ in range(2):
        store = await opened(infra)
        replicas.append(Deps(store, SystemClock(), kiln_config.default()))
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
    store = await opened(infra)
    try:
        event = iteration(uid, output_tokens=2).model_copy(
            update={"occurred_at": datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC)}
        )
        deps = Deps(store, SystemClock(), kiln_config.default())
        await spending.charge_iteration(deps, event)
        raw = store.redis
        assert await raw.get(f"kiln:spend:user:u{uid}:day:2024-12-31") == "30"
        assert await raw.get(f"kiln:spend:user:u{uid}:month:2024-12") == "30"
        assert await raw.get(f"kiln:spend:build:b{uid}") == "30"
        assert 0 < await raw.ttl(f"kiln:charged:{event.event_id}") <= 35 * 24 * 3600
    finally:
        await store.close()


async def test_running_builds_and_an_unknown_model_charged_at_the_fallback(
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
    status = await allowance.allowance(deps, user)
    assert (status.tier, status.spent_today_micro_usd) == ("pro", 0)
    assert status.allowance_today_micro_usd > 0

    # a model with no price is never free and never dead-lettered: the fallback's prices
    # (claude-opus-4-1, $15 per Mtok input) are charged
    bad = iteration(uid, input_tokens=1).model_copy(update={"model": "no-such-model"})
    await budget.bus.publish(bad)
    await until_async(lambda: _equals(spending.spent_build(deps, f"b{uid}"), 15))


async def test_a_continued_build_runs_again_once_per_run(budget: bootstrap.Wiring, uid: str):
    deps, user, build = budget.deps, f"u{uid}", f"b{uid}"

    def ended(k: int) -> BuildCompleted:
        return BuildCompleted(
            build_id=build, user_id=user, summary="", iterations=1, cost_micro_usd=0,
            continuation=k,
        )  # fmt: skip

    await budget.bus.publish(BuildRequested(build_id=build, user_id=user, idea_brief="x"))
    await budget.bus.publish(ended(0))
    await until_async(lambda: _equals(spending.running_builds(deps, user), set()))
    again = BuildContinued(
        build_id=build, user_id=user, continuation=1, after="completed", message_id="m1",
        iterations=1, cost_micro_usd=0,
    )  # fmt: skip
    await budget.bus.publish(again)
    seq = await republish(budget, again)  # delivered twice
    await until_async(lambda: consumer_caught_up(budget, "build_continued", seq))
    assert await spending.running_builds(deps, user) == {build}
    seq = await republish(budget, ended(0))  # the first run's end, late: it stays running
    await until_async(lambda: consumer_caught_up(budget, "build_completed", seq))
    assert await spending.running_builds(deps, user) == {build}
    await budget.bus.publish(ended(1))
    await until_async(lambda: _equals(spending.running_builds(deps, user), set()))
    # the same on the store, out of order: a continuation after its own run's end stays out
    store = deps.store
    await store.build_ended(user, build, 2)
    assert not await store.build_continued(user, build, 2)
    assert not await store.build_started(user, build)
    assert await spending.running_builds(deps, user) == set()


async def _equals(awaitable: object, expected: object) -> bool:
    return await awaitable == expected  # type: ignore[misc]


async def republish(wiring: bootstrap.Wiring, event: Envelope) -> int:
    """``event`` again under another Nats-Msg-Id (as after the duplicate window); its seq."""
    ack = await wiring.bus.nc.jetstream().publish(
        subjects.subject_of(event),
        event.model_dump_json().encode(),
        headers={"Nats-Msg-Id": f"again-{event.event_id}"},
    )
    assert not ack.duplicate
    return ack.seq


async def status_of(wiring: bootstrap.Wiring, user: str) -> BudgetStatus:
    """The budget's answer on kiln.rpc.budget.status, as the gateway asks it."""
    request = BudgetStatusRequest(user_id=user).model_dump_json().encode()
    msg = await wiring.bus.nc.request(subjects.BUDGET_STATUS, request, timeout=10)
    reply = BudgetStatusReply.model_validate_json(msg.data)
    assert reply.ok and reply.status is not None, reply.error
    return reply.status


async def test_spend_and_top_ups_survive_losing_redis(budget: bootstrap.Wiring, uid: str) -> None:
    deps, user = budget.deps, f"u{uid}"
    epoch, far = datetime(1970, 1, 1, tzinfo=UTC), datetime(2999, 1, 1, tzinfo=UTC)
    charged = [
        iteration(uid, 1, input_tokens=1000, output_tokens=10),
        iteration(uid, 2, input_tokens=2000, cache_read_input_tokens=500),
        iteration(uid, 3, output_tokens=300, cache_creation_input_tokens=40),
    ]
    priced = sum(spending.cost_of(deps.config, e) for e in charged)
    for event in charged:
        await budget.bus.publish(event)
    await budget.bus.publish(TopUpRequested.of(user, f"t{uid}", 5_000))
    seq = await republish(budget, charged[0])  # the same iteration twice on the stream
    await until_async(lambda: consumer_caught_up(budget, "iteration_completed", seq))
    await until_async(lambda: _equals(deps.store.topups(user, epoch, far), 5_000))
    assert await spending.spent_today(deps, user) == priced
    assert await spending.spent_this_month(deps, user) == priced

    # Redis loses everything in the middle of the day
    await deps.store.redis.flushall()  # type: ignore[attr-defined]
    assert await spending.spent_today(deps, user) == 0 and not await deps.store.intact()

    # the next charge finds the store lost: it is rebuilt from the stream first, then added to
    later = iteration(uid, 4, output_tokens=7)
    await budget.bus.publish(later)
    total = priced + spending.cost_of(deps.config, later)
    await until_async(lambda: _equals(spending.spent_build(deps, f"b{uid}"), total))
    assert await deps.store.intact()
    assert await spending.spent_today(deps, user) == total
    assert await spending.spent_this_month(deps, user) == total
    assert await deps.store.topups(user, epoch, far) == 5_000

    # redeliveries of an iteration charged before the loss and of one charged after: nothing more
    seq = max([await republish(budget, charged[1]), await republish(budget, later)])
    await until_async(lambda: consumer_caught_up(budget, "iteration_completed", seq))
    status = await status_of(budget, user)
    assert (status.spent_period_micro_usd, status.spent_cycle_micro_usd) == (total, total)
    assert status.topups_cycle_micro_usd == 5_000
    assert await spending.spent_build(deps, f"b{uid}") == total


async def test_a_lost_redis_is_rebuilt_before_the_budget_answers(
    budget: bootstrap.Wiring, uid: str
) -> None:
    deps, user = budget.deps, f"u{uid}"
    event = iteration(uid, input_tokens=100)
    await budget.bus.publish(event)
    await until_async(lambda: spending.spent_build(deps, f"b{uid}"))
    await deps.store.redis.flushall()  # type: ignore[attr-defined]
    status = await status_of(budget, user)
    assert status.spent_period_micro_usd == spending.cost_of(deps.config, event) == 300
    assert await deps.store.intact()
