"""The sandbox service's subscribers and RPC responders: validate, delegate, reply."""

from __future__ import annotations

import logging

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
from kiln_runtime.rpc import Responder

from .handlers import SandboxService

log = logging.getLogger(__name__)

SERVICE = "sandbox"


class SandboxApp:
    """Binds the bus to a ``SandboxService`` that exists once the service has started."""

    def __init__(self, bus: Bus, *, max_workers: int = 32) -> None:
        self.bus = bus
        self.service: SandboxService | None = None
        # One request at a time per subject, in the order nats-py delivers them.
        self.responders: tuple[
            Responder[ManifestRequest, ManifestReply], Responder[UploadRequest, UploadReply]
        ] = (
            Responder(
                subjects.SANDBOX_MANIFEST,
                SERVICE,
                ManifestRequest,
                ManifestReply,
                lambda r: self.svc.manifest(r),
                concurrent=False,
            ),
            Responder(
                subjects.SANDBOX_UPLOAD,
                SERVICE,
                UploadRequest,
                UploadReply,
                lambda r: self.svc.upload(r),
                concurrent=False,
            ),
        )
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
        for responder in self.responders:
            await responder.start(self.bus.nc)

    async def stop_rpc(self) -> None:
        for responder in self.responders:
            await responder.stop()
