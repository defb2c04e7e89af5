"""Consuming: the wrapper around a handler (``Consumer``: validation, acks, redelivery with
backoff, dead letters, tracing, metrics), run by each durable consumer's pull loop
(``pull.Puller``), and the in-progress acks of every message being handled (``Heartbeats``).
``Bus.consume`` sets them up; see ``bus`` for the why."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from nats.aio.msg import Msg
from pydantic import ValidationError

from kiln_contracts import BY_KIND, Envelope, stable_id, subjects

from . import metrics, tracing
from .errors import PermanentError, RetryLater
from .retry import backoff_delay

if TYPE_CHECKING:
    from .bus import Bus

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Envelope)


@dataclass(frozen=True)
class Delivery:
    """What a handler may know about the delivery of its message."""

    subject: str
    stream_seq: int
    num_delivered: int


Handler = Callable[[E, Delivery], Awaitable[None]]


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
        self.bus.heartbeats.hold(msg)
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
            self.bus.heartbeats.let_go(msg)
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


class Heartbeats:
    """Marks every message being handled as in progress at least every ``interval_s`` (so that
    JetStream does not redeliver it while its handler runs), from one task for all of them: a
    handler holds its message from start to settlement, and no timer or task is kept per
    message."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        # message → when it was last marked (or started), oldest first
        self.held: dict[_Settle, float] = {}
        self._task: asyncio.Task[None] | None = None

    def hold(self, msg: _Settle) -> None:
        loop = asyncio.get_running_loop()
        self.held[msg] = loop.time()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())

    def let_go(self, msg: _Settle) -> None:
        self.held.pop(msg, None)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        # every half interval: a message is marked at most 1.5 intervals after its last mark
        loop = asyncio.get_running_loop()
        while self.held:
            await asyncio.sleep(self.interval_s / 2)
            now = loop.time()
            due = []
            for msg, since in self.held.items():
                if now - since < self.interval_s:
                    break  # the rest were marked later
                due.append(msg)
            for msg in due:
                if self.held.pop(msg, None) is None:
                    continue  # settled while an earlier one was being marked
                self.held[msg] = now  # to the end: the oldest stay first
                with contextlib.suppress(Exception):
                    await msg.in_progress()


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
