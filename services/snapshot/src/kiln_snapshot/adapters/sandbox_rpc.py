"""The Sandbox port over core NATS request/reply (kiln.rpc.sandbox.*)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import nats.errors
from nats.aio.client import Client
from pydantic import BaseModel, ValidationError

from kiln_contracts import subjects
from kiln_contracts.rpc import ManifestReply, ManifestRequest, UploadReply, UploadRequest
from kiln_runtime.errors import RetryLater

R = TypeVar("R", bound=BaseModel)


class SandboxUnavailable(RetryLater):
    pass


class NatsSandbox:
    def __init__(
        self,
        nc: Callable[[], Client],
        *,
        manifest_timeout_s: float = 60.0,
        upload_timeout_s: float = 300.0,
        retry_delay_s: float = 5.0,
    ) -> None:
        self._nc = nc
        self.manifest_timeout_s = manifest_timeout_s
        self.upload_timeout_s = upload_timeout_s
        self.retry_delay_s = retry_delay_s

    async def _request(
        self, subject: str, request: BaseModel, reply_model: type[R], timeout: float
    ) -> R:
        try:
            msg = await self._nc().request(
                subject, request.model_dump_json().encode(), timeout=timeout
            )
        except nats.errors.NoRespondersError as err:
            raise SandboxUnavailable(
                f"no sandbox answers on {subject}", self.retry_delay_s
            ) from err
        except (nats.errors.TimeoutError, TimeoutError) as err:
            raise SandboxUnavailable(
                f"sandbox did not answer on {subject} within {timeout:g}s", self.retry_delay_s
            ) from err
        try:
            return reply_model.model_validate_json(msg.data)
        except ValidationError as err:
            raise RuntimeError(f"invalid {reply_model.__name__} on {subject}: {err}") from err

    async def manifest(self, request: ManifestRequest) -> ManifestReply:
        return await self._request(
            subjects.SANDBOX_MANIFEST, request, ManifestReply, self.manifest_timeout_s
        )

    async def upload(self, request: UploadRequest) -> UploadReply:
        return await self._request(
            subjects.SANDBOX_UPLOAD, request, UploadReply, self.upload_timeout_s
        )
