"""The files archive is the workspace: a snapshot taken by the snapshot service through the
sandbox's real manifest/upload code (local provider), on NATS and the S3 API, downloaded from the
gateway (``GET /v1/builds/{id}/files``) holds the same paths, types, modes, link targets and
bytes, empty directories and symlinks included. A manifest the snapshot service stored before
(the document as it was written, not through the model) still downloads and restores."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import boto3
import pytest
import pytest_asyncio

from kiln_contracts import CheckpointSaved, bucket
from kiln_devstack.sandbox import MemoryRegistry
from kiln_sandbox.adapters.local import LocalProvider
from kiln_sandbox.handlers import SandboxService
from kiln_sandbox.records import SandboxRecord
from kiln_snapshot import bootstrap
from tests.integration.gateway_fixtures import Gateway, running_gateway
from tests.integration.test_snapshot_restore_gc import serve_sandbox_rpc, settings, tree
from tests.integration.test_snapshot_s3 import until, watch_saved
from tests.integration.wirings import restore_fresh, started
from tests.unit.test_manifest import stored_manifest

pytestmark = pytest.mark.integration

BRIEF = {"idea_brief": "A tiny CLI that counts words.", "understanding_qna": []}
Tree = dict[str, tuple[str, int, bytes | str]]


@pytest.fixture(scope="module")
def bucket_name() -> str:
    return f"kiln-archive-{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gw(infra: dict[str, str], bucket_name: str) -> AsyncIterator[Gateway]:
    async with running_gateway(
        infra,
        "gwarchive",
        redis_url=infra["REDIS_URL"],
        s3_endpoint_url=infra["S3_ENDPOINT_URL"],
        s3_bucket=bucket_name,
        projection_durable="gateway-projection-archive",
    ) as gateway:
        yield gateway


@pytest.fixture
async def service(
    infra: dict[str, str], uid: str, bucket_name: str
) -> AsyncIterator[bootstrap.Wiring]:
    wiring = bootstrap.build(
        settings(infra, uid).model_copy(update={"s3_bucket": bucket_name}),
        service=f"snapshot-{uid}",
    )
    async with started(wiring):
        yield wiring


async def new_build(gw: Gateway, user: str) -> tuple[str, str]:
    """(API key, build id) of a build the gateway knows, owned by ``user``."""
    key = await gw.key(user)
    async with gw.client(key) as c:
        r = await c.post("/v1/builds", json=BRIEF)
        assert r.status_code == 201, r.text
        return key, r.json()["build_id"]


async def download(gw: Gateway, key: str, build_id: str) -> tuple[str, bytes]:
    """(snapshot id, tar.gz) of the build's files."""
    async with gw.client(key) as c:
        r = await c.get(f"/v1/builds/{build_id}/files")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip"
    return r.headers["x-kiln-snapshot-id"], r.content


def members(archive: bytes, root: str) -> Tree:
    """The archive's entries in the shape of ``tree``: (kind, mode, bytes or link target)."""
    out: Tree = {}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for m in tar.getmembers():
            assert m.name.startswith(f"{root}/"), m.name
            rel = m.name.removeprefix(f"{root}/")
            if m.issym():
                out[rel] = ("link", 0, m.linkname)
            elif m.isdir():
                out[rel] = ("dir", m.mode, b"")
            else:
                assert m.isreg(), m.name
                data = tar.extractfile(m)
                assert data is not None
                out[rel] = ("file", m.mode, data.read())
    return out


def extracted(archive: bytes, into: Path, root: str) -> Tree:
    """The tree ``tar -xzf`` leaves (Python's tarfile, the "tar" filter: modes kept)."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(into, filter="tar")
    return tree(into / root)


async def test_the_downloaded_archive_is_the_workspace(
    gw: Gateway, service: bootstrap.Wiring, infra: dict[str, str], uid: str, tmp_path: Path
) -> None:
    user = f"a{uid}"
    key, build = await new_build(gw, user)
    provider = LocalProvider(tmp_path / "sandboxes")
    registry = MemoryRegistry()
    svc = SandboxService(provider, registry, None, None)  # type: ignore[arg-type]
    sandbox = await provider.create(build)
    await registry.put(SandboxRecord(build, "local", sandbox.sandbox_id, "running"))
    ws = Path(sandbox.root)
    (ws / "src" / "pkg" / "data").mkdir(parents=True)
    (ws / "src" / "pkg" / "mod.py").write_bytes(b"def f():\n    return 1\n")
    (ws / "src" / "pkg" / "data" / "table.csv").write_bytes(b"a,b\n1,2\n")
    (ws / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(ws / "run.sh", 0o755)
    (ws / "blob.bin").write_bytes(bytes(range(256)) * 1024)
    os.chmod(ws / "blob.bin", 0o600)
    (ws / "empty.txt").write_bytes(b"")
    (ws / "empty" / "deeper").mkdir(parents=True)
    os.chmod(ws / "empty" / "deeper", 0o700)
    os.symlink("src/pkg/mod.py", ws / "link-to-file")
    os.symlink("pkg", ws / "src" / "link-to-dir")
    os.symlink("nowhere/yet", ws / "dangling-inside")
    os.symlink("/etc/passwd", ws / "absolute")  # leads outside: not in the archive
    (ws / "__pycache__").mkdir()
    (ws / "__pycache__" / "x.pyc").write_bytes(b"junk")  # excluded from snapshots
    rpc = await serve_sandbox_rpc(infra["NATS_URL"], svc)
    try:
        saved = await watch_saved(service, build)
        event = CheckpointSaved(build_id=build, user_id=user, iteration=1, reason="files_changed")
        await service.bus.publish(event)
        await until(lambda: saved)
    finally:
        await rpc.close()
        await provider.close()

    snapshot_id, archive = await download(gw, key, build)
    assert snapshot_id == saved[0].snapshot_id == str(event.event_id)

    workspace = tree(ws)
    for left_out in ("__pycache__", "__pycache__/x.pyc", "absolute"):
        del workspace[left_out]
    root = f"kiln-{build}"
    assert members(archive, root) == workspace
    assert extracted(archive, tmp_path / "out", root) == workspace
    # what the comparison covers
    assert workspace["empty/deeper"] == ("dir", 0o700, b"")
    assert workspace["run.sh"][:2] == ("file", 0o755)
    assert workspace["link-to-file"] == ("link", 0, "src/pkg/mod.py")
    assert workspace["src/pkg/data/table.csv"] == ("file", 0o644, b"a,b\n1,2\n")


@pytest.mark.parametrize("oldest", [False, True], ids=["with-dirs-and-symlinks", "files-only"])
async def test_a_manifest_stored_before_downloads_and_restores(
    gw: Gateway,
    service: bootstrap.Wiring,
    infra: dict[str, str],
    uid: str,
    tmp_path: Path,
    bucket_name: str,
    oldest: bool,
) -> None:
    user = f"l{uid}"
    key, build = await new_build(gw, user)
    files = {
        "run.sh": (b"#!/bin/sh\necho hi\n", 0o755),
        "src/pkg/mod.py": (b"x = 1\n", 0o644),
        "src/pkg/secret.txt": (b"s3cr3t\n", 0o600),
    }
    dirs = {"empty": 0o700, "src": 0o755, "src/pkg": 0o750}
    links = {"link": "src/pkg/mod.py", "out": "/etc/passwd"}
    snapshot_id = f"s{uid}"
    s3 = boto3.client("s3", endpoint_url=infra["S3_ENDPOINT_URL"], region_name="us-east-1")
    for data, _ in files.values():
        s3.put_object(
            Bucket=bucket_name, Key=bucket.blob_key(hashlib.sha256(data).hexdigest()), Body=data
        )
    doc = stored_manifest(
        build_id=build,
        user_id=user,
        snapshot_id=snapshot_id,
        files=files,
        dirs=None if oldest else dirs,
        symlinks=None if oldest else links,
    )
    s3.put_object(Bucket=bucket_name, Key=bucket.manifest_key(build, snapshot_id), Body=doc)
    s3.put_object(Bucket=bucket_name, Key=bucket.latest_key(build), Body=snapshot_id.encode())

    expected: Tree = {p: ("file", m, data) for p, (data, m) in files.items()}
    if not oldest:
        expected |= {p: ("dir", m, b"") for p, m in dirs.items()}
        expected["link"] = ("link", 0, "src/pkg/mod.py")  # "out" leads outside: left out

    got_id, archive = await download(gw, key, build)
    assert got_id == snapshot_id
    assert members(archive, f"kiln-{build}") == expected

    # restored into a fresh sandbox by the sandbox's own restore path
    provider = LocalProvider(tmp_path / "fresh")
    try:
        got, root = await restore_fresh(infra["NATS_URL"], provider, build)
    finally:
        await provider.close()
    assert got == snapshot_id
    restored = tree(root)
    if oldest:  # the parents of the files are made as they come, with the default mode
        restored = {p: e for p, e in restored.items() if e[0] != "dir"}
    assert restored == expected
