"""Every tool on both providers: the local one for real, the E2B adapter through the real
``e2b`` SDK against the local E2B-compatible server, so the adapter's whole code path runs."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from kiln_contracts import Envelope, ToolCall
from kiln_sandbox.adapters.e2b import E2BProvider
from kiln_sandbox.adapters.local import LocalProvider, LocalSandbox
from kiln_sandbox.adapters.memory import MemoryProcesses, MemoryReads
from kiln_sandbox.processes import Processes
from kiln_sandbox.tools import MAX_OUTPUT_CHARS, ToolContext, glob_to_regex, run_tool
from kiln_sandbox.workspace import Workspace

HOST_ROOT: dict[int, Path] = {}  # id(sandbox) -> its workspace on this host
# id(sandbox) -> the host's pid of a pid its commands see (E2B: its own PID namespace)
HOST_PID: dict[int, Callable[[int], int | None]] = {}
STATE: dict[int, tuple[MemoryReads, Processes]] = {}  # id(sandbox) -> its build's stores
CALL_IDS = itertools.count(1)


class Events:
    def __init__(self) -> None:
        self.published: list[Envelope] = []

    async def publish(self, msg: Envelope) -> None:
        self.published.append(msg)


@pytest.fixture(params=["local", "e2b"])
async def sb(request, tmp_path: Path, e2b_server: Any) -> AsyncIterator[Workspace]:
    if request.param == "local":
        local = LocalProvider(tmp_path / "root")
        sandbox = Workspace(await local.create("b1"))
        HOST_ROOT[id(sandbox)] = Path(sandbox.root)
        HOST_PID[id(sandbox)] = lambda pid: pid
        STATE[id(sandbox)] = (MemoryReads(), Processes(MemoryProcesses(), Events()))
        yield sandbox
        await _stop_processes(sandbox)
        await local.close()
    else:
        server = e2b_server
        provider = E2BProvider(api_key="e2b_test", api_url=server.url, sandbox_url=server.url)
        sandbox = Workspace(await provider.create("b1", user_id="u1"))
        HOST_ROOT[id(sandbox)] = server.home(sandbox.sandbox_id) / "workspace"
        HOST_PID[id(sandbox)] = lambda pid: server.host_pid(sandbox.sandbox_id, pid)
        STATE[id(sandbox)] = (MemoryReads(), Processes(MemoryProcesses(), Events()))
        yield sandbox
        await _stop_processes(sandbox)
        await provider.stop("b1", sandbox.sandbox_id)
    HOST_ROOT.pop(id(sandbox), None)
    HOST_PID.pop(id(sandbox), None)
    STATE.pop(id(sandbox), None)


async def _stop_processes(sb: Workspace) -> None:
    await processes(sb).stop_all(sb, tool_call("teardown"), "the test ended")


def ws(sb: Workspace) -> Path:
    return HOST_ROOT[id(sb)]


def host_pid(sb: Workspace, pid: int) -> int | None:
    """The host's pid of ``pid`` as the sandbox's commands see it (None: no such process)."""
    return HOST_PID[id(sb)](pid)


def inside(sb: Workspace) -> str:
    """The workspace's path as the sandbox's commands see it."""
    return _real(str(ws(sb))) if isinstance(sb.machine, LocalSandbox) else sb.root


def processes(sb: Workspace) -> Processes:
    return STATE[id(sb)][1]


def events(sb: Workspace) -> list[Envelope]:
    bus = processes(sb).bus
    assert isinstance(bus, Events)
    return bus.published


def tool_call(call_id: str | None = None) -> ToolCall:
    return ToolCall(
        build_id="b1",
        user_id="u1",
        call_id=call_id or f"toolu_{next(CALL_IDS)}",
        iteration=1,
        tool="bash",
        input={},
    )


async def run(sb: Workspace, tool: str, args: Any, *, timeout_s: float, call_id: str | None = None):
    reads, procs = STATE[id(sb)]
    ctx = ToolContext(tool_call(call_id), reads, procs)
    return await run_tool(sb, tool, args, timeout_s=timeout_s, ctx=ctx)


async def call(sb: Workspace, tool: str, timeout_s: float = 30.0, **args):
    return await run(sb, tool, args, timeout_s=timeout_s)


# ---------------------------------------------------------------------------- files


async def test_write_then_read_with_line_numbers(sb):
    out = await call(sb, "write_file", path="src/app/main.py", content="a\nb\nc\n")
    assert not out.is_error, out.output
    assert out.files_changed == ["src/app/main.py"]
    assert (ws(sb) / "src/app/main.py").read_text() == "a\nb\nc\n"

    out = await call(sb, "read_file", path="src/app/main.py")
    assert out.output == "   1\ta\n   2\tb\n   3\tc"
    out = await call(sb, "read_file", path="src/app/main.py", offset=2, limit=1)
    assert out.output.startswith("   2\tb\n")
    assert "lines 2-2 of 3" in out.output


async def test_read_errors(sb):
    (ws(sb) / "bin.dat").write_bytes(b"\x00\x01\x02binary")
    (ws(sb) / "big.txt").write_bytes(b"x" * (5 * 1024 * 1024 + 1))
    (ws(sb) / "d").mkdir()
    assert "binary" in (await call(sb, "read_file", path="bin.dat")).output
    big = await call(sb, "read_file", path="big.txt")
    assert big.is_error and "5 MB" in big.output
    missing = await call(sb, "read_file", path="nope.txt")
    assert missing.is_error and "not found" in missing.output
    assert (await call(sb, "read_file", path="d")).is_error


async def test_edit_file_exact_unique_and_replace_all(sb):
    (ws(sb) / "f.txt").write_text("one two two three\n")
    await call(sb, "read_file", path="f.txt")
    out = await call(sb, "edit_file", path="f.txt", old_string="one", new_string="1")
    assert not out.is_error and out.files_changed == ["f.txt"]
    assert (ws(sb) / "f.txt").read_text() == "1 two two three\n"

    amb = await call(sb, "edit_file", path="f.txt", old_string="two", new_string="2")
    assert amb.is_error and "2 times" in amb.output
    assert (ws(sb) / "f.txt").read_text() == "1 two two three\n"

    out = await call(
        sb, "edit_file", path="f.txt", old_string="two", new_string="2", replace_all=True
    )
    assert not out.is_error and "2 replacements" in out.output
    assert (ws(sb) / "f.txt").read_text() == "1 2 2 three\n"

    nf = await call(sb, "edit_file", path="f.txt", old_string="zzz", new_string="y")
    assert nf.is_error and "not found" in nf.output
    missing = await call(sb, "edit_file", path="none.txt", old_string="a", new_string="b")
    assert missing.is_error and "not found" in missing.output


# ---------------------------------------------------------------------------- confinement


@pytest.mark.parametrize(
    "path", ["../x.txt", "a/../../x.txt", "/etc/passwd", "/tmp/elsewhere.txt", "a/\x00b"]
)
async def test_paths_outside_are_refused(sb, path):
    for tool, args in (
        ("read_file", {"path": path}),
        ("write_file", {"path": path, "content": "x"}),
        ("edit_file", {"path": path, "old_string": "a", "new_string": "b"}),
        ("list_dir", {"path": path}),
        ("grep", {"pattern": "x", "path": path}),
    ):
        out = await run(sb, tool, args, timeout_s=5)
        assert out.is_error, (tool, path, out.output)
        assert "outside" in out.output or "leaves" in out.output or "NUL" in out.output
    assert not (ws(sb).parent / "x.txt").exists()


async def test_symlinks_leading_outside_are_refused(sb, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    os.symlink(outside, ws(sb) / "link")
    os.symlink(outside / "secret.txt", ws(sb) / "s.txt")
    assert (await call(sb, "read_file", path="link/secret.txt")).is_error
    assert (await call(sb, "read_file", path="s.txt")).is_error
    out = await call(sb, "write_file", path="link/new.txt", content="x")
    assert out.is_error and "outside" in out.output
    assert not (outside / "new.txt").exists()
    out = await call(sb, "edit_file", path="s.txt", old_string="secret", new_string="x")
    assert out.is_error
    assert (outside / "secret.txt").read_text() == "secret"


async def test_absolute_path_inside_the_workspace_is_allowed(sb):
    out = await call(sb, "write_file", path=f"{sb.root}/a/b.txt", content="hi")
    assert not out.is_error and out.files_changed == ["a/b.txt"]
    assert "hi" in (await call(sb, "read_file", path="a/b.txt")).output


# ---------------------------------------------------------------------------- bash


async def test_bash_output_exit_code_and_files_changed(sb):
    (ws(sb) / "keep.txt").write_text("same")
    out = await call(sb, "bash", command="echo out; echo err >&2; mkdir -p d; echo x > d/new.txt")
    assert not out.is_error and out.exit_code == 0
    assert "out" in out.output and "err" in out.output
    assert out.files_changed == ["d/new.txt"]
    assert (await call(sb, "bash", command="pwd")).output.strip() == inside(sb)

    failed = await call(sb, "bash", command="echo nope; exit 3")
    assert failed.exit_code == 3 and "exit code 3" in failed.output


async def test_bash_does_not_see_service_secrets(sb, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-secret")
    out = await call(sb, "bash", command="echo key=${ANTHROPIC_API_KEY:-none}")
    assert "key=none" in out.output


async def test_bash_truncates_10_mb_of_output(sb):
    out = await call(
        sb, "bash", command="head -c 10485760 /dev/zero | tr '\\0' 'a'; echo; echo END"
    )
    assert not out.is_error
    assert len(out.output) < MAX_OUTPUT_CHARS + 500
    assert "bytes of output truncated" in out.output
    assert "10,485,7" in out.output  # the total is reported
    assert out.output.rstrip().endswith("END")
    assert out.output.startswith("aaaa")


async def test_bash_timeout_kills_the_whole_process_group(sb):
    pidfile = ws(sb) / "child.pid"
    started = time.monotonic()
    out = await call(
        sb,
        "bash",
        timeout_s=1.0,
        command=f"sleep 300 & echo $! > {pidfile}; echo started; wait",
    )
    assert time.monotonic() - started < 10
    assert out.is_error and out.exit_code is None
    assert "timed out after 1s" in out.output and "started" in out.output
    child = host_pid(sb, int(pidfile.read_text()))
    for _ in range(100):  # up to 5 s
        if not _alive(child):
            break
        await asyncio.sleep(0.05)
    assert not _alive(child), "the child of the timed-out command survived"


async def test_bash_returns_while_a_background_process_holds_the_pipe(sb):
    pidfile = ws(sb) / "bg.pid"
    started = time.monotonic()
    out = await call(sb, "bash", command=f"sleep 60 & echo $! > {pidfile}; echo done")
    assert time.monotonic() - started < 5
    assert not out.is_error and "done" in out.output
    bg = host_pid(sb, int(pidfile.read_text()))
    assert bg is not None
    os.kill(bg, 9)


async def test_bash_timeout_argument_is_capped_by_the_call(sb):
    started = time.monotonic()
    out = await run(sb, "bash", {"command": "sleep 30", "timeout_s": 100}, timeout_s=0.5)
    assert out.is_error and "timed out after 0.5s" in out.output
    assert time.monotonic() - started < 10


def _real(path: str) -> str:
    return os.path.realpath(path)


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped by its dead parent's reaper) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------- search


async def test_glob_grep_and_list_dir(sb):
    root = ws(sb)
    (root / "src/pkg").mkdir(parents=True)
    (root / "src/pkg/a.py").write_text("import os\nVALUE = 1\n")
    (root / "src/b.py").write_text("value = 2\n")
    (root / "README.md").write_text("# Value\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__/x.py").write_text("VALUE\n")

    out = await call(sb, "glob", pattern="**/*.py")
    assert sorted(out.output.splitlines()) == ["src/b.py", "src/pkg/a.py"]
    assert (await call(sb, "glob", pattern="*.md")).output == "README.md"
    assert (await call(sb, "glob", pattern="*.rs")).output == "no files match"

    out = await call(sb, "grep", pattern=r"VALUE\s*=", output_mode="content")
    assert out.output == "src/pkg/a.py:2:VALUE = 1"
    out = await call(sb, "grep", pattern="(?i)value", glob="*.py", output_mode="content")
    assert out.output.splitlines() == ["src/b.py:1:value = 2", "src/pkg/a.py:2:VALUE = 1"]
    out = await call(sb, "grep", pattern="value", path="src/b.py", output_mode="content")
    assert out.output == "src/b.py:1:value = 2"
    assert (await call(sb, "grep", pattern="nothing-here")).output == "no matches"

    out = await call(sb, "list_dir")
    assert out.output.splitlines()[0] == "README.md  (8 bytes)"
    assert "src/" in out.output.splitlines()
    assert (await call(sb, "list_dir", path="src")).output.splitlines() == [
        "b.py  (10 bytes)",
        "pkg/",
    ]


def test_glob_translation():
    assert glob_to_regex("**/*.py").match("a/b/c.py")
    assert glob_to_regex("**/*.py").match("c.py")
    assert not glob_to_regex("*.py").match("a/c.py")
    assert glob_to_regex("src/{a,b}.ts").match("src/b.ts")
    assert glob_to_regex("file?.[ch]").match("file1.h")


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("tool", "args", "needle"),
    [
        ("read_file", {}, "missing required argument 'path'"),
        ("read_file", {"path": 3}, "must be a string"),
        ("read_file", {"path": "a", "offset": "x"}, "'offset' must be an integer"),
        ("write_file", {"path": "a.txt"}, "missing required argument 'content'"),
        ("write_file", {"path": "", "content": "x"}, "must name a file"),
        ("edit_file", {"path": "a", "old_string": "", "new_string": "b"}, "must not be empty"),
        ("edit_file", {"path": "a", "old_string": "x", "new_string": "x"}, "the same"),
        (
            "edit_file",
            {"path": "a", "old_string": "x", "new_string": "y", "replace_all": "yes"},
            "boolean",
        ),
        ("bash", {}, "missing required argument 'command'"),
        ("bash", {"command": "true", "timeout_s": "soon"}, "must be an integer or a number"),
        ("bash", {"command": "true", "timeout_s": -1}, "must be > 0"),
        ("glob", {}, "missing required argument 'pattern'"),
        ("grep", {"pattern": "("}, "grep failed"),
        ("grep", {"pattern": "x", "output_mode": "lines"}, "output_mode must be one of"),
        ("grep", {"pattern": "x", "type": "cobol"}, "unknown type 'cobol'"),
        ("grep", {"pattern": "x", "-A": -1}, "-A must be >= 0"),
        ("bash", {"command": "true", "timeout": 0}, "timeout must be > 0"),
        ("bash_output", {}, "missing required argument 'bash_id'"),
        ("bash_output", {"bash_id": "bash_9"}, "no background process 'bash_9'"),
        ("bash_output", {"bash_id": "bash_1", "filter": "("}, "invalid filter"),
        ("kill_shell", {"shell_id": "bash_1"}, "no background process 'bash_1'"),
        ("list_dir", {"path": ["x"]}, "must be a string"),
        ("nope", {}, "unknown tool"),
    ],
)
async def test_bad_input_is_an_error_result(sb, tool, args, needle):
    out = await run(sb, tool, args, timeout_s=5)
    assert out.is_error
    assert needle in out.output


# ---------------------------------------------------------------------------- Claude Code parity


class Counting:
    """A machine that counts its primitives' calls (and refuses file reads)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.runs = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def run(self, command: str, **kwargs: Any) -> Any:
        self.runs += 1
        return await self.inner.run(command, **kwargs)

    async def read(self, path: str) -> bytes:
        raise AssertionError(f"grep read {path} by itself")


async def test_grep_modes_context_case_type_glob_and_limits(sb):
    root = ws(sb)
    (root / "src/web").mkdir(parents=True)
    (root / "src/web/app.js").write_text("const port = 3000;\n// TODO: Port\nlisten(port)\n")
    (root / "src/main.py").write_text("a = 1\nPORT = 8000\nb = 2\nc = 3\n")
    (root / "notes.md").write_text("port notes\nport again\n")
    (root / "node_modules/x").mkdir(parents=True)
    (root / "node_modules/x/port.js").write_text("port\n")

    out = await call(sb, "grep", pattern="port")  # files_with_matches, case-sensitive
    assert out.output.splitlines() == ["notes.md", "src/web/app.js"]
    out = await call(sb, "grep", pattern="port", **{"-i": True})
    assert out.output.splitlines() == ["notes.md", "src/main.py", "src/web/app.js"]
    out = await call(sb, "grep", pattern="port", output_mode="count", **{"-i": True})
    assert out.output.splitlines() == [
        "notes.md:2",
        "src/main.py:1",
        "src/web/app.js:3",
        "[6 matching lines in all]",
    ]
    out = await call(sb, "grep", pattern="PORT", output_mode="content", type="py", **{"-C": 1})
    assert out.output.splitlines() == [
        "src/main.py-1-a = 1",
        "src/main.py:2:PORT = 8000",
        "src/main.py-3-b = 2",
    ]
    out = await call(
        sb, "grep", pattern="port", output_mode="content", glob="src/**/*.{js,ts}", **{"-n": False}
    )
    assert out.output.splitlines() == [
        "src/web/app.js:const port = 3000;",
        "src/web/app.js:listen(port)",
    ]
    out = await call(sb, "grep", pattern="b = 2", output_mode="content", path="src", **{"-B": 1})
    assert out.output.splitlines() == ["src/main.py-2-PORT = 8000", "src/main.py:3:b = 2"]
    out = await call(
        sb, "grep", pattern="port", output_mode="content", head_limit=2, **{"-i": True}
    )
    lines = out.output.splitlines()
    assert lines[:2] == ["notes.md:1:port notes", "notes.md:2:port again"]
    assert lines[2] == "[showing the first 2 of 6 lines (head_limit)]"
    # a path inside a skipped directory is searched when asked for
    out = await call(sb, "grep", pattern="port", path="node_modules/x")
    assert out.output == "node_modules/x/port.js"
    out = await call(sb, "grep", pattern=r"\d{4}", output_mode="content")  # PCRE classes
    assert out.output.splitlines() == [
        "src/main.py:2:PORT = 8000",
        "src/web/app.js:1:const port = 3000;",
    ]


async def test_grep_is_one_command_in_the_sandbox(sb):
    for i in range(30):
        (ws(sb) / f"f{i}.txt").write_text(f"line {i}\nneedle {i}\n")
    counting = Counting(sb.machine)
    wrapped = Workspace(counting)  # type: ignore[arg-type]
    HOST_ROOT[id(wrapped)], STATE[id(wrapped)] = ws(sb), STATE[id(sb)]
    try:
        out = await call(wrapped, "grep", pattern="needle", output_mode="count")
    finally:
        HOST_ROOT.pop(id(wrapped)), STATE.pop(id(wrapped))
    assert not out.is_error, out.output
    assert len(out.output.splitlines()) == 31
    assert counting.runs == 1


async def test_glob_takes_a_path(sb):
    (ws(sb) / "a/b").mkdir(parents=True)
    (ws(sb) / "a/b/x.py").write_text("")
    (ws(sb) / "top.py").write_text("")
    assert (await call(sb, "glob", pattern="**/*.py", path="a")).output == "a/b/x.py"
    assert (await call(sb, "glob", pattern="*.py", path="a/b")).output == "a/b/x.py"
    assert (await call(sb, "glob", pattern="*.py", path="../")).is_error


async def test_read_file_says_what_it_left_out(sb):
    (ws(sb) / "long.txt").write_text("".join(f"l{i}\n" for i in range(1, 2502)) + "x" * 2500 + "\n")
    out = await call(sb, "read_file", path="long.txt")
    assert out.output.splitlines()[-1] == (
        "[showing lines 1-2000 of 2502 (the default limit of 2,000 lines); pass offset=2001 "
        "to read on]"
    )
    out = await call(sb, "read_file", path="long.txt", offset=2500, limit=5)
    assert out.output.splitlines()[0] == "2500\tl2500"
    assert out.output.splitlines()[-1] == "[1 line longer than 2,000 characters cut]"
    out = await call(sb, "read_file", path="long.txt", offset=10, limit=2)
    assert "(limit=2); pass offset=12" in out.output


async def test_edit_file_needs_a_read_of_the_current_content(sb):
    (ws(sb) / "app.py").write_text("x = 1\n")
    out = await call(sb, "edit_file", path="app.py", old_string="1", new_string="2")
    assert out.is_error and "has not been read yet" in out.output
    assert (ws(sb) / "app.py").read_text() == "x = 1\n"

    await call(sb, "read_file", path="app.py", limit=1)  # a partial read counts
    out = await call(sb, "edit_file", path="app.py", old_string="1", new_string="2")
    assert not out.is_error, out.output
    # its own edit is known: a second edit needs no new read
    out = await call(sb, "edit_file", path="app.py", old_string="2", new_string="3")
    assert not out.is_error, out.output

    await call(sb, "bash", command="echo 'y = 0' >> app.py")  # changed behind its back
    out = await call(sb, "edit_file", path="app.py", old_string="3", new_string="4")
    assert out.is_error and "changed since you last read it" in out.output
    await call(sb, "read_file", path="app.py")
    out = await call(sb, "edit_file", path="app.py", old_string="3", new_string="4")
    assert not out.is_error and (ws(sb) / "app.py").read_text() == "x = 4\ny = 0\n"

    # a file it wrote itself can be edited at once, by any path that leads to it
    await call(sb, "write_file", path="new.txt", content="hello\n")
    out = await call(
        sb, "edit_file", path=f"{sb.root}/new.txt", old_string="hello", new_string="bye"
    )
    assert not out.is_error, out.output


# ---------------------------------------------------------------------------- background processes


async def _until(check, what: str, deadline_s: float = 20.0):
    end = time.monotonic() + deadline_s
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < end, what
        await asyncio.sleep(0.1)


async def test_background_process_output_filter_and_exit(sb):
    out = await call(
        sb,
        "bash",
        run_in_background=True,
        command="for i in 1 2 3; do echo line $i; echo err $i >&2; done; "
        "while [ ! -e go ]; do sleep 0.05; done; echo after; exit 7",
    )
    assert not out.is_error, out.output
    assert out.output.startswith("Command running in background with ID: bash_1")
    (started,) = [e for e in events(sb) if e.kind == "process_started"]
    assert started.process_id == "bash_1" and started.pid and started.sandbox_id == sb.sandbox_id

    async def first_lines():
        got = await call(sb, "bash_output", bash_id="bash_1", filter="^line")
        return got if "line 3" in got.output else None

    got = await _until(first_lines, "the first lines never came")
    assert got.output.splitlines()[0].startswith("bash_1 (for i in 1 2 3;")
    assert "running" in got.output.splitlines()[0]
    body = got.output.splitlines()[1:]
    assert body[:3] == ["line 1", "line 2", "line 3"] and "err 1" not in body  # filtered out
    again = await call(sb, "bash_output", bash_id="bash_1")
    assert again.output.splitlines()[1:] == ["(no new output)"]  # only what is new

    (ws(sb) / "go").write_text("")

    async def ended():
        got = await call(sb, "bash_output", bash_id="bash_1")
        return got if "exited" in got.output.splitlines()[0] else None

    got = await _until(ended, "the process never exited")
    assert "exited with code 7" in got.output.splitlines()[0]
    exited = [e for e in events(sb) if e.kind == "process_exited"]
    assert [(e.process_id, e.how, e.exit_code) for e in exited] == [("bash_1", "exited", 7)]
    out = await call(sb, "kill_shell", shell_id="bash_1")
    assert "is not running" in out.output


async def test_bash_output_reads_a_chatty_process_in_parts(sb):
    await call(sb, "bash", run_in_background=True, command="seq 1 20000; sleep 60")

    async def first():
        got = await call(sb, "bash_output", bash_id="bash_1")
        return got if "1\n2\n" in got.output else None

    got = await _until(first, "no output")
    shown = got.output
    if "more bytes of output not read yet" in shown:
        rest = await call(sb, "bash_output", bash_id="bash_1")
        shown += rest.output
    numbers = [line for line in shown.splitlines() if line.isdigit()]
    assert numbers == [str(i) for i in range(1, len(numbers) + 1)]  # nothing lost or repeated
    assert len(got.output) <= 30_500


async def test_kill_shell_stops_the_process_and_what_it_started(sb):
    pidfile = ws(sb) / "child.pid"
    await call(sb, "bash", run_in_background=True, command=f"sleep 300 & echo $! > {pidfile}; wait")
    child = host_pid(sb, int((await _until(lambda: _read(pidfile), "no child")).strip()))
    assert _alive(child)
    out = await call(sb, "kill_shell", shell_id="bash_1")
    assert "killed" in out.output, out.output
    await _until(lambda: _true(not _alive(child)), "the child survived kill_shell")
    exited = [e for e in events(sb) if e.kind == "process_exited"]
    assert [(e.process_id, e.how) for e in exited] == [("bash_1", "killed")]
    got = await call(sb, "bash_output", bash_id="bash_1")
    assert "killed" in got.output.splitlines()[0]


async def test_a_call_starts_at_most_one_process(sb):
    command = "echo started >> starts.txt; sleep 300"
    one = await run(
        sb, "bash", {"command": command, "run_in_background": True}, timeout_s=5, call_id="toolu_bg"
    )
    two = await run(
        sb, "bash", {"command": command, "run_in_background": True}, timeout_s=5, call_id="toolu_bg"
    )
    assert one.output == two.output and "bash_1" in one.output
    await _until(lambda: _read(ws(sb) / "starts.txt"), "never started")
    await asyncio.sleep(0.3)
    assert (ws(sb) / "starts.txt").read_text() == "started\n"
    # the wrapper refuses a second start in the same process's directory even without a record
    record = await processes(sb).store.get("b1", "bash_1")
    assert record is not None
    await processes(sb).store.update(__import__("dataclasses").replace(record, status="starting"))
    await run(
        sb, "bash", {"command": command, "run_in_background": True}, timeout_s=5, call_id="toolu_bg"
    )
    await asyncio.sleep(0.3)
    assert (ws(sb) / "starts.txt").read_text() == "started\n"
    # a repeat is published with the same id (the server drops it as a duplicate)
    assert len({e.event_id for e in events(sb) if e.kind == "process_started"}) == 1


async def test_stopped_processes_are_reported_once(sb):
    pidfile = ws(sb) / "server.pid"
    await call(sb, "bash", run_in_background=True, command=f"echo $$ > {pidfile}; exec sleep 300")
    pid = host_pid(sb, int((await _until(lambda: _read(pidfile), "no pid")).strip()))
    procs = processes(sb)
    assert await procs.stop_all(sb, tool_call("toolu_sleep"), "build sleeping") == 1
    await _until(lambda: _true(not _alive(pid)), "the process survived the stop")
    exited = [e for e in events(sb) if e.kind == "process_exited"]
    assert [(e.process_id, e.how, e.reason) for e in exited] == [
        ("bash_1", "stopped", "build sleeping")
    ]
    note = await procs.notes(tool_call("toolu_next"), sb)
    assert "bash_1 (echo $$ >" in note and "build sleeping" in note and "not restarted" in note
    assert await procs.notes(tool_call("toolu_after"), sb) == ""
    # a live process recorded in another sandbox is lost, and said so
    await call(sb, "bash", run_in_background=True, command="sleep 300")
    elsewhere = Workspace(Renamed(sb.machine, "another-sandbox"))  # type: ignore[arg-type]
    note = await procs.notes(tool_call("toolu_elsewhere"), elsewhere)
    assert "bash_2 (sleep 300): its sandbox went away" in note
    assert [e.how for e in events(sb) if e.kind == "process_exited"] == ["stopped", "lost"]


class Renamed:
    """A machine under another sandbox id (the build's sandbox as it is after a replacement)."""

    def __init__(self, inner: Any, sandbox_id: str) -> None:
        self.inner, self.sandbox_id = inner, sandbox_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_process_that_ends_by_itself_is_reported_by_the_next_call(sb):
    procs = processes(sb)
    await call(sb, "bash", run_in_background=True, command="sleep 0.2; echo bye; exit 3")
    await call(sb, "bash", run_in_background=True, command="sleep 300")

    async def ended():
        note = await procs.notes(tool_call(), sb)
        return note or None

    note = await _until(ended, "the exit was never noticed")
    assert note == (
        "[background processes that have ended: bash_1 (sleep 0.2; echo bye; exit 3): exited "
        "with code 3. Their last output: bash_output]"
    )
    assert await procs.notes(tool_call(), sb) == ""  # said once; bash_2 still runs
    exited = [e for e in events(sb) if e.kind == "process_exited"]
    assert [(e.process_id, e.how, e.exit_code) for e in exited] == [("bash_1", "exited", 3)]
    got = await call(sb, "bash_output", bash_id="bash_1")
    assert got.output.splitlines()[1:] == ["bye"]


async def _read(path: Path) -> str | None:
    return await asyncio.to_thread(_text_of, path)


def _text_of(path: Path) -> str | None:
    return path.read_text() if path.exists() and path.read_text().strip() else None


async def _true(value: bool) -> bool:
    return value


async def test_bash_output_names_the_ports_a_process_listens_on(sb):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = (
        "python3 -c 'import socket,time; s=socket.socket(); "
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        f's.bind(("127.0.0.1", {port})); s.listen(); print("up", flush=True); time.sleep(300)\''
    )
    # started through a shell, so the listener is a child of the process: found by its session
    await call(sb, "bash", run_in_background=True, command=f"{server}; true")

    # each later call of the build looks at its live processes: the ports are recorded without
    # the model asking (what a preview needs)
    async def recorded():
        await processes(sb).notes(tool_call(), sb)
        record = await processes(sb).store.get("b1", "bash_1")
        return record if record is not None and record.ports else None

    record = await _until(recorded, "the port was never seen")
    assert record.ports == (port,)
    got = await call(sb, "bash_output", bash_id="bash_1")
    assert got.output.splitlines()[0].endswith(
        f"running, pid {record.pid}, listening on port {port}"
    )
