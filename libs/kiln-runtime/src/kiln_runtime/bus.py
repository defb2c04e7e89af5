"""The bus: nats-py on Kiln's JetStream stream, with explicit acks and a dead letter.

``Bus.consume`` registers a durable pull consumer for one kind of message and wraps a plain
``async def handler(message, delivery)``: it validates the payload against the contract (invalid →
dead letter with the reason), heartbeats the message while the handler runs (so JetStream does not
redeliver a long model call elsewhere), acks on success, redelivers transient failures with backoff,
and dead-letters permanent failures or messages that exhausted their deliveries.

The bus owns its hot path outright, on nats-py's public API: the connection, the durable consumers,
each consumer's pull loop (``_Puller``: up to ``max_workers`` handlers at once, each message handed
over the moment it arrives) and the wrapper around the handler (``_Consumer``: validation, acks,
tracing, metrics). FastStream's subscriber does the same through its public API with a loop that
fetches a batch and waits for every handler of it to finish before it fetches again, and a
per-message path (middlewares, a JSON decode of the body, dependency injection) whose CPU Kiln does
not use (docs/BENCHMARKS.md, bus). FastStream writes Kiln's AsyncAPI document
(``kiln_runtime.asyncapi``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, StreamConfig
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from kiln_contracts import BY_KIND, Envelope, subjects

from . import metrics, tracing
from .errors import PermanentError, RetryLater
from .retry import backoff_delay
from .settings import CommonSettings

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Envelope)

MIN_SERVER = (2, 12)
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
    heartbeat: Callable[[], Awaitable[None]]

    @property
    def redelivered(self) -> bool:
        return self.num_delivered > 1


Handler = Callable[[E, Delivery], Awaitable[None]]


class ServerTooOld(RuntimeError):
    pass


def stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        num_replicas=replicas,
        name=subjects.STREAM,
        subjects=list(subjects.STREAM_SUBJECTS),
        duplicate_window=subjects.DUPLICATE_WINDOW_S,
        max_msg_size=subjects.MAX_MSG_BYTES,
        max_age=subjects.MAX_AGE_S,
        allow_msg_schedules=True,
    )


def dlq_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        num_replicas=replicas,
        name=subjects.DLQ_STREAM,
        subjects=list(subjects.DLQ_SUBJECTS),
        duplicate_window=subjects.DUPLICATE_WINDOW_S,
        max_age=subjects.MAX_AGE_S,
    )


async def ensure_streams(nc: Client, replicas: int = 1) -> None:
    """Check the server can do what Kiln needs, then create or update Kiln's streams."""
    version = nc.connected_server_version
    if (version.major, version.minor) < MIN_SERVER:
        raise ServerTooOld(
            f"nats-server {version} is too old: Kiln needs >= {MIN_SERVER[0]}.{MIN_SERVER[1]} "
            "with JetStream (message schedules). Point NATS_URL at a newer server."
        )
    js = nc.jetstream()
    for config in (stream_config(replicas), dlq_stream_config(replicas)):
        try:
            await js.stream_info(config.name or "")
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)


def gates_stream_config(replicas: int = 1) -> StreamConfig:
    """The stream behind the budget gates' key-value bucket, as nats-py's ``create_key_value``
    makes one (one value per key, rollups, no deletes of single messages), with Kiln's replicas.
    No direct gets: every read is answered by the stream's leader, so it sees the last write."""
    bucket = subjects.BUDGET_GATES
    return StreamConfig(
        name=f"KV_{bucket}",
        subjects=[f"$KV.{bucket}.>"],
        num_replicas=replicas,
        max_msgs_per_subject=1,
        max_msgs=-1,
        max_consumers=-1,
        max_age=subjects.BUDGET_GATES_MAX_AGE_S,
        max_msg_size=subjects.BUDGET_GATES_MAX_VALUE_BYTES,
        discard=DiscardPolicy.NEW,
        duplicate_window=120.0,
        allow_rollup_hdrs=True,
        deny_delete=True,
        allow_direct=False,
    )


async def ensure_gates(nc: Client, replicas: int = 1) -> KeyValue:
    """Create or update the budget gates' bucket (the budget writes it; the agent and the gateway
    read it, so each of them may be the first to start) and bind to it."""
    js = nc.jetstream()
    config = gates_stream_config(replicas)
    try:
        await js.stream_info(config.name or "")
        await js.update_stream(config)
    except NotFoundError:
        await js.add_stream(config)
    return await js.key_value(subjects.BUDGET_GATES)


class Bus:
    """One service's connection to the bus."""

    def __init__(self, settings: CommonSettings, service: str) -> None:
        self.settings = settings
        self.service = service
        self.draining = False  # shutting down: take no new work
        self.inflight = 0  # handlers running now
        self.started = 0  # handlers started so far
        self.pullers: dict[str, _Puller] = {}  # the pull loop of each durable consumer
        self._loops: list[asyncio.Task[None]] = []
        self.connected_at: float | None = None  # time.monotonic() of the last (re)connection
        self.consuming_since: float | None = None  # time.monotonic() when start() returned
        self._nc: Client | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def _begin(self) -> None:
        self.inflight += 1
        self.started += 1
        self._idle.clear()

    def _end(self) -> None:
        self.inflight -= 1
        if not self.inflight:
            self._idle.set()

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        settings = self.settings
        self._nc = await nats.connect(
            settings.nats_url,
            user=settings.nats_user or None,
            password=(settings.nats_password or "") if settings.nats_user else None,
            name=f"kiln-{self.service}",
            reconnected_cb=self._reconnected,
            error_cb=self._error,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=5,
        )
        self.connected_at = time.monotonic()
        await ensure_streams(self._nc, self.settings.stream_replicas)

    async def _reconnected(self) -> None:
        self.connected_at = time.monotonic()

    async def _error(self, err: Exception) -> None:
        log.debug("NATS: %s", err, extra={"service": self.service})

    async def start(self) -> None:
        """Declare the durable consumers, then start their loops (after the service's own
        resources are ready)."""
        js = self.nc.jetstream()
        for puller in self.pullers.values():
            try:
                await js.consumer_info(subjects.STREAM, puller.durable)
            except NotFoundError:
                await js.add_consumer(subjects.STREAM, config=puller.config)
        for puller in self.pullers.values():
            self._loops.append(asyncio.create_task(puller.keep_running()))
        self.consuming_since = time.monotonic()

    @property
    def nats_connected(self) -> bool:
        """Connected to NATS now (not before the first connection, nor while reconnecting)."""
        return self._nc is not None and self._nc.is_connected

    @property
    def nats_closed(self) -> bool:
        """The connection is closed for good: the client will not reconnect by itself."""
        return self._nc is not None and self._nc.is_closed

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain, then disconnect: new deliveries are handed back at once, handlers in flight
        get up to ``grace_s`` to finish; any still running then are cancelled and handed back
        (nak) for redelivery elsewhere."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        if self.inflight:
            log.warning(
                "%d handlers still running after %.0fs; handing them back", self.inflight, grace
            )
        loops, self._loops = self._loops, []
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()  # sends the acks and naks still buffered, then closes

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise RuntimeError("the bus is not connected: call connect() first")
        return self._nc

    async def gates(self) -> KeyValue:
        """The budget gates' key-value bucket (after ``connect``), at the streams' replicas."""
        return await ensure_gates(self.nc, self.settings.stream_replicas)

    # ------------------------------------------------------------------ publishing

    async def publish(self, msg: Envelope) -> None:
        """Publish an event to the stream; the server drops a repeat of the same event_id."""
        subject = subjects.subject_of(msg)
        headers = {"Nats-Msg-Id": str(msg.event_id), "Kiln-Kind": msg.kind}
        with tracing.publishing(msg.kind, subject, **{"kiln.build_id": msg.build_id}):
            tracing.inject(headers)
            # nats-py's JetStream publish directly, not through FastStream's publisher: its
            # middlewares and headers add CPU to every publish (docs/BENCHMARKS.md, bus)
            await self.nc.jetstream().publish(
                subject,
                msg.model_dump_json().encode(),
                headers=headers,
                stream=subjects.STREAM,
                timeout=10,
            )
        metrics.PUBLISHED.labels(self.service, msg.kind).inc()

    async def publish_at(self, msg: Envelope, at_rfc3339: str, name: str) -> None:
        """Schedule ``msg`` to be delivered at a UTC time with a JetStream message schedule."""
        await self.nc.jetstream().publish(
            subjects.schedule_subject(msg.build_id, name),
            msg.model_dump_json().encode(),
            headers={
                "Nats-Schedule": f"@at {at_rfc3339}",
                "Nats-Schedule-Target": subjects.subject_of(msg),
                "Nats-Msg-Id": f"schedule-{msg.event_id}",
            },
            timeout=10,
        )

    # ------------------------------------------------------------------ consuming

    def consume(
        self,
        model: type[E],
        handler: Handler[E],
        *,
        max_workers: int = 1,
        durable: str | None = None,
    ) -> None:
        """Handle every ``model`` message of every build with a durable, explicitly-acked consumer."""
        name = durable or f"{self.service}-{model.kind}".replace("_", "-")
        self._subscribe(
            subjects.kind_filter(model.kind), name, _Consumer(self, model, handler), max_workers
        )

    def consume_all(
        self, handler: Handler[Envelope], *, durable: str, max_workers: int = 1
    ) -> None:
        """Handle every message of every kind (e.g. the gateway's read-model projection)."""
        self._subscribe("kiln.build.>", durable, _Consumer(self, None, handler), max_workers)

    def consume_kinds(
        self,
        models: Sequence[type[Envelope]],
        handler: Handler[Envelope],
        *,
        durable: str,
        max_workers: int = 1,
    ) -> None:
        """Handle the messages of several kinds with one durable consumer (JetStream's
        ``filter_subjects``), in stream order when ``max_workers`` is 1 (e.g. the webhooks)."""
        filters = [subjects.kind_filter(m.kind) for m in models]
        self._subscribe(filters, durable, _Consumer(self, None, handler), max_workers)

    def _subscribe(
        self, subject: str | list[str], durable: str, consumer: _Consumer[Any], max_workers: int
    ) -> None:
        """A durable pull consumer on ``subject`` (or several; declared by ``start``) and its
        loop."""
        if durable in self.pullers:
            raise ValueError(f"{self.service} already consumes with durable {durable!r}")
        max_workers = max(1, max_workers)
        filters = [subject] if isinstance(subject, str) else list(subject)
        config = ConsumerConfig(
            name=durable,
            durable_name=durable,
            filter_subject=filters[0] if len(filters) == 1 else None,
            filter_subjects=filters if len(filters) > 1 else None,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait_s,
            # room for every handler running plus a pull request's worth waiting to be handled
            max_ack_pending=max(1000, max_workers + MAX_PULL_BATCH),
        )
        self.pullers[durable] = _Puller(self, filters, config, max_workers, consumer)

    async def dead_letter(self, raw: Msg, reason: str) -> None:
        _, kind = _split(raw.subject)
        meta = raw.metadata
        await self.nc.jetstream().publish(
            subjects.dlq_subject(self.service, kind or "unknown"),
            raw.data,
            headers={
                "Kiln-Dlq-Reason": reason[:1000],
                "Kiln-Original-Subject": raw.subject,
                "Kiln-Original-Seq": str(meta.sequence.stream),
                "Nats-Msg-Id": f"dlq-{self.service}-{meta.sequence.stream}",
            },
            timeout=10,
        )
        metrics.DEAD_LETTERS.labels(self.service, kind or "unknown").inc()
        log.warning(
            "dead-lettered %s: %s",
            raw.subject,
            reason,
            extra={"service": self.service, "kind": kind},
        )


class _Puller:
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
        filters: list[str],
        config: ConsumerConfig,
        max_workers: int,
        consumer: Callable[[Msg], Awaitable[None]],
    ) -> None:
        self.bus = bus
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


def _split(subject: str) -> tuple[str | None, str | None]:
    try:
        return subjects.parse(subject)
    except ValueError:
        return None, None


class _Consumer(Generic[E]):
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
        kind = _split(raw.subject)[1] or "unknown"
        if self.bus.draining:  # shutting down: another replica (or our successor) takes it
            await msg.nack(delay=1.0)
            return
        if meta.num_delivered > self.bus.settings.max_deliver:
            await self.bus.dead_letter(raw, f"gave up after {meta.num_delivered - 1} deliveries")
            await msg.ack()
            return
        try:
            event = self._parse(raw.subject, raw.data)
        except PermanentError as err:
            await self.bus.dead_letter(raw, str(err))
            await msg.ack()
            metrics.HANDLED.labels(service, kind, "invalid").inc()
            return

        delivery = Delivery(raw.subject, meta.sequence.stream, meta.num_delivered, msg.in_progress)
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
        build_id, kind = _split(subject)
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


def dump(msg: Envelope) -> dict[str, Any]:
    return msg.model_dump(mode="json")
