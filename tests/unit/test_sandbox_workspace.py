"""The workspace operations over both providers' primitives (local for real, e2b through the
real SDK against the local E2B-compatible server): names a shell would misread stay names, long
argument lists are sent in batches, and a restore never makes a symlink through another one."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from kiln_contracts.manifest import ManifestEntry
from kiln_sandbox.adapters import script
from kiln_sandbox.adapters.local import LocalProvider
from kiln_sandbox.adapters.memory import MemoryProcesses, MemoryReads
from kiln_sandbox.processes import Processes
from kiln_sandbox.tools import ToolContext, run_tool
from kiln_sandbox.workspace import Workspace
from tests.unit.test_sandbox_e2b import blobs  # noqa: F401  (a fixture)
from tests.unit.test_sandbox_e2b import provider as e2b_provider
from tests.unit.test_sandbox_tools import Events, tool_call

CTX = ToolContext(tool_call("toolu_ws"), MemoryReads(), Processes(MemoryProcesses(), Events()))

NASTY = ["it's $(touch PWNED) `touch PWNED2`.txt", "-rf", "semi;colon & amp.txt", "new\nline"]


@pytest.fixture(params=["local", "e2b"])
def make(request: pytest.FixtureRequest, tmp_path: Path, e2b_server: Any) -> Any:
    if request.param == "local":
        return LocalProvider(tmp_path / "local")
    return e2b_provider(e2b_server)


async def test_names_a_shell_would_misread_stay_names(make: Any, blobs: Any) -> None:  # noqa: F811
    base, store = blobs
    ws = Workspace(await make.create("b1"))
    for i, name in enumerate(NASTY):
        out = await run_tool(
            ws, "write_file", {"path": f"d/{name}", "content": f"x{i}\n"}, timeout_s=5, ctx=CTX
        )
        assert not out.is_error, out.output
        assert (
            await run_tool(ws, "read_file", {"path": f"d/{name}"}, timeout_s=5, ctx=CTX)
        ).output == (f"   1\tx{i}")
    grep = await run_tool(
        ws, "grep", {"pattern": "x0", "output_mode": "content"}, timeout_s=5, ctx=CTX
    )
    assert grep.output == f"d/{NASTY[0]}:1:x0"
    grep = await run_tool(ws, "grep", {"pattern": "x3"}, timeout_s=5, ctx=CTX)
    assert grep.output == f"d/{NASTY[3]}"
    grep = await run_tool(
        ws, "grep", {"pattern": "x3", "output_mode": "content"}, timeout_s=5, ctx=CTX
    )
    assert grep.output == f"d/{NASTY[3]}:1:x3"
    entries = await ws.manifest([], dirs_and_symlinks=True)
    assert sorted(e.path for e in entries) == sorted(["d", *(f"d/{n}" for n in NASTY)])
    first = next(e for e in entries if e.path == f"d/{NASTY[0]}")
    assert first.sha256 == hashlib.sha256(b"x0\n").hexdigest()
    assert await ws.upload(first.path, first.sha256, f"{base}/blob/one") == 3
    assert store["/blob/one"] == b"x0\n"

    fresh = Workspace(await make.create("b2"))
    store["/blob/two"] = b"x0\n"
    assert await fresh.download(f"e/{NASTY[1]}", first.sha256, 0o600, f"{base}/blob/two") == 3
    link = ManifestEntry.symlink(f"e/{NASTY[2]}", NASTY[1])
    assert await fresh.restore_tree([ManifestEntry.directory("e", 0o750)], [link]) == []
    assert await fresh.read(f"e/{NASTY[2]}") == b"x0\n"
    listed = await fresh.manifest([], dirs_and_symlinks=True)
    assert [(e.path, e.type, e.mode) for e in listed] == [
        ("e", "dir", 0o750),
        (f"e/{NASTY[1]}", "file", 0o600),
        (f"e/{NASTY[2]}", "symlink", 0o777),
    ]
    for sb in (ws, fresh):  # nothing ran that a name spelled out (commands run in the workspace)
        out = await run_tool(sb, "glob", {"pattern": "**/PWNED*"}, timeout_s=5, ctx=CTX)
        assert out.output == "no files match"
    await make.close()


async def test_many_paths_go_in_batches(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(script, "MAX_ARGS_CHARS", 2_000)
    ws = Workspace(await make.create("b1"))
    dirs = [ManifestEntry.directory(f"d{i:03d}/" + "x" * 40, 0o700) for i in range(150)]
    assert await ws.restore_tree(dirs, []) == []
    entries = await ws.manifest([], dirs_and_symlinks=True)
    assert len([e for e in entries if e.mode == 0o700]) == 150
    await make.close()


async def test_a_symlink_is_never_made_through_another_one(make: Any, tmp_path: Path) -> None:
    ws = Workspace(await make.create("b1"))
    links = [
        ManifestEntry.symlink("out", str(tmp_path)),  # absolute: removed once made
        ManifestEntry.symlink("out/planted", "x"),  # would be made outside, through "out"
        ManifestEntry.symlink("ok", "src"),
    ]
    skipped = await ws.restore_tree([ManifestEntry.directory("src", 0o755)], links)
    assert sorted(skipped) == ["out", "out/planted"]
    assert not (tmp_path / "planted").exists()
    assert [e.path for e in await ws.manifest([], dirs_and_symlinks=True)] == ["ok", "src"]
    await make.close()
