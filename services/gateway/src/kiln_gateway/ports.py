"""What the gateway needs from the outside world."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from kiln_contracts import BudgetGate, BuildRequested, Envelope
from kiln_contracts.manifest import Manifest
from kiln_contracts.rpc import BudgetStatus
from kiln_contracts.webhooks import WebhookReply

from .model import ApiKey, Build, Caller, Message, NewBuild, NewMessage, Project, Projection

Publish = Callable[[Envelope], Awaitable[None]]


@dataclass(frozen=True)
class Inserted:
    outcome: Literal["created", "existing", "capped"]
    build: Build | None


@dataclass(frozen=True)
class MessageInserted:
    outcome: Literal["created", "existing", "capped"]
    message: Message | None


@dataclass(frozen=True)
class StoredEvent:
    """One message of a build's history on the stream."""

    seq: int
    kind: str
    data: bytes


@dataclass(frozen=True)
class Checkpoint:
    """A CheckpointSaved of a build: a snapshot with that id is (or is being) taken."""

    seq: int
    iteration: int
    snapshot_id: str


class BuildStore(Protocol):
    async def caller_for_key(self, key_sha256: str) -> Caller | None: ...

    async def upsert_key(self, key_sha256: str, user_id: str, tier: str) -> None: ...

    async def insert_build(self, new: NewBuild, *, cap: int) -> Inserted:
        """Insert unless the user already has a build with this idempotency key ("existing") or
        ``cap`` builds that are not finished ("capped"); atomic per user."""
        ...

    async def mark_published(self, build_id: str) -> None: ...

    async def unpublished(self, older_than_s: float, limit: int = 100) -> list[Build]: ...

    async def get(self, build_id: str) -> Build | None: ...

    async def insert_message(self, new: NewMessage, *, cap: int) -> MessageInserted:
        """Store a message as the build's next (seq 1, 2, ...) unless the build already has one
        with this idempotency key ("existing"), or the build has ended and its user has ``cap``
        builds that are not ("capped": continuing it would pass the cap); atomic per user."""
        ...

    async def unpublished_messages(
        self, build_id: str | None = None, older_than_s: float = 0.0, limit: int = 100
    ) -> list[Message]:
        """Messages not published yet (of one build, or of every build stored more than
        ``older_than_s`` ago), by build and seq."""
        ...

    async def mark_message_published(self, message_id: str) -> None: ...

    async def count_with_status(self, status: str) -> int:
        """How many builds (of every user) are in ``status`` now."""
        ...

    async def list_for_user(
        self,
        user_id: str,
        *,
        status: str | None,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[Build]: ...

    async def insert_from_event(self, event: BuildRequested) -> None:
        """Create the row of a build requested by another producer (no-op if it exists)."""
        ...

    async def update_projection(
        self, build_id: str, seq: int, evolve: Callable[[Projection], Projection]
    ) -> Literal["applied", "duplicate", "missing"]:
        """Apply ``evolve`` to the build's projection unless ``seq`` was already applied."""
        ...

    async def ping(self) -> None: ...

    # API keys (admin)
    async def create_key(
        self, key_sha256: str, key_id: str, key_prefix: str, user_id: str, tier: str
    ) -> ApiKey: ...

    async def find_keys(self, ident: str) -> list[ApiKey]: ...

    async def revoke_key(self, key_id: str) -> ApiKey | None: ...

    async def list_keys(self, user_id: str | None) -> list[ApiKey]: ...

    # projects
    async def create_project(
        self, project_id: str, user_id: str, name: str, idea_brief: str, qna: list[dict[str, Any]]
    ) -> Project: ...

    async def get_project(self, project_id: str, version: int | None = None) -> Project | None: ...

    async def add_project_version(
        self,
        project_id: str,
        base_version: int | None,
        name: str,
        idea_brief: str,
        qna: list[dict[str, Any]],
    ) -> Project | Literal["missing", "conflict"]: ...

    async def list_projects(
        self, user_id: str, *, limit: int, before: tuple[datetime, str] | None
    ) -> list[Project]: ...

    async def project_versions(self, project_id: str) -> list[Project]: ...


@dataclass(frozen=True)
class StoredSnapshot:
    """A snapshot's manifest and when the snapshot service wrote it."""

    manifest: Manifest
    written_at: datetime


class BlobTooLarge(Exception):
    """A blob holds more bytes than the reader asked for at most."""


class SnapshotFiles(Protocol):
    """The snapshot service's bucket, read only."""

    async def latest(self, build_id: str) -> Manifest | None:
        """The manifest of the build's newest snapshot; None if it has none."""
        ...

    async def latest_id(self, build_id: str) -> str | None:
        """The id of the build's newest snapshot; None if it has none."""
        ...

    async def manifest(self, build_id: str, snapshot_id: str) -> Manifest | None:
        """One snapshot of the build; None if it does not exist (or no longer: retention)."""
        ...

    async def snapshots(self, build_id: str) -> list[StoredSnapshot]:
        """Every snapshot of the build the bucket still keeps, in no particular order."""
        ...

    def blob(self, sha256: str) -> AsyncIterator[bytes]:
        """A file's bytes, in chunks."""
        ...

    async def read_blob(self, sha256: str, max_bytes: int) -> bytes:
        """A file's bytes whole; ``BlobTooLarge`` past ``max_bytes``."""
        ...

    async def pruned(self, build_id: str) -> int | None:
        """The highest iteration of a manifest retention deleted (None: none deleted)."""
        ...


class BudgetUnavailable(Exception):
    """The budget service did not answer (down, busy rebuilding, or it failed)."""


class Budget(Protocol):
    """The budget service, asked: it owns spend, top-ups and allowances."""

    async def status(self, user_id: str, tier: str) -> BudgetStatus:
        """The user's allowance now as the budget enforces it (``tier``: the caller's, for a
        user the budget has not seen yet); ``BudgetUnavailable`` without an answer."""
        ...

    async def gate(self, user_id: str) -> BudgetGate | None:
        """The user's budget gate as the budget service last wrote it in its key-value bucket
        (None: never written)."""
        ...


class EventSource(Protocol):
    def history(
        self, build_id: str, after_seq: int, idle_s: float
    ) -> AsyncGenerator[StoredEvent | None, None]:
        """The build's messages after ``after_seq``, then live ones; None after ``idle_s`` of quiet."""
        ...

    async def checkpoints(self, build_id: str) -> list[Checkpoint]:
        """The build's CheckpointSaved events so far, in stream order."""
        ...


class WebhooksUnavailable(Exception):
    """The webhooks service did not answer (down or busy)."""


class Webhooks(Protocol):
    """The webhooks service, asked: it owns the endpoints and their delivery logs."""

    async def ask(self, subject: str, request: BaseModel) -> WebhookReply:
        """Its answer to ``request`` on ``subject`` (kiln_contracts.webhooks); raises
        ``WebhooksUnavailable`` without one."""
        ...
