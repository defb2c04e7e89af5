"""A fork's files on NATS and the S3 API, with the sandbox's real manifest/upload/restore code
(local provider): the fork's first snapshot is a copy of its source's snapshot at the fork's
iteration (the newest one taken at it or before), made once however often it is asked for, naming
the same blobs; a fresh sandbox restored from it is that iteration's workspace, byte for byte;
retention of the source then leaves the fork's files whole (the garbage collector keeps every
blob a manifest names), and a fork at an iteration whose snapshot retention deleted is refused."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from kiln_contracts import BuildRequested, CheckpointSaved, ForkOrigin, bucket
from kiln_contracts.manifest import Manifest
from kiln_contracts.messages import utcnow
from kiln_devstack.sandbox import MemoryRegistry
from kiln_sandbox.adapters.local import LocalProvider
from kiln_sandbox.handlers import SandboxService
from kiln_sandbox.records import SandboxRecord
from kiln_snapshot import bootstrap, gc, manifests, restores
from tests.integration.test_snapshot_restore_gc import serve_sandbox_rpc, settings, tree
from tests.integration.test_snapshot_s3 import until, watch_saved
from tests.integration.wirings import restore_fresh, started

pytestmark = pytest.mark.integration


@pytest.fixture
async def service(infra: dict[str, str], uid: str) -> AsyncIterator[bootstrap.Wiring]:
    async with started(
        bootstrap.build(settings(infra, uid, snapshot_keep=5), service=f"snapshot-{uid}")
    ) as wiring:
        yield wiring


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_a_fork_is_its_sources_snapshot_at_that_iteration_and_outlives_its_retention(
    service: bootstrap.Wiring, infra: dict[str, str], uid: str, tmp_path: Path
) -> None:
    source, fork, user = f"s{uid}", f"f{uid}", f"u{uid}"
    provider = LocalProvider(tmp_path / "source")
    registry = MemoryRegistry()
    svc = SandboxService(provider, registry, None, None)  # type: ignore[arg-type]
    sandbox = await provider.create(source)
    await registry.put(SandboxRecord(source, "local", sandbox.sandbox_id, "running"))
    ws = Path(sandbox.root)
    store = service.store
    rpc = await serve_sandbox_rpc(infra["NATS_URL"], svc)
    checkpoints = []
    try:
        saved = await watch_saved(service, source)
        # iteration 2: the package; 3: a scratch file; 4: it changed, a file more, one gone
        (ws / "pkg").mkdir()
        (ws / "pkg" / "mod.py").write_bytes(b"x = 2\n")
        (ws / "notes.txt").write_bytes(b"only at iteration 2\n")
        (ws / "empty").mkdir()
        for iteration in (2, 3, 4):
            if iteration == 3:
                (ws / "scratch.txt").write_bytes(b"only at iteration 3\n")
            if iteration == 4:
                (ws / "scratch.txt").unlink()
                (ws / "pkg" / "mod.py").write_bytes(b"x = 4\n")
                (ws / "notes.txt").unlink()
                (ws / "later.txt").write_bytes(b"from iteration 4\n")
            if iteration == 2:
                at_two = tree(ws)
            event = CheckpointSaved(
                build_id=source, user_id=user, iteration=iteration, reason="files_changed"
            )
            checkpoints.append(event)
            await service.bus.publish(event)
            await until(lambda n=len(checkpoints): len(saved) == n)  # type: ignore[misc]
    finally:
        await rpc.close()
        await provider.close()
    two, _, four = (str(c.event_id) for c in checkpoints)

    # the fork at iteration 2, delivered twice: one first snapshot, a copy of iteration 2's
    fork_saved = await watch_saved(service, fork)
    request = BuildRequested(
        build_id=fork,
        user_id=user,
        idea_brief="x",
        fork=ForkOrigin(build_id=source, iteration=2, snapshot_id=None),
    )
    await service.bus.publish(request)
    await service.bus.publish(request.with_id(uuid.uuid4()))  # another id: a real redelivery
    await until(lambda: fork_saved)
    fork_manifests = await store.list(bucket.manifests_prefix(fork))
    assert len(fork_manifests) == 1
    [first] = fork_saved
    assert (first.reason, first.iteration, first.bytes_uploaded) == ("fork", 2, 0)
    raw = await store.get(bucket.manifest_key(fork, first.snapshot_id))
    assert raw is not None
    copy = Manifest.parse(raw)
    original = Manifest.parse(await store.get(bucket.manifest_key(source, two)) or b"")
    assert copy.forked_from is not None and copy.forked_from.snapshot_id == two
    assert (copy.entries, copy.dirs, copy.symlinks) == (
        original.entries,
        original.dirs,
        original.symlinks,
    )
    assert await store.get(bucket.latest_key(fork)) == first.snapshot_id.encode()

    # a fresh sandbox of the fork, restored as its first ToolCall restores it: iteration 2's files
    async def restored(build: str, origin: ForkOrigin, into: Path) -> dict[str, object]:
        got, root = await restore_fresh(infra["NATS_URL"], LocalProvider(into), build, origin)
        assert got
        return tree(root)  # type: ignore[return-value]

    origin = ForkOrigin(build_id=source, iteration=2)
    assert await restored(fork, origin, tmp_path / "fork") == at_two
    # a fork whose first sandbox is made before its BuildRequested reached the snapshot service:
    # the restore plan makes the copy (here of iteration 4's snapshot, named by its id)
    other = f"g{uid}"
    at_four = await restored(
        other, ForkOrigin(build_id=source, iteration=4, snapshot_id=four), tmp_path / "other"
    )
    assert at_four[("later.txt")] == ("file", 0o644, b"from iteration 4\n")
    assert "notes.txt" not in at_four and await store.get(bucket.latest_key(other)) is not None

    # retention of the source (keep 1): the manifests forks were made from stay (iteration 2's,
    # and 4's, which is also latest), the other one goes and is recorded as gone
    assert {o.key for o in await store.list(bucket.fork_refs_prefix(source))} == {
        bucket.fork_ref_key(source, two, fork),
        bucket.fork_ref_key(source, four, other),
    }
    later = {"clock": lambda: utcnow() + timedelta(hours=2)}
    report = await gc.collect(
        store, keep=1, grace_s=3600, max_snapshot_s=4 * 3600.0, sweep_s=600.0, **later
    )  # type: ignore[arg-type]
    kept = {o.key for o in await store.list(bucket.manifests_prefix(source))}
    assert kept == {bucket.manifest_key(source, two), bucket.manifest_key(source, four)}
    assert await manifests.pruned_iteration(store, source) == 3
    # blobs only the deleted manifest named go; every blob a manifest names stays (the fork's
    # copy shares the source's), and the fork restores as before
    assert sha(b"only at iteration 3\n") in report.deleted
    blobs = {o.key.removeprefix("blobs/") for o in await store.list("blobs/")}
    assert {sha(b"x = 2\n"), sha(b"only at iteration 2\n"), sha(b"x = 4\n")} <= blobs
    assert not set(report.deleted) & copy.blobs()
    assert await restored(fork, origin, tmp_path / "again") == at_two
    # a new fork at iteration 3 now would be given iteration 2's files: refused; at 2 and 4 not
    with pytest.raises(restores.ForkSourceMissing, match="no longer kept"):
        await restores.resolve(store, source, 3)
    assert (await restores.resolve(store, source, 2)).snapshot_id == two  # type: ignore[union-attr]
    assert (await restores.resolve(store, source, 9)).snapshot_id == four  # type: ignore[union-attr]
