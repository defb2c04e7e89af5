"""The files archive from a manifest: directories (empty ones too) with their modes, symlinks
that stay inside, regular files with their modes and bytes; a wrong blob cuts the stream."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import AsyncIterator

import pytest

from kiln_contracts.manifest import Manifest
from kiln_gateway import archive
from tests.unit.test_manifest import STORED, entries_only

BLOBS = {
    hashlib.sha256(data).hexdigest(): data for data in (b"#!/bin/sh\necho hi\n", b"print('hi')\n")
}


async def blob(sha256: str) -> AsyncIterator[bytes]:
    data = BLOBS[sha256]
    for start in range(0, len(data), 5):
        yield data[start : start + 5]


async def tar_of(manifest: Manifest, root: str = "kiln-b") -> tarfile.TarFile:
    raw = b"".join(
        [c async for c in archive.tar_gz(manifest, blob, root=root, mtime=1_700_000_000)]
    )
    return tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz")


async def test_the_archive_holds_directories_symlinks_and_files() -> None:
    with await tar_of(Manifest.parse(STORED)) as tar:
        got = {m.name: (m.type, m.mode, m.linkname, m.mtime, m.size) for m in tar.getmembers()}
        assert list(got) == sorted(got)  # a directory comes before what it holds
        assert got == {
            "kiln-b/app.py": (tarfile.SYMTYPE, 0o777, "src/app.py", 1_700_000_000, 0),
            "kiln-b/empty": (tarfile.DIRTYPE, 0o700, "", 1_700_000_000, 0),
            "kiln-b/run.sh": (tarfile.REGTYPE, 0o755, "", 1_700_000_000, 18),
            "kiln-b/src": (tarfile.DIRTYPE, 0o755, "", 1_700_000_000, 0),
            "kiln-b/src/app.py": (tarfile.REGTYPE, 0o644, "", 1_700_000_000, 12),
        }  # "passwd" -> /etc/passwd leads outside: left out, as a restore leaves it out
        run = tar.extractfile("kiln-b/run.sh")
        assert run is not None and run.read() == b"#!/bin/sh\necho hi\n"


async def test_the_oldest_manifests_give_their_files() -> None:
    with await tar_of(Manifest.parse(entries_only(STORED)), root="") as tar:
        assert tar.getnames() == ["run.sh", "src/app.py"]


async def test_a_blob_of_the_wrong_size_cuts_the_stream() -> None:
    manifest = Manifest.parse(STORED)
    wrong = manifest.model_copy(
        update={"entries": [manifest.entries[0].model_copy(update={"size": 17})]}
    )
    with pytest.raises(archive.ArchiveError, match=r"run\.sh"):
        async for _ in archive.tar_gz(wrong, blob):
            pass
