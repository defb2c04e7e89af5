"""A build's manifests in the bucket: their order (iteration, then the checkpoint's time, kept as
each manifest's metadata), ``latest`` (moved forward only), and retention (the newest ``keep``,
never ``latest``'s nor one a fork was made from)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from kiln_contracts.bucket import (
    fork_refs_prefix,
    latest_key,
    manifest_key,
    manifests_prefix,
    parse_fork_ref_key,
    pruned_key,
)
from kiln_contracts.manifest import Manifest

from .ports import ObjectStore

log = logging.getLogger(__name__)

ORDER_META = "kiln-order"  # S3 user metadata on a manifest: see order_tag


async def prune_manifests(store: ObjectStore, build_id: str, keep: int) -> list[str]:
    """Delete the build's manifests beyond the newest ``keep``; their keys. Never ``latest``'s
    (the one a live build restores from) nor one a fork was made from (``forks/`` marks).

    Newest by the order tag each manifest carries as metadata (iteration, then checkpoint time);
    S3's LastModified (one-second resolution) breaks ties and orders untagged manifests."""
    objects = await store.list(manifests_prefix(build_id))
    if len(objects) <= keep:
        return []
    latest = await store.get(latest_key(build_id))
    protected = {manifest_key(build_id, latest.decode())} if latest is not None else set()
    for mark in await store.list(fork_refs_prefix(build_id)):
        if (names := parse_fork_ref_key(mark.key)) is not None:
            protected.add(manifest_key(build_id, names[1]))
    tags = {o.key: ((await store.metadata(o.key)) or {}).get(ORDER_META, "") for o in objects}
    objects.sort(key=lambda o: (tags[o.key], o.last_modified, o.key), reverse=True)
    doomed = [o.key for o in objects[keep:] if o.key not in protected]
    if doomed:
        # recorded before the deletes: a fork at an iteration whose snapshot may be gone is
        # refused rather than given an older one (``resolve``)
        highest = max(tag_iteration(tags[key]) for key in doomed)
        before = await pruned_iteration(store, build_id)
        if before is None or highest > before:
            await store.put(pruned_key(build_id), str(highest).encode(), "text/plain")
    for key in doomed:
        await store.delete(key)
    if doomed:
        log.info("pruned %d old manifests", len(doomed), extra={"build_id": build_id})
    return doomed


def tag_iteration(tag: str) -> int:
    """The iteration an order tag starts with (0 for an untagged manifest)."""
    head = tag.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


async def pruned_iteration(store: ObjectStore, build_id: str) -> int | None:
    """The highest iteration of a manifest of the build that retention deleted (None: none)."""
    raw = await store.get(pruned_key(build_id))
    return int(raw.decode()) if raw and raw.decode().strip().isdigit() else None


def order_tag(doc: Manifest) -> str:
    """Sorts like ``_order``: the iteration (zero-padded), then the checkpoint's time in UTC."""
    at = doc.checkpoint_at.astimezone(UTC)
    return f"{doc.iteration:012d}-{at.strftime('%Y%m%dT%H%M%S.%f')}"


async def write_manifest(store: ObjectStore, doc: Manifest) -> None:
    """Store ``doc`` under its key, tagged with its ``order_tag`` (read back by retention)."""
    await store.put(
        manifest_key(doc.build_id, doc.snapshot_id),
        doc.dump(),
        metadata={ORDER_META: order_tag(doc)},
    )


async def load_manifest(store: ObjectStore, build_id: str, snapshot_id: str) -> Manifest | None:
    data = await store.get(manifest_key(build_id, snapshot_id))
    return None if data is None else Manifest.parse(data)


def _order(doc: Manifest) -> tuple[int, datetime]:
    return doc.iteration, doc.checkpoint_at


async def advance_latest(
    store: ObjectStore,
    build_id: str,
    doc: Manifest,
    read_before: Manifest | None = None,
) -> None:
    """Point ``latest`` at ``doc`` unless it already points at a newer snapshot.

    ``read_before``: the manifest ``latest`` pointed at earlier, not read again if still so."""
    current_id = await store.get(latest_key(build_id))
    if current_id is not None:
        if current_id.decode() == doc.snapshot_id:
            return
        if read_before is not None and read_before.snapshot_id == current_id.decode():
            current: Manifest | None = read_before
        else:
            current = await load_manifest(store, build_id, current_id.decode())
        if current is not None and _order(current) > _order(doc):
            return
    await store.put(latest_key(build_id), doc.snapshot_id.encode(), "text/plain")


async def latest_manifest(store: ObjectStore, build_id: str) -> Manifest | None:
    snapshot_id = await store.get(latest_key(build_id))
    if snapshot_id is None:
        return None
    return await load_manifest(store, build_id, snapshot_id.decode())
