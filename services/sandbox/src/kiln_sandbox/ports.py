"""What the sandbox service needs from the outside world, as Protocols.

A provider (``Provider``) makes, finds, pauses and kills a build's sandbox and hands out a
``Machine``: the few primitives a sandbox offers (run a shell command, locate paths, read and
write a file, list a tree, move a file to or from a URL, apply a batch of filesystem changes).
Everything the service does with files (the tools, path confinement, the snapshot manifest,
uploads, restores) is written once over them, in ``workspace.py``. Paths given to a ``Machine``
are relative to its workspace ('/'-separated, '' the workspace itself) and, except for
``locate``'s, already confined by the workspace: real paths inside it.

The service's own records (sandboxes, calls, processes, reads) and their stores are in
``records.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from kiln_contracts import Envelope, ForkOrigin, RestorePlanReply

EntryKind = Literal["file", "dir", "symlink", "other"]


class SandboxError(Exception):
    """A tool-level failure to report to the model (is_error result), not a service failure."""


class PathOutsideWorkspace(SandboxError):
    pass


class DigestMismatch(SandboxError):
    """The bytes moved by ``put`` / ``get`` do not have the expected sha256 (``actual``)."""

    def __init__(self, actual: str) -> None:
        super().__init__(f"sha256 {actual}")
        self.actual = actual


class TransferFailed(SandboxError):
    """``put`` / ``get`` could not move the bytes (the reason: HTTP status, curl's error ...)."""


class SandboxGone(Exception):
    """The sandbox no longer exists (expired, killed, crashed): create a fresh one."""


@dataclass(frozen=True)
class FileInfo:
    path: str  # relative to the workspace root, '/'-separated
    kind: EntryKind
    size: int
    mtime_ns: int
    mode: int = 0o644
    target: str | None = None  # a symlink's target, as readlink says (listed with content)
    sha256: str | None = None  # a regular file's (listed with content)

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"


@dataclass(frozen=True)
class Located:
    """Where a path leads: ``real`` as ``realpath -m --relative-base=<workspace>`` prints it
    (relative when inside, '' for the workspace itself; absolute or '..'-led when it leads
    outside) and what is there, symlinks followed (None: nothing)."""

    real: str
    info: FileInfo | None


@dataclass(frozen=True)
class FsOp:
    """One change of ``Machine.apply``: ``mkdir`` (with parents), ``symlink`` (``arg`` the
    target; replaces a file or symlink, fails on a directory), ``chmod`` (``arg`` octal bits),
    ``unlink``."""

    op: Literal["mkdir", "symlink", "chmod", "unlink"]
    path: str
    arg: str = ""


@dataclass(frozen=True)
class CommandResult:
    """A finished command; output is stdout+stderr combined, head and tail kept, middle dropped."""

    exit_code: int | None
    head: bytes
    tail: bytes
    total_bytes: int
    timed_out: bool = False


class Machine(Protocol):
    """One build's sandbox as its provider offers it. Each primitive is one round trip to the
    sandbox; any of them raises ``SandboxGone`` when the sandbox no longer exists and
    ``SandboxError`` for a failure to report to the model."""

    @property
    def sandbox_id(self) -> str: ...

    @property
    def root(self) -> str:
        """The workspace's absolute path inside the sandbox."""
        ...

    @property
    def process_dir(self) -> str:
        """Where background processes keep their pid, output and exit status, outside the
        workspace: a shell word (quoted, or with ``$HOME``) for ``run``'s commands."""
        ...

    def preview(self, port: int) -> PreviewTarget:
        """Where a port the build's processes listen on can be reached from outside the
        sandbox (no round trip)."""
        ...

    async def run(self, command: str, *, timeout_s: float, max_output: int) -> CommandResult:
        """A shell command in the workspace, in a process group of its own that is killed at
        the timeout; its output's head and tail (``max_output`` bytes in all) are kept."""
        ...

    async def locate(self, paths: Sequence[str]) -> list[Located]:
        """Where each path leads (not yet confined: '..' and symlinks are followed)."""
        ...

    async def read(self, path: str) -> bytes: ...

    async def fetch(self, path: str, max_bytes: int) -> tuple[Located, bytes | None]:
        """``locate`` of one path and, if it leads to a regular file inside the workspace of at
        most ``max_bytes``, its bytes, in one round trip (else None: read it apart)."""
        ...

    async def write(self, path: str, data: bytes) -> None:
        """Write a file, creating its parent directories."""
        ...

    async def store(self, path: str, data: bytes) -> Located:
        """``locate`` of one path and, if it leads inside the workspace and not to a directory,
        ``data`` written there (parents created), in one round trip where the machine can: what
        was there before."""
        ...

    async def walk(
        self,
        path: str,
        *,
        depth: int | None,
        skip_dirs: frozenset[str] = frozenset(),
        exclude: Sequence[str] = (),
        content: bool = False,
        limit: int | None = None,
    ) -> list[FileInfo]:
        """The entries under ``path`` (not itself) up to ``depth`` levels (None: all), in no
        set order, symlinks not followed, at most ``limit``. Directories named in
        ``skip_dirs`` are listed but not entered; entries whose name or workspace-relative
        path matches an ``exclude`` pattern (fnmatch) are neither. With ``content``, also each
        regular file's sha256 (a file that cannot be hashed is left out) and each symlink's
        target."""
        ...

    async def put(self, path: str, url: str, *, sha256: str) -> int:
        """PUT the file to a URL from inside the sandbox if its bytes still hash to ``sha256``
        (else ``DigestMismatch``); the bytes sent. ``TransferFailed`` if the PUT fails."""
        ...

    async def get(self, url: str, path: str, *, sha256: str, mode: int) -> int:
        """GET a URL into the file (parents created) from inside the sandbox, replacing it only
        once the bytes hash to ``sha256`` (else ``DigestMismatch``), with ``mode``; the size."""
        ...

    async def apply(self, ops: Sequence[FsOp]) -> None:
        """Make the changes in order; ``SandboxError`` at the first that fails."""
        ...


class Provider(Protocol):
    name: str

    async def create(self, build_id: str, *, user_id: str = "") -> Machine:
        """A fresh sandbox for a build (tagged with the build and the user where supported)."""
        ...

    async def connect(self, build_id: str, sandbox_id: str, *, running: bool = False) -> Machine:
        """Reattach to (and resume, if paused) a sandbox and keep it alive for a while;
        SandboxGone when it no longer exists. ``running``: the registry has it running (not
        paused by Kiln): a provider may hand back a handle it made recently without asking."""
        ...

    async def stop_others(self, build_id: str, keep: str) -> list[str]:
        """Kill the build's sandboxes other than ``keep`` (made but never recorded: a crash
        between creating and recording); the ids killed."""
        ...

    async def pause(self, build_id: str, sandbox_id: str) -> None: ...

    async def stop(self, build_id: str, sandbox_id: str) -> None:
        """Kill the sandbox (the local provider keeps the workspace directory for downloads)."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class PreviewTarget:
    """A sandbox port as its provider exposes it: on E2B its public host (``url``, with the
    traffic token where the sandbox's traffic is private); locally nothing (``url`` None): the
    gateway proxies to the port on the host's loopback."""

    provider: str
    url: str | None = None
    traffic_access_token: str | None = None


class Restorer(Protocol):
    """Asks the snapshot service how to rebuild a build's workspace (its latest snapshot)."""

    async def restore_plan(
        self, build_id: str, fork: ForkOrigin | None = None
    ) -> RestorePlanReply | None:
        """The plan, or None when no snapshot service answered. ``fork``: the build is a fork,
        whose first snapshot is its source's (made when the build has none of its own yet)."""
        ...


class Publisher(Protocol):
    async def publish(self, msg: Envelope) -> None: ...
