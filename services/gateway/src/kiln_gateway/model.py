"""The gateway's records: an API caller, a build row and its projected state."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

QUEUED = "queued"
RUNNING = "running"
SLEEPING = "sleeping"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
REJECTED = "rejected"  # never started: the user's allowance was used up (BuildRejected)
STATUSES = (QUEUED, RUNNING, SLEEPING, COMPLETED, FAILED, CANCELLED, REJECTED)
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED, REJECTED})


@dataclass(frozen=True)
class Caller:
    """Who an API key belongs to."""

    user_id: str
    tier: str


@dataclass(frozen=True)
class Projection:
    """The part of a build row the event projection owns."""

    status: str = QUEUED
    iteration: int = 0
    cost_micro_usd: int = 0
    last_snapshot_id: str | None = None
    summary: str | None = None
    reason: str | None = None
    last_seq: int = 0
    terminal_seq: int | None = None
    finished_at: datetime | None = None
    continuations: int = 0
    processes: str = "[]"
    """The build's background processes, a JSON array of ``{process_id, command, status, pid,
    exit_code, reason, sandbox_id}`` (``kiln_gateway.projection.processes_after``)."""
    waiting: str = "{}"
    """What the build is waiting on, JSON (``kiln_gateway.waiting``)."""
    previews: str = "[]"
    """The build's previews, a JSON array, one per port: ``{port, status, reason, seq,
    process_id, provider, sandbox_id, url, traffic_access_token}``
    (``kiln_gateway.previews.previews_after``)."""

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class NewBuild:
    build_id: str
    user_id: str
    tier: str
    idea_brief: str
    understanding_qna: list[dict[str, Any]]
    limits: dict[str, Any]
    idempotency_key: str | None = None
    request_sha256: str | None = None
    project_id: str | None = None
    project_version: int | None = None
    fork_of: str | None = None
    fork_iteration: int | None = None
    fork_snapshot_id: str | None = None


@dataclass(frozen=True)
class Build:
    build_id: str
    user_id: str
    tier: str
    idea_brief: str
    understanding_qna: list[dict[str, Any]]
    limits: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    state: Projection = field(default_factory=Projection)
    idempotency_key: str | None = None
    request_sha256: str | None = None
    published_at: datetime | None = None
    project_id: str | None = None
    project_version: int | None = None
    fork_of: str | None = None
    """A fork: the source build, at ``fork_iteration``, from its snapshot ``fork_snapshot_id``."""
    fork_iteration: int | None = None
    fork_snapshot_id: str | None = None

    @property
    def status(self) -> str:
        return self.state.status


@dataclass(frozen=True)
class NewMessage:
    message_id: str
    build_id: str
    user_id: str
    text: str
    request_sha256: str
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Message:
    """A user's message to a build: the build's ``seq``-th."""

    message_id: str
    build_id: str
    user_id: str
    seq: int
    text: str
    request_sha256: str
    created_at: datetime
    idempotency_key: str | None = None
    published_at: datetime | None = None


@dataclass(frozen=True)
class Project:
    """One version of a project: an idea brief and its understanding-interview answers."""

    project_id: str
    user_id: str
    name: str
    version: int
    latest_version: int
    idea_brief: str
    understanding_qna: list[dict[str, Any]]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ApiKey:
    """An API key's record (never the key itself)."""

    key_id: str
    key_prefix: str
    user_id: str
    tier: str
    created_at: datetime
    revoked_at: datetime | None = None
