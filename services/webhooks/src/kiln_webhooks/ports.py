"""What the webhooks domain needs from the outside world."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from kiln_contracts.webhooks import WebhookDelivery, WebhookEndpoint


@dataclass(frozen=True)
class AttemptResult:
    ok: bool
    status_code: int | None
    error: str | None
    seconds: float
    refused: bool = False  # the target was refused (unsafe address), nothing was sent


@dataclass(frozen=True)
class Claimed:
    """A delivery claimed for one attempt (its lease held by ``token``)."""

    delivery_id: str
    endpoint_id: str
    build_id: str
    event_type: str
    attempts: int  # including this one
    body: bytes
    url: str
    secrets: Sequence[str]  # the current secret, then the previous one while it overlaps
    token: str


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, for the store: delivered, to be retried after ``retry_in_s``, or
    failed for good (``retry_in_s`` None and not ok)."""

    ok: bool
    status_code: int | None
    error: str | None
    retry_in_s: float | None
    disable_after_s: float = field(default=0.0)


class Store(Protocol):
    """Endpoints and their deliveries (Postgres schema ``webhooks``)."""

    async def create_endpoint(
        self,
        endpoint_id: str,
        user_id: str,
        url: str,
        event_types: Sequence[str],
        description: str,
        secret: str,
    ) -> WebhookEndpoint: ...

    async def count_endpoints(self, user_id: str) -> int: ...

    async def endpoints(self, user_id: str) -> list[WebhookEndpoint]: ...

    async def endpoint(self, user_id: str, endpoint_id: str) -> WebhookEndpoint | None: ...

    async def update_endpoint(
        self,
        user_id: str,
        endpoint_id: str,
        *,
        url: str | None,
        event_types: Sequence[str] | None,
        description: str | None,
        enabled: bool | None,
    ) -> WebhookEndpoint | None: ...

    async def delete_endpoint(self, user_id: str, endpoint_id: str) -> bool: ...

    async def rotate_secret(
        self, user_id: str, endpoint_id: str, secret: str, overlap_s: int
    ) -> WebhookEndpoint | None: ...

    async def enqueue(
        self,
        user_id: str,
        build_id: str,
        event_type: str,
        event_id: str,
        seq: int,
        body: bytes,
    ) -> int:
        """A delivery for each enabled endpoint of the user that wants ``event_type``, once per
        (endpoint, event): a repeat adds nothing. Returns how many were added."""
        ...

    async def claim(self, limit: int, lease_s: float) -> list[Claimed]:
        """Up to ``limit`` due deliveries, each the oldest pending one of its (endpoint, build),
        leased for ``lease_s``."""
        ...

    async def record(self, claimed: Claimed, outcome: Outcome) -> str | None:
        """Store the attempt's outcome (if the lease is still ``claimed.token``); a failure that
        leaves the endpoint failing for ``outcome.disable_after_s`` disables it. Returns the
        reason when this disabled it."""
        ...

    async def deliveries(
        self,
        user_id: str,
        endpoint_id: str,
        status: str | None,
        limit: int,
        before: datetime | None,
    ) -> list[WebhookDelivery] | None: ...

    async def redeliver(
        self, user_id: str, endpoint_id: str, delivery_id: str
    ) -> WebhookDelivery | None: ...

    async def backlog(self) -> int:
        """Deliveries pending now (due or waiting for a retry)."""
        ...


class Sender(Protocol):
    async def send(self, url: str, headers: dict[str, str], body: bytes) -> AttemptResult: ...
