"""The pull loop of each durable consumer (``Puller``): one pull request open on the server for
as many messages as there are free handler slots. ``Bus.consume`` starts one around each
``consume.Consumer``; ``health`` reads it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig

from kiln_contracts import subjects

if TYPE_CHECKING:
    from .bus import Bus

log = logging.getLogger(__name__)

PULL_EXPIRES_S = 5.0  # a pull request lingers this long on the server when nothing is pending
# JetStream answers every pull request within its expiry (messages, or 408 when it expires): a
# consume loop with no answer for this long, while connected, is not consuming.
PULL_STALL_S = 3 * PULL_EXPIRES_S
MAX_PULL_BATCH = 256  # messages asked for in one pull request
RESTART_S = 1.0  # a consume loop that failed starts again after this long


class Puller:
    """One consumer's pull loop: keep one pull request open on the server for as many messages
    as there are free handler slots, and start each message's handler as soon as it arrives.

    The request is JetStream's ``CONSUMER.MSG.NEXT`` API on an inbox of our own; a new one is
    sent once the last has been filled, expired (status 408), refused (409) or not answered
    within its expiry (a reconnect loses it).

    What the health checks read (``kiln_runtime.health``): ``up`` while the loop runs;
    ``failed_at``, when it last failed (``keep_running`` starts it again), until JetStream next
    answers it; ``waiting_since``, when the oldest pull request JetStream has not answered was
    sent."""

    def __init__(
        self,
        bus: Bus,
        filters: str | list[str],
        config: ConsumerConfig,
        max_workers: int,
        consumer: Callable[[Msg], Awaitable[None]],
    ) -> None:
        self.bus = bus
        if isinstance(filters, str):
            filters = [filters]
        self.filters = tuple(filters)  # the consumer's filter subjects
        self.subject = filters[0]  # its (first) filter
        self.config = config
        self.durable = config.durable_name or ""
        self.max_workers = max_workers
        self.consumer = consumer
        self.running = 0
        self.delivered = 0  # messages this loop has handed to the consumer
        self.up = False
        self.failed_at: float | None = None
        self.waiting_since: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._room.set()
        self._answered = asyncio.Event()
        self._wanted = 0

    async def keep_running(self) -> None:
        """Run the loop until cancelled, starting it again whenever it fails."""
        while True:
            try:
                await self.run()
            except Exception:
                log.warning(
                    "the consume loop of %s failed; starting it again",
                    self.durable,
                    exc_info=True,
                    extra={"service": self.bus.service},
                )
            await asyncio.sleep(RESTART_S)

    async def run(self) -> None:
        """The loop, until cancelled or it fails."""
        nc = self.bus.nc
        inbox = nc.new_inbox()
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{subjects.STREAM}.{self.durable}"
        expires_ns = int(PULL_EXPIRES_S * 1e9)
        sub: Subscription | None = None

        async def arrived(msg: Msg) -> None:
            status = msg.headers.get("Status") if msg.headers else None
            if status and not msg.data:
                if status != "100":  # 100: an idle heartbeat; 404/408/409: the request is over
                    self._answered.set()
                if status == "408":  # expired unfilled: JetStream is serving the consumer
                    self._served()
                return
            self._served()
            self._wanted -= 1
            if self._wanted <= 0:
                self._answered.set()
            self.delivered += 1
            self.running += 1
            if self.running >= self.max_workers:
                self._room.clear()
            task = asyncio.create_task(self._handle(msg))
            self._tasks.add(task)

        try:
            sub = await nc.subscribe(inbox, cb=arrived, pending_msgs_limit=-1)
            self.up = True
            while True:
                await self._room.wait()
                if self.running >= self.max_workers:
                    self._room.clear()
                    continue
                self._wanted = min(self.max_workers - self.running, MAX_PULL_BATCH)
                self._answered.clear()
                request = {"batch": self._wanted, "expires": expires_ns}
                if self.waiting_since is None:
                    self.waiting_since = time.monotonic()
                try:
                    await nc.publish(subject, json.dumps(request).encode(), reply=inbox)
                except Exception as err:  # disconnected: the client reconnects, ask again then
                    log.debug("pull request not sent: %s", err)
                    await asyncio.sleep(0.5)
                    continue
                # asyncio.timeout, not wait_for: Python 3.11's wait_for returns an answer that
                # arrives with a cancellation and drops the cancellation, so stop() would hang
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PULL_EXPIRES_S + 1):
                        await self._answered.wait()
        except Exception:
            if self.failed_at is None:
                self.failed_at = time.monotonic()
            raise
        finally:
            self.up = False
            self.waiting_since = None
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    def _served(self) -> None:
        self.waiting_since = None
        self.failed_at = None

    async def _handle(self, msg: Msg) -> None:
        try:
            await self.consumer(msg)
        except Exception:  # the handler's own errors are settled inside; this is acking failing
            log.warning(
                "could not settle %s (it is redelivered after the ack wait)",
                msg.subject,
                exc_info=True,
                extra={"service": self.bus.service},
            )
        finally:
            self.running -= 1
            self._room.set()
            self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
