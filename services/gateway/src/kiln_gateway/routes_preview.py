"""The local provider's previews: ``/v1/builds/{id}/preview/{port}/…`` proxied, HTTP and
WebSocket, to that port of the build's sandbox (the host's loopback) and nothing else.

Who: the build's owner, by API key (``X-API-Key`` or ``Authorization: Bearer``), or by a
preview token (``POST /v1/builds/{id}/preview/token``, short-lived, good for that build's
previews only) carried in the path, ``/v1/builds/{id}/preview/t/<token>/{port}/…``, so that a
frame's relative links and its WebSocket keep it without cookies or headers. What may be
reached is decided by ``previews.target``. What the app gets: the request without the caller's
credentials (API key, cookies, the token's path segment); what the browser gets: the app's
answer without cookies, with redirects kept under the preview's prefix, and under a
``Content-Security-Policy: sandbox`` that gives the page an origin of its own, so that the app's
scripts cannot read the dashboard's storage or call the API as the user.
"""

from __future__ import annotations

import asyncio
import html
import logging
from collections.abc import AsyncIterator
from typing import Annotated

import aiohttp
from fastapi import APIRouter, HTTPException, Path, Request, WebSocket
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.websockets import WebSocketDisconnect
from yarl import URL

from . import accounts, builds, previews
from .bootstrap import Wiring
from .deps import Key, Me, Owned, Rt, build_of, unauthorized
from .model import Build
from .problems import responses
from .schemas_builds import PreviewToken

log = logging.getLogger(__name__)

router = APIRouter()

Port = Annotated[int, Path(ge=1, le=65535)]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
NOT_TO_APP = HOP | {"authorization", "x-api-key", "cookie", "origin", "referer"}
NOT_TO_BROWSER = HOP | {"set-cookie", "content-security-policy"}
SANDBOX_CSP = "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0


def _scope(build_id: str) -> str:
    return f"preview:{build_id}"


@router.post(
    "/v1/builds/{build_id}/preview/token",
    response_model=PreviewToken,
    tags=["builds"],
    responses=responses(401, 404),
)
async def preview_token(build: Owned, rt: Rt, me: Me) -> PreviewToken:
    """A short-lived token for this build's previews (for a frame, which cannot send headers)."""
    token, expires = accounts.stream_token(
        rt.token_secret, me, _scope(build.build_id), rt.settings.preview_token_ttl_s
    )
    return PreviewToken(
        token=token,
        expires_at=expires,
        url_prefix=f"/v1/builds/{build.build_id}/preview/t/{token}/",
    )


async def _owner(rt: Wiring, build_id: str, key: str | None, token: str | None) -> Build:
    me = await builds.authenticate(rt.store, key) if key else None
    if me is None and token:
        me = accounts.check_stream_token(rt.token_secret, token, _scope(build_id))
    if me is None:
        raise unauthorized(key)
    return await build_of(rt, me, build_id)


async def _target(rt: Wiring, build: Build, port: int) -> tuple[str, int]:
    refused = frozenset({rt.settings.gateway_port, *rt.settings.refused_ports()})
    holder = await rt.store.preview_holder(port)
    host, port = previews.target(build, port, holder, refused)
    shown = next(p for p in previews.previews_of(build) if p.port == port)
    session = previews.process_pid(build, shown.process_id)
    if session is None or not await asyncio.to_thread(previews.held_by, port, session):
        raise previews.Unreachable(
            404, "No preview", f"no process of this build listens on port {port} now"
        )
    return host, port


def _page(err: previews.Unreachable) -> HTMLResponse:
    title, detail = html.escape(err.title), html.escape(err.detail)
    body = (
        f"<!doctype html><meta charset=utf-8><title>{title}</title>"
        "<body style='font:16px system-ui;margin:2em;color:#333'>"
        f"<h1 style='font-size:1.3em'>{title}</h1><p>{detail}</p>"
    )
    headers = {"Cache-Control": "no-store", "X-Kiln-Preview": "unavailable"}
    if err.status == 503:
        headers["Retry-After"] = "30"
    return HTMLResponse(body, status_code=err.status, headers=headers)


def _upstream(host: str, port: int, path: str, query: str, scheme: str = "http") -> URL:
    if any(c in path for c in "\r\n\x00"):
        raise HTTPException(400, "bad path")
    # The host and port are fixed here; the path is only ever a path (``//x`` stays one).
    return URL.build(
        scheme=scheme, host=host, port=port, path="/" + path.lstrip("/"), query_string=query
    )


def _location(value: str, prefix: str, port: int) -> str:
    """A redirect's target kept under the preview's prefix when it points at the app itself."""
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
        if value.startswith(origin + "/") or value == origin:
            value = value[len(origin) :] or "/"
    if value.startswith("/") and not value.startswith("//"):
        return prefix + value[1:]
    return value


async def _proxy(
    request: Request, rt: Wiring, build_id: str, port: int, path: str, key: str | None,
    token: str | None, prefix: str,
) -> Response:  # fmt: skip
    build = await _owner(rt, build_id, key, token)
    try:
        host, port = await _target(rt, build, port)
    except previews.Unreachable as err:
        return _page(err)
    url = _upstream(host, port, path, request.url.query)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in NOT_TO_APP}
    headers["Host"] = f"127.0.0.1:{port}"
    headers["X-Forwarded-Prefix"] = prefix.rstrip("/")
    session = aiohttp.ClientSession(
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S
        ),
    )
    try:
        upstream = await session.request(
            request.method,
            url,
            headers=headers,
            data=request.stream() if request.method not in ("GET", "HEAD") else None,
            allow_redirects=False,
        )
    except (aiohttp.ClientError, TimeoutError) as err:
        await session.close()
        return _page(
            previews.Unreachable(
                502,
                "The app is not answering",
                f"Nothing answered on port {port} ({type(err).__name__}); it may be starting "
                "or have stopped.",
            )
        )
    out = {k: v for k, v in upstream.headers.items() if k.lower() not in NOT_TO_BROWSER}
    if "Location" in out:
        out["Location"] = _location(out["Location"], prefix, port)
    out["Content-Security-Policy"] = SANDBOX_CSP
    out["X-Kiln-Preview"] = str(port)

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.content.iter_any():
                yield chunk
        finally:
            upstream.release()
            await session.close()

    return StreamingResponse(body(), status_code=upstream.status, headers=out)


@router.api_route(
    "/v1/builds/{build_id}/preview/t/{token}/{port}/{path:path}",
    methods=METHODS,
    tags=["builds"],
    include_in_schema=False,
)
async def preview_with_token(
    request: Request, build_id: str, token: str, port: Port, path: str, rt: Rt
) -> Response:
    prefix = f"/v1/builds/{build_id}/preview/t/{token}/{port}/"
    return await _proxy(request, rt, build_id, port, path, None, token, prefix)


async def preview(
    request: Request, build_id: str, port: Port, path: str, rt: Rt, key: Key
) -> Response:
    """The build's app on ``port`` (local provider), proxied; with the API key, or a preview
    token in the path (``/v1/builds/{id}/preview/t/<token>/{port}/…``). A port without a
    preview, or a build asleep or ended, answers with a page that says so (404, 410, 503)."""
    prefix = f"/v1/builds/{build_id}/preview/{port}/"
    return await _proxy(request, rt, build_id, port, path, key, None, prefix)


for _method in METHODS:  # one route per method: each its own operation in the OpenAPI document
    router.add_api_route(
        "/v1/builds/{build_id}/preview/{port}/{path:path}",
        preview,
        methods=[_method],
        operation_id=f"preview_{_method.lower()}",
        tags=["builds"],
        responses=responses(401, 404),
    )


# ---------------------------------------------------------------------------- WebSocket


@router.websocket("/v1/builds/{build_id}/preview/t/{token}/{port}/{path:path}")
async def preview_socket(
    websocket: WebSocket, build_id: str, token: str, port: int, path: str
) -> None:
    """A WebSocket to the app (a dev server's hot reload), for the token's owner only."""
    rt: Wiring | None = websocket.app.state.runtime
    if rt is None or not 1 <= port <= 65535:
        await websocket.close(code=1013 if rt is None else 1008)
        return
    try:
        build = await _owner(rt, build_id, None, token)
        host, port = await _target(rt, build, port)
    except (HTTPException, previews.Unreachable) as err:
        await websocket.close(code=1008, reason=str(getattr(err, "detail", err))[:120])
        return
    url = _upstream(host, port, path, websocket.url.query, scheme="ws")
    protocols = [
        p.strip()
        for p in websocket.headers.get("sec-websocket-protocol", "").split(",")
        if p.strip()
    ]
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
    ) as session:
        try:
            upstream = await session.ws_connect(
                url, protocols=protocols, headers={"Host": f"127.0.0.1:{port}"}, autoping=True
            )
        except (aiohttp.ClientError, TimeoutError):
            await websocket.close(code=1011, reason="the app is not answering")
            return
        await websocket.accept(subprotocol=upstream.protocol)

        async def to_app() -> None:
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                if msg.get("text") is not None:
                    await upstream.send_str(msg["text"])
                elif msg.get("bytes") is not None:
                    await upstream.send_bytes(msg["bytes"])

        async def to_browser() -> None:
            async for msg in upstream:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await websocket.send_text(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await websocket.send_bytes(msg.data)
                else:
                    return

        tasks = [asyncio.create_task(to_app()), asyncio.create_task(to_browser())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except WebSocketDisconnect:
            pass
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await upstream.close()
            try:
                await websocket.close()
            except RuntimeError:
                pass  # already closed by the browser
