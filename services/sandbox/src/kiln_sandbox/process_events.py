"""The events of background processes that the gateway projects: ``PreviewAvailable`` and
``PreviewGone`` (a process's listening ports as they change), ``ProcessExited``.

Previews: whenever the service looks at a live process (every tool call of the build looks at
the others; ``bash_output`` at its own) it records the TCP ports the process's session listens
on; a port newly seen is a ``PreviewAvailable`` (its URL from the provider: E2B's host for the
port, or the gateway's proxy path locally), a port no longer seen, or the process's end, a
``PreviewGone``. Each is published before the record is updated, with an id stable per process,
port and the event that saw the change: a redelivered message republishes the same ids, and a
crash in between publishes the change again (the gateway's projection takes it once).
"""

from __future__ import annotations

import logging

from kiln_contracts import Envelope, PreviewAvailable, PreviewGone, ProcessExited, stable_id

from .ports import Publisher
from .records import ProcessRecord
from .workspace import Workspace

log = logging.getLogger(__name__)


class ProcessEvents:
    """Publishes what becomes of a build's background processes, with stable ids."""

    def __init__(self, bus: Publisher) -> None:
        self.bus = bus

    async def ports_changed(
        self, ws: Workspace, event: Envelope, record: ProcessRecord, ports: tuple[int, ...]
    ) -> None:
        """Publish the previews a change of ``record``'s listening ports makes and ends."""
        for port in sorted(set(record.ports) - set(ports)):
            await self.gone(event, record, port, "no longer listening")
        for port in sorted(set(ports) - set(record.ports)):
            try:
                target = ws.machine.preview(port)
            except Exception as err:  # a provider that cannot say: no preview, the rest goes on
                log.warning("no preview for port %s: %s", port, err,
                            extra={"build_id": event.build_id})  # fmt: skip
                continue
            url = target.url or f"/v1/builds/{event.build_id}/preview/{port}/"
            await self.bus.publish(
                event.caused(
                    PreviewAvailable,
                    process_id=record.process_id,
                    port=port,
                    provider=target.provider,
                    sandbox_id=record.sandbox_id,
                    url=url,
                    traffic_access_token=target.traffic_access_token,
                ).with_id(
                    stable_id(
                        event.build_id,
                        "preview_available",
                        record.process_id,
                        str(port),
                        str(event.event_id),
                    )
                )
            )
            log.info("preview of %s on port %s: %s", record.process_id, port, url,
                     extra={"build_id": event.build_id})  # fmt: skip

    async def gone(self, event: Envelope, record: ProcessRecord, port: int, reason: str) -> None:
        await self.bus.publish(
            event.caused(
                PreviewGone, process_id=record.process_id, port=port, reason=reason
            ).with_id(
                stable_id(
                    event.build_id,
                    "preview_gone",
                    record.process_id,
                    str(port),
                    str(event.event_id),
                )
            )
        )

    async def exited(self, event: Envelope, record: ProcessRecord) -> None:
        for port in record.ports:
            await self.gone(event, record, port, f"its process {record.status}")
        await self.bus.publish(
            event.caused(
                ProcessExited,
                process_id=record.process_id,
                how=record.status if record.status != "starting" else "lost",
                exit_code=record.exit_code,
                reason=record.reason,
            ).with_id(stable_id(event.build_id, "process_exited", record.process_id))
        )
