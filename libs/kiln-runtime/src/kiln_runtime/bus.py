"""The bus: nats-py on Kiln's JetStream stream, with explicit acks and a dead letter.

``Bus.consume`` registers a durable pull consumer for one kind of message and wraps a plain
``async def handler(message, delivery)``: it validates the payload against the contract (invalid →
dead letter with the reason), heartbeats the message while the handler runs (so JetStream does not
redeliver a long model call elsewhere), acks on success, redelivers transient failures with backoff,
and dead-letters permanent failures or messages that exhausted their deliveries.

The bus owns its hot path outright, on nats-py's public API: the connection, the durable consumers,
each consumer's pull loop (``Puller``: up to ``max_workers`` handlers at once, each message handed
over the moment it arrives) and the wrapper around the handler (``Consumer``: validation, acks,
tracing, metrics). FastStream's subscriber does the same through its public API with a loop that
fetches a batch and waits for every handler of it to finish before it fetches again, and a
per-message path (middlewares, a JSON decode of the body, dependency injection) whose CPU Kiln does
not use (docs/BENCHMARKS.md, bus). FastStream writes Kiln's AsyncAPI document
(``kiln_runtime.asyncapi``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from kiln_contracts import Envelope, subjects

from . import metrics, tracing
from .consume import Consumer, Delivery, Handler, Heartbeats, split_subject
from .dead_letters import cause_of
from .pull import MAX_PULL_BATCH, Puller
from .retry import retry
from .settings import CommonSettings
from .streams import bind_gates, require_streams

__all__ = ["Bus", "Delivery", "Handler"]

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Envelope)


def servers(url: str) -> list[str]:
    """The servers of a NATS URL: one, or a cluster's nodes comma-separated."""
    return [u.strip() for u in url.split(",") if u.strip()]


def inbox_prefix(service: str) -> str:
    """Where a service's replies arrive (``_INBOX_<service>.<id>``; deploy/nats/render.py)."""
    return f"_INBOX_{service}"


class Bus:
    """One service's connection to the bus."""

    def __init__(self, settings: CommonSettings, service: str) -> None:
        self.settings = settings
        self.service = service
        self.draining = False  # shutting down: take no new work
        self.inflight = 0  # handlers running now
        self.started = 0  # handlers started so far
        self.pullers: dict[str, Puller] = {}  # the pull loop of each durable consumer
        self._loops: list[asyncio.Task[None]] = []
        self.connected_at: float | None = None  # time.monotonic() of the last (re)connection
        self.consuming_since: float | None = None  # time.monotonic() when start() returned
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # a message being handled is marked in progress every ack_wait / 3 (at least 0.5 s)
        self.heartbeats = Heartbeats(max(0.5, settings.ack_wait_s / 3))

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
            servers(settings.nats_url),
            user=settings.nats_user or None,
            password=(settings.nats_password or "") if settings.nats_user else None,
            name=f"kiln-{self.service}",
            # replies to this service's requests (RPCs, JetStream API calls, pulls) come on a
            # prefix of its own: its NATS user may subscribe to that prefix only
            inbox_prefix=inbox_prefix(self.service),
            # a server that stops answering (a hung node) is left for another after
            # ping_interval x max_outstanding_pings, not nats-py's default of 4 minutes
            ping_interval=settings.nats_ping_interval_s,
            max_outstanding_pings=3,
            reconnected_cb=self._reconnected,
            error_cb=self._error,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=5,
        )
        self.connected_at = time.monotonic()
        self._js = self._nc.jetstream()  # one context for every publish (it survives reconnects)
        try:  # the set-up step creates the streams; a service only looks them up
            await require_streams(self._nc)
        except BaseException:
            nc, self._nc, self._js = self._nc, None, None
            with contextlib.suppress(Exception):
                await nc.close()
            raise

    async def _reconnected(self) -> None:
        self.connected_at = time.monotonic()

    async def _error(self, err: Exception) -> None:
        log.debug("NATS: %s", err, extra={"service": self.service})

    async def start(self) -> None:
        """Declare the durable consumers, then start their loops (after the service's own
        resources are ready)."""
        js = self.js
        for puller in self.pullers.values():

            async def declare(p: Puller = puller) -> None:
                try:
                    await js.consumer_info(subjects.STREAM, p.durable)
                except NotFoundError:
                    await js.add_consumer(subjects.STREAM, config=p.config)

            # JetStream may not answer at once (a cluster electing a leader, a loaded node)
            await retry(
                declare,
                attempts=10,
                retry_on=(
                    TimeoutError,
                    nats.errors.TimeoutError,
                    nats.js.errors.ServiceUnavailableError,
                ),
                base=0.5,
                cap=5.0,
                on_retry=self._consumer_retry,
            )
        for puller in self.pullers.values():
            self._loops.append(asyncio.create_task(puller.keep_running()))
        self.consuming_since = time.monotonic()

    def _consumer_retry(self, err: BaseException, attempt: int) -> None:
        log.warning("declaring a consumer: %r; retrying", err, extra={"service": self.service})

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
        self.heartbeats.stop()
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()  # sends the acks and naks still buffered, then closes

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise RuntimeError("the bus is not connected: call connect() first")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("the bus is not connected: call connect() first")
        return self._js

    async def gates(self) -> KeyValue:
        """The budget gates' key-value bucket (after ``connect``), which the set-up step made."""
        return await bind_gates(self.nc)

    # ------------------------------------------------------------------ publishing

    async def publish(self, msg: Envelope) -> None:
        """Publish an event to the stream; the server drops a repeat of the same event_id."""
        subject = subjects.subject_of(msg)
        headers = {"Nats-Msg-Id": str(msg.event_id), "Kiln-Kind": msg.kind}
        with tracing.publishing(msg.kind, subject, **{"kiln.build_id": msg.build_id}):
            tracing.inject(headers)
            # nats-py's JetStream publish directly, not through FastStream's publisher: its
            # middlewares and headers add CPU to every publish (docs/BENCHMARKS.md, bus)
            await self.js.publish(
                subject,
                msg.model_dump_json().encode(),
                headers=headers,
                stream=subjects.STREAM,
                timeout=10,
            )
        metrics.PUBLISHED.labels(self.service, msg.kind).inc()

    async def publish_at(self, msg: Envelope, at_rfc3339: str, name: str) -> None:
        """Schedule ``msg`` to be delivered at a UTC time with a JetStream message schedule."""
        await self.js.publish(
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
            subjects.kind_filter(model.kind), name, Consumer(self, model, handler), max_workers
        )

    def consume_all(
        self, handler: Handler[Envelope], *, durable: str, max_workers: int = 1
    ) -> None:
        """Handle every message of every kind (e.g. the gateway's read-model projection)."""
        self._subscribe("kiln.build.>", durable, Consumer(self, None, handler), max_workers)

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
        self._subscribe(filters, durable, Consumer(self, None, handler), max_workers)

    def _subscribe(
        self, subject: str | list[str], durable: str, consumer: Consumer[Any], max_workers: int
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
        self.pullers[durable] = Puller(self, filters, config, max_workers, consumer)

    async def dead_letter(self, raw: Msg, reason: str) -> None:
        _, kind = split_subject(raw.subject)
        meta = raw.metadata
        await self.js.publish(
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
        metrics.DEAD_LETTER_CAUSES.labels(self.service, kind or "unknown", cause_of(reason)).inc()
        log.warning(
            "dead-lettered %s: %s",
            raw.subject,
            reason,
            extra={"service": self.service, "kind": kind},
        )
