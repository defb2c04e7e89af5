"""What the gateway needs from the outside world."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from kiln_contracts import BuildRequested, Envelope

from .model import Build, Caller, NewBuild, Projection

Publish = Callable[[Envelope], Awaitable[None]]


@dataclass(frozen=True)
class Inserted:
    outcome: Literal["created", "existing", "capped"]
    build: Build | None


@dataclass(frozen=True)
class StoredEvent:
    """One message of a build's history on the stream."""

    seq: int
    kind: str
    data: bytes


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


class EventSource(Protocol):
    def history(
        self, build_id: str, after_seq: int, idle_s: float
    ) -> AsyncGenerator[StoredEvent | None, None]:
        """The build's messages after ``after_seq``, then live ones; None after ``idle_s`` of quiet."""
        ...
