"""Forking over the gateway (uvicorn on a free port, real NATS, Postgres and the S3 API): a fork
at an iteration gets the newest snapshot taken at it or before, 201 with a Location, once per
Idempotency-Key, and its BuildRequested carries the fork; bad input is a clear 4xx problem
document; another user's build is a 404."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio

from kiln_contracts import CheckpointSaved, IterationCompleted, Usage, bucket, subjects
from kiln_contracts.manifest import FileEntry, Manifest
from kiln_snapshot.adapters.s3 import S3Store
from kiln_snapshot.manifests import ORDER_META, order_tag
from tests.integration.gateway_fixtures import Gateway, running_gateway, until

pytestmark = pytest.mark.integration

BRIEF = {"idea_brief": "A tiny CLI that counts words.", "understanding_qna": []}
BUCKET = f"kiln-gwfork-{uuid.uuid4().hex[:10]}"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gw(infra: dict[str, str]) -> AsyncIterator[Gateway]:
    async with running_gateway(
        infra,
        "gwfork",
        republish_every_s=0.5,
        s3_endpoint_url=infra["S3_ENDPOINT_URL"],
        s3_bucket=BUCKET,
        projection_durable="gateway-projection-fork",
    ) as g:
        yield g


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def s3(infra: dict[str, str]) -> AsyncIterator[S3Store]:
    store = S3Store(BUCKET, endpoint_url=infra["S3_ENDPOINT_URL"])
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def snapshot(s3: S3Store, build_id: str, user: str, iteration: int) -> str:
    """A manifest of the build at ``iteration``, as the snapshot service stores it; its id."""
    snapshot_id = str(uuid.uuid4())
    at = datetime.now(UTC)
    doc = Manifest(
        snapshot_id=snapshot_id, build_id=build_id, user_id=user, iteration=iteration,
        reason="files_changed", checkpoint_at=at, created_at=at, files=1, bytes_total=1,
        bytes_uploaded=1, entries=[FileEntry(path="a.txt", sha256="0" * 64, size=1, mode=0o644)],
    )  # fmt: skip
    await s3.put(
        bucket.manifest_key(build_id, snapshot_id),
        doc.dump(),
        metadata={ORDER_META: order_tag(doc)},
    )
    return snapshot_id


async def source(gw: Gateway, s3: S3Store, user: str) -> tuple[str, str, dict[int, str]]:
    """(API key, build id, iteration -> snapshot id) of a build at iteration 5 with snapshots
    taken at iterations 2 and 4."""
    key = await gw.key(user)
    async with gw.client(key) as c:
        build_id = (await c.post("/v1/builds", json=BRIEF)).json()["build_id"]
        for i in range(1, 6):
            await gw.bus.publish(
                IterationCompleted(
                    build_id=build_id,
                    user_id=user,
                    iteration=i,
                    model="m",
                    usage=Usage(),
                    stop_reason="tool_use",
                )
            )

        async def at_five() -> bool:
            return (await c.get(f"/v1/builds/{build_id}")).json()["iteration"] == 5

        await until(at_five)
    snaps = {i: await snapshot(s3, build_id, user, i) for i in (2, 4)}
    return key, build_id, snaps


async def requested(gw: Gateway, build_id: str) -> list[dict[str, Any]]:
    sub = await gw.bus.nc.jetstream().subscribe(
        subjects.subject(build_id, "build_requested"), stream=subjects.STREAM,
        ordered_consumer=True,
    )  # fmt: skip
    out = []
    try:
        while True:
            out.append(json.loads((await sub.next_msg(timeout=0.5)).data))
    except Exception:
        pass
    finally:
        await sub.unsubscribe()
    return out


async def test_a_fork_at_an_iteration_starts_from_the_newest_snapshot_at_it(
    gw: Gateway, s3: S3Store, uid: str
) -> None:
    key, build_id, snaps = await source(gw, s3, f"a{uid}")
    async with gw.client(key) as c:
        url = f"/v1/builds/{build_id}/fork"
        r = await c.post(url, json={"iteration": 3}, headers={"Idempotency-Key": "f1"})
        assert r.status_code == 201, r.text
        fork = r.json()
        assert r.headers["location"] == f"/v1/builds/{fork['build_id']}"
        assert fork["build_id"] != build_id and fork["status"] in ("queued", "running")
        assert fork["forked_from"] == {
            "build_id": build_id, "iteration": 3, "snapshot_id": snaps[2],
        }  # fmt: skip
        assert fork["idea_brief"] == BRIEF["idea_brief"]
        # the same key: the same fork, not a second one; with another body: 409
        again = await c.post(url, json={"iteration": 3}, headers={"Idempotency-Key": "f1"})
        assert (again.status_code, again.json()["build_id"]) == (200, fork["build_id"])
        assert again.headers["location"] == r.headers["location"]
        clash = await c.post(url, json={"iteration": 4}, headers={"Idempotency-Key": "f1"})
        assert clash.status_code == 409
        # at a snapshot: its iteration
        by_id = await c.post(url, json={"snapshot_id": snaps[4]})
        assert by_id.status_code == 201
        assert by_id.json()["forked_from"]["iteration"] == 4
        # before any snapshot: an empty workspace
        zero = await c.post(url, json={"iteration": 1})
        assert zero.json()["forked_from"] == {"build_id": build_id, "iteration": 1,
                                              "snapshot_id": None}  # fmt: skip
        listed = (await c.get("/v1/builds?limit=100")).json()["builds"]
        assert sum(b["forked_from"] is not None for b in listed) == 3
        # the source is untouched
        assert (await c.get(f"/v1/builds/{build_id}")).json()["iteration"] == 5
    [sent] = await requested(gw, fork["build_id"])
    assert sent["fork"] == {"build_id": build_id, "iteration": 3, "snapshot_id": snaps[2]}
    assert sent["idea_brief"] == BRIEF["idea_brief"] and sent["user_id"] == f"a{uid}"


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        ({}, 422, "invalid-request"),
        ({"iteration": 2, "snapshot_id": "x"}, 422, "invalid-request"),
        ({"iteration": -1}, 422, "invalid-request"),
        ({"iteration": "two"}, 422, "invalid-request"),
        ({"iteration": 2, "extra": 1}, 422, "invalid-request"),
        ({"iteration": 6}, 422, "iteration-out-of-range"),
        ({"iteration": 5}, 409, "iteration-in-progress"),
        ({"snapshot_id": "a2f6c1b0-0000-4000-8000-000000000000"}, 404, "unknown-snapshot"),
        ({"snapshot_id": "../etc"}, 422, "invalid-request"),
    ],
)
async def test_bad_input_is_a_clear_4xx_and_forks_nothing(
    gw: Gateway, s3: S3Store, uid: str, body: dict[str, Any], status: int, kind: str
) -> None:
    key, build_id, _ = await source(gw, s3, f"v{uid}")
    async with gw.client(key) as c:
        r = await c.post(f"/v1/builds/{build_id}/fork", json=body)
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/problem+json"
        problem = r.json()
        assert problem["type"].endswith(kind) and problem["detail"]
        if kind == "iteration-out-of-range":
            assert "from 0 to 5" in problem["detail"]
        listed = (await c.get("/v1/builds?limit=100")).json()["builds"]
        assert [b["build_id"] for b in listed] == [build_id]


async def test_another_users_build_is_a_404_and_a_pruned_snapshot_a_410(
    gw: Gateway, s3: S3Store, uid: str
) -> None:
    _, build_id, _ = await source(gw, s3, f"o{uid}")
    theirs = await gw.key(f"t{uid}")
    async with gw.client(theirs) as c:
        r = await c.post(f"/v1/builds/{build_id}/fork", json={"iteration": 3})
        assert (r.status_code, r.json()["detail"]) == (404, "build not found")
        assert (await c.get("/v1/builds")).json()["builds"] == []
    assert await requested(gw, build_id) != []  # the source's own only
    # retention deleted the snapshots up to iteration 2 (the snapshot service records it)
    key, pruned_build, snaps = await source(gw, s3, f"p{uid}")
    await s3.delete(bucket.manifest_key(pruned_build, snaps[2]))
    await s3.put(bucket.pruned_key(pruned_build), b"2", "text/plain")
    async with gw.client(key) as c:
        gone = await c.post(f"/v1/builds/{pruned_build}/fork", json={"iteration": 3})
        assert gone.status_code == 410 and gone.json()["type"].endswith("snapshot-gone")
        ok = await c.post(f"/v1/builds/{pruned_build}/fork", json={"iteration": 4})
        assert ok.status_code == 201 and ok.json()["forked_from"]["snapshot_id"] == snaps[4]


async def test_a_fork_stored_while_the_bus_is_down_is_sent_later_with_its_origin(
    gw: Gateway, s3: S3Store, uid: str
) -> None:
    key, build_id, snaps = await source(gw, s3, f"d{uid}")
    real = gw.rt.publish

    async def broken(msg: Any) -> None:
        raise ConnectionError("bus down")

    gw.rt.publish = broken
    try:
        async with gw.client(key) as c:
            r = await c.post(
                f"/v1/builds/{build_id}/fork",
                json={"iteration": 4},
                headers={"Idempotency-Key": "d"},
            )
            assert r.status_code == 503 and r.headers["retry-after"] == "2"
            listed = (await c.get("/v1/builds?limit=100")).json()["builds"]
    finally:
        gw.rt.publish = real
    [fork] = [b for b in listed if b["forked_from"]]

    async def sent() -> bool:
        return [m.get("fork") for m in await requested(gw, fork["build_id"])] == [
            {"build_id": build_id, "iteration": 4, "snapshot_id": snaps[4]}
        ]

    await until(sent)


async def test_a_fork_waits_for_a_snapshot_still_being_written(
    gw: Gateway, s3: S3Store, uid: str
) -> None:
    user = f"w{uid}"
    key, build_id, snaps = await source(gw, s3, user)
    # iteration 5's files changed (its checkpoint is on the stream), its snapshot not written yet
    checkpoint = CheckpointSaved(
        build_id=build_id, user_id=user, iteration=5, reason="files_changed"
    )
    await gw.bus.publish(checkpoint)
    async with gw.client(key) as c:
        url = f"/v1/builds/{build_id}/fork"
        # still at iteration 5: its results may be on their way
        busy = await c.post(url, json={"iteration": 5})
        assert busy.status_code == 409 and busy.json()["type"].endswith("iteration-in-progress")
        await gw.bus.publish(
            IterationCompleted(
                build_id=build_id, user_id=user, iteration=6, model="claude-haiku-4-5",
                usage=Usage(), stop_reason="tool_use",
            )
        )  # fmt: skip

        async def moved_on() -> bool:
            return (await c.get(f"/v1/builds/{build_id}")).json()["iteration"] == 6

        await until(moved_on)
        early = await c.post(url, json={"iteration": 5})
        assert early.status_code == 503 and early.headers["retry-after"] == "2", early.text
        assert early.json()["type"].endswith("snapshot-pending")
        # before it, iteration 4's snapshot is the newest: no wait
        assert (await c.post(url, json={"iteration": 4})).status_code == 201
        # written: the fork starts from it
        at = datetime.now(UTC)
        doc = Manifest(
            snapshot_id=str(checkpoint.event_id), build_id=build_id, user_id=user, iteration=5,
            reason="files_changed", checkpoint_at=at, created_at=at, files=0, bytes_total=0,
            bytes_uploaded=0, entries=[],
        )  # fmt: skip
        await s3.put(bucket.manifest_key(build_id, doc.snapshot_id), doc.dump())
        late = await c.post(url, json={"iteration": 5})
        assert late.status_code == 201, late.text
        assert late.json()["forked_from"]["snapshot_id"] == str(checkpoint.event_id)
    assert snaps[4] != str(checkpoint.event_id)
