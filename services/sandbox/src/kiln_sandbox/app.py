"""The sandbox service's subscribers and RPC responders: validate, delegate, reply."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel, ValidationError

from kiln_contracts import (
    BuildCancelled,
    BuildFailed,
    ManifestReply,
    ManifestRequest,
    SnapshotSaved,
    ToolCall,
    UploadReply,
    UploadRequest,
    subjects,
)
from kiln_runtime.bus import Bus, Delivery

from .handlers import SandboxService

log = logging.getLogger(__name__)

SERVICE = "sandbox"
Req = TypeVar("Req", bound=BaseModel)
Rep = TypeVar("Rep", ManifestReply, UploadReply)


class SandboxApp:
    """Binds the bus to a ``SandboxService`` that exists once the service has started."""

    def __init__(self, bus: Bus, *, max_workers: int = 32) -> None:
        self.bus = bus
        self.service: SandboxService | None = None
        self._subs: list[Subscription] = []
        bus.consume(ToolCall, self.on_tool_call, max_workers=max_workers)
        bus.consume(SnapshotSaved, self.on_snapshot_saved, max_workers=8)
        bus.consume(BuildCancelled, self.on_build_ended, max_workers=8)
        bus.consume(BuildFailed, self.on_build_ended, max_workers=8)

    @property
    def svc(self) -> SandboxService:
        if self.service is None:
            raise RuntimeError("the sandbox service has not started")
        return self.service

    async def on_tool_call(self, call: ToolCall, delivery: Delivery) -> None:
        """Run a tool in the build's sandbox (at most once) and publish its ToolResult."""
        await self.svc.handle_tool_call(call)

    async def on_snapshot_saved(self, event: SnapshotSaved, delivery: Delivery) -> None:
        """Pause the sandbox after the sleep snapshot; stop it after the final one."""
        await self.svc.handle_snapshot_saved(event)

    async def on_build_ended(self, event: BuildCancelled | BuildFailed, delivery: Delivery) -> None:
        """Stop the sandbox of a cancelled or failed build."""
        await self.svc.handle_build_ended(event)

    # ------------------------------------------------------------------ request/reply

    async def start_rpc(self) -> None:
        nc = self.bus.nc
        self._subs = [
            await nc.subscribe(
                subjects.SANDBOX_MANIFEST,
                queue=SERVICE,
                cb=self._responder(ManifestRequest, ManifestReply, lambda r: self.svc.manifest(r)),
            ),
            await nc.subscribe(
                subjects.SANDBOX_UPLOAD,
                queue=SERVICE,
                cb=self._responder(UploadRequest, UploadReply, lambda r: self.svc.upload(r)),
            ),
        ]

    async def stop_rpc(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                log.debug("unsubscribe failed", exc_info=True)
        self._subs = []

    def _responder(
        self,
        request_model: type[Req],
        reply_model: type[Rep],
        handle: Callable[[Req], Awaitable[Rep]],
    ) -> Callable[[Msg], Awaitable[None]]:
        async def respond(msg: Msg) -> None:
            reply: BaseModel
            try:
                request = request_model.model_validate_json(msg.data)
            except ValidationError as err:
                reply = reply_model(ok=False, error=f"invalid {request_model.__name__}: {err}")
            else:
                try:
                    reply = await handle(request)
                except Exception as err:
                    log.exception("%s failed", msg.subject)
                    reply = reply_model(ok=False, error=f"{type(err).__name__}: {err}")
            if msg.reply:
                await msg.respond(reply.model_dump_json().encode())

        return respond
