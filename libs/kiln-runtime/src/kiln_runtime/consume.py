"""Consuming: each durable consumer's pull loop (``Puller``) and the wrapper around a handler
(``Consumer``: validation, heartbeats, acks, redelivery with backoff, dead letters, tracing,
metrics). ``Bus.consume`` sets them up; see ``bus`` for the why."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig
from pydantic import ValidationError

from kiln_contracts import BY_KIND, Envelope, stable_id, subjects

from . import metrics, tracing
from .errors import PermanentError, RetryLater
from .retry import backoff_delay

if TYPE_CHECKING:
    from .bus import Bus

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Envelope)

PULL_EXPIRES_S = 5.0  # a pull request lingers this long on the server when nothing is pending
# JetStream answers every pull request within its expiry (messages, or 408 when it expires): a
# consume loop with no answer for this long, while connected, is not consuming.
PULL_STALL_S = 3 * PULL_EXPIRES_S
MAX_PULL_BATCH = 256  # messages asked for in one pull request
RESTART_S = 1.0  # a consume loop that failed starts again after this long


@dataclass(frozen=True)
class Delivery:
    """What a handler may know about the delivery of its message."""

    subject: str
    stream_seq: int
    num_delivered: int


Handler = Callable[[E, Delivery], Awaitable[None]]


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


def split_subject(subject: str) -> tuple[str | None, str | None]:
    try:
        return subjects.parse(subject)
    except ValueError:
        return None, None


class Consumer(Generic[E]):
    """The wrapper around one handler: validate, heartbeat, ack / redeliver / dead-letter."""

    def __init__(self, bus: Bus, model: type[E] | None, handler: Handler[E]) -> None:
        """``model`` None: any kind, chosen by the subject's last token."""
        self.bus = bus
        self.model = model
        self.handler = handler
        self.__name__ = f"{bus.service}_{model.kind if model else 'all'}"
        self.__doc__ = handler.__doc__

    async def __call__(self, raw: Msg) -> None:
        msg = _Settle(raw)
        meta = raw.metadata
        service = self.bus.service
        kind = split_subject(raw.subject)[1] or "unknown"
        if self.bus.draining:  # shutting down: another replica (or our successor) takes it
            await msg.nack(delay=1.0)
            return
        if meta.num_delivered > self.bus.settings.max_deliver:
            await self.bus.dead_letter(raw, f"gave up after {meta.num_delivered - 1} deliveries")
            await msg.ack()
            return
        try:
            event = self._parse(raw.subject, raw.data)
            if "event_id" not in event.model_fields_set:
                event = event.with_id(agreed_event_id(raw.headers, meta.sequence.stream))
        except PermanentError as err:
            await self.bus.dead_letter(raw, str(err))
            await msg.ack()
            metrics.HANDLED.labels(service, kind, "invalid").inc()
            return

        delivery = Delivery(raw.subject, meta.sequence.stream, meta.num_delivered)
        extra = {"build_id": event.build_id, "event_id": event.event_id, "kind": kind}
        beat = asyncio.create_task(self._heartbeat(msg))
        started = asyncio.get_running_loop().time()
        span = tracing.consuming(
            service,
            kind,
            raw.headers,
            **{"kiln.build_id": event.build_id, "kiln.event_id": str(event.event_id)},
        )
        self.bus._begin()
        try:
            with span:
                await self.handler(event, delivery)
        except asyncio.CancelledError:
            # Stopped mid-handling: hand the message back now rather than after ack_wait.
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.nack())
            metrics.HANDLED.labels(service, kind, "cancelled").inc()
            raise
        except PermanentError as err:
            await self.bus.dead_letter(raw, str(err))
            await msg.ack()
            metrics.HANDLED.labels(service, kind, "dead_letter").inc()
        except RetryLater as err:
            if meta.num_delivered >= self.bus.settings.max_deliver:  # its last: say why
                await self.bus.dead_letter(
                    raw, f"gave up after {meta.num_delivered} deliveries: {err}"
                )
                await msg.ack()
                metrics.HANDLED.labels(service, kind, "dead_letter").inc()
            else:
                await msg.nack(delay=err.delay_s or None)
                metrics.HANDLED.labels(service, kind, "retry").inc()
                log.info("redelivering later: %s", err, extra=extra)
        except Exception as err:
            if meta.num_delivered >= self.bus.settings.max_deliver:
                await self.bus.dead_letter(raw, f"{type(err).__name__}: {err}")
                await msg.ack()
                metrics.HANDLED.labels(service, kind, "dead_letter").inc()
            else:
                await msg.nack(delay=backoff_delay(meta.num_delivered, base=0.5, cap=15))
                metrics.HANDLED.labels(service, kind, "error").inc()
            log.exception("handler failed (delivery %d)", meta.num_delivered, extra=extra)
        else:
            await msg.ack()
            metrics.HANDLED.labels(service, kind, "ok").inc()
        finally:
            self.bus._end()
            beat.cancel()
            metrics.HANDLER_SECONDS.labels(service, kind).observe(
                asyncio.get_running_loop().time() - started
            )

    def _parse(self, subject: str, body: bytes) -> E:
        build_id, kind = split_subject(subject)
        model: type[Any] | None = self.model or BY_KIND.get(kind or "")
        if model is None or kind != model.kind:
            raise PermanentError(f"unexpected subject {subject!r}: unknown kind")
        if len(body) > subjects.MAX_MSG_BYTES:
            raise PermanentError(f"payload of {len(body)} bytes exceeds {subjects.MAX_MSG_BYTES}")
        try:
            event: E = model.model_validate_json(body)
        except ValidationError as err:
            raise PermanentError(f"invalid {kind}: {_summary(err)}") from err
        if event.build_id != build_id:
            raise PermanentError(f"build_id {event.build_id!r} does not match subject {subject!r}")
        return event

    async def _heartbeat(self, msg: _Settle) -> None:
        interval = max(0.5, self.bus.settings.ack_wait_s / 3)
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(interval)
                with contextlib.suppress(Exception):
                    await msg.in_progress()


def agreed_event_id(headers: dict[str, str] | None, stream_seq: int) -> uuid.UUID:
    """The ``event_id`` of a message that came without one (an outside producer's): its
    ``Nats-Msg-Id`` (as a UUID if it is one), else its sequence on the stream; every consumer
    of the message derives the same id, and a republish with the same Nats-Msg-Id too."""
    msg_id = (headers or {}).get("Nats-Msg-Id", "").strip()
    if msg_id:
        try:
            return uuid.UUID(msg_id)
        except ValueError:
            return stable_id("nats-msg-id", msg_id)
    return stable_id("stream-seq", subjects.STREAM, stream_seq)


class _Settle:
    """A delivered message's acks: a message is settled once (a later ack or nak is a no-op,
    and so is a heartbeat after it)."""

    __slots__ = ("raw",)

    def __init__(self, raw: Msg) -> None:
        self.raw = raw

    async def ack(self) -> None:
        if not self.raw.is_acked:
            await self.raw.ack()

    async def nack(self, delay: float | None = None) -> None:
        if not self.raw.is_acked:
            await self.raw.nak(delay=delay)

    async def in_progress(self) -> None:
        if not self.raw.is_acked:
            await self.raw.in_progress()


def _summary(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)
