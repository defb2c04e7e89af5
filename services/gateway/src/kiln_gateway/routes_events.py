"""A build's events over SSE (``GET /v1/builds/{id}/events``, resumable by stream sequence) and
the short-lived token a browser's EventSource authenticates it with."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query
from fastapi.responses import StreamingResponse

from . import accounts, builds, history
from .deps import Key, Me, Owned, Rt, build_of, unauthorized
from .problems import responses
from .schemas_builds import StreamToken

router = APIRouter()


def _after(last_event_id: str | None) -> int:
    if last_event_id is None or not last_event_id.strip():
        return 0
    try:
        after = int(last_event_id)
    except ValueError:
        raise HTTPException(400, "Last-Event-ID must be an integer stream sequence") from None
    if after < 0:
        raise HTTPException(400, "Last-Event-ID must not be negative")
    return after


@router.get(
    "/v1/builds/{build_id}/events",
    response_class=StreamingResponse,
    tags=["builds"],
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
        **responses(400, 401, 404),
    },
)
async def build_events(
    build_id: str,
    rt: Rt,
    key: Key,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
    token: Annotated[
        str | None,
        Query(
            max_length=1000,
            description="A stream token (POST .../events/token) instead of the API key, for "
            "browsers' EventSource, which cannot send headers.",
        ),
    ] = None,
    last_event_id_q: Annotated[
        str | None,
        Query(
            alias="last_event_id",
            max_length=40,
            description="Resume after this stream sequence (if no Last-Event-ID header).",
        ),
    ] = None,
) -> StreamingResponse:
    """The build's events as Server-Sent Events: its history, then live, until it ends.

    Each event's ``id`` is its stream sequence; reconnect with ``Last-Event-ID`` to resume. A
    ``: heartbeat`` comment is sent while nothing happens.
    """
    me = await builds.authenticate(rt.store, key) if key else None
    if me is None and token:
        me = accounts.check_stream_token(rt.token_secret, token, build_id)
    if me is None:
        raise unauthorized(key)
    build = await build_of(rt, me, build_id)
    after = _after(last_event_id if last_event_id is not None else last_event_id_q)
    stream = history.event_stream(rt.events, build, after, rt.settings.sse_heartbeat_s)
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/v1/builds/{build_id}/events/token",
    response_model=StreamToken,
    tags=["builds"],
    responses=responses(401, 404),
)
async def stream_token(build: Owned, rt: Rt, me: Me) -> StreamToken:
    """A short-lived token for this build's event stream (for a browser's EventSource)."""
    token, expires = accounts.stream_token(
        rt.token_secret, me, build.build_id, rt.settings.stream_token_ttl_s
    )
    return StreamToken(
        token=token, expires_at=expires, events_url=f"/v1/builds/{build.build_id}/events"
    )
