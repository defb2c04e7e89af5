"""Deliveries: from a build event to signed attempts, retried with backoff until delivered.

``accept`` turns an event into one delivery per endpoint that wants it (its body fixed then, its
id the ``webhook-id`` of every attempt), committed before the event is acked: a restart loses
nothing. ``Dispatcher`` claims due deliveries (each the oldest pending one of its endpoint and
build, so a build's events reach an endpoint in order) and makes one attempt each; a failure is
retried after the next delay of the schedule (jittered), and after the last one the delivery has
failed (a manual redelivery tries again). An endpoint whose deliveries have all failed for
``disable_after_s`` is disabled with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kiln_contracts import Envelope
from kiln_contracts.webhooks import TYPE_OF_KIND, WebhookEvent, WebhookPayload

from . import metrics, signing
from .ports import Claimed, Outcome, Sender, Store

log = logging.getLogger(__name__)

JITTER = 0.2


def payload(event: Envelope, sequence: int) -> bytes:
    """The body every endpoint gets for ``event`` (contracts/schemas/webhooks/WebhookPayload.json)."""
    body = WebhookPayload(
        type=TYPE_OF_KIND[event.kind],  # type: ignore[arg-type]
        timestamp=event.occurred_at,
        data=WebhookEvent(
            build_id=event.build_id,
            kind=event.kind,
            event_id=event.event_id,
            sequence=sequence,
            message=event.model_dump(mode="json"),
        ),
    )
    return body.model_dump_json().encode()


async def accept(store: Store, event: Envelope, sequence: int) -> int:
    """Queue ``event`` for every endpoint of its user that wants it (once: a redelivered event
    adds nothing); the number of deliveries added."""
    event_type = TYPE_OF_KIND.get(event.kind)
    if event_type is None:
        return 0
    return await store.enqueue(
        event.user_id,
        event.build_id,
        event_type,
        str(event.event_id),
        sequence,
        payload(event, sequence),
    )


def retry_delay(
    schedule: Sequence[float], attempts: int, rand: Callable[[], float]
) -> float | None:
    """The delay before the attempt after ``attempts`` failed ones (None: no more attempts)."""
    if attempts > len(schedule):
        return None
    base = schedule[attempts - 1]
    return max(0.0, base * (1 + JITTER * (2 * rand() - 1)))


@dataclass
class Dispatcher:
    store: Store
    sender: Sender
    schedule: Sequence[float]
    disable_after_s: float
    concurrency: int = 16
    poll_s: float = 1.0
    lease_s: float = 60.0
    clock: Callable[[], float] = time.time
    rand: Callable[[], float] = random.random
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _loop: asyncio.Task[None] | None = None
    running: bool = False

    def wake(self) -> None:
        """Look for due deliveries now (a new event was queued, one was delivered)."""
        self._wake.set()

    def start(self) -> None:
        self._loop = asyncio.create_task(self.run())

    async def stop(self, grace_s: float = 10.0) -> None:
        """Claim no more; let attempts under way finish for ``grace_s`` (a cancelled one is
        retried by a replica once its lease runs out)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def run(self) -> None:
        self.running = True
        try:
            while True:
                try:
                    claimed = await self.tick()
                except Exception:
                    log.warning("claiming deliveries failed; trying again", exc_info=True)
                    claimed = 0
                if claimed == 0 or len(self._tasks) >= self.concurrency:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.poll_s):
                            await self._wake.wait()
                    self._wake.clear()
        finally:
            self.running = False

    async def tick(self) -> int:
        """Claim what is due, up to the free slots, and start an attempt for each."""
        free = self.concurrency - len(self._tasks)
        if free <= 0:
            return 0
        claimed = await self.store.claim(free, self.lease_s)
        for item in claimed:
            task = asyncio.create_task(self.attempt(item))
            self._tasks.add(task)
            task.add_done_callback(self._done)
        return len(claimed)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()

    async def attempt(self, item: Claimed) -> None:
        """One attempt: sign it now, send it, record how it went."""
        extra = {"build_id": item.build_id, "webhook_id": item.delivery_id}
        timestamp = int(self.clock())
        headers = signing.headers(item.secrets, item.delivery_id, timestamp, item.body)
        result = await self.sender.send(item.url, headers, item.body)
        metrics.LATENCY.observe(result.seconds)
        if result.ok:
            outcome = Outcome(True, result.status_code, None, None)
            metrics.DELIVERIES.labels("delivered").inc()
        else:
            delay = retry_delay(self.schedule, item.attempts, self.rand)
            outcome = Outcome(False, result.status_code, result.error, delay, self.disable_after_s)
            metrics.DELIVERIES.labels(
                "refused" if result.refused else ("retry" if delay is not None else "failed")
            ).inc()
            log.info(
                "webhook attempt %d to %s failed: %s%s",
                item.attempts,
                item.endpoint_id,
                result.error,
                f"; again in {delay:.1f} s" if delay is not None else "; giving up",
                extra=extra,
            )
        try:
            disabled = await self.store.record(item, outcome)
        except Exception:
            log.warning(
                "could not record a webhook attempt (retried after the lease)",
                exc_info=True,
                extra=extra,
            )
            return
        if disabled:
            metrics.DISABLED.inc()
            log.warning("webhook endpoint %s disabled: %s", item.endpoint_id, disabled, extra=extra)
