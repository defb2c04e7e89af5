"""Messages to a build over the gateway (uvicorn on a free port, real NATS and Postgres): accepted
once per Idempotency-Key, numbered, published in order; bad input refused; another user's build
a 404; a continued build projected as running again."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from kiln_contracts import (
    BuildCompleted,
    BuildContinued,
    BuildRequested,
    subjects,
)
from tests.integration.gateway_fixtures import Gateway, read_sse, running_gateway, until

pytestmark = pytest.mark.integration

BRIEF = {"idea_brief": "A tiny CLI that counts words.", "understanding_qna": []}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gw(infra) -> AsyncIterator[Gateway]:
    async with running_gateway(infra, "gwmsg", sse_heartbeat_s=0.3, republish_every_s=0.5) as g:
        yield g


async def sent_messages(gw: Gateway, build_id: str) -> list[dict[str, Any]]:
    """The SendUserMessage commands of the build on the stream, in stream order."""
    sub = await gw.bus.nc.jetstream().subscribe(
        subjects.subject(build_id, "send_user_message"), stream=subjects.STREAM,
        ordered_consumer=True,
    )  # fmt: skip
    out = []
    try:
        while True:
            msg = await sub.next_msg(timeout=0.5)
            out.append(json.loads(msg.data))
    except Exception:
        pass
    finally:
        await sub.unsubscribe()
    return out


async def test_a_message_is_accepted_once_per_key_numbered_and_published(gw: Gateway, uid: str):
    key = await gw.key(f"a{uid}")
    async with gw.client(key) as c:
        build_id = (await c.post("/v1/builds", json=BRIEF)).json()["build_id"]
        url = f"/v1/builds/{build_id}/messages"
        first = await c.post(
            url, json={"text": " add a --json flag "}, headers={"Idempotency-Key": "k1"}
        )
        assert first.status_code == 202, first.text
        body = first.json()
        assert (body["build_id"], body["seq"]) == (build_id, 1)
        again = await c.post(
            url, json={"text": "add a --json flag"}, headers={"Idempotency-Key": "k1"}
        )
        assert (again.status_code, again.json()) == (202, body)  # the same message
        conflict = await c.post(url, json={"text": "other"}, headers={"Idempotency-Key": "k1"})
        assert conflict.status_code == 409
        assert conflict.headers["content-type"] == "application/problem+json"
        second = await c.post(url, json={"text": "and tests"})
        assert second.json()["seq"] == 2
    sent = await sent_messages(gw, build_id)
    assert [(m["seq"], m["text"], m["message_id"]) for m in sent] == [
        (1, "add a --json flag", body["message_id"]),
        (2, "and tests", second.json()["message_id"]),
    ]


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"text": ""},
        {"text": "   "},
        {"text": 5},
        {"text": "x" * 20_001},
        {"text": "hi", "extra": 1},
        {"text": "a\u0000b"},
        [],
    ],
)
async def test_bad_input_is_a_422_and_sends_nothing(gw: Gateway, uid: str, payload: Any):
    key = await gw.key(f"v{uid}")
    async with gw.client(key) as c:
        build_id = (await c.post("/v1/builds", json=BRIEF)).json()["build_id"]
        r = await c.post(f"/v1/builds/{build_id}/messages", json=payload)
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith("invalid request")
        raw = await c.post(
            f"/v1/builds/{build_id}/messages",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        )
        assert raw.status_code == 422
    assert await sent_messages(gw, build_id) == []


async def test_another_users_build_is_a_404_and_a_missing_key_a_401(gw: Gateway, uid: str):
    mine, theirs = await gw.key(f"o{uid}"), await gw.key(f"t{uid}")
    async with gw.client(mine) as c:
        build_id = (await c.post("/v1/builds", json=BRIEF)).json()["build_id"]
    async with gw.client(theirs) as c:
        r = await c.post(f"/v1/builds/{build_id}/messages", json={"text": "hijack"})
        assert (r.status_code, r.json()["detail"]) == (404, "build not found")
        assert (await c.post("/v1/builds/nope/messages", json={"text": "x"})).status_code == 404
    async with gw.client() as c:
        assert (
            await c.post(f"/v1/builds/{build_id}/messages", json={"text": "x"})
        ).status_code == 401
    assert await sent_messages(gw, build_id) == []


async def test_a_message_stored_while_the_bus_is_down_is_sent_later(gw: Gateway, uid: str):
    key = await gw.key(f"d{uid}")
    async with gw.client(key) as c:
        build_id = (await c.post("/v1/builds", json=BRIEF)).json()["build_id"]
    real = gw.rt.publish

    async def broken(msg: Any) -> None:
        raise ConnectionError("bus down")

    gw.rt.publish = broken
    try:
        async with gw.client(key) as c:
            r = await c.post(f"/v1/builds/{build_id}/messages", json={"text": "later"})
            assert r.status_code == 503 and r.headers["retry-after"] == "2"
    finally:
        gw.rt.publish = real

    async def sent() -> bool:
        return [m["text"] for m in await sent_messages(gw, build_id)] == ["later"]

    await until(sent)


async def test_a_continued_build_is_running_again_and_its_stream_ends_at_its_new_end(
    gw: Gateway, uid: str
):
    user, build_id = f"c{uid}", f"b{uid}"
    key = await gw.key(user)
    await gw.bus.publish(BuildRequested(build_id=build_id, user_id=user, idea_brief="x"))

    def ended(k: int, iterations: int) -> BuildCompleted:
        return BuildCompleted(
            build_id=build_id, user_id=user, summary=f"run {k}", iterations=iterations,
            cost_micro_usd=10 * iterations, continuation=k,
        )  # fmt: skip

    await gw.bus.publish(ended(0, 3))
    async with gw.client(key) as c:

        async def status(expected: str, continuations: int) -> bool:
            b = (await c.get(f"/v1/builds/{build_id}")).json()
            return (b.get("status"), b.get("continuations")) == (expected, continuations)

        await until(lambda: status("completed", 0))
        r = await c.post(f"/v1/builds/{build_id}/messages", json={"text": "one more"})
        assert r.status_code == 202
        continued = BuildContinued(
            build_id=build_id, user_id=user, continuation=1, after="completed",
            message_id=r.json()["message_id"], iterations=3, cost_micro_usd=30,
        )  # fmt: skip
        await gw.bus.publish(continued)
        await gw.bus.publish(continued.with_id(continued.event_id))
        await until(lambda: status("running", 1))
        b = (await c.get(f"/v1/builds/{build_id}")).json()
        assert (b["summary"], b["finished_at"], b["iteration"]) == (None, None, 3)
        await gw.bus.publish(ended(1, 5))
        await until(lambda: status("completed", 1))
        b = (await c.get(f"/v1/builds/{build_id}")).json()
        assert (b["summary"], b["iteration"], b["cost_micro_usd"]) == ("run 1", 5, 50)

        # the history goes past the first run's end, to the end of the run it continued with
        async with c.stream("GET", f"/v1/builds/{build_id}/events") as resp:
            events = await read_sse(resp.aiter_lines())
        kinds = [e["event"] for e in events if "event" in e]
        assert kinds == [
            "build_requested", "build_completed", "send_user_message", "build_continued",
            "build_completed",
        ]  # fmt: skip


async def test_continuing_a_build_at_the_tiers_cap_is_a_429(gw: Gateway, uid: str):
    user = f"q{uid}"
    key = await gw.key(user, tier="free")  # one concurrent build
    await gw.bus.publish(BuildRequested(build_id=f"e{uid}", user_id=user, idea_brief="x"))
    await gw.bus.publish(
        BuildCompleted(build_id=f"e{uid}", user_id=user, summary="", iterations=1, cost_micro_usd=0)
    )
    async with gw.client(key) as c:

        async def completed() -> bool:
            return (await c.get(f"/v1/builds/e{uid}")).json().get("status") == "completed"

        await until(completed)
        running = (await c.post("/v1/builds", json=BRIEF)).json()["build_id"]
        assert (
            await c.post(f"/v1/builds/{running}/messages", json={"text": "ok"})
        ).status_code == 202
        r = await c.post(f"/v1/builds/e{uid}/messages", json={"text": "continue"})
        assert r.status_code == 429 and r.headers["retry-after"] == "30"
        assert "before continuing this one" in r.json()["detail"]
