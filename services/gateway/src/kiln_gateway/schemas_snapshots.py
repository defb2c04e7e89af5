"""The bodies of the snapshot read endpoints (``routes_snapshots``)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from kiln_contracts.manifest import Manifest

from .ports import StoredSnapshot
from .snapshots import Change


class SnapshotOut(BaseModel):
    snapshot_id: str
    iteration: int = Field(description="The iteration the snapshot was taken at.")
    reason: str = Field(description="periodic, files_changed, sleep or final", examples=["final"])
    checkpoint_at: datetime = Field(description="When the checkpoint it was taken for was made.")
    created_at: datetime = Field(description="When the snapshot was written.")
    files: int = Field(description="How many regular files.")
    bytes_total: int = Field(description="The regular files' bytes.")
    latest: bool = Field(description="Whether it is the build's newest snapshot.")

    @classmethod
    def of(cls, m: Manifest, latest_id: str | None) -> SnapshotOut:
        return cls(
            snapshot_id=m.snapshot_id,
            iteration=m.iteration,
            reason=m.reason,
            checkpoint_at=m.checkpoint_at,
            created_at=m.created_at,
            files=m.files,
            bytes_total=m.bytes_total,
            latest=m.snapshot_id == latest_id,
        )


class SnapshotList(BaseModel):
    build_id: str
    snapshots: list[SnapshotOut] = Field(
        description="Oldest first. Only the snapshots the bucket keeps (retention drops old ones)."
    )

    @classmethod
    def of(cls, build_id: str, stored: list[StoredSnapshot], latest_id: str | None) -> SnapshotList:
        return cls(
            build_id=build_id, snapshots=[SnapshotOut.of(s.manifest, latest_id) for s in stored]
        )


class TreeEntry(BaseModel):
    path: str = Field(description="Relative to the workspace root, '/'-separated.")
    type: Literal["file", "dir", "symlink"]
    size: int | None = Field(default=None, description="A file's bytes.")
    mode: int | None = Field(default=None, description="Permission bits (files, directories).")
    sha256: str | None = Field(default=None, description="A file's content hash.")
    target: str | None = Field(default=None, description="A symlink's target, never followed.")


class SnapshotTree(BaseModel):
    snapshot: SnapshotOut
    entries: list[TreeEntry] = Field(description="Every file, directory and symlink, by path.")

    @classmethod
    def of(cls, m: Manifest, latest_id: str | None) -> SnapshotTree:
        entries = [
            *(
                TreeEntry(path=f.path, type="file", size=f.size, mode=f.mode, sha256=f.sha256)
                for f in m.entries
            ),
            *(TreeEntry(path=d.path, type="dir", mode=d.mode) for d in m.dirs),
            *(TreeEntry(path=s.path, type="symlink", target=s.target) for s in m.symlinks),
        ]
        return cls(
            snapshot=SnapshotOut.of(m, latest_id), entries=sorted(entries, key=lambda e: e.path)
        )


class FileDiffOut(BaseModel):
    path: str
    change: Change
    type: Literal["file", "symlink"]
    old_size: int | None = None
    new_size: int | None = None
    old_mode: int | None = None
    new_mode: int | None = None
    binary: bool = Field(default=False, description="A binary file: listed, no diff.")
    diff: str | None = Field(
        default=None,
        description="A text file's unified diff (an added or removed one against /dev/null).",
    )
    note: str | None = Field(
        default=None,
        description="Why there is no diff (binary, too large, mode only), or a symlink's targets.",
    )


class DiffOut(BaseModel):
    build_id: str
    from_snapshot: SnapshotOut = Field(description="The files of iteration `from`.")
    to_snapshot: SnapshotOut = Field(description="The files of iteration `to`.")
    added: int
    removed: int
    modified: int
    truncated: bool = Field(description="Some changed files are listed without a diff (too large).")
    files: list[FileDiffOut] = Field(description="Every changed file and symlink, by path.")
