"""The sandbox service's own records, as Protocols of the stores that keep them (Postgres in
``adapters/postgres.py``; in memory for a service without it): each build's sandbox, each tool
call's claim and result, each background process, what each build last saw of each file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

SandboxState = Literal["running", "paused", "stopped"]


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

    async def finish(self, build_id: str, call_id: str, result: dict[str, Any]) -> None:
        """Store the result of a call that ran, waiting out a store outage (about two minutes,
        the message held): a call that ran and whose result was lost would be answered as
        interrupted on its redelivery, the work it did unknown to the model."""
        ...


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
