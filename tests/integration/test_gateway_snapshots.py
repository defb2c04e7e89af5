"""The snapshot read endpoints over real NATS, Postgres and the S3 API: a build's snapshots, one
snapshot's tree, one file (content type, size limit, no way out of the manifest), the diff of two
iterations, and another user's build as a 404 on each."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import boto3
import httpx
import pytest
import pytest_asyncio

from kiln_contracts import bucket as bucket_keys
from kiln_contracts.manifest import DirEntry, FileEntry, Manifest, SymlinkEntry
from tests.integration.gateway_fixtures import Gateway, running_gateway

pytestmark = pytest.mark.integration

BUCKET = "kiln-gw-snapshots"
PROBLEM = "application/problem+json"
BRIEF = {"idea_brief": "A tiny CLI that counts words.", "understanding_qna": []}
MAX_FILE = 64 * 1024
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gw(infra) -> AsyncIterator[Gateway]:
    async with running_gateway(
        infra,
        "gwsnapshots",
        s3_endpoint_url=infra["S3_ENDPOINT_URL"],
        s3_bucket=BUCKET,
        gateway_projection_durable="gateway-projection-snapshots",
        snapshot_file_max_bytes=MAX_FILE,
        snapshot_diff_max_bytes=3 * MAX_FILE,
    ) as gateway:
        yield gateway


def is_problem(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM, r.headers
    body = r.json()
    assert body["status"] == status and body["detail"], body
    return body


def put_snapshot(
    infra: dict[str, str],
    build_id: str,
    snapshot_id: str,
    iteration: int,
    files: dict[str, bytes | tuple[bytes, int]],
    *,
    dirs: tuple[str, ...] = (),
    symlinks: dict[str, str] | None = None,
    latest: bool = True,
    reason: str = "files_changed",
) -> None:
    """A snapshot as the snapshot service stores it: blobs, then the manifest, then ``latest``."""
    s3 = boto3.client("s3", endpoint_url=infra["S3_ENDPOINT_URL"], region_name="us-east-1")
    try:
        s3.create_bucket(Bucket=BUCKET)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    entries = []
    for path, spec in files.items():
        data, mode = spec if isinstance(spec, tuple) else (spec, 0o644)
        digest = hashlib.sha256(data).hexdigest()
        s3.put_object(Bucket=BUCKET, Key=bucket_keys.blob_key(digest), Body=data)
        entries.append(FileEntry(path=path, sha256=digest, size=len(data), mode=mode))
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=iteration)
    manifest = Manifest(
        snapshot_id=snapshot_id,
        build_id=build_id,
        user_id="someone",
        iteration=iteration,
        reason=reason,  # type: ignore[arg-type]
        checkpoint_at=at,
        created_at=at,
        files=len(entries),
        bytes_total=sum(e.size for e in entries),
        bytes_uploaded=0,
        entries=entries,
        dirs=[DirEntry(path=p, mode=0o755) for p in dirs],
        symlinks=[SymlinkEntry(path=p, target=t) for p, t in (symlinks or {}).items()],
    )
    key = bucket_keys.manifest_key(build_id, snapshot_id)
    s3.put_object(Bucket=BUCKET, Key=key, Body=manifest.dump())
    if latest:
        s3.put_object(
            Bucket=BUCKET, Key=bucket_keys.latest_key(build_id), Body=snapshot_id.encode()
        )


async def new_build(gw: Gateway, user: str) -> tuple[str, str]:
    key = await gw.key(user)
    async with gw.client(key) as c:
        r = await c.post("/v1/builds", json=BRIEF)
        assert r.status_code == 201, r.text
        return key, r.json()["build_id"]


async def two_snapshots(gw: Gateway, infra, user: str) -> tuple[str, str]:
    """A build with snapshots at iterations 2 and 5 (and one for iteration 2 taken first)."""
    key, build_id = await new_build(gw, user)
    put_snapshot(infra, build_id, f"s1-{build_id}", 2, {"old.txt": b"first\n"}, latest=False)
    put_snapshot(
        infra,
        build_id,
        f"s2-{build_id}",
        2,
        {
            "app/main.py": b"def main():\n    print('hi')\n",
            "gone.txt": b"bye\n",
            "logo.png": PNG,
            "run.sh": (b"#!/bin/sh\n", 0o644),
            "big.txt": b"x" * (MAX_FILE + 1),
        },
        dirs=("app", "empty"),
        symlinks={"link": "app/main.py"},
        latest=False,
    )
    put_snapshot(
        infra,
        build_id,
        f"s3-{build_id}",
        5,
        {
            "app/main.py": b"def main():\n    print('hello')\n\nmain()",
            "new.md": b"# Notes\n",
            "logo.png": PNG + b"\0",
            "run.sh": (b"#!/bin/sh\n", 0o755),
            "big.txt": b"y" * (MAX_FILE + 1),
        },
        dirs=("app",),
        symlinks={"link": "new.md"},
        reason="final",
    )
    return key, build_id


async def test_snapshots_are_listed_oldest_first(gw: Gateway, infra, uid: str):
    key, build_id = await new_build(gw, f"l{uid}")
    async with gw.client(key) as c:
        r = await c.get(f"/v1/builds/{build_id}/snapshots")
        assert r.status_code == 200, r.text
        assert r.json() == {"build_id": build_id, "snapshots": []}
        is_problem(await c.get(f"/v1/builds/{build_id}/snapshots/latest/tree"), 404)
        is_problem(await c.get(f"/v1/builds/{build_id}/diff?from=0&to=3"), 404)
    _, build_id = await two_snapshots(gw, infra, f"l{uid}")
    async with gw.client(key) as c:
        body = (await c.get(f"/v1/builds/{build_id}/snapshots")).json()
    got = [(s["snapshot_id"], s["iteration"], s["reason"], s["latest"]) for s in body["snapshots"]]
    assert got == [
        (f"s1-{build_id}", 2, "files_changed", False),
        (f"s2-{build_id}", 2, "files_changed", False),
        (f"s3-{build_id}", 5, "final", True),
    ]
    assert body["snapshots"][1]["files"] == 5
    assert body["snapshots"][0]["bytes_total"] == len(b"first\n")


async def test_a_snapshots_tree_and_its_files(gw: Gateway, infra, uid: str):
    key, build_id = await two_snapshots(gw, infra, f"t{uid}")
    async with gw.client(key) as c:
        r = await c.get(f"/v1/builds/{build_id}/snapshots/s2-{build_id}/tree")
        assert r.status_code == 200, r.text
        tree = r.json()
        assert tree["snapshot"]["snapshot_id"] == f"s2-{build_id}"
        assert [(e["path"], e["type"]) for e in tree["entries"]] == [
            ("app", "dir"),
            ("app/main.py", "file"),
            ("big.txt", "file"),
            ("empty", "dir"),
            ("gone.txt", "file"),
            ("link", "symlink"),
            ("logo.png", "file"),
            ("run.sh", "file"),
        ]
        main = tree["entries"][1]
        assert main["size"] == len(b"def main():\n    print('hi')\n") and main["mode"] == 0o644
        assert tree["entries"][5]["target"] == "app/main.py"
        latest = (await c.get(f"/v1/builds/{build_id}/snapshots/latest/tree")).json()
        assert latest["snapshot"]["snapshot_id"] == f"s3-{build_id}"
        assert latest["snapshot"]["latest"] is True

        base = f"/v1/builds/{build_id}/snapshots/s2-{build_id}/files"
        r = await c.get(f"{base}/app/main.py")
        assert r.status_code == 200, r.text
        assert r.content == b"def main():\n    print('hi')\n"
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["content-security-policy"].startswith("sandbox")
        r = await c.get(f"{base}/logo.png")
        assert r.content == PNG and r.headers["content-type"] == "image/png"
        r = await c.get(f"/v1/builds/{build_id}/snapshots/latest/files/new.md")
        assert r.headers["content-type"] == "text/markdown; charset=utf-8"

        too_big = is_problem(await c.get(f"{base}/big.txt"), 413)
        assert too_big["type"].endswith("/file-too-large")
        assert too_big["size"] == MAX_FILE + 1 and too_big["max_bytes"] == MAX_FILE
        assert "download" in too_big["detail"]
        assert "directory" in is_problem(await c.get(f"{base}/app"), 404)["detail"]
        assert "symlink" in is_problem(await c.get(f"{base}/link"), 404)["detail"]
        assert "not in this snapshot" in is_problem(await c.get(f"{base}/new.md"), 404)["detail"]
        for bad in ("app//main.py", "%2e/gone.txt", "app/%2e%2e/gone.txt", "%2Fetc/passwd"):
            is_problem(await c.get(f"{base}/{bad}"), 400)
        # Another build's snapshot is not this build's, even by its id.
        _, other = await two_snapshots(gw, infra, f"t2{uid}")
        is_problem(await c.get(f"/v1/builds/{build_id}/snapshots/s2-{other}/tree"), 404)
        is_problem(await c.get(f"/v1/builds/{build_id}/snapshots/a.b/tree"), 422)


async def test_the_diff_of_two_iterations(gw: Gateway, infra, uid: str):
    key, build_id = await two_snapshots(gw, infra, f"d{uid}")
    async with gw.client(key) as c:
        r = await c.get(f"/v1/builds/{build_id}/diff", params={"from": 3, "to": 9})
        assert r.status_code == 200, r.text
        body = r.json()
        # Iteration 3 has no snapshot of its own: its files are the newest one before it.
        assert body["from_snapshot"]["snapshot_id"] == f"s2-{build_id}"
        assert body["to_snapshot"]["snapshot_id"] == f"s3-{build_id}"
        files = {f["path"]: f for f in body["files"]}
        assert {p: f["change"] for p, f in files.items()} == {
            "app/main.py": "modified",
            "big.txt": "modified",
            "gone.txt": "removed",
            "link": "modified",
            "logo.png": "modified",
            "new.md": "added",
            "run.sh": "modified",
        }
        assert (body["added"], body["removed"], body["modified"]) == (1, 1, 5)
        assert files["app/main.py"]["diff"] == (
            "--- a/app/main.py\n+++ b/app/main.py\n@@ -1,2 +1,4 @@\n def main():\n"
            "-    print('hi')\n+    print('hello')\n+\n+main()\n\\ No newline at end of file\n"
        )
        assert files["new.md"]["diff"] == "--- /dev/null\n+++ b/new.md\n@@ -0,0 +1 @@\n+# Notes\n"
        assert files["gone.txt"]["diff"].startswith("--- a/gone.txt\n+++ /dev/null\n")
        assert files["logo.png"]["binary"] is True and files["logo.png"]["diff"] is None
        assert files["run.sh"]["diff"] is None and files["run.sh"]["note"] == "mode changed"
        assert (files["run.sh"]["old_mode"], files["run.sh"]["new_mode"]) == (0o644, 0o755)
        assert files["big.txt"]["diff"] is None and "larger than" in files["big.txt"]["note"]
        assert files["link"]["type"] == "symlink" and "new.md" in files["link"]["note"]
        assert body["truncated"] is True

        # The other way round, and an iteration against itself.
        back = (await c.get(f"/v1/builds/{build_id}/diff?from=5&to=2")).json()
        assert {f["path"]: f["change"] for f in back["files"]}["new.md"] == "removed"
        same = (await c.get(f"/v1/builds/{build_id}/diff?from=5&to=5")).json()
        assert same["files"] == [] and same["truncated"] is False

        missing = is_problem(await c.get(f"/v1/builds/{build_id}/diff?from=1&to=5"), 404)
        assert "iteration 1" in missing["detail"] and "2, 5" in missing["detail"]
        is_problem(await c.get(f"/v1/builds/{build_id}/diff?from=-1&to=5"), 422)
        is_problem(await c.get(f"/v1/builds/{build_id}/diff?to=5"), 422)


async def test_the_diff_stops_reading_at_its_byte_budget(gw: Gateway, infra, uid: str):
    key, build_id = await new_build(gw, f"b{uid}")
    chunk = b"a\n" * (MAX_FILE // 4)  # half the per-file limit
    put_snapshot(infra, build_id, f"b1-{build_id}", 1, {})
    put_snapshot(infra, build_id, f"b2-{build_id}", 2, {f"f{i}.txt": chunk for i in range(8)})
    async with gw.client(key) as c:
        body = (await c.get(f"/v1/builds/{build_id}/diff?from=1&to=2")).json()
    with_diff = [f["path"] for f in body["files"] if f["diff"] is not None]
    assert with_diff == [f"f{i}.txt" for i in range(6)]  # 3 x MAX_FILE of budget
    assert body["truncated"] is True
    assert all("too large" in f["note"] for f in body["files"][6:])


async def test_another_users_build_is_not_found(gw: Gateway, infra, uid: str):
    _, build_id = await two_snapshots(gw, infra, f"ia{uid}")
    bob = await gw.key(f"ib{uid}")
    async with gw.client(bob) as c:
        for path in (
            "snapshots",
            f"snapshots/s2-{build_id}/tree",
            "snapshots/latest/tree",
            f"snapshots/s2-{build_id}/files/app/main.py",
            "diff?from=2&to=5",
        ):
            body = is_problem(await c.get(f"/v1/builds/{build_id}/{path}"), 404)
            assert body["detail"] == "build not found", (path, body)


async def test_the_endpoints_are_documented(gw: Gateway):
    async with gw.client() as c:
        spec = (await c.get("/openapi.json")).json()
    for path in (
        "/v1/builds/{build_id}/snapshots",
        "/v1/builds/{build_id}/snapshots/{snapshot_id}/tree",
        "/v1/builds/{build_id}/snapshots/{snapshot_id}/files/{path}",
        "/v1/builds/{build_id}/diff",
    ):
        operation = spec["paths"][path]["get"]
        assert operation["description"] and "404" in operation["responses"], path
