"""FastAPI dependencies shared by the routes: the runtime, the caller, the caller's build."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from . import builds
from .bootstrap import Wiring
from .model import Build, Caller

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False)


def runtime(request: Request) -> Wiring:
    rt: Wiring | None = request.app.state.runtime
    if rt is None:
        raise HTTPException(503, "the gateway is starting or stopping; retry")
    return rt


Rt = Annotated[Wiring, Depends(runtime)]


def presented_key(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key)],
) -> str | None:
    return bearer.credentials if bearer else api_key


Key = Annotated[str | None, Depends(presented_key)]

IdempotencyKey = Annotated[str | None, Header(max_length=200)]
"""The ``Idempotency-Key`` header of a request that is safe to retry with it."""


def unauthorized(key: str | None) -> HTTPException:
    return HTTPException(
        401,
        "missing or unknown API key" if key else "missing API key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def require_admin(rt: Wiring, key: str | None) -> None:
    """Raise 401 unless ``key`` is the gateway's admin key (and one is configured).

    Called first in each admin route's body, after FastAPI has validated the request."""
    expected = rt.settings.admin_api_key
    if not expected:
        raise HTTPException(
            401, "the admin API is disabled (set KILN_ADMIN_API_KEY on the gateway)"
        )
    if not key or not hmac.compare_digest(key.encode(), expected.encode()):
        raise HTTPException(401, "admin key required", headers={"WWW-Authenticate": "Bearer"})


async def caller(rt: Rt, key: Key) -> Caller:
    who = await builds.authenticate(rt.store, key)
    if who is None:
        raise unauthorized(key)
    return who


Me = Annotated[Caller, Depends(caller)]


def not_found() -> HTTPException:
    return HTTPException(404, "build not found")


async def build_of(rt: Wiring, me: Caller, build_id: str) -> Build:
    """The caller's build; another user's build does not exist for them (404, never 403)."""
    build = await rt.store.get(build_id) if len(build_id) <= 64 else None
    if build is None or build.user_id != me.user_id:
        raise not_found()
    return build


async def owned_build(build_id: str, rt: Rt, me: Me) -> Build:
    return await build_of(rt, me, build_id)


Owned = Annotated[Build, Depends(owned_build)]
