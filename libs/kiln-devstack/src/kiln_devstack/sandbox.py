"""Stand-ins for tests and benchmarks: ``MemoryRegistry`` (the sandbox registry in memory, with
the Postgres one's semantics) and ``FakeE2B``, for ``e2b.AsyncSandbox`` with the surface the E2B
adapter uses, on this host.

``FakeE2B`` plays the ``AsyncSandbox`` class (``create``, ``connect``, ``set_timeout``, ``pause``,
``kill``); the sandboxes it returns have ``files.read/write/get_info/make_dir`` and
``commands.run``. It raises the SDK's own exceptions: ``SandboxNotFoundException`` for an
unknown or killed sandbox, ``SandboxNotRunningException`` for a call into a sandbox that was
killed or paused meanwhile, ``FileNotFoundException``, and ``CommandExitException`` for a
non-zero exit. Each sandbox's home ``/home/user`` is a directory under ``base``: paths under it
are translated (files API and ``cwd``); commands run with ``bash -c`` on this host in their own
session. For tests only: it is no more a boundary than the local provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from e2b import (
    CommandExitException,
    CommandResult,
    EntryInfo,
    FileNotFoundException,
    FileType,
    InvalidArgumentException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    TimeoutException,
)

from kiln_sandbox.ports import SandboxRecord

HOME = "/home/user"


class MemoryRegistry:
    """Which sandbox belongs to which build, in memory."""

    def __init__(self) -> None:
        self.rows: dict[str, SandboxRecord] = {}

    async def get(self, build_id: str) -> SandboxRecord | None:
        return self.rows.get(build_id)

    async def put(self, record: SandboxRecord) -> None:
        held = self.rows.get(record.build_id)
        if held is not None and held.has_processes:
            record = replace(record, has_processes=True)
        self.rows[record.build_id] = record

    async def mark_processes(self, build_id: str) -> None:
        if (held := self.rows.get(build_id)) is not None:
            self.rows[build_id] = replace(held, has_processes=True)

    async def replace(self, record: SandboxRecord, expected: str | None) -> SandboxRecord:
        held = self.rows.get(record.build_id)
        if (held.sandbox_id if held is not None else None) != expected:
            assert held is not None
            return held
        if held is not None and held.has_processes:
            record = replace(record, has_processes=True)
        self.rows[record.build_id] = record
        return record


@dataclass
class FakeState:
    sandbox_id: str
    home: Path
    metadata: dict[str, str]
    template: str | None
    timeout: int | None
    state: str = "running"  # running | paused | killed
    calls: list[str] = field(default_factory=list)
    pgids: set[int] = field(default_factory=set)


class FakeE2B:
    """The ``AsyncSandbox`` class's class-method surface, over directories under ``base``."""

    def __init__(self, base: str | Path) -> None:
        self.base = Path(base)
        self.sandboxes: dict[str, FakeState] = {}
        self.api_keys: set[str] = set()

    def _state(self, sandbox_id: str) -> FakeState:
        st = self.sandboxes.get(sandbox_id)
        if st is None or st.state == "killed":
            raise SandboxNotFoundException(f"Sandbox {sandbox_id} not found")
        return st

    async def create(
        self,
        template: str | None = None,
        timeout: int | None = None,
        metadata: dict[str, str] | None = None,
        *,
        api_key: str | None = None,
        request_timeout: float | None = None,
        **_: Any,
    ) -> FakeSandbox:
        sandbox_id = f"fake{uuid.uuid4().hex[:12]}"
        home = self.base / sandbox_id / "home-user"
        await asyncio.to_thread(home.mkdir, parents=True)
        st = FakeState(sandbox_id, home, dict(metadata or {}), template, timeout)
        self.sandboxes[sandbox_id] = st
        if api_key:
            self.api_keys.add(api_key)
        st.calls.append("create")
        return FakeSandbox(st)

    async def connect(self, sandbox_id: str, timeout: int | None = None, **_: Any) -> FakeSandbox:
        st = self._state(sandbox_id)
        st.state = "running"  # connect resumes a paused sandbox
        if timeout is not None:
            st.timeout = max(st.timeout or 0, timeout)
        st.calls.append("connect")
        return FakeSandbox(st)

    async def set_timeout(self, sandbox_id: str, timeout: int, **_: Any) -> None:
        st = self._state(sandbox_id)
        st.timeout = timeout
        st.calls.append(f"set_timeout {timeout}")

    async def pause(self, sandbox_id: str, **_: Any) -> bool:
        st = self._state(sandbox_id)
        st.calls.append("pause")
        if st.state == "paused":
            return False
        st.state = "paused"
        return True

    async def kill(self, sandbox_id: str, **_: Any) -> bool:
        st = self.sandboxes.get(sandbox_id)
        if st is None or st.state == "killed":
            return False
        self.expire(sandbox_id)
        st.calls.append("kill")
        return True

    def expire(self, sandbox_id: str) -> None:
        """What E2B does at a sandbox's timeout: it, every process in it and its files are
        gone."""
        st = self.sandboxes[sandbox_id]
        st.state = "killed"
        for pgid in st.pgids:
            _killpg(pgid)
        for pid in _processes_under(st.home):  # background ones too, as in a VM that ends
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(st.home.parent, ignore_errors=True)


class FakeSandbox:
    def __init__(self, state: FakeState) -> None:
        self._st = state
        self.files = FakeFiles(state)
        self.commands = FakeCommands(state)

    @property
    def sandbox_id(self) -> str:
        return self._st.sandbox_id


def _alive(st: FakeState) -> None:
    if st.state != "running":
        raise SandboxNotRunningException(
            f"sandbox {st.sandbox_id} was not found: The sandbox was killed or reached its timeout"
        )


def _host(st: FakeState, path: str) -> Path:
    if not path.startswith("/"):
        path = f"{HOME}/{path}"
    if path != HOME and not path.startswith(HOME + "/"):
        raise InvalidArgumentException(f"the fake maps only {HOME}, not {path!r}")
    return st.home / path[len(HOME) :].lstrip("/")


class FakeFiles:
    def __init__(self, state: FakeState) -> None:
        self._st = state

    async def read(self, path: str, format: str = "text", **_: Any) -> Any:
        _alive(self._st)
        host = _host(self._st, path)
        try:
            data = await asyncio.to_thread(host.read_bytes)
        except FileNotFoundError as err:
            raise FileNotFoundException(f"path '{path}' does not exist") from err
        except IsADirectoryError as err:
            raise InvalidArgumentException(f"path '{path}' is a directory") from err
        return bytearray(data) if format == "bytes" else data.decode()

    async def write(self, path: str, data: str | bytes, **_: Any) -> Any:
        _alive(self._st)
        host = _host(self._st, path)
        raw = data.encode() if isinstance(data, str) else bytes(data)

        def put() -> None:
            host.parent.mkdir(parents=True, exist_ok=True)
            host.write_bytes(raw)

        try:
            await asyncio.to_thread(put)
        except OSError as err:
            raise InvalidArgumentException(f"cannot write '{path}': {err.strerror}") from err
        return None

    async def make_dir(self, path: str, **_: Any) -> bool:
        _alive(self._st)
        host = _host(self._st, path)
        existed = host.is_dir()
        await asyncio.to_thread(host.mkdir, parents=True, exist_ok=True)
        return not existed

    async def get_info(self, path: str, **_: Any) -> EntryInfo:
        _alive(self._st)
        host = _host(self._st, path)
        try:
            st = await asyncio.to_thread(os.lstat, host)
        except FileNotFoundError as err:
            raise FileNotFoundException(f"path '{path}' does not exist") from err
        kind = (
            FileType.SYMLINK
            if host.is_symlink()
            else FileType.DIR
            if host.is_dir()
            else FileType.FILE
        )
        return EntryInfo(
            name=host.name,
            type=kind,
            path=path,
            size=st.st_size,
            mode=st.st_mode,
            permissions="",
            owner="user",
            group="user",
            modified_time=datetime.fromtimestamp(st.st_mtime, tz=UTC),
        )


class FakeCommands:
    def __init__(self, state: FakeState) -> None:
        self._st = state

    async def run(
        self,
        cmd: str,
        background: bool | None = None,
        envs: dict[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        timeout: float | None = 60,
        request_timeout: float | None = None,
        **_: Any,
    ) -> CommandResult[str]:
        _alive(self._st)
        home = str(self._st.home)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "LANG": "C.UTF-8"}
        env.update(envs or {})
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            cmd,
            cwd=_host(self._st, cwd) if cwd else home,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self._st.pgids.add(proc.pid)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout or None)
        except TimeoutError as exc:
            _killpg(proc.pid)
            raise TimeoutException("context deadline exceeded") from exc
        except BaseException:
            _killpg(proc.pid)
            raise
        finally:
            self._st.pgids.discard(proc.pid)
        stdout = out.decode("utf-8", errors="replace")
        stderr = err.decode("utf-8", errors="replace")
        if self._st.state != "running":  # killed or paused while it ran
            _alive(self._st)
        assert proc.returncode is not None
        if proc.returncode != 0:
            raise CommandExitException(
                stdout=stdout, stderr=stderr, exit_code=proc.returncode, error=None
            )
        return CommandResult(stdout=stdout, stderr=stderr, exit_code=0, error=None)


def _processes_under(home: Path) -> list[int]:
    """The host processes whose working directory is in a fake sandbox's home."""
    root = str(home)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd == root or cwd.startswith(root + "/"):
            found.append(int(entry.name))
    return found


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
