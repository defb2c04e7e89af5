"""What the agent needs from the outside world, as Protocols (real adapters in adapters/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from kiln_contracts import BudgetGate, Envelope, Usage

from .checkpoint import Checkpoint, Turn


class VersionConflict(Exception):
    """The checkpoint changed since it was loaded (another handler saved first)."""


@dataclass(frozen=True)
class LeaseChange:
    """What a save does to the build's think lease, in the same write: ``give_up``, a token whose
    lease it gives up (if that token still holds it); ``take``, a token it takes the lease for,
    for ``ttl_s`` seconds, if the lease is free, ran out or is that token's already."""

    give_up: str | None = None
    take: str | None = None
    ttl_s: float = 0.0


NO_LEASE_CHANGE = LeaseChange()


@dataclass(frozen=True)
class Idle:
    """A build that wants to move (thinking or acting) whose row has not changed for ``idle_s``
    seconds and whose think lease is free: no model call runs for it."""

    build_id: str
    version: int
    idle_s: float


class CheckpointStore(Protocol):
    async def create(self, cp: Checkpoint, turns: list[Turn]) -> bool:
        """Insert a new build; False if the build already exists."""

    async def load(self, build_id: str) -> Checkpoint | None: ...

    async def turns(self, build_id: str, since: int = 0) -> list[Turn]:
        """The conversation's turns from seq ``since`` on, in order, each as it was saved (the
        same keys in the same order: a turn the agent keeps from its own save and the same turn
        read back build byte-identical requests). Committed turns never change, so a reader may
        keep the ones it has and ask only for newer ones."""

    async def save(
        self, cp: Checkpoint, new_turns: list[Turn], lease: LeaseChange = NO_LEASE_CHANGE
    ) -> bool:
        """Write ``cp`` (with its outbox) and append ``new_turns`` in one transaction, if the stored
        version is still ``cp.version``; then ``cp.version`` is the new one. Else VersionConflict.
        ``lease``: what the same write does to the think lease (see LeaseChange); True if it took
        the lease. The write itself never waits for the lease."""

    async def mark_sent(self, sent: dict[str, int]) -> None:
        """Clear the outbox of each build (``{build_id: version}``) if it is still at that version
        (a no-op for a build that has moved on), in one go."""

    async def take_lease(
        self, build_id: str, token: str, ttl_s: float
    ) -> tuple[float, Checkpoint | None]:
        """Take the build's think lease for ``token`` for ``ttl_s`` seconds (if it is free, ran
        out or is ``token``'s already) and read the checkpoint under it, in one go: (0.0, the
        checkpoint) if ``token`` holds it now, (seconds left, None) if another holder does,
        (0.0, None) if there is no such build. Apart from the version: the lease never conflicts
        with a save."""

    async def extend_lease(self, build_id: str, token: str, ttl_s: float) -> bool:
        """Extend ``token``'s lease to ``ttl_s`` from now; False if ``token`` no longer holds it
        (never takes a lease that was given up or taken over)."""

    async def extend_leases(self, leases: dict[str, str], ttl_s: float) -> set[str]:
        """``extend_lease`` for many builds at once (``{build_id: token}``), in one go: the
        builds whose lease was extended."""

    async def release_lease(self, build_id: str, token: str) -> None:
        """Give the lease up if ``token`` still holds it."""

    async def idle(self, idle_s: float, limit: int) -> list[Idle]:
        """The builds thinking or acting, unchanged for at least ``idle_s`` seconds, with no
        think lease held: the longest idle first, at most ``limit``."""


class Publisher(Protocol):
    async def publish(self, msg: Envelope) -> None: ...


class ModelRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    system: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    messages: list[dict[str, Any]]
    max_tokens: int
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    betas: list[str] = []


class ModelReply(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    content: list[dict[str, Any]]
    stop_reason: str
    usage: Usage


class ModelError(Exception):
    """The model could not answer (after retries, or a request it will never accept)."""


class ContextWindowExceeded(ModelError):
    """The request does not fit the model's context window (e.g. "prompt is too long")."""


class Model(Protocol):
    async def complete(self, request: ModelRequest) -> ModelReply: ...


class Gates(Protocol):
    async def closed(self, user_id: str) -> BudgetGate | None:
        """The user's budget gate if it is closed now, else None; RetryLater if this replica
        cannot tell (the agent then neither calls the model nor starts a build)."""
