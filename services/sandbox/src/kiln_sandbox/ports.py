"""What the sandbox service needs from the outside world, as Protocols.

``Provider`` / ``Sandbox`` are shaped after e2b's ``AsyncSandbox`` (``create``, ``connect``,
``pause``, ``kill``, ``set_timeout``, ``files.read/write/list``, ``commands.run``) so that an E2B
adapter is a thin translation; the ``local`` provider implements them with a directory and
subprocesses. Paths given to a ``Sandbox`` are relative to its workspace root ('/'-separated);
the tools normalise them first, the adapter still refuses anything that resolves outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from kiln_contracts import Envelope, RestorePlanReply
from kiln_contracts.manifest import ManifestEntry

SandboxState = Literal["running", "paused", "stopped"]


class SandboxError(Exception):
    """A tool-level failure to report to the model (is_error result), not a service failure."""


class PathOutsideWorkspace(SandboxError):
    pass


class SandboxGone(Exception):
    """The sandbox no longer exists (expired, killed, crashed): create a fresh one."""


@dataclass(frozen=True)
class FileInfo:
    path: str  # relative to the workspace root, '/'-separated
    is_dir: bool
    size: int
    mtime_ns: int
    mode: int = 0o644


@dataclass(frozen=True)
class CommandResult:
    """A finished command; output is stdout+stderr combined, head and tail kept, middle dropped."""

    exit_code: int | None
    head: bytes
    tail: bytes
    total_bytes: int
    timed_out: bool = False


class Sandbox(Protocol):
    """One build's sandbox (its workspace)."""

    @property
    def sandbox_id(self) -> str: ...

    @property
    def root(self) -> str:
        """The workspace's absolute path inside the sandbox (absolute paths under it are allowed)."""
        ...

    async def run(self, command: str, *, timeout_s: float, max_output: int) -> CommandResult: ...

    async def read(self, path: str) -> bytes: ...

    async def write(self, path: str, data: bytes) -> None:
        """Write a file, creating its parent directories."""
        ...

    async def stat(self, path: str) -> FileInfo | None: ...

    async def list_entries(
        self, path: str = "", *, depth: int = 1, skip_dirs: frozenset[str] = frozenset(), limit: int
    ) -> list[FileInfo]:
        """Entries under ``path`` up to ``depth`` levels (at most ``limit``; symlinks not followed)."""
        ...

    async def manifest(
        self, excludes: list[str], *, dirs_and_symlinks: bool = False
    ) -> list[ManifestEntry]:
        """Every regular file minus ``excludes``, hashed inside the sandbox; with
        ``dirs_and_symlinks`` also every directory and symlink (not followed), sorted by path."""
        ...

    async def upload(self, path: str, sha256: str, url: str) -> int:
        """PUT the file's bytes to a presigned URL after checking its sha256; the bytes sent."""
        ...

    async def download(self, path: str, sha256: str, mode: int, url: str) -> int:
        """GET a file from a presigned URL into the workspace, checking its sha256; its size."""
        ...

    async def restore_tree(
        self, dirs: list[ManifestEntry], symlinks: list[ManifestEntry]
    ) -> list[str]:
        """After the files: create ``dirs`` and ``symlinks``, then set the directories' modes
        (deepest first). A symlink that resolves outside the workspace once created is removed;
        the paths of those are returned."""
        ...


class Provider(Protocol):
    name: str

    async def create(self, build_id: str, *, user_id: str = "") -> Sandbox:
        """A fresh sandbox for a build (tagged with the build and the user where supported)."""
        ...

    async def connect(self, build_id: str, sandbox_id: str) -> Sandbox:
        """Reattach to (and resume, if paused) a sandbox; SandboxGone when it no longer exists."""
        ...

    async def pause(self, build_id: str, sandbox_id: str) -> None: ...

    async def stop(self, build_id: str, sandbox_id: str) -> None:
        """Kill the sandbox (the local provider keeps the workspace directory for downloads)."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class SandboxRecord:
    build_id: str
    provider: str
    sandbox_id: str
    state: SandboxState


class Registry(Protocol):
    """Which sandbox belongs to which build; survives restarts."""

    async def get(self, build_id: str) -> SandboxRecord | None: ...

    async def put(self, record: SandboxRecord) -> None: ...

    async def replace(self, record: SandboxRecord, expected: str | None) -> SandboxRecord:
        """Record a build's new sandbox only if the build's sandbox id is still ``expected``
        (None: no record yet), so that of two replicas creating one at once only the first is
        kept; the record that holds afterwards (``record``, or the one that got there first)."""
        ...


@dataclass(frozen=True)
class CallRecord:
    """A call seen before: 'started' (with the lease of the replica running it) or 'done'."""

    status: Literal["started", "done"]
    result: dict[str, Any] | None = None
    owner: str | None = None
    lease_left_s: float = 0.0  # > 0 while the owner's lease is fresh


class CallStore(Protocol):
    """The exactly-once ledger of tool calls."""

    async def get(self, build_id: str, call_id: str) -> CallRecord | None: ...

    async def claim(
        self, build_id: str, call_id: str, owner: str, lease_s: float
    ) -> CallRecord | None:
        """Record the call as 'started' by ``owner`` (leased for ``lease_s``) and return None;
        if it was recorded already, change nothing and return that record."""
        ...

    async def release(self, build_id: str, call_id: str, owner: str) -> None:
        """Forget ``owner``'s 'started' record of a call it did not run (so it can be retried)."""
        ...

    async def renew(self, build_id: str, call_id: str, owner: str, lease_s: float) -> None:
        """Extend the owner's lease on a running call."""
        ...

    async def finish(self, build_id: str, call_id: str, result: dict[str, Any]) -> None: ...


class Restorer(Protocol):
    """Asks the snapshot service how to rebuild a build's workspace (its latest snapshot)."""

    async def restore_plan(self, build_id: str) -> RestorePlanReply | None:
        """The plan, or None when no snapshot service answered."""
        ...


class Publisher(Protocol):
    async def publish(self, msg: Envelope) -> None: ...
