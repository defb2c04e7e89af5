"""The gateway in-process (uvicorn on a free port) over real NATS and Postgres."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from kiln_contracts import (
    AgentNarrated,
    BuildCompleted,
    BuildFailed,
    BuildRequested,
    BuildResumed,
    BuildSleeping,
    IterationCompleted,
    SnapshotSaved,
    ToolCall,
    Usage,
)
from kiln_gateway import projection
from tests.integration.gateway_fixtures import Gateway, read_sse, running_gateway, until

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gw(infra) -> AsyncIterator[Gateway]:
    async with running_gateway(
        infra,
        "gwtest",
        sse_heartbeat_s=0.3,
        republish_every_s=0.5,
        dev_api_key="kiln-test-dev-key",
        dev_user="devtest",
    ) as gateway:
        yield gateway


BRIEF = {"idea_brief": "A tiny CLI that counts words.", "understanding_qna": []}


async def test_health_ready_metrics_docs_and_dev_key(gw: Gateway):
    async with gw.client() as c:
        assert (await c.get("/healthz")).status_code == 200
        ready = await c.get("/readyz")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready", "problems": []})
        assert "kiln_gateway_builds_created_total" in (await c.get("/metrics")).text
        assert (await c.get("/docs")).status_code == 200
        assert "/v1/builds" in (await c.get("/openapi.json")).json()["paths"]
    async with gw.client("kiln-test-dev-key") as c:
        assert (await c.get("/v1/builds")).status_code == 200


async def test_auth_is_required(gw: Gateway, uid: str):
    async with gw.client() as c:
        r = await c.post("/v1/builds", json=BRIEF)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert (await c.get("/v1/builds")).status_code == 401
    async with gw.client("not-a-key") as c:
        assert (await c.get("/v1/builds")).status_code == 401
    key = await gw.key(f"u{uid}")
    async with gw.client(**{"X-API-Key": key}) as c:
        assert (await c.get("/v1/builds")).status_code == 200


async def test_create_get_list_and_isolation(gw: Gateway, uid: str):
    alice, bob = await gw.key(f"a{uid}"), await gw.key(f"b{uid}")
    body = {
        "idea_brief": "A word counter",
        "understanding_qna": [{"question": "Language?", "answer": "Python"}],
        "limits": {"max_iterations": 7},
    }
    async with gw.client(alice) as c:
        r = await c.post("/v1/builds", json=body)
        assert r.status_code == 201, r.text
        build = r.json()
        build_id = build["build_id"]
        assert build["status"] in ("queued", "running")
        assert build["limits"]["max_iterations"] == 7
        got = (await c.get(f"/v1/builds/{build_id}")).json()
        assert got["idea_brief"] == "A word counter"
        assert got["understanding_qna"] == body["understanding_qna"]
        listed = (await c.get("/v1/builds")).json()
        assert [b["build_id"] for b in listed["builds"]] == [build_id]

        # The projection sees its own BuildRequested: queued -> running.
        async def running() -> bool:
            return (await c.get(f"/v1/builds/{build_id}")).json()["status"] == "running"

        await until(running)
    async with gw.client(bob) as c:
        assert (await c.get(f"/v1/builds/{build_id}")).status_code == 404
        assert (await c.get(f"/v1/builds/{build_id}/events")).status_code == 404
        assert (await c.post(f"/v1/builds/{build_id}/cancel")).status_code == 404
        assert (await c.get("/v1/builds")).json()["builds"] == []
    history = await gw.history(build_id)
    assert [k for _, k in history] == ["build_requested"]


async def test_idempotency_key(gw: Gateway, uid: str):
    key = await gw.key(f"i{uid}")
    async with gw.client(key, **{"Idempotency-Key": f"k{uid}"}) as c:
        first = await c.post("/v1/builds", json=BRIEF)
        again = await c.post("/v1/builds", json=BRIEF)
        assert (first.status_code, again.status_code) == (201, 200)
        assert first.json()["build_id"] == again.json()["build_id"]
        other = await c.post("/v1/builds", json=BRIEF | {"idea_brief": "something else"})
        assert other.status_code == 409
        assert "Idempotency-Key" in other.json()["detail"]
        assert len((await c.get("/v1/builds")).json()["builds"]) == 1
    history = await gw.history(first.json()["build_id"])
    assert [k for _, k in history] == ["build_requested"]


async def test_concurrency_cap_per_tier(gw: Gateway, uid: str):
    user = f"c{uid}"
    key = await gw.key(user, tier="free")  # one concurrent build
    async with gw.client(key) as c:
        first = await c.post("/v1/builds", json=BRIEF)
        assert first.status_code == 201
        capped = await c.post("/v1/builds", json=BRIEF)
        assert capped.status_code == 429
        assert int(capped.headers["retry-after"]) > 0
        build_id = first.json()["build_id"]
        await gw.bus.publish(
            BuildCompleted(
                build_id=build_id, user_id=user, summary="done", iterations=1, cost_micro_usd=5
            )
        )

        async def finished() -> bool:
            return (await c.get(f"/v1/builds/{build_id}")).json()["status"] == "completed"

        await until(finished)
        assert (await c.post("/v1/builds", json=BRIEF)).status_code == 201


async def test_invalid_bodies(gw: Gateway, uid: str):
    key = await gw.key(f"v{uid}")
    async with gw.client(key) as c:
        for body in (
            {},
            {"idea_brief": "   "},
            {"idea_brief": "x" * 100_001},
            {"idea_brief": "ok", "surprise": 1},
            {"idea_brief": "ok", "understanding_qna": [{"question": "q"}]},
            {"idea_brief": "ok", "limits": {"max_iterations": 0}},
        ):
            r = await c.post("/v1/builds", json=body)
            assert r.status_code == 422, (body, r.text)
            assert r.json()["detail"].startswith("invalid request: ")
        r = await c.post("/v1/builds", json={})
        assert "give idea_brief" in r.json()["detail"]
        assert r.headers["content-type"] == "application/problem+json"
        r = await c.post(
            "/v1/builds", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 422
        big = json.dumps({"idea_brief": "x" * (1024 * 1024 + 10)})
        r = await c.post("/v1/builds", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(20):
                yield b" " * 100_000

        r = await c.post(
            "/v1/builds", content=chunks(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413
        assert (await c.get("/v1/builds?status=nope")).status_code == 422
        assert (await c.get("/v1/builds?cursor=%%%")).status_code == 400
        assert (await c.get("/v1/builds")).json()["builds"] == []


async def test_list_paginates_newest_first(gw: Gateway, uid: str):
    key = await gw.key(f"p{uid}", tier="team")
    async with gw.client(key) as c:
        ids = [(await c.post("/v1/builds", json=BRIEF)).json()["build_id"] for _ in range(3)]
        page1 = (await c.get("/v1/builds?limit=2")).json()
        page2 = (await c.get(f"/v1/builds?limit=2&cursor={page1['next_cursor']}")).json()
        seen = [b["build_id"] for b in page1["builds"] + page2["builds"]]
        assert seen == ids[::-1]
        assert page2["next_cursor"] is None
        assert (await c.get("/v1/builds?status=completed")).json()["builds"] == []


def _events(build_id: str, user: str) -> list[Any]:
    return [
        BuildRequested(build_id=build_id, user_id=user, tier="pro", idea_brief="from NATS"),
        IterationCompleted(
            build_id=build_id,
            user_id=user,
            iteration=1,
            model="scripted",
            usage=Usage(input_tokens=10),
            stop_reason="tool_use",
            cost_micro_usd=100,
        ),
        SnapshotSaved(
            build_id=build_id,
            user_id=user,
            snapshot_id="snap-1",
            iteration=1,
            reason="files_changed",
            files=1,
            bytes_total=1,
            bytes_uploaded=1,
        ),
        BuildSleeping(build_id=build_id, user_id=user, reason="budget"),
    ]


async def test_projection_of_events_from_another_producer(gw: Gateway, uid: str):
    user, build_id = f"r{uid}", f"b{uid}"
    key = await gw.key(user)
    for event in _events(build_id, user):
        await gw.bus.publish(event)
    async with gw.client(key) as c:

        async def at(status: str) -> bool:
            r = await c.get(f"/v1/builds/{build_id}")
            return r.status_code == 200 and r.json()["status"] == status

        await until(lambda: at("sleeping"))
        b = (await c.get(f"/v1/builds/{build_id}")).json()
        assert (b["iteration"], b["cost_micro_usd"], b["last_snapshot_id"]) == (1, 100, "snap-1")
        assert b["idea_brief"] == "from NATS" and b["tier"] == "pro"
        await gw.bus.publish(BuildResumed(build_id=build_id, user_id=user, reason="wake"))
        await until(lambda: at("running"))
        await gw.bus.publish(
            IterationCompleted(
                build_id=build_id,
                user_id=user,
                iteration=2,
                model="scripted",
                usage=Usage(),
                stop_reason="end_turn",
                cost_micro_usd=50,
            )
        )
        await gw.bus.publish(
            BuildFailed(
                build_id=build_id,
                user_id=user,
                reason="cost_limit",
                detail="over the cap",
                iterations=2,
                cost_micro_usd=150,
            )
        )
        await until(lambda: at("failed"))
        # Terminal states stick.
        await gw.bus.publish(BuildResumed(build_id=build_id, user_id=user, reason="late"))
        await gw.bus.publish(
            BuildCompleted(
                build_id=build_id, user_id=user, summary="?", iterations=2, cost_micro_usd=150
            )
        )
        marker = f"m{uid}"
        await gw.bus.publish(BuildRequested(build_id=marker, user_id=user, idea_brief="marker"))
        await until(lambda: at_other(c, marker))
        b = (await c.get(f"/v1/builds/{build_id}")).json()
        assert (b["status"], b["reason"], b["iteration"], b["cost_micro_usd"]) == (
            "failed",
            "cost_limit: over the cap",
            2,
            150,
        )
        assert b["finished_at"] is not None
        assert (await c.post(f"/v1/builds/{build_id}/cancel")).status_code == 409


async def at_other(c: httpx.AsyncClient, build_id: str) -> bool:
    return (await c.get(f"/v1/builds/{build_id}")).status_code == 200


async def test_projection_is_idempotent_per_stream_sequence(gw: Gateway, uid: str):
    user, build_id = f"d{uid}", f"b{uid}"
    store = gw.rt.store
    requested, iteration = _events(build_id, user)[:2]
    assert await projection.project(store, requested, 10) == "applied"
    assert await projection.project(store, requested, 10) == "duplicate"
    assert await projection.project(store, iteration, 11) == "applied"
    assert await projection.project(store, iteration, 11) == "duplicate"  # redelivered
    assert await projection.project(store, iteration, 9) == "duplicate"
    build = await store.get(build_id)
    assert build is not None
    assert (build.status, build.state.cost_micro_usd, build.state.last_seq) == ("running", 100, 11)


async def test_publish_failure_keeps_the_build(gw: Gateway, uid: str):
    key = await gw.key(f"f{uid}")
    real = gw.rt.publish

    async def broken(msg: Any) -> None:
        raise ConnectionError("bus down")

    gw.rt.publish = broken
    try:
        async with gw.client(key, **{"Idempotency-Key": f"f{uid}"}) as c:
            r = await c.post("/v1/builds", json=BRIEF)
            assert r.status_code == 503
            (build,) = (await c.get("/v1/builds")).json()["builds"]
            assert build["status"] == "queued"
    finally:
        gw.rt.publish = real
    async with gw.client(key, **{"Idempotency-Key": f"f{uid}"}) as c:
        r = await c.post("/v1/builds", json=BRIEF)
        assert r.status_code == 200
        assert r.json()["build_id"] == build["build_id"]
    assert [k for _, k in await gw.history(build["build_id"])] == ["build_requested"]


async def test_unpublished_builds_are_republished_in_the_background(gw: Gateway, uid: str):
    key = await gw.key(f"g{uid}")
    real = gw.rt.publish

    async def broken(msg: Any) -> None:
        raise ConnectionError("bus down")

    gw.rt.publish = broken
    try:
        async with gw.client(key) as c:
            assert (await c.post("/v1/builds", json=BRIEF)).status_code == 503
            (build,) = (await c.get("/v1/builds")).json()["builds"]
    finally:
        gw.rt.publish = real

    async def published() -> bool:
        return bool(await gw.history(build["build_id"]))

    await until(published)


async def test_cancel_and_wake_publish_commands_for_the_owner(gw: Gateway, uid: str):
    key, other = await gw.key(f"w{uid}"), await gw.key(f"x{uid}")
    async with gw.client(key) as c:
        build_id = (await c.post("/v1/builds", json=BRIEF)).json()["build_id"]
        r = await c.post(f"/v1/builds/{build_id}/wake")
        assert (r.status_code, r.json()["requested"]) == (202, "wake")
        assert (await c.post(f"/v1/builds/{build_id}/cancel")).status_code == 202
    async with gw.client(other) as c:
        assert (await c.post(f"/v1/builds/{build_id}/wake")).status_code == 404
    kinds = [k for _, k in await gw.history(build_id)]
    assert kinds == ["build_requested", "wake_requested", "cancel_requested"]


# ---------------------------------------------------------------------------- SSE


async def test_sse_replays_resumes_and_ends(gw: Gateway, uid: str):
    user, build_id = f"s{uid}", f"b{uid}"
    key = await gw.key(user)
    first = [
        BuildRequested(build_id=build_id, user_id=user, idea_brief="sse"),
        AgentNarrated(build_id=build_id, user_id=user, iteration=1, text="Writing the code"),
        ToolCall(
            build_id=build_id,
            user_id=user,
            call_id="c1",
            iteration=1,
            tool="bash",
            input={"command": "ls"},
        ),
    ]
    for e in first:
        await gw.bus.publish(e)
    await until(lambda: at_other_user(gw, key, build_id))
    async with gw.client(key) as c:
        async with c.stream("GET", f"/v1/builds/{build_id}/events") as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            got = await read_sse(resp.aiter_lines(), count=3)
        events = [e for e in got if "event" in e]
        assert [e["event"] for e in events] == ["build_requested", "agent_narrated", "tool_call"]
        assert [json.loads(e["data"])["event_id"] for e in events] == [
            str(e.event_id) for e in first
        ]
        ids = [int(e["id"]) for e in events]
        assert ids == sorted(ids)
        last = str(ids[-1])

        # Live: connect, see a heartbeat while quiet, then the rest as it is published.
        async with c.stream(
            "GET", f"/v1/builds/{build_id}/events", headers={"Last-Event-ID": last}
        ) as resp:
            lines = resp.aiter_lines()
            seen_heartbeat = False
            async for line in lines:
                if line.startswith(": heartbeat"):
                    seen_heartbeat = True
                    break
            assert seen_heartbeat
            await gw.bus.publish(
                AgentNarrated(build_id=build_id, user_id=user, iteration=1, text="more")
            )
            await gw.bus.publish(
                BuildCompleted(
                    build_id=build_id, user_id=user, summary="ok", iterations=1, cost_micro_usd=1
                )
            )
            await gw.bus.publish(
                AgentNarrated(build_id=build_id, user_id=user, iteration=1, text="after the end")
            )
            rest = await asyncio.wait_for(read_sse(lines), 10)  # the server ends the stream
        kinds = [e["event"] for e in rest if "event" in e]
        assert kinds == ["agent_narrated", "build_completed"]
        assert all(int(e["id"]) > int(last) for e in rest if "event" in e)
        terminal_id = [e["id"] for e in rest if "event" in e][-1]

        # Resuming after the end returns at once with nothing more.
        async def projected_terminal() -> bool:
            b = await gw.rt.store.get(build_id)
            return b is not None and b.state.terminal_seq is not None

        await until(projected_terminal)
        async with c.stream(
            "GET", f"/v1/builds/{build_id}/events", headers={"Last-Event-ID": terminal_id}
        ) as resp:
            assert [
                e for e in await asyncio.wait_for(read_sse(resp.aiter_lines()), 5) if "event" in e
            ] == []
        r = await c.get(f"/v1/builds/{build_id}/events", headers={"Last-Event-ID": "abc"})
        assert r.status_code == 400


async def at_other_user(gw: Gateway, key: str, build_id: str) -> bool:
    async with gw.client(key) as c:
        return (await c.get(f"/v1/builds/{build_id}")).status_code == 200
