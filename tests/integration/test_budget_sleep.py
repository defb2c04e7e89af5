"""Sleep and wake on real NATS (message schedules on nats-server >= 2.12) and Redis.

Periods are shortened (a "day" of a few seconds) and the allowance is tiny, so one iteration uses it
up; the scheduled wake then fires at the end of the period, a few seconds later."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from kiln_budget import bootstrap, spending
from kiln_budget.periods import ShortCalendar
from kiln_budget.settings import BudgetSettings
from kiln_contracts import (
    BuildRequested,
    BuildResumed,
    IterationCompleted,
    TopUpRequested,
    Usage,
    budget_id,
    subjects,
)
from kiln_contracts.rpc import BudgetStatus, BudgetStatusReply, BudgetStatusRequest
from kiln_runtime.streams import ensure_streams

pytestmark = pytest.mark.integration

PERIOD_S = 3.0
ALLOWANCE_USD = Decimal("0.001")  # 1_000 micro-USD: one 400-token sonnet iteration is over it


def settings(infra: dict[str, str], **extra: Any) -> BudgetSettings:
    return BudgetSettings(
        nats_url=infra["NATS_URL"],
        redis_url=infra["REDIS_URL"],
        ack_wait_s=5,
        max_deliver=3,
        budget_period_s=PERIOD_S,
        budget_periods_per_cycle=10,
        budget_demo_allowance_usd=ALLOWANCE_USD,
        **extra,
    )


@dataclass
class FixedClock:
    at: datetime

    def now(self) -> datetime:
        return self.at


def later() -> datetime:
    """A moment an hour ahead: with a clock fixed there and events dated there, charge and check
    fall in one period whatever the real time (the wake it schedules fires after the test)."""
    return datetime.now(UTC) + timedelta(hours=1)


async def started(
    infra: dict[str, str], service: str, clock: FixedClock | None = None
) -> bootstrap.Wiring:
    wiring = bootstrap.build(settings(infra), service=service, clock=clock)
    await wiring.bus.connect()
    await wiring.start()
    await wiring.bus.start()
    return wiring


async def stopped(wiring: bootstrap.Wiring) -> None:
    await wiring.bus.stop()
    await wiring.stop()


@pytest.fixture
async def nc(infra: dict[str, str]) -> AsyncIterator[Client]:
    client = Client()
    await client.connect(infra["NATS_URL"])
    await ensure_streams(client)
    yield client
    await client.close()


@pytest.fixture
async def budget(infra: dict[str, str], uid: str) -> AsyncIterator[bootstrap.Wiring]:
    wiring = await started(infra, f"budget-{uid}")
    try:
        yield wiring
    finally:
        await stopped(wiring)


async def until(predicate: Callable[[], Awaitable[object]], timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.05)


async def on_stream(nc: Client, build_id: str, kind: str) -> list[dict[str, Any]]:
    """Every ``kind`` message of the build on the stream, oldest first."""
    js = nc.jetstream()
    sub = await js.subscribe(
        subjects.subject(build_id, kind),
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    found = []
    try:
        while True:
            msg = await sub.next_msg(timeout=0.3)
            found.append(json.loads(msg.data))
    except Exception:
        pass
    finally:
        await sub.unsubscribe()
    return found


async def status_of(nc: Client, user: str) -> BudgetStatus:
    """The budget's answer on kiln.rpc.budget.status."""
    request = BudgetStatusRequest(user_id=user).model_dump_json().encode()
    reply = BudgetStatusReply.model_validate_json(
        (await nc.request(subjects.BUDGET_STATUS, request, timeout=10)).data
    )
    assert reply.ok and reply.status is not None, reply.error
    return reply.status


async def count_at_least(nc: Client, build_id: str, kind: str, n: int) -> bool:
    return len(await on_stream(nc, build_id, kind)) >= n


async def fresh_period() -> None:
    """Start just after a period begins: a charge and its check then fall in the same period
    (positioning in time, not waiting for an outcome)."""
    cal = ShortCalendar(PERIOD_S)
    now = datetime.now(UTC)
    left = (cal.period(now).end - now).total_seconds()
    if left < PERIOD_S - 0.5:
        await asyncio.sleep(left + 0.05)


def requested(uid: str, n: int = 0) -> BuildRequested:
    return BuildRequested(build_id=f"b{n}{uid}", user_id=f"u{uid}", idea_brief="x", tier="pro")


def iteration(
    uid: str, n: int = 0, it: int = 1, tokens: int = 400, at: datetime | None = None
) -> IterationCompleted:
    return IterationCompleted(
        build_id=f"b{n}{uid}",
        user_id=f"u{uid}",
        iteration=it,
        model="claude-sonnet-4-5",
        usage=Usage(input_tokens=tokens),
        stop_reason="tool_use",
        occurred_at=at or datetime.now(UTC),
    )


async def test_a_tiny_allowance_sleeps_every_running_build_and_the_scheduled_wake_fires(
    budget: bootstrap.Wiring, nc: Client, uid: str
) -> None:
    deps = budget.deps
    user = f"u{uid}"
    for n in (0, 1):
        await budget.bus.publish(requested(uid, n))
    await until(lambda: _equals(spending.running_builds(deps, user), {f"b0{uid}", f"b1{uid}"}))

    await fresh_period()
    await budget.bus.publish(iteration(uid, 0, tokens=100))  # 300 of 1_000: awake
    await until(lambda: _equals(spending.spent_today(deps, user), 300))
    assert await on_stream(nc, f"b0{uid}", "sleep_requested") == []

    event = iteration(uid, 0, it=2)  # +1_200: over the allowance
    await budget.bus.publish(event)
    for n in (0, 1):
        await until(lambda n=n: count_at_least(nc, f"b{n}{uid}", "sleep_requested", 1))
    (sleep,) = await on_stream(nc, f"b1{uid}", "sleep_requested")
    assert sleep["causation_id"] == str(event.event_id)
    assert "daily allowance used up" in sleep["reason"]
    assert await deps.store.sleeping(user) == {f"b0{uid}", f"b1{uid}"}

    # The reset: the server publishes the scheduled WakeRequested at the period's end.
    wake_at = datetime.fromisoformat(sleep["wake_at"])
    assert await on_stream(nc, f"b0{uid}", "wake_requested") == []
    for n in (0, 1):
        await until(lambda n=n: count_at_least(nc, f"b{n}{uid}", "wake_requested", 1), 10)
    assert datetime.now(UTC) >= wake_at
    (wake,) = await on_stream(nc, f"b0{uid}", "wake_requested")
    assert wake["reason"] == "allowance reset"


async def test_a_duplicate_iteration_sleeps_once_and_a_resumed_build_sleeps_again(
    infra: dict[str, str], nc: Client, uid: str
) -> None:
    at = later()
    budget = await started(infra, f"budget-{uid}", FixedClock(at))
    try:
        await _duplicate_then_resume(budget, nc, uid, at)
    finally:
        await stopped(budget)


async def _duplicate_then_resume(
    budget: bootstrap.Wiring, nc: Client, uid: str, at: datetime
) -> None:
    deps = budget.deps
    await budget.bus.publish(requested(uid))
    event = iteration(uid, at=at)
    await budget.bus.publish(event)
    await until(lambda: count_at_least(nc, f"b0{uid}", "sleep_requested", 1))
    (sleep,) = await on_stream(nc, f"b0{uid}", "sleep_requested")
    status = await status_of(nc, f"u{uid}")  # what the gateway's GET /v1/budget shows
    assert (status.allowance_micro_usd, status.remaining_micro_usd) == (1_000, 0)
    assert status.spent_period_micro_usd == 1_200 and status.tier == "pro"
    assert status.wake_at == datetime.fromisoformat(sleep["wake_at"])
    # the same event again under another Nats-Msg-Id (so the server does not drop it)
    ack = await nc.jetstream().publish(
        subjects.subject_of(event),
        event.model_dump_json().encode(),
        headers={"Nats-Msg-Id": f"again-{event.event_id}"},
    )
    await until(lambda: _caught_up(budget, "iteration_completed", ack.seq))
    await budget.bus.publish(iteration(uid, it=2, tokens=1, at=at))
    await until(lambda: _equals(spending.spent_build(deps, f"b0{uid}"), 1_203))
    assert len(await on_stream(nc, f"b0{uid}", "sleep_requested")) == 1

    # woken (by the user, say) in the same period, still over the allowance: asleep again at
    # once, before any other iteration (the agent calls no model behind the closed gate)
    await budget.bus.publish(BuildResumed(build_id=f"b0{uid}", user_id=f"u{uid}", reason="user"))
    await until(lambda: count_at_least(nc, f"b0{uid}", "sleep_requested", 2))
    assert await deps.store.sleeping(f"u{uid}") == {f"b0{uid}"}


async def test_two_budget_replicas_charge_and_sleep_once(
    infra: dict[str, str], nc: Client, uid: str
) -> None:
    service = f"budget-{uid}"  # the same durable consumers: a real pair of replicas
    at = later()
    replicas = [await started(infra, service, FixedClock(at)) for _ in range(2)]
    try:
        deps = replicas[0].deps
        await replicas[0].bus.publish(requested(uid))
        events = [iteration(uid, it=i, tokens=100, at=at) for i in range(1, 6)]  # 5 x 300
        seqs = []
        for round_ in range(3):  # each event three times, under different message ids
            for e in events:
                ack = await nc.jetstream().publish(
                    subjects.subject_of(e),
                    e.model_dump_json().encode(),
                    headers={"Nats-Msg-Id": f"{round_}-{e.event_id}"},
                )
                seqs.append(ack.seq)
        await until(lambda: _caught_up(replicas[0], "iteration_completed", max(seqs)))
        assert await spending.spent_build(deps, f"b0{uid}") == 1_500
        assert len(await on_stream(nc, f"b0{uid}", "sleep_requested")) == 1
    finally:
        for r in replicas:
            await stopped(r)


async def test_a_budget_restart_loses_neither_spend_nor_the_scheduled_wake(
    infra: dict[str, str], nc: Client, uid: str
) -> None:
    service = f"budget-{uid}"
    first = await started(infra, service)
    try:
        await first.bus.publish(requested(uid))
        await fresh_period()
        await first.bus.publish(iteration(uid))
        await until(lambda: count_at_least(nc, f"b0{uid}", "sleep_requested", 1))
    finally:
        await stopped(first)  # the budget is gone before the reset

    await until(lambda: count_at_least(nc, f"b0{uid}", "wake_requested", 1), 10)
    second = await started(infra, service)
    try:
        assert await second.deps.store.build(f"b0{uid}") == 1_200
        assert await spending.running_builds(second.deps, f"u{uid}") == {f"b0{uid}"}
    finally:
        await stopped(second)


async def test_a_top_up_wakes_at_once(nc: Client, infra: dict[str, str], uid: str) -> None:
    at = later()
    budget = await started(infra, f"budget-{uid}", FixedClock(at))
    try:
        await _top_up(budget, nc, uid, at)
    finally:
        await stopped(budget)


@dataclass
class AsleepInTheReadModel:
    """The gateway's read model, as the top-up route reads it: the user's sleeping builds."""

    build_ids: list[str]

    async def list_for_user(self, user_id: str, **_: Any) -> list[Any]:
        return [SimpleNamespace(build_id=b) for b in self.build_ids]


async def _top_up(budget: bootstrap.Wiring, nc: Client, uid: str, at: datetime) -> None:
    from kiln_gateway import routes_budget_admin

    user = f"u{uid}"
    published: list[Any] = []

    async def publish(msg: Any) -> None:
        published.append(msg)
        await budget.bus.publish(msg)

    app = FastAPI()
    app.include_router(routes_budget_admin.router)
    app.state.runtime = SimpleNamespace(
        settings=SimpleNamespace(admin_api_key="adm"),
        publish=publish,
        store=AsleepInTheReadModel([f"b0{uid}"]),
    )
    await budget.bus.publish(requested(uid))
    await budget.bus.publish(iteration(uid, at=at))
    await until(lambda: count_at_least(nc, f"b0{uid}", "sleep_requested", 1))
    gate, _ = await budget.gates.read(user)
    assert gate is not None and gate.closed_at(at)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        body = {"user_id": user, "amount_usd": "0.5", "topup_id": f"t{uid}"}
        assert (await client.post("/v1/budget/top-up", json=body)).status_code == 401
        bad = await client.post(
            "/v1/budget/top-up", json={**body, "amount_usd": "-1"}, headers={"X-API-Key": "adm"}
        )
        assert bad.status_code == 422
        done = await client.post("/v1/budget/top-up", json=body, headers={"X-API-Key": "adm"})
        assert done.status_code == 200, done.text
        assert done.json()["woken"] == [f"b0{uid}"]
        assert done.json()["amount_micro_usd"] == 500_000
        # a retry with the same topup_id is the same top-up
        again = await client.post("/v1/budget/top-up", json=body, headers={"X-API-Key": "adm"})
        assert again.status_code == 200
    (command, repeat) = published
    assert isinstance(command, TopUpRequested) and command.build_id == budget_id(user)
    assert (repeat.event_id, repeat.topup_id) == (command.event_id, command.topup_id)

    await until(lambda: _at_least(wakes_of(nc, f"b0{uid}"), 1))
    # now, not only at the reset; credited once, at the time it was requested
    epoch, far = datetime(1970, 1, 1, tzinfo=UTC), datetime(2999, 1, 1, tzinfo=UTC)
    assert await budget.deps.store.topups(user, epoch, far) == 500_000

    # the same command delivered again (another Nats-Msg-Id, as after the duplicate window) and
    # the same top-up id with another amount: acked, and nothing more credited or woken
    other = TopUpRequested.of(user, f"t{uid}", 900_000)
    for msg, msg_id in ((command, f"again-{command.event_id}"), (other, f"other-{uid}")):
        ack = await nc.jetstream().publish(
            subjects.subject_of(msg),
            msg.model_dump_json().encode(),
            headers={"Nats-Msg-Id": msg_id},
        )
    await until(lambda: _caught_up(budget, "top_up_requested", ack.seq))
    assert await budget.deps.store.topups(user, epoch, far) == 500_000
    wakes = await wakes_of(nc, f"b0{uid}")
    assert len(wakes) == 1 and wakes[0]["causation_id"] == str(command.event_id)


async def wakes_of(nc: Client, build_id: str) -> list[dict[str, Any]]:
    return [w for w in await on_stream(nc, build_id, "wake_requested") if w["reason"] == "top-up"]


async def _at_least(awaitable: Awaitable[list[Any]], n: int) -> bool:
    return len(await awaitable) >= n


async def _equals(awaitable: Awaitable[object], expected: object) -> bool:
    return await awaitable == expected


async def _caught_up(wiring: bootstrap.Wiring, kind: str, seq: int) -> bool:
    durable = f"{wiring.bus.service}-{kind}".replace("_", "-")
    info = await wiring.bus.nc.jetstream().consumer_info(subjects.STREAM, durable)
    return info.ack_floor.stream_seq >= seq and not info.num_ack_pending
