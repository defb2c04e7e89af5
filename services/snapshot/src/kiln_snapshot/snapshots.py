"""Content-addressed, incremental snapshots of a build's workspace, and restore plans.

The bucket's keys are ``kiln_contracts.bucket`` (blobs, each build's manifests and ``latest``,
pending markers, collection flags); a manifest is ``kiln_contracts.manifest.Manifest`` (regular
files, directories, symlinks). The gateway reads both for its files archive: keep them stable.

A snapshot's id is the event_id of the CheckpointSaved it was taken for. Bytes go from the sandbox
to S3 directly (presigned PUTs); a manifest is written only once every blob it names exists, and
``latest`` only moves forward (by the checkpoint's iteration, then time). After each snapshot the
build's manifests beyond the newest ``keep`` (by iteration, then checkpoint time; ``latest``'s
never) are deleted.

Safety against the garbage collector (``kiln_snapshot.gc``), in this order:

1. write the pending marker (every sha256 the manifest will name, and the start time);
2. if a collection is sweeping (a fresh ``gc/running/*``), give up for now (RetryLater): the
   sweep may act on a listing taken before our marker existed;
3. check which blobs exist (those of the build's latest manifest do; the others by a HEAD
   each), have the sandbox upload the missing ones, verify them;
4. if more than ``max_snapshot_s`` passed since step 1, give up (RetryLater; a collection ignores
   markers that old, so our blobs may no longer be protected);
5. write the manifest, move ``latest``, delete the marker.

Entries: regular files (uploaded as blobs), directories (all of them, so that empty ones and
modes come back) and symlinks, recorded as they are, never followed. A restore plan leaves out a
symlink whose target is absolute or that leads outside the workspace once every symlink of the
snapshot is followed (it is listed in ``skipped``); the sandbox checks again on its filesystem.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from kiln_contracts import CheckpointSaved, SnapshotSaved, stable_id
from kiln_contracts.bucket import (
    GC_RUNNING_PREFIX,
    blob_key,
    pending_key,
)
from kiln_contracts.manifest import Manifest, ManifestEntry
from kiln_contracts.messages import utcnow
from kiln_contracts.rpc import (
    ManifestRequest,
    Upload,
    UploadRequest,
)
from kiln_runtime.errors import PermanentError, RetryLater

from .manifests import (
    advance_latest,
    latest_manifest,
    load_manifest,
    prune_manifests,
    write_manifest,
)
from .ports import ObjectStore, Publisher, Sandbox

log = logging.getLogger(__name__)


# Allowance for clock skew between replicas and for the last writes of a slow snapshot.
CLOCK_SLACK_S = 300.0
# Checkpoints that someone waits on (the sandbox pauses or stops after them): never coalesced away.
NEVER_SKIPPED = frozenset({"sleep", "final"})


class Coalescer:
    """The newest checkpoint seen per build (in this process) and a lock per build.

    Checkpoints are ordered by (iteration, stream sequence). A checkpoint older than one already
    seen for the same build is skipped, since the newer one's snapshot supersedes it; snapshots of
    one build never run concurrently in a process, so the same content is not uploaded twice.
    """

    def __init__(self, max_builds: int = 10_000) -> None:
        self.max_builds = max_builds
        self._newest: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def seen(self, build_id: str, order: tuple[int, int]) -> None:
        current = self._newest.get(build_id)
        if current is None or order > current:
            self._newest[build_id] = order
        self._newest.move_to_end(build_id)
        while len(self._newest) > self.max_builds:
            self._newest.popitem(last=False)

    def superseded(self, build_id: str, order: tuple[int, int]) -> bool:
        newest = self._newest.get(build_id)
        return newest is not None and newest > order

    def lock(self, build_id: str) -> asyncio.Lock:
        lock = self._locks.get(build_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[build_id] = lock
        return lock


@dataclass
class Deps:
    store: ObjectStore
    sandbox: Sandbox
    publisher: Publisher
    excludes: list[str] = field(default_factory=list)
    coalescer: Coalescer = field(default_factory=Coalescer)
    upload_batch: int = 200
    keep: int = 5  # manifests kept per build
    max_snapshot_s: float = 1800.0  # a snapshot older than this gives up (see the docstring)
    gc_sweep_s: float = 600.0  # how long a collection may sweep (kiln_snapshot.gc)
    retry_delay_s: float = 5.0


# ------------------------------------------------------------------------------ snapshots


async def take_snapshot(
    deps: Deps, event: CheckpointSaved, stream_seq: int = 0
) -> SnapshotSaved | None:
    """Snapshot the build's workspace for ``event``; None when a newer checkpoint superseded it."""
    build_id = event.build_id
    snapshot_id = str(event.event_id)
    order = (event.iteration, stream_seq)
    extra = {"build_id": build_id, "event_id": event.event_id, "iteration": event.iteration}
    deps.coalescer.seen(build_id, order)
    async with deps.coalescer.lock(build_id):
        stored = await load_manifest(deps.store, build_id, snapshot_id)
        if stored is not None:
            # Redelivered after the manifest was written: finish the job, publish the same event.
            await advance_latest(deps.store, build_id, stored)
            saved = snapshot_saved(event, stored)
            await deps.publisher.publish(saved)
            log.info("snapshot %s already stored; republished", snapshot_id, extra=extra)
            return saved
        if event.reason not in NEVER_SKIPPED and deps.coalescer.superseded(build_id, order):
            log.info("checkpoint superseded by a newer one; skipped", extra=extra)
            return None

        reply = await deps.sandbox.manifest(
            ManifestRequest(
                build_id=build_id, excludes=list(deps.excludes), include_dirs_and_symlinks=True
            )
        )
        if not reply.ok:  # its sandbox being made, restored or unreachable: not for good
            raise RetryLater(
                f"sandbox could not list the workspace of {build_id}: {reply.error}",
                delay_s=deps.retry_delay_s,
            )
        entries = _normalise(reply.entries)
        files = [e for e in entries if e.type == "file"]
        by_sha = {e.sha256: e for e in files}
        async with pending_marker(deps, build_id, snapshot_id, by_sha, "snapshot") as started:
            # The blobs of the build's latest manifest exist (a manifest is written only once
            # its blobs do, and from here on our marker keeps them from being collected):
            # only the others are looked up, one HEAD each.
            previous = await _readable_latest(deps.store, build_id)
            known = previous.blobs() if previous else set()
            missing = await _missing_blobs(deps, [sha for sha in by_sha if sha not in known])
            if missing:
                await _upload(deps, build_id, [by_sha[sha] for sha in sorted(missing)])
            if (utcnow() - started).total_seconds() > deps.max_snapshot_s:
                raise RetryLater(
                    f"snapshot took longer than {deps.max_snapshot_s:g}s; its blobs may have "
                    "been collected meanwhile, starting again",
                    delay_s=deps.retry_delay_s,
                )
            doc = Manifest.of(
                event, entries, bytes_uploaded=sum(by_sha[sha].size for sha in missing)
            )
            await write_manifest(deps.store, doc)
        await advance_latest(deps.store, build_id, doc, previous)
        saved = snapshot_saved(event, doc)
        await deps.publisher.publish(saved)
        log.info(
            "snapshot %s: %d files, %d bytes, %d uploaded",
            snapshot_id,
            saved.files,
            saved.bytes_total,
            saved.bytes_uploaded,
            extra=extra,
        )
        try:
            await prune_manifests(deps.store, build_id, deps.keep)
        except Exception:
            log.warning("could not prune old manifests", exc_info=True, extra=extra)
        return saved


@asynccontextmanager
async def pending_marker(
    deps: Deps, build_id: str, snapshot_id: str, blobs: Iterable[str], what: str
) -> AsyncIterator[datetime]:
    """Steps 1 and 2 of the protocol above, and the marker's deletion at the end of step 5:
    the pending marker naming ``blobs`` written, RetryLater ("``what`` later") while a
    collection is sweeping, the marker deleted on the way out, an error's too (without a
    manifest the marker may stay, after a crash: collections ignore it once old). Yields the
    time the marker says the snapshot started."""
    started = utcnow()
    marker = pending_key(build_id, snapshot_id)
    await deps.store.put(
        marker,
        json.dumps({"started_at": started.isoformat(), "blobs": sorted(blobs)}).encode(),
    )
    try:
        sweeping = await collections_sweeping(deps.store, started, deps.gc_sweep_s)
        if sweeping:
            raise RetryLater(
                f"a garbage collection is sweeping ({sweeping[0]}); {what} later",
                delay_s=deps.retry_delay_s,
            )
        yield started
    finally:
        await deps.store.delete(marker)


async def collections_sweeping(store: ObjectStore, now: datetime, sweep_s: float) -> list[str]:
    """The keys of collections that may be sweeping now (stale flags of dead runs ignored)."""
    horizon = now - timedelta(seconds=sweep_s + CLOCK_SLACK_S)
    return [o.key for o in await store.list(GC_RUNNING_PREFIX) if o.last_modified > horizon]


def snapshot_saved(event: CheckpointSaved, doc: Manifest) -> SnapshotSaved:
    """The SnapshotSaved for a stored manifest: the same event (and id) however often it is built."""
    snapshot_id = str(event.event_id)
    return event.caused(
        SnapshotSaved,
        event_id=stable_id(event.build_id, "snapshot_saved", snapshot_id),
        occurred_at=doc.created_at,
        snapshot_id=snapshot_id,
        iteration=event.iteration,
        reason=event.reason,
        files=doc.files,
        bytes_total=doc.bytes_total,
        bytes_uploaded=doc.bytes_uploaded,
    )


def _normalise(entries: list[ManifestEntry]) -> list[ManifestEntry]:
    """One entry per path (the last wins), sorted; paths must stay inside the workspace."""
    by_path: dict[str, ManifestEntry] = {}
    for entry in entries:
        parts = entry.path.split("/")
        if entry.path.startswith("/") or not entry.path or ".." in parts or "\\" in entry.path:
            raise PermanentError(f"sandbox manifest has an unsafe path: {entry.path!r}")
        by_path[entry.path] = entry
    return [by_path[p] for p in sorted(by_path)]


async def _readable_latest(store: ObjectStore, build_id: str) -> Manifest | None:
    try:
        return await latest_manifest(store, build_id)
    except ValueError:  # unreadable: every blob is looked up
        return None


async def _missing_blobs(deps: Deps, shas: list[str]) -> set[str]:
    keys = {blob_key(sha): sha for sha in shas}
    absent = await deps.store.missing(keys)
    return {keys[k] for k in absent}


async def _upload(deps: Deps, build_id: str, entries: list[ManifestEntry]) -> None:
    """Have the sandbox PUT the missing blobs, then check every one of them exists."""
    uploads = [
        Upload(path=e.path, sha256=e.sha256, url=await deps.store.presign_put(blob_key(e.sha256)))
        for e in entries
    ]
    for start in range(0, len(uploads), deps.upload_batch):
        batch = uploads[start : start + deps.upload_batch]
        reply = await deps.sandbox.upload(UploadRequest(build_id=build_id, uploads=batch))
        if not reply.ok:
            raise RetryLater(f"sandbox upload failed: {reply.error}", delay_s=5.0)
    sizes = await deps.store.sizes([blob_key(e.sha256) for e in entries])
    still = [e for e in entries if sizes[blob_key(e.sha256)] is None]
    if still:
        raise RetryLater(f"{len(still)} blobs still missing after the upload", delay_s=5.0)
    # A blob is named by its hash, so a wrong one would poison every later snapshot: one whose
    # size is not the file's (it changed between manifest and upload) is deleted and retried.
    wrong = [e for e in entries if sizes[blob_key(e.sha256)] != e.size]
    for entry in wrong:
        await deps.store.delete(blob_key(entry.sha256))
    if wrong:
        raise RetryLater(
            f"{len(wrong)} uploaded blobs do not have the manifest's size "
            f"(e.g. {wrong[0].path!r}); the workspace changed during the snapshot",
            delay_s=1.0,
        )
