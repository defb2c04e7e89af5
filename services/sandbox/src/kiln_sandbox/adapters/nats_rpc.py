"""The restore-plan request to the snapshot service (core NATS request/reply)."""

from __future__ import annotations

import logging

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from kiln_contracts import ForkOrigin, RestorePlanReply, RestorePlanRequest, subjects

log = logging.getLogger(__name__)


class NatsRestorer:
    def __init__(self, nc: Client, *, timeout_s: float = 30.0) -> None:
        self.nc = nc
        self.timeout_s = timeout_s

    async def restore_plan(
        self, build_id: str, fork: ForkOrigin | None = None
    ) -> RestorePlanReply | None:
        request = RestorePlanRequest(build_id=build_id, fork=fork).model_dump_json().encode()
        try:
            reply = await self.nc.request(
                subjects.SNAPSHOT_RESTORE_PLAN, request, timeout=self.timeout_s
            )
        except (NoRespondersError, NatsTimeoutError, TimeoutError) as err:
            log.warning(
                "no restore plan for %s (%s)",
                build_id,
                type(err).__name__,
                extra={"build_id": build_id},
            )
            return None
        return RestorePlanReply.model_validate_json(reply.data)
