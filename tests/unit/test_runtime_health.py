"""Liveness and readiness (kiln_runtime.health): the heartbeat, the bus checks, the consume loop's
own state, and the thread that serves them."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import pytest
from nats.js.api import ConsumerConfig

from kiln_runtime.health import Health, HealthServer, Problems, bus_problems, watch
from kiln_runtime.pull import PULL_STALL_S, Puller

STALL_S = 20.0


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------- the heartbeat


def test_a_fresh_reading_is_judged_by_its_problems() -> None:
    clock = Clock()
    health = Health(STALL_S, clock)
    assert health.readiness() == ["starting"]  # nothing recorded yet: not ready, but live
    assert health.liveness() == []
    health.record(Problems())
    assert (health.readiness(), health.liveness()) == ([], [])
    health.record(Problems(not_ready=("not connected to NATS",)))
    assert (health.readiness(), health.liveness()) == (["not connected to NATS"], [])


def test_a_reading_older_than_the_threshold_means_the_event_loop_is_stuck() -> None:
    clock = Clock()
    health = Health(STALL_S, clock)
    health.record(Problems())
    clock.now += STALL_S  # at the threshold: still fine
    assert health.liveness() == []
    clock.now += 1
    (stalled,) = health.liveness()
    assert "has not beaten for 21s" in stalled
    assert health.readiness() == [stalled]  # a stuck loop does no work either
    health.record(Problems())  # the loop beats again
    assert (health.readiness(), health.liveness()) == ([], [])


async def test_the_heartbeat_stops_while_the_event_loop_is_blocked() -> None:
    health = Health(0.3)
    task = asyncio.create_task(watch(_Bus(consuming_since=time.monotonic()), health, every_s=0.02))
    try:
        await asyncio.sleep(0.1)
        assert health.liveness() == []
        seen: list[list[str]] = []

        def look() -> None:  # as the serving thread does, while the loop cannot run
            deadline = time.monotonic() + 2
            while not seen and time.monotonic() < deadline:
                if problems := health.liveness():
                    seen.append(problems)
                time.sleep(0.02)

        looker = threading.Thread(target=look)
        looker.start()
        time.sleep(0.8)  # noqa: ASYNC251 (the point: the event loop is stuck in a blocking call)
        looker.join()
        assert seen and "has not beaten" in seen[0][0]
        await asyncio.sleep(0.1)
        assert health.liveness() == []  # beating again
    finally:
        task.cancel()


async def test_a_failing_check_is_not_ready_and_the_loop_keeps_beating() -> None:
    class Broken:
        draining, nats_connected, nats_closed, connected_at, consuming_since = (
            False, True, False, 0.0, 0.0,
        )  # fmt: skip

        @property
        def pullers(self) -> dict[str, Any]:
            raise RuntimeError("boom")

    health = Health(STALL_S)
    task = asyncio.create_task(watch(Broken(), health, every_s=0.01))
    await asyncio.sleep(0.05)
    task.cancel()
    assert health.readiness() == ["the health check failed: boom"]
    assert health.liveness() == []


# ---------------------------------------------------------------------------- the bus


@dataclass
class _Loop:
    up: bool = True
    failed_at: float | None = None
    waiting_since: float | None = None


@dataclass
class _Bus:
    draining: bool = False
    nats_connected: bool = True
    nats_closed: bool = False
    connected_at: float | None = 0.0
    consuming_since: float | None = None
    pullers: dict[str, Any] = field(default_factory=dict)


NOW = 1000.0


def problems(bus: _Bus) -> tuple[list[str], list[str]]:
    found = bus_problems(bus, NOW, STALL_S)
    return list(found.not_ready), list(found.not_live)


def test_consuming_and_connected_is_ready_and_live() -> None:
    bus = _Bus(consuming_since=NOW - 100, pullers={"a": _Loop(), "b": _Loop()})
    assert problems(bus) == ([], [])


def test_not_ready_before_it_consumes() -> None:
    bus = _Bus(nats_connected=False, connected_at=None)
    assert problems(bus) == (["not connected to NATS", "not consuming yet"], [])
    bus = _Bus(pullers={"a": _Loop(up=False)})  # connected, still opening its stores
    assert problems(bus) == (["not consuming yet"], [])


def test_disconnected_is_not_ready_but_live() -> None:
    bus = _Bus(nats_connected=False, consuming_since=NOW - 100, pullers={"a": _Loop()})
    assert problems(bus) == (["not connected to NATS"], [])
    # the pull request it sent before is not answered: that is the disconnection, said once
    bus.pullers["a"].waiting_since = NOW - 60
    assert problems(bus) == (["not connected to NATS"], [])


def test_a_connection_closed_for_good_is_not_live() -> None:
    bus = _Bus(nats_connected=False, nats_closed=True, consuming_since=NOW - 100)
    not_ready, not_live = problems(bus)
    assert "the NATS connection is closed" in not_ready
    assert not_live == ["the NATS connection is closed for good"]


def test_shutting_down_is_not_ready_and_still_live() -> None:
    bus = _Bus(
        draining=True,
        nats_connected=False,
        nats_closed=True,
        consuming_since=NOW - 100,
        pullers={"a": _Loop(up=False, failed_at=NOW - 60)},
    )
    assert problems(bus) == (["shutting down"], [])


def test_a_consume_loop_that_failed_is_not_ready_then_not_live() -> None:
    bus = _Bus(consuming_since=NOW - 100, pullers={"a": _Loop(up=False, failed_at=NOW - 2)})
    assert problems(bus) == (["consume loop a failed 2s ago"], [])
    bus.pullers["a"].up = True  # started again, JetStream has not answered it yet
    assert problems(bus) == (["consume loop a failed 2s ago"], [])
    bus.pullers["a"].failed_at = NOW - STALL_S - 5  # and it never worked again
    not_ready, not_live = problems(bus)
    assert not_ready == ["consume loop a failed 25s ago"]
    assert not_live == ["consume loop a has not worked for 25s"]


def test_a_consume_loop_that_never_runs_is_not_ready_then_not_live() -> None:
    bus = _Bus(consuming_since=NOW - 1, pullers={"a": _Loop(up=False)})
    assert problems(bus) == (["consume loop a is not running"], [])
    bus.consuming_since = NOW - STALL_S - 1
    assert problems(bus)[1] == ["consume loop a has not run for 21s"]


def test_a_consume_loop_jetstream_does_not_answer_is_not_ready() -> None:
    loop = _Loop(waiting_since=NOW - PULL_STALL_S + 1)
    bus = _Bus(consuming_since=NOW - 100, pullers={"a": loop})
    assert problems(bus) == ([], [])  # an answer is due within the pull's expiry
    loop.waiting_since = NOW - PULL_STALL_S - 2
    assert problems(bus) == (["consume loop a: no answer from JetStream for 17s"], [])
    bus.connected_at = NOW - 1  # just reconnected: the request before it was lost, not refused
    assert problems(bus) == ([], [])


# ---------------------------------------------------------------------------- the consume loop


class _Status:
    def __init__(self, code: str) -> None:
        self.headers = {"Status": code}
        self.data = b""


class _FakeNc:
    def __init__(self, subscribe_fails: bool = False) -> None:
        self.subscribe_fails = subscribe_fails
        self.requests: list[bytes] = []
        self.cb: Any = None

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject: str, cb: Any, pending_msgs_limit: int) -> Any:
        if self.subscribe_fails:
            raise ConnectionError("nats: connection closed")
        self.cb = cb
        return self

    async def unsubscribe(self) -> None:
        pass

    async def publish(self, subject: str, payload: bytes, reply: str) -> None:
        self.requests.append(payload)


@dataclass
class _PullerBus:
    nc: _FakeNc
    service: str = "test"


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.01)


async def _nothing(msg: Any) -> None:
    pass


_CONFIG = ConsumerConfig(durable_name="test-durable")


async def test_the_consume_loop_says_it_is_up_waiting_and_answered() -> None:
    nc = _FakeNc()
    puller = Puller(_PullerBus(nc), "kiln.>", _CONFIG, 2, _nothing)  # type: ignore[arg-type]
    assert (puller.up, puller.failed_at, puller.waiting_since) == (False, None, None)
    task = asyncio.create_task(puller.run())
    await _until(lambda: nc.requests)
    assert puller.up and puller.waiting_since is not None
    assert json.loads(nc.requests[0])["batch"] == 2
    await nc.cb(_Status("408"))  # the request expired unfilled: JetStream answered
    assert puller.waiting_since is None
    await _until(lambda: len(nc.requests) == 2)  # the next request
    assert puller.waiting_since is not None
    await nc.cb(_Status("409"))  # refused: no proof that the consumer is served
    assert puller.waiting_since is not None
    await _until(lambda: len(nc.requests) == 3)
    task.cancel()  # while it waits for an answer
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (puller.up, puller.failed_at) == (False, None)  # stopped, not failed


async def test_the_consume_loop_stops_when_cancelled_as_an_answer_arrives() -> None:
    """What stop() relies on under load: the cancellation is not lost to the answer."""
    nc = _FakeNc()
    puller = Puller(_PullerBus(nc), "kiln.>", _CONFIG, 1, _nothing)  # type: ignore[arg-type]
    task = asyncio.create_task(puller.run())
    await _until(lambda: nc.requests)
    await nc.cb(_Status("408"))  # the answer wakes the loop ...
    task.cancel()  # ... and the cancellation comes with it
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert not puller.up


async def test_a_consume_loop_that_fails_says_when_until_jetstream_answers_it_again() -> None:
    nc = _FakeNc(subscribe_fails=True)
    puller = Puller(_PullerBus(nc), "kiln.>", _CONFIG, 1, _nothing)  # type: ignore[arg-type]
    with pytest.raises(ConnectionError):
        await puller.run()
    assert not puller.up and puller.failed_at is not None
    failed_at = puller.failed_at
    with pytest.raises(ConnectionError):  # keep_running starts it again; it fails again
        await puller.run()
    assert puller.failed_at == failed_at  # down since the first failure
    nc.subscribe_fails = False
    task = asyncio.create_task(puller.run())
    await _until(lambda: nc.requests)
    assert puller.up and puller.failed_at == failed_at  # running, not proven yet
    await nc.cb(_Status("408"))
    assert puller.failed_at is None
    await _until(lambda: len(nc.requests) == 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ---------------------------------------------------------------------------- serving


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_the_thread_serves_livez_readyz_and_the_metrics() -> None:
    clock = Clock()
    health = Health(STALL_S, clock)
    server = HealthServer(0, health, host="127.0.0.1")
    base = f"http://127.0.0.1:{server.port}"
    try:
        status, body = _get(f"{base}/readyz")
        assert status == 503
        assert json.loads(body) == {"status": "not ready", "problems": ["starting"]}
        assert _get(f"{base}/livez") == (200, json.dumps({"status": "live", "problems": []}))
        health.record(Problems())
        assert _get(f"{base}/readyz") == (200, json.dumps({"status": "ready", "problems": []}))
        status, body = _get(f"{base}/metrics")
        assert status == 200 and "kiln_messages_handled_total" in body
        clock.now += STALL_S + 5  # the event loop has not recorded a reading since
        status, body = _get(f"{base}/livez")
        assert status == 503
        assert json.loads(body)["problems"] == ["the event loop has not beaten for 25s"]
        assert _get(f"{base}/readyz")[0] == 503
    finally:
        server.close()
