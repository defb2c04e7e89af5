"""The sandbox's manifest with directories and symlinks, and ``restore_tree``, on both providers
(local for real, e2b through the real SDK against the local E2B-compatible server): the same
entries, and a tree rebuilt from them is the same tree, symlinks leading outside removed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kiln_sandbox.adapters.local import LocalProvider
from kiln_sandbox.workspace import Workspace
from tests.unit.test_sandbox_e2b import provider as e2b_provider


@pytest.fixture(params=["local", "e2b"])
def make(request: pytest.FixtureRequest, tmp_path: Path, e2b_server: Any) -> Any:
    if request.param == "local":
        return LocalProvider(tmp_path / "local")
    return e2b_provider(e2b_server)


async def test_manifest_lists_dirs_and_symlinks_and_restore_tree_rebuilds_them(make: Any) -> None:
    sb = Workspace(await make.create("b1"))
    await sb.run(
        "mkdir -p src empty/deep node_modules/x && echo hi > src/a.txt && chmod 700 empty/deep"
        " && ln -s src/a.txt link && ln -s /etc/passwd abs && ln -s ../../out src/up"
        " && echo x > node_modules/x/y",
        timeout_s=10,
        max_output=1000,
    )
    plain = await sb.manifest(["node_modules"])
    assert [e.path for e in plain] == ["src/a.txt"]  # without the flag: regular files only
    entries = await sb.manifest(["node_modules"], dirs_and_symlinks=True)
    got = {e.path: (e.type, e.mode if e.type != "symlink" else 0, e.target) for e in entries}
    assert got == {
        "abs": ("symlink", 0, "/etc/passwd"),
        "empty": ("dir", 0o755, None),
        "empty/deep": ("dir", 0o700, None),
        "link": ("symlink", 0, "src/a.txt"),
        "src": ("dir", 0o755, None),
        "src/a.txt": ("file", 0o644, None),
        "src/up": ("symlink", 0, "../../out"),
    }

    fresh = Workspace(await make.create("b2"))
    dirs = [e for e in entries if e.type == "dir"]
    links = [e for e in entries if e.type == "symlink"]
    skipped = await fresh.restore_tree(dirs, links)
    assert sorted(skipped) == ["abs", "src/up"]
    again = await fresh.manifest([], dirs_and_symlinks=True)
    assert {e.path: (e.type, e.mode, e.target) for e in again} == {
        "empty": ("dir", 0o755, None),
        "empty/deep": ("dir", 0o700, None),
        "link": ("symlink", 0o777, "src/a.txt"),
        "src": ("dir", 0o755, None),
    }
    await fresh.write("src/a.txt", b"hi\n")  # what the downloads do
    assert await fresh.read("link") == b"hi\n"
    await make.close()
