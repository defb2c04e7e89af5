"""The gateway's user-facing surface over real NATS, Postgres and S3 (and the budget service on
Redis): projects, isolation, problem+json errors, the files archive, budget and top-ups, admin
keys, stream tokens and resumable SSE."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import tarfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import boto3
import httpx
import pytest
import pytest_asyncio

from kiln_budget import bootstrap as budget_bootstrap
from kiln_budget.settings import BudgetSettings
from kiln_contracts import (
    AgentNarrated,
    BuildCompleted,
    BuildRequested,
    BuildSleeping,
    IterationCompleted,
    Usage,
)
from kiln_contracts import bucket as bucket_keys
from kiln_contracts.manifest import DirEntry, FileEntry, Manifest, SymlinkEntry
from kiln_gateway import builds
from kiln_gateway.ports import BudgetUnavailable
from tests.integration.gateway_fixtures import Gateway, read_sse, running_gateway, until

pytestmark = pytest.mark.integration

ADMIN = "kiln-test-admin-key"
PROBLEM = "application/problem+json"
BRIEF = {"idea_brief": "A tiny CLI that counts words.", "understanding_qna": []}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gw(infra) -> AsyncIterator[Gateway]:
    """The gateway, with a budget service answering its budget questions."""
    budget = budget_bootstrap.build(
        BudgetSettings(nats_url=infra["NATS_URL"], redis_url=infra["REDIS_URL"], ack_wait_s=5),
        service="budget-surface",
    )
    await budget.bus.connect()
    await budget.start()
    await budget.bus.start()
    try:
        async with _gateway(infra) as gateway:
            yield gateway
    finally:
        await budget.bus.stop()
        await budget.stop()


@contextlib.asynccontextmanager
async def _gateway(infra) -> AsyncIterator[Gateway]:
    async with running_gateway(
        infra,
        "gwsurface",
        s3_endpoint_url=infra["S3_ENDPOINT_URL"],
        s3_bucket="kiln-gw-surface",
        sse_heartbeat_s=0.3,
        admin_api_key=ADMIN,
        gateway_projection_durable="gateway-projection-surface",
        max_body_bytes=64 * 1024,
    ) as gateway:
        yield gateway


def is_problem(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM, r.headers
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"], body
    assert body["type"].startswith("https://"), body
    return body


async def requested_event(gw: Gateway, build_id: str) -> dict:
    """The BuildRequested of ``build_id`` as it is on the stream."""
    sub = await gw.bus.nc.jetstream().subscribe(
        f"kiln.build.{build_id}.build_requested", ordered_consumer=True
    )
    try:
        msg = await sub.next_msg(timeout=5)
        return json.loads(msg.data)
    finally:
        await sub.unsubscribe()


# ---------------------------------------------------------------------------- projects


async def test_projects_are_versioned_and_builds_carry_them(gw: Gateway, uid: str):
    alice, bob = await gw.key(f"pa{uid}", "team"), await gw.key(f"pb{uid}", "team")
    qna = [{"question": "Language?", "answer": "Python"}]
    async with gw.client(alice) as c:
        r = await c.post(
            "/v1/projects", json={"name": "wc", "idea_brief": "v1", "understanding_qna": qna}
        )
        assert r.status_code == 201, r.text
        p = r.json()
        pid = p["project_id"]
        assert (p["version"], p["latest_version"], p["idea_brief"]) == (1, 1, "v1")
        r = await c.patch(f"/v1/projects/{pid}", json={"idea_brief": "v2", "base_version": 1})
        assert (r.status_code, r.json()["version"], r.json()["understanding_qna"]) == (200, 2, qna)
        is_problem(await c.patch(f"/v1/projects/{pid}", json={"name": "x", "base_version": 1}), 409)
        r = await c.put(f"/v1/projects/{pid}", json={"name": "wc3", "idea_brief": "v3"})
        assert (r.json()["version"], r.json()["understanding_qna"], r.json()["name"]) == (
            3,
            [],
            "wc3",
        )
        assert (await c.get(f"/v1/projects/{pid}?version=1")).json()["idea_brief"] == "v1"
        assert (await c.get(f"/v1/projects/{pid}")).json()["idea_brief"] == "v3"
        is_problem(await c.get(f"/v1/projects/{pid}?version=9"), 404)
        versions = (await c.get(f"/v1/projects/{pid}/versions")).json()
        assert [v["version"] for v in versions] == [1, 2, 3]
        listed = (await c.get("/v1/projects")).json()["projects"]
        assert [(x["project_id"], x["version"]) for x in listed] == [(pid, 3)]

        # A build of the latest version and one of version 1: the event carries the brief.
        latest = (await c.post("/v1/builds", json={"project_id": pid})).json()
        old = (await c.post("/v1/builds", json={"project_id": pid, "project_version": 1})).json()
        assert (latest["project_version"], latest["idea_brief"]) == (3, "v3")
        assert (old["project_version"], old["understanding_qna"]) == (1, qna)
        event = await requested_event(gw, old["build_id"])
        assert (event["idea_brief"], event["understanding_qna"]) == ("v1", qna)
        is_problem(await c.post("/v1/builds", json={"project_id": pid, "idea_brief": "x"}), 422)
        is_problem(await c.post("/v1/builds", json={"project_version": 1, "idea_brief": "x"}), 422)

    async with gw.client(bob) as c:
        is_problem(await c.get(f"/v1/projects/{pid}"), 404)
        is_problem(await c.get(f"/v1/projects/{pid}/versions"), 404)
        is_problem(await c.patch(f"/v1/projects/{pid}", json={"name": "mine"}), 404)
        is_problem(await c.put(f"/v1/projects/{pid}", json={"idea_brief": "mine"}), 404)
        is_problem(await c.post("/v1/builds", json={"project_id": pid}), 404)
        assert (await c.get("/v1/projects")).json()["projects"] == []


async def test_idempotent_create_from_a_project_survives_an_edit(gw: Gateway, uid: str):
    key = await gw.key(f"pi{uid}")
    async with gw.client(key, **{"Idempotency-Key": f"k{uid}"}) as c:
        pid = (await c.post("/v1/projects", json={"idea_brief": "one"})).json()["project_id"]
        first = await c.post("/v1/builds", json={"project_id": pid})
        await c.patch(f"/v1/projects/{pid}", json={"idea_brief": "two"})
        again = await c.post("/v1/builds", json={"project_id": pid})
        assert (first.status_code, again.status_code) == (201, 200)
        assert first.json()["build_id"] == again.json()["build_id"]
        is_problem(await c.post("/v1/builds", json={"project_id": pid, "project_version": 2}), 409)


# ---------------------------------------------------------------------------- isolation, errors


async def test_every_build_endpoint_hides_another_users_build(gw: Gateway, uid: str):
    alice, bob = await gw.key(f"ia{uid}"), await gw.key(f"ib{uid}")
    async with gw.client(alice) as c:
        build_id = (await c.post("/v1/builds", json=BRIEF)).json()["build_id"]
        assert (await c.get(f"/v1/builds/{build_id}")).status_code == 200
    async with gw.client(bob) as c:
        for method, path in (
            ("GET", f"/v1/builds/{build_id}"),
            ("GET", f"/v1/builds/{build_id}/events"),
            ("POST", f"/v1/builds/{build_id}/events/token"),
            ("POST", f"/v1/builds/{build_id}/cancel"),
            ("POST", f"/v1/builds/{build_id}/wake"),
            ("GET", f"/v1/builds/{build_id}/files"),
            ("POST", f"/v1/builds/{build_id}/messages"),
        ):
            sent = await c.request(method, path, json={"text": "hi"} if method == "POST" else None)
            body = is_problem(sent, 404)
            assert body["detail"] == "build not found", (path, body)
        assert (await c.get("/v1/builds")).json()["builds"] == []
        assert (await c.get("/v1/builds?status=queued")).json()["builds"] == []
    kinds = [k for _, k in await gw.history(build_id)]
    assert kinds == ["build_requested"]  # bob's cancel, wake and message sent nothing


async def test_errors_are_problem_documents(gw: Gateway, uid: str):
    async with gw.client() as c:
        body = is_problem(await c.get("/v1/builds"), 401)
        assert body["instance"] == "/v1/builds"
        is_problem(await c.get("/v1/budget"), 401)
        is_problem(await c.get("/v1/projects"), 401)
    key = await gw.key(f"e{uid}", "free")
    async with gw.client(key) as c:
        is_problem(await c.get("/v1/builds/nope"), 404)
        is_problem(await c.get("/v1/nothing-here"), 404)
        body = is_problem(await c.post("/v1/builds", json={"idea_brief": 5}), 422)
        assert body["errors"][0]["loc"][-1] == "idea_brief"
        is_problem(
            await c.post(
                "/v1/builds", content=b"{not json", headers={"content-type": "application/json"}
            ),
            422,
        )
        is_problem(await c.post("/v1/builds", json={"idea_brief": "x" * 70_000}), 413)
        is_problem(await c.post("/v1/projects", json={"idea_brief": "x" * 70_000}), 413)
        is_problem(await c.get("/v1/builds?cursor=%%%"), 400)
        # Postgres text cannot hold NUL: refused as invalid input, never a server error.
        is_problem(await c.post("/v1/projects", json={"idea_brief": "a\u0000b"}), 422)
        is_problem(await c.post("/v1/builds", json={"idea_brief": "a\u0000b"}), 422)
        assert (await c.post("/v1/builds", json=BRIEF)).status_code == 201
        capped = is_problem(await c.post("/v1/builds", json=BRIEF), 429)
        assert "concurrent" in capped["detail"]


# ---------------------------------------------------------------------------- files


def _put_snapshot(
    infra: dict[str, str],
    bucket: str,
    build_id: str,
    files: dict[str, tuple[bytes, int]],
    dirs: dict[str, int] | None = None,
    symlinks: dict[str, str] | None = None,
) -> str:
    """A snapshot as the snapshot service stores it: blobs, a manifest, ``latest``."""
    s3 = boto3.client("s3", endpoint_url=infra["S3_ENDPOINT_URL"], region_name="us-east-1")
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    entries = []
    for path, (data, mode) in files.items():
        digest = hashlib.sha256(data).hexdigest()
        s3.put_object(Bucket=bucket, Key=bucket_keys.blob_key(digest), Body=data)
        entries.append(FileEntry(path=path, sha256=digest, size=len(data), mode=mode))
    snapshot_id = f"snap-{build_id}"
    now = datetime.now(UTC)
    manifest = Manifest(
        snapshot_id=snapshot_id,
        build_id=build_id,
        user_id="someone",
        iteration=1,
        reason="files_changed",
        checkpoint_at=now,
        created_at=now,
        files=len(entries),
        bytes_total=sum(e.size for e in entries),
        bytes_uploaded=sum(e.size for e in entries),
        entries=entries,
        dirs=[DirEntry(path=p, mode=m) for p, m in (dirs or {}).items()],
        symlinks=[SymlinkEntry(path=p, target=t) for p, t in (symlinks or {}).items()],
    )
    s3.put_object(
        Bucket=bucket, Key=bucket_keys.manifest_key(build_id, snapshot_id), Body=manifest.dump()
    )
    s3.put_object(Bucket=bucket, Key=bucket_keys.latest_key(build_id), Body=snapshot_id.encode())
    return snapshot_id


async def test_files_is_the_latest_snapshot_as_a_tar_gz(gw: Gateway, infra, uid: str):
    user = f"f{uid}"
    key = await gw.key(user)
    async with gw.client(key) as c:
        build_id = (await c.post("/v1/builds", json=BRIEF)).json()["build_id"]
        body = is_problem(await c.get(f"/v1/builds/{build_id}/files"), 404)
        assert "no snapshot" in body["detail"]
        big = bytes(range(256)) * 4096  # 1 MiB, several chunks
        files = {
            "textstats/__init__.py": (b"def count(text):\n    return len(text.split())\n", 0o644),
            "run.sh": (b"#!/bin/sh\necho hi\n", 0o755),
            "data/big.bin": (big, 0o644),
            "empty.txt": (b"", 0o644),
        }
        snapshot_id = _put_snapshot(
            infra,
            "kiln-gw-surface",
            build_id,
            files,
            dirs={"empty-dir": 0o750},
            symlinks={"latest.sh": "run.sh"},
        )
        r = await c.get(f"/v1/builds/{build_id}/files")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/gzip"
        assert r.headers["x-kiln-snapshot-id"] == snapshot_id
        assert f"kiln-{build_id}.tar.gz" in r.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        root = f"kiln-{build_id}"
        assert set(members) == {f"{root}/{p}" for p in [*files, "empty-dir", "latest.sh"]}
        assert members[f"{root}/empty-dir"].isdir() and members[f"{root}/empty-dir"].mode == 0o750
        assert members[f"{root}/latest.sh"].issym()
        assert members[f"{root}/latest.sh"].linkname == "run.sh"
        for path, (data, mode) in files.items():
            m = members[f"kiln-{build_id}/{path}"]
            assert m.mode == mode
            extracted = tar.extractfile(m)
            assert extracted is not None and extracted.read() == data


# ---------------------------------------------------------------------------- budget


async def budget_of(gw: Gateway, key: str, until_: object = None) -> dict:
    """GET /v1/budget, asked again until ``until_(body)`` holds (the budget charges
    asynchronously)."""
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        async with gw.client(key) as c:
            r = await c.get("/v1/budget")
        assert r.status_code == 200, r.text
        body = r.json()
        if until_ is None or until_(body):  # type: ignore[operator]
            return body
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.1)


async def test_budget_is_the_budget_services_answer(gw: Gateway, uid: str):
    user = f"m{uid}"
    key = await gw.key(user, "pro")
    now = datetime.now(UTC)
    empty = await budget_of(gw, key)
    assert (empty["user_id"], empty["tier"], empty["source"]) == (user, "pro", "budget")
    assert (empty["day"], empty["month"]) == (f"{now:%Y-%m-%d}", f"{now:%Y-%m}")
    assert (empty["spent_today_micro_usd"], empty["spent_month_micro_usd"]) == (0, 0)
    tier = gw.rt.config.tier("pro")
    assert empty["monthly_budget_micro_usd"] == tier.monthly_budget_micro_usd
    assert empty["daily_allowance_micro_usd"] == empty["remaining_today_micro_usd"] > 0
    assert empty["per_build_cap_micro_usd"] == tier.per_build_cap_micro_usd
    assert empty["concurrent_builds"] == tier.concurrent_builds
    assert empty["period_end"].startswith((now + timedelta(days=1)).strftime("%Y-%m-%d"))

    await gw.bus.publish(
        IterationCompleted(
            build_id=f"b{uid}",
            user_id=user,
            iteration=1,
            model="claude-sonnet-4-5",
            usage=Usage(input_tokens=500),  # 1_500 micro-USD
            stop_reason="end_turn",
        )
    )
    b = await budget_of(gw, key, lambda b: b["spent_today_micro_usd"] == 1_500)
    assert b["spent_month_micro_usd"] == 1_500
    assert b["daily_allowance_micro_usd"] == empty["daily_allowance_micro_usd"]
    assert b["remaining_today_micro_usd"] == b["daily_allowance_micro_usd"] - 1_500
    assert b["sleeping_builds"] == [] and b["topups_micro_usd"] == 0


async def test_a_top_up_is_sent_to_the_budget_and_shows_in_the_budget(gw: Gateway, uid: str):
    user, build_id = f"z{uid}", f"b{uid}"
    key = await gw.key(user, "pro")
    await gw.bus.publish(BuildRequested(build_id=build_id, user_id=user, idea_brief="zz"))
    await gw.bus.publish(BuildSleeping(build_id=build_id, user_id=user, reason="allowance"))

    async def asleep() -> bool:
        async with gw.client(key) as c:
            return (await c.get(f"/v1/builds/{build_id}")).json().get("status") == "sleeping"

    await until(asleep)
    before = await budget_of(gw, key)
    body = {"user_id": user, "amount_usd": "0.007"}
    async with gw.client(ADMIN) as admin:
        done = await admin.post(
            "/v1/budget/top-up", json=body, headers={"Idempotency-Key": f"k{uid}"}
        )
        assert done.status_code == 200, done.text
        assert done.json() == {
            "user_id": user,
            "topup_id": f"k{uid}",
            "amount_micro_usd": 7_000,
            "woken": [build_id],
        }
        # a retry with the same Idempotency-Key is the same top-up
        again = await admin.post(
            "/v1/budget/top-up", json=body, headers={"Idempotency-Key": f"k{uid}"}
        )
        assert again.status_code == 200
        is_problem(await admin.post("/v1/budget/top-up", json={**body, "amount_usd": "0"}), 422)
    async with gw.client(key) as c:
        is_problem(await c.post("/v1/budget/top-up", json=body), 401)  # not the admin key
    b = await budget_of(gw, key, lambda b: b["topups_micro_usd"] == 7_000)
    assert b["daily_allowance_micro_usd"] == before["daily_allowance_micro_usd"] + 7_000
    assert b["sleeping_builds"] == [build_id]


async def test_budget_without_the_budget_services_answer_is_503(gw: Gateway, uid: str):
    class Silent:
        async def status(self, user_id: str, tier: str) -> object:
            raise BudgetUnavailable("no budget service is answering")

    key = await gw.key(f"s{uid}", "pro")
    answering, gw.rt.budget = gw.rt.budget, Silent()  # type: ignore[assignment]
    try:
        async with gw.client(key) as c:
            body = is_problem(await c.get("/v1/budget"), 503)
    finally:
        gw.rt.budget = answering
    assert "budget service is unavailable" in body["detail"]


# ---------------------------------------------------------------------------- admin keys


async def test_admin_creates_and_revokes_keys(gw: Gateway, uid: str):
    user = f"k{uid}"
    async with gw.client(ADMIN) as admin:
        r = await admin.post("/v1/admin/keys", json={"user_id": user, "tier": "pro"})
        assert r.status_code == 201, r.text
        created = r.json()
        api_key = created["api_key"]
        assert api_key.startswith(created["key_prefix"]) and created["tier"] == "pro"
        is_problem(await admin.post("/v1/admin/keys", json={"user_id": user, "tier": "gold"}), 422)
        listed = (await admin.get(f"/v1/admin/keys?user_id={user}")).json()["keys"]
        assert [k["key_id"] for k in listed] == [created["key_id"]]
        assert "api_key" not in listed[0]
    async with gw.client(api_key) as c:
        assert (await c.get("/v1/builds")).status_code == 200
    async with gw.client(api_key) as c:  # a user's key is not an admin key
        is_problem(await c.post("/v1/admin/keys", json={"user_id": "x"}), 401)
    async with gw.client(ADMIN) as admin:
        is_problem(await admin.delete("/v1/admin/keys/kiln_"), 404)  # too short a prefix
        r = await admin.delete(f"/v1/admin/keys/{created['key_prefix']}")
        assert r.status_code == 200 and r.json()["revoked_at"], r.text
        is_problem(await admin.delete("/v1/admin/keys/nosuchkey123"), 404)
    async with gw.client(api_key) as c:
        is_problem(await c.get("/v1/builds"), 401)


# ---------------------------------------------------------------------------- SSE


async def test_sse_reconnects_without_missing_or_repeating(gw: Gateway, uid: str):
    user, build_id = f"s{uid}", f"b{uid}"
    key = await gw.key(user)
    await gw.bus.publish(BuildRequested(build_id=build_id, user_id=user, idea_brief="sse"))
    for i in range(5):
        await gw.bus.publish(
            AgentNarrated(build_id=build_id, user_id=user, iteration=1, text=f"n{i}")
        )
    await until(lambda: _exists(gw, key, build_id))
    seen: list[tuple[int, str]] = []
    async with gw.client(key) as c:
        async with c.stream("GET", f"/v1/builds/{build_id}/events") as resp:
            got = await read_sse(resp.aiter_lines(), count=3)  # then the client drops
        seen += [
            (
                int(e["id"]),
                json.loads(e["data"])["text"] if e["event"] == "agent_narrated" else e["event"],
            )
            for e in got
            if "event" in e
        ]
        for i in range(5, 8):  # published while the client is away
            await gw.bus.publish(
                AgentNarrated(build_id=build_id, user_id=user, iteration=1, text=f"n{i}")
            )
        last = seen[-1][0]
        async with c.stream(
            "GET", f"/v1/builds/{build_id}/events", headers={"Last-Event-ID": str(last)}
        ) as resp:
            got = await read_sse(resp.aiter_lines(), count=6)
        seen += [(int(e["id"]), json.loads(e["data"])["text"]) for e in got if "event" in e]
        # A third connection through a stream token and ?last_event_id= (the dashboard's way).
        token = (await c.post(f"/v1/builds/{build_id}/events/token")).json()["token"]
        await gw.bus.publish(
            BuildCompleted(
                build_id=build_id, user_id=user, summary="ok", iterations=1, cost_micro_usd=1
            )
        )
    async with gw.client() as anon:
        url = f"/v1/builds/{build_id}/events?token={token}&last_event_id={seen[-1][0]}"
        async with anon.stream("GET", url) as resp:
            assert resp.status_code == 200
            rest = await asyncio.wait_for(read_sse(resp.aiter_lines()), 10)  # ends at the end
        seen += [(int(e["id"]), e["event"]) for e in rest if "event" in e]
        is_problem(await anon.get(f"/v1/builds/{build_id}/events?token=forged.{token}"), 401)
        is_problem(await anon.get(f"/v1/builds/other{uid}/events?token={token}"), 401)
        is_problem(await anon.get(f"/v1/builds/{build_id}/events"), 401)
    ids = [i for i, _ in seen]
    assert ids == sorted(set(ids)), "an event was repeated or out of order"
    assert [x for _, x in seen] == ["build_requested"] + [f"n{i}" for i in range(8)] + [
        "build_completed"
    ]
    assert ids == [s for s, _ in await gw.history(build_id)], "an event was missed"
    async with gw.client(key) as c:
        for bad in ("abc", "-1", "1.5"):
            is_problem(
                await c.get(f"/v1/builds/{build_id}/events", headers={"Last-Event-ID": bad}), 400
            )
        is_problem(await c.get(f"/v1/builds/{build_id}/events?last_event_id=x"), 400)


async def _exists(gw: Gateway, key: str, build_id: str) -> bool:
    async with gw.client(key) as c:
        return (await c.get(f"/v1/builds/{build_id}")).status_code == 200


# ---------------------------------------------------------------------------- AsyncAPI, dashboard


async def test_asyncapi_document_and_dashboard_are_served(gw: Gateway, tmp_path):
    settings = gw.rt.settings
    previous = settings.asyncapi_path
    try:
        settings.asyncapi_path = str(tmp_path / "missing.json")
        async with gw.client() as c:
            body = is_problem(await c.get("/v1/asyncapi.json"), 404)
            assert "not generated" in body["detail"]
            (tmp_path / "asyncapi.json").write_text(json.dumps({"asyncapi": "3.0.0"}))
            settings.asyncapi_path = str(tmp_path / "asyncapi.json")
            assert (await c.get("/v1/asyncapi.json")).json() == {"asyncapi": "3.0.0"}
            home = await c.get("/", follow_redirects=True)
            assert home.status_code == 200 and "<html" in home.text.lower()
            assert (await c.get("/dashboard/app.js")).status_code == 200
            spec = (await c.get("/openapi.json")).json()
            for path in ("/v1/projects", "/v1/budget", "/v1/builds/{build_id}/files"):
                assert path in spec["paths"], path
            errors = spec["paths"]["/v1/builds"]["post"]["responses"]
            assert PROBLEM in errors["429"]["content"]
    finally:
        settings.asyncapi_path = previous


def test_key_digest_is_what_is_stored():
    assert builds.key_digest("k") == hashlib.sha256(b"k").hexdigest()
