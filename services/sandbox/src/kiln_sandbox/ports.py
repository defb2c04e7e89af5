"""What the sandbox service needs from the outside world, as Protocols.

A provider (``Provider``) makes, finds, pauses and kills a build's sandbox and hands out a
``Machine``: the few primitives a sandbox offers (run a shell command, locate paths, read and
write a file, list a tree, move a file to or from a URL, apply a batch of filesystem changes).
Everything the service does with files (the tools, path confinement, the snapshot manifest,
uploads, restores) is written once over them, in ``workspace.py``. Paths given to a ``Machine``
are relative to its workspace ('/'-separated, '' the workspace itself) and, except for
``locate``'s, already confined by the workspace: real paths inside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from kiln_contracts import Envelope, ForkOrigin, RestorePlanReply

SandboxState = Literal["running", "paused", "stopped"]
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

    async def run(self, command: str, *, timeout_s: float, max_output: int) -> CommandResult:
        """A shell command in the workspace, in a process group of its own that is killed at
        the timeout; its output's head and tail (``max_output`` bytes in all) are kept."""
        ...

    async def locate(self, paths: Sequence[str]) -> list[Located]:
        """Where each path leads (not yet confined: '..' and symlinks are followed)."""
        ...

    async def read(self, path: str) -> bytes: ...

    async def write(self, path: str, data: bytes) -> None:
        """Write a file, creating its parent directories."""
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

    async def connect(self, build_id: str, sandbox_id: str) -> Machine:
        """Reattach to (and resume, if paused) a sandbox and keep it alive for a while;
        SandboxGone when it no longer exists."""
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
class SandboxRecord:
    build_id: str
    provider: str
    sandbox_id: str
    state: SandboxState
    iteration: int | None = None
    """For a stopped sandbox, the iteration its build had reached then: a call of a later one
    (the build continued) gets a fresh sandbox; None for the others."""
    has_processes: bool = False
    """Whether the build has ever started a background process (only then does a call look
    for processes to report, or a stop for processes to stop)."""


class Registry(Protocol):
    """Which sandbox belongs to which build; survives restarts."""

    async def get(self, build_id: str) -> SandboxRecord | None: ...

    async def put(self, record: SandboxRecord) -> None: ...

    async def replace(self, record: SandboxRecord, expected: str | None) -> SandboxRecord:
        """Record a build's new sandbox only if the build's sandbox id is still ``expected``
        (None: no record yet), so that of two replicas creating one at once only the first is
        kept; the record that holds afterwards (``record``, or the one that got there first)."""
        ...

    async def mark_processes(self, build_id: str) -> None:
        """Record that the build has started a background process (``has_processes``)."""
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
        self, build_id: str, call_id: str, owner: str, lease_s: float, iteration: int = 0
    ) -> CallRecord | None:
        """Record the call (of ``iteration``) as 'started' by ``owner`` (leased for ``lease_s``)
        and return None; if it was recorded already, change nothing and return that record."""
        ...

    async def last_iteration(self, build_id: str) -> int:
        """The highest iteration of the build's recorded calls (0 for none)."""
        ...

    async def release(self, build_id: str, call_id: str, owner: str) -> None:
        """Forget ``owner``'s 'started' record of a call it did not run (so it can be retried)."""
        ...

    async def renew(self, build_id: str, call_id: str, owner: str, lease_s: float) -> None:
        """Extend the owner's lease on a running call."""
        ...

    async def finish(self, build_id: str, call_id: str, result: dict[str, Any]) -> None: ...


ProcessStatus = Literal["starting", "running", "exited", "killed", "stopped", "lost"]
LIVE: frozenset[str] = frozenset({"starting", "running"})


@dataclass(frozen=True)
class ProcessRecord:
    """A background process of a build, as the service records it (``processes.py``)."""

    build_id: str
    process_id: str  # bash_1, bash_2 ... per build
    call_id: str  # the ToolCall that started it
    iteration: int
    command: str
    sandbox_id: str  # it lives and dies with this sandbox
    status: ProcessStatus
    pid: int | None = None  # leads its own session and process group in the sandbox
    exit_code: int | None = None
    reason: str = ""
    read_offset: int = 0  # bytes of its output already shown by bash_output
    reported_by: str | None = None  # the call whose result told the model it had ended
    ports: tuple[int, ...] = ()  # TCP ports it (or a process it started) listened on, last seen

    @property
    def live(self) -> bool:
        return self.status in LIVE


class ProcessStore(Protocol):
    """The builds' background processes; survives restarts."""

    async def register(
        self, build_id: str, call_id: str, iteration: int, command: str, sandbox_id: str
    ) -> tuple[ProcessRecord, bool]:
        """The process of call ``call_id``: a new one ('starting', the build's next
        ``bash_<n>``; True) or the one registered for that call before (False)."""
        ...

    async def get(self, build_id: str, process_id: str) -> ProcessRecord | None: ...

    async def by_call(self, build_id: str, call_id: str) -> ProcessRecord | None: ...

    async def all(self, build_id: str) -> list[ProcessRecord]:
        """All of the build's processes, oldest first."""
        ...

    async def update(self, record: ProcessRecord) -> None:
        """Store ``record``'s status, pid, exit code, reason and read offset."""
        ...

    async def to_report(
        self, build_id: str, sandbox_id: str, call_id: str
    ) -> tuple[list[ProcessRecord], list[ProcessRecord]]:
        """For a call about to run in ``sandbox_id``: the build's live processes of another
        sandbox are marked 'lost' (first list: those, now lost); every process ended by the
        platform ('stopped', 'lost') and not yet reported is marked reported by ``call_id``
        (second list)."""
        ...


class ReadLog(Protocol):
    """What each build last saw of each file (read_file) or made it (write_file, edit_file):
    its sha256. edit_file refuses a file whose content is not what the build last saw."""

    async def saw(self, build_id: str, path: str, sha256: str, call_id: str) -> None: ...

    async def last_seen(self, build_id: str, path: str) -> str | None:
        """The sha256 the build last saw ``path`` with, from a call whose result it got."""
        ...


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
