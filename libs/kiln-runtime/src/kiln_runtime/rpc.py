"""The one request/reply responder on core NATS (``kiln.rpc.*``): not persisted, a reply for every
request.

A ``Responder`` subscribes to one subject in a queue group, validates each request as its
``contracts`` model, calls the handler and answers with the reply model. An invalid request and a
handler's exception come back as ``reply_model(ok=False, error=...)``, so a caller never waits out
its timeout for a request the service did receive. Every reply model has ``ok`` and ``error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel, ValidationError

log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=BaseModel)
Rep = TypeVar("Rep", bound=BaseModel)


class Responder(Generic[Req, Rep]):
    """Answers ``request_model`` on ``subject`` (queue group ``queue``) with ``handle``.

    ``failure`` prefixes the error of a failed handler (``"<failure> failed: <Type>: <message>"``;
    empty: ``"<Type>: <message>"``). ``concurrent``: each request in its own task (else one at a
    time, in the order nats-py delivers them).
    """

    def __init__(
        self,
        subject: str,
        queue: str,
        request_model: type[Req],
        reply_model: type[Rep],
        handle: Callable[[Req], Awaitable[Rep]],
        *,
        failure: str = "",
        concurrent: bool = True,
    ) -> None:
        self.subject = subject
        self.queue = queue
        self.request_model = request_model
        self.reply_model = reply_model
        self.handle = handle
        self.failure = failure
        self.concurrent = concurrent
        self._sub: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def answer(self, data: bytes) -> Rep:
        """The reply to one request's bytes; never raises for a bad request or a failed handler."""
        try:
            request = self.request_model.model_validate_json(data)
        except ValidationError as err:
            return self.reply_model(ok=False, error=f"invalid {self.request_model.__name__}: {err}")
        try:
            return await self.handle(request)
        except Exception as err:
            build_id = getattr(request, "build_id", None)
            who = build_id or getattr(request, "user_id", None)
            log.exception("%s failed for %s", self.subject, who, extra={"build_id": build_id})
            error = f"{type(err).__name__}: {err}"
            return self.reply_model(
                ok=False, error=f"{self.failure} failed: {error}" if self.failure else error
            )

    async def _respond(self, msg: Msg) -> None:
        reply = await self.answer(msg.data)
        if msg.reply:
            await msg.respond(reply.model_dump_json().encode())

    async def _on_request(self, msg: Msg) -> None:
        if not self.concurrent:
            await self._respond(msg)
            return
        task = asyncio.create_task(self._respond(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self, nc: Client) -> None:
        self._sub = await nc.subscribe(self.subject, queue=self.queue, cb=self._on_request)

    async def stop(self) -> None:
        """Stop taking requests (those under way finish on their own)."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
