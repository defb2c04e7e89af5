"""What the server answers on the wire: the REST API's errors, envd's Connect RPC errors and
stream envelopes (5 bytes: flags, length; flag 2 is the end of the stream), and which sandbox an
envd request is for."""

from __future__ import annotations

import json
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .box import Box, RpcError

_CONNECT_STATUS = {
    "canceled": 499, "unknown": 500, "invalid_argument": 400, "deadline_exceeded": 504,
    "not_found": 404, "already_exists": 409, "permission_denied": 403,
    "resource_exhausted": 429, "failed_precondition": 400, "aborted": 409, "unavailable": 503,
    "internal": 500, "unauthenticated": 401,
}  # fmt: skip

Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, message: str) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status)


def rpc_error(err: RpcError) -> web.Response:
    return web.json_response(
        {"code": err.code, "message": err.message}, status=_CONNECT_STATUS.get(err.code, 500)
    )


def unary(reply: Any) -> web.Response:
    return web.Response(body=reply.to_json(), content_type="application/json")


def unenveloped(raw: bytes) -> bytes:
    """The message in a streaming call's enveloped request."""
    if len(raw) < 5:
        raise RpcError("invalid_argument", "an enveloped request was expected")
    (size,) = struct.unpack(">I", raw[1:5])
    return raw[5 : 5 + size]


async def frame(resp: web.StreamResponse, message: Any) -> None:
    data = message.to_json().encode()
    await resp.write(struct.pack(">BI", 0, len(data)) + data)


async def end_frame(resp: web.StreamResponse, err: RpcError | None) -> None:
    body = {} if err is None else {"error": {"code": err.code, "message": err.message}}
    data = json.dumps(body).encode()
    await resp.write(struct.pack(">BI", 2, len(data)) + data)
    await resp.write_eof()


def for_envd(
    sandboxes: dict[str, Box], handler: Callable[[web.Request, Box], Awaitable[web.StreamResponse]]
) -> Route:
    """``handler`` for envd requests, given the running sandbox each is for (``envd_box``)."""

    async def route(request: web.Request) -> web.StreamResponse:
        box = envd_box(sandboxes, request)
        if isinstance(box, web.Response):
            return box
        return await handler(request, box)

    return route


def envd_box(sandboxes: dict[str, Box], request: web.Request) -> Box | web.Response:
    """The running sandbox an envd request is for (``E2b-Sandbox-Id``, ``X-Access-Token``), or
    E2B's answer when there is none: 502 "... was not found" (paused or gone), 401."""
    sandbox_id = request.headers.get("E2b-Sandbox-Id", "")
    box = sandboxes.get(sandbox_id)
    if box is None or box.state != "running":
        return web.json_response(
            {
                "code": 502,
                "message": f"The sandbox {sandbox_id} was not found",
                "sandboxId": sandbox_id,
            },
            status=502,
        )
    if request.headers.get("X-Access-Token") != box.token:
        return error(401, "invalid access token")
    return box
