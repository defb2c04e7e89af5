"""Retention and garbage collection of the snapshot bucket: ``python -m kiln_snapshot.gc``.

One run (``collect``): keep the newest ``keep`` manifests of every build (``latest``'s always),
then delete every blob that no remaining manifest and no pending snapshot names, and that is
older than ``grace_s`` (by its LastModified). Mark and sweep, safe against snapshots running at
the same time, by this protocol (the snapshot's side is in ``snapshots``' docstring):

1. write ``gc/running/<run_id>``: snapshots that start from now on wait until the sweep is over
   (one that checked before this flag existed has written its pending marker already);
2. list the pending markers, ``pending/<build>/<snapshot>.json``, *before* the manifests: a
   snapshot that finishes in between has written its manifest before deleting its marker, so
   each in-flight snapshot is seen either way. Markers older than ``max_snapshot_s`` (+ slack
   for clock skew) are from crashed snapshots: ignored and deleted (a live snapshot that old
   gives up before writing its manifest);
3. apply the retention, then read every remaining manifest: the referenced blobs (a manifest
   that cannot be read ends the run here, before anything is swept);
4. sweep: delete blobs referenced by neither, last modified before ``now - grace_s``; stop
   sweeping once ``sweep_s`` have passed since step 1 (snapshots treat an older flag as that of
   a dead run and go on), the rest waits for the next run;
5. delete the flag.

The timing assumptions (clocks agree within ``CLOCK_SLACK_S``; a snapshot's last writes and a
sweep's last delete finish within that slack) are the price of not having a lock or conditional
deletes in S3. The grace period also keeps blobs a crashed snapshot uploaded (the redelivered
checkpoint will want them) and gives restores holding presigned URLs time to finish.

Every build's manifests are read on each run: fine for thousands of builds, the next step past
that is an index of referenced blobs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from kiln_contracts.bucket import (
    BLOBS_PREFIX,
    BUILDS_PREFIX,
    PENDING_PREFIX,
    blob_sha256,
    gc_running_key,
    parse_manifest_key,
)
from kiln_contracts.manifest import Manifest
from kiln_contracts.messages import utcnow

from .manifests import prune_manifests
from .ports import ObjectStore
from .snapshots import CLOCK_SLACK_S

log = logging.getLogger(__name__)


@dataclass
class Report:
    manifests_pruned: int = 0
    manifests_kept: int = 0
    blobs_seen: int = 0
    blobs_referenced: int = 0
    blobs_pending: int = 0
    blobs_deleted: int = 0
    bytes_deleted: int = 0
    stale_markers: int = 0
    young_kept: int = 0
    complete: bool = True
    deleted: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"manifests kept={self.manifests_kept} pruned={self.manifests_pruned}; "
            f"blobs seen={self.blobs_seen} referenced={self.blobs_referenced} "
            f"pending={self.blobs_pending} young={self.young_kept} "
            f"deleted={self.blobs_deleted} ({self.bytes_deleted} bytes); "
            f"stale markers={self.stale_markers}; complete={self.complete}"
        )


async def collect(
    store: ObjectStore,
    *,
    keep: int,
    grace_s: float,
    max_snapshot_s: float,
    sweep_s: float,
    dry_run: bool = False,
    clock: Callable[[], datetime] = utcnow,
) -> Report:
    """One retention + mark-and-sweep run (see the module docstring)."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    report = Report()
    started = clock()
    flag = gc_running_key(uuid.uuid4().hex)
    await store.put(flag, json.dumps({"started_at": started.isoformat()}).encode())
    try:
        # 1. blobs of snapshots being written (before the manifests: see the docstring)
        pending: set[str] = set()
        stale_before = started - timedelta(seconds=max_snapshot_s + CLOCK_SLACK_S)
        for marker in await store.list(PENDING_PREFIX):
            raw = await store.get(marker.key)
            if raw is None:
                continue  # its snapshot finished meanwhile: its manifest is listed below
            doc = json.loads(raw)
            if datetime.fromisoformat(doc["started_at"]) < stale_before:
                report.stale_markers += 1
                if not dry_run:
                    await store.delete(marker.key)
                continue
            pending.update(doc["blobs"])
        report.blobs_pending = len(pending)

        # 2. retention, then the blobs the remaining manifests name
        by_build: dict[str, int] = defaultdict(int)
        for obj in await store.list(BUILDS_PREFIX):
            if (names := parse_manifest_key(obj.key)) is not None:
                by_build[names[0]] += 1
        for build_id, count in by_build.items():
            if count > keep and not dry_run:
                report.manifests_pruned += len(await prune_manifests(store, build_id, keep))
        referenced: set[str] = set()
        for obj in await store.list(BUILDS_PREFIX):
            if parse_manifest_key(obj.key) is None:
                continue
            raw = await store.get(obj.key)
            if raw is None:
                continue  # pruned meanwhile
            report.manifests_kept += 1
            # One that cannot be read raises: nothing is swept while its blobs are unknown.
            referenced.update(Manifest.parse(raw).blobs())
        report.blobs_referenced = len(referenced)

        # 3. sweep
        old_before = started - timedelta(seconds=grace_s)
        for blob in await store.list(BLOBS_PREFIX):
            report.blobs_seen += 1
            sha = blob_sha256(blob.key)
            if sha is None or sha in referenced or sha in pending:
                continue
            if blob.last_modified >= old_before:
                report.young_kept += 1
                continue
            if (clock() - started).total_seconds() > sweep_s:
                report.complete = False
                log.warning("sweep window of %gs used up; the rest waits", sweep_s)
                break
            if not dry_run:
                await store.delete(blob.key)
            report.blobs_deleted += 1
            report.bytes_deleted += blob.size
            report.deleted.append(sha)
    finally:
        await store.delete(flag)
    log.info("gc%s: %s", " (dry run)" if dry_run else "", report.summary())
    return report


async def run_periodically(
    store: ObjectStore,
    interval_s: float,
    stop: asyncio.Event,
    **options: float,
) -> None:
    """``collect`` every ``interval_s`` until ``stop`` is set; a failed run is logged and retried."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
            return
        except TimeoutError:
            pass
        try:
            await collect(
                store,
                keep=int(options["keep"]),
                grace_s=options["grace_s"],
                max_snapshot_s=options["max_snapshot_s"],
                sweep_s=options["sweep_s"],
            )
        except Exception:
            log.exception("garbage collection failed; next try in %gs", interval_s)


async def _main(dry_run: bool) -> Report:
    from kiln_runtime import log as runtime_log

    from .bootstrap import make_store
    from .settings import SnapshotSettings

    settings = SnapshotSettings()
    runtime_log.configure("snapshot-gc", settings.log_level, settings.log_json)
    store = make_store(settings)
    await store.open()
    try:
        return await collect(
            store,
            keep=settings.snapshot_keep,
            grace_s=settings.snapshot_gc_grace_s,
            max_snapshot_s=settings.snapshot_max_s,
            sweep_s=settings.snapshot_gc_sweep_s,
            dry_run=dry_run,
        )
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kiln_snapshot.gc",
        description="Retention (KILN_SNAPSHOT_KEEP manifests per build) and garbage collection "
        "of unreferenced blobs older than KILN_SNAPSHOT_GC_GRACE_S, on the bucket the snapshot "
        "service uses (S3_ENDPOINT_URL, KILN_S3_BUCKET).",
    )
    parser.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    args = parser.parse_args(argv)
    report = asyncio.run(_main(args.dry_run))
    print(report.summary())


if __name__ == "__main__":
    main()
