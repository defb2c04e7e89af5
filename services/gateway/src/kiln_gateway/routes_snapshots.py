"""A build's snapshots, read: the list, one snapshot's tree, one file, the diff of two
iterations. Read from the snapshot service's bucket (the gateway never writes it)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Annotated, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Path, Query, Response

from kiln_contracts.manifest import Manifest

from . import snapshots
from .bootstrap import Wiring
from .deps import Owned, Rt
from .model import Build
from .problems import ProblemError, responses
from .schemas_snapshots import DiffOut, FileDiffOut, SnapshotList, SnapshotOut, SnapshotTree

log = logging.getLogger(__name__)

router = APIRouter(tags=["snapshots"])

T = TypeVar("T")

SnapshotRef = Annotated[
    str,
    Path(
        pattern=r"^[A-Za-z0-9_-]{1,100}$",
        description="A snapshot id (from the list), or `latest`.",
        examples=["latest"],
    ),
]


async def _s3(build: Build, call: Awaitable[T]) -> T:
    """``call``, with S3 unreachable (or a manifest unreadable) answered as 503."""
    try:
        return await call
    except (snapshots.FileTooLarge, snapshots.NotAFile, snapshots.InvalidPath):
        raise
    except Exception as err:
        log.warning("snapshot store unavailable: %s", err, extra={"build_id": build.build_id})
        raise HTTPException(503, "the snapshot store is unavailable; retry") from err


async def _snapshot(rt: Wiring, build: Build, ref: str) -> tuple[Manifest, str | None]:
    """The snapshot ``ref`` names (an id, or ``latest``) and the id of the build's newest."""
    latest_id = await _s3(build, rt.files.latest_id(build.build_id))
    snapshot_id = latest_id if ref == "latest" else ref
    manifest = (
        await _s3(build, rt.files.manifest(build.build_id, snapshot_id)) if snapshot_id else None
    )
    if manifest is None or manifest.build_id != build.build_id:
        asked = None if ref == "latest" else ref
        raise HTTPException(*snapshots.missing(build.build_id, build.state.last_snapshot_id, asked))
    return manifest, latest_id


@router.get(
    "/v1/builds/{build_id}/snapshots",
    response_model=SnapshotList,
    responses=responses(401, 404, 503),
)
async def list_snapshots(build: Owned, rt: Rt) -> SnapshotList:
    """The build's snapshots, oldest first: the iteration each was taken at, why, how many
    files and bytes. The files of an iteration are those of the newest snapshot at or before
    it."""
    stored = await _s3(build, rt.files.snapshots(build.build_id))
    latest_id = await _s3(build, rt.files.latest_id(build.build_id))
    mine = [s for s in stored if s.manifest.build_id == build.build_id]
    return SnapshotList.of(build.build_id, snapshots.ordered(mine), latest_id)


@router.get(
    "/v1/builds/{build_id}/snapshots/{snapshot_id}/tree",
    response_model=SnapshotTree,
    responses=responses(401, 404, 410, 422, 503),
)
async def snapshot_tree(build: Owned, rt: Rt, snapshot_id: SnapshotRef) -> SnapshotTree:
    """Every file (size, mode, sha256), directory and symlink (target) of one snapshot."""
    manifest, latest_id = await _snapshot(rt, build, snapshot_id)
    return SnapshotTree.of(manifest, latest_id)


@router.get(
    "/v1/builds/{build_id}/snapshots/{snapshot_id}/files/{path:path}",
    response_class=Response,
    responses={
        200: {
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The file's bytes",
        },
        **responses(400, 401, 404, 410, 413, 422, 503),
    },
)
async def snapshot_file(
    build: Owned,
    rt: Rt,
    snapshot_id: SnapshotRef,
    path: Annotated[str, Path(max_length=4096, description="The file's path in the workspace.")],
) -> Response:
    """One regular file of a snapshot, as it is (up to ``KILN_SNAPSHOT_FILE_MAX_BYTES``, 1 MiB
    by default; larger: 413, problem type ``file-too-large``: download the archive).

    Text is served as ``text/plain`` (JSON, CSS, CSV and Markdown as such), images, audio,
    video, fonts, PDF and archives as their type, everything else, HTML and SVG included, as
    text or ``application/octet-stream``: never as something a browser runs, and with a
    ``sandbox`` content security policy."""
    manifest, _ = await _snapshot(rt, build, snapshot_id)
    try:
        entry = snapshots.file_of(manifest, path)
        data = await _s3(
            build, snapshots.read_file(rt.files, entry, rt.settings.snapshot_file_max_bytes)
        )
    except snapshots.InvalidPath as err:
        raise HTTPException(400, str(err)) from err
    except snapshots.NotAFile as err:
        raise HTTPException(404, str(err)) from err
    except snapshots.FileTooLarge as err:
        raise ProblemError(
            413, "file-too-large", str(err), size=err.size, max_bytes=err.limit
        ) from err
    name = quote(path.rsplit("/", 1)[-1])
    return Response(
        data,
        media_type=snapshots.content_type(path, data),
        headers={
            "Content-Disposition": f"inline; filename*=UTF-8''{name}",
            "Content-Security-Policy": "sandbox; default-src 'none'",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, max-age=3600",
            "X-Kiln-Snapshot-Id": manifest.snapshot_id,
            "X-Kiln-File-Mode": oct(entry.mode),
        },
    )


@router.get(
    "/v1/builds/{build_id}/diff",
    response_model=DiffOut,
    responses=responses(401, 404, 422, 503),
)
async def diff_iterations(
    build: Owned,
    rt: Rt,
    from_: Annotated[int, Query(alias="from", ge=0, le=1_000_000, description="An iteration.")],
    to: Annotated[int, Query(ge=0, le=1_000_000, description="An iteration.")],
) -> DiffOut:
    """What changed in the build's files from iteration ``from`` to iteration ``to`` (each: the
    newest snapshot at or before it): every added, removed and modified file and symlink, with
    a unified diff for text files; binary files are said to be binary; files over
    ``KILN_SNAPSHOT_FILE_MAX_BYTES``, and any past ``KILN_SNAPSHOT_DIFF_MAX_BYTES`` read in all,
    are listed without a diff (``truncated``). No snapshot at or before an iteration: 404."""
    stored = await _s3(build, rt.files.snapshots(build.build_id))
    mine = [s for s in stored if s.manifest.build_id == build.build_id]
    if not mine:
        raise HTTPException(404, "this build has no snapshot yet")
    try:
        old, new = snapshots.at_iteration(mine, from_), snapshots.at_iteration(mine, to)
    except snapshots.SnapshotMissing as err:
        raise HTTPException(404, str(err)) from err
    latest_id = await _s3(build, rt.files.latest_id(build.build_id))
    files, truncated = await _s3(
        build,
        snapshots.diff(
            rt.files,
            old.manifest,
            new.manifest,
            max_file_bytes=rt.settings.snapshot_file_max_bytes,
            max_total_bytes=rt.settings.snapshot_diff_max_bytes,
        ),
    )
    return DiffOut(
        build_id=build.build_id,
        from_snapshot=SnapshotOut.of(old.manifest, latest_id),
        to_snapshot=SnapshotOut.of(new.manifest, latest_id),
        added=sum(f.change == "added" for f in files),
        removed=sum(f.change == "removed" for f in files),
        modified=sum(f.change == "modified" for f in files),
        truncated=truncated,
        files=[FileDiffOut.model_validate(f, from_attributes=True) for f in files],
    )
