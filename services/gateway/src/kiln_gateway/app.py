"""The gateway application: the FastAPI app, its lifespan and the read-model subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln_contracts import Envelope
from kiln_runtime.bus import Delivery
from kiln_runtime.retry import retry

from . import (
    builds,
    messages,
    projection,
    routes_accounts,
    routes_budget_admin,
    routes_builds,
    routes_dlq,
    routes_events,
    routes_fork,
    routes_messages,
    routes_ops,
    routes_preview,
    routes_projects,
    routes_snapshots,
    routes_webhooks,
)
from .bootstrap import Wiring, running
from .problems import install as install_problems
from .problems import problem
from .settings import GatewaySettings

log = logging.getLogger(__name__)

TRANSIENT_DB = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
)


def register_consumers(rt: Wiring) -> None:
    async def project(event: Envelope, delivery: Delivery) -> None:
        """Project every build event onto the gateway's builds read model."""
        # Retried here, in order, rather than redelivered behind later events of the build.
        await retry(
            lambda: projection.project(
                rt.store, event, delivery.stream_seq, delivery.num_delivered
            ),
            attempts=3,
            retry_on=TRANSIENT_DB,
            base=0.2,
            cap=2.0,
        )

    rt.bus.consume_all(project, durable=rt.settings.gateway_projection_durable, max_workers=1)


async def _republish_loop(rt: Wiring) -> None:
    """Builds and messages stored while the bus was unreachable are published as soon as it is
    back."""
    older_than = 0.0  # at start-up: everything left over
    while True:
        with contextlib.suppress(Exception):
            if n := await builds.republish_pending(rt.store, rt.publish, older_than):
                log.info("republished %d queued build(s)", n)
        with contextlib.suppress(Exception):
            if n := await messages.republish_pending_messages(rt.store, rt.publish, older_than):
                log.info("republished %d message(s)", n)
        older_than = rt.settings.republish_every_s
        await asyncio.sleep(rt.settings.republish_every_s)


class BodyLimit:
    """413 for a request body over ``max_bytes`` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = problem(413, f"request body larger than {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await problem(400, "invalid Content-Length")(scope, receive, send)
                return
            if declared > self.max_bytes:
                await too_big(scope, receive, send)
                return
        seen = 0
        answered = False

        async def limited() -> Message:
            nonlocal seen, answered
            message = await receive()
            if message["type"] == "http.request" and not answered:
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    answered = True
                    await too_big(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if not answered:
                await send(message)

        await self.app(scope, limited, guarded)


STATIC = Path(__file__).with_name("static")
DESCRIPTION = """Submit idea briefs, follow builds live, write to them, wake and cancel them.

Authenticate with `Authorization: Bearer <API key>` (or `X-API-Key`). Errors are RFC 9457
problem details (`application/problem+json`). Another user's build or project is a 404.
The web dashboard is at `/dashboard/`; the bus's AsyncAPI document at `/v1/asyncapi.json`.
"""


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with running(settings) as rt:
            register_consumers(rt)
            await rt.bus.start()
            republisher = asyncio.create_task(_republish_loop(rt))
            app.state.runtime = rt
            log.info("gateway ready")
            try:
                yield
            finally:
                app.state.runtime = None
                republisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await republisher

    app = FastAPI(
        title="Kiln gateway",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.runtime = None
    install_problems(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    for routes in (
        routes_builds,
        routes_events,
        routes_messages,
        routes_ops,
        routes_projects,
        routes_accounts,
        routes_budget_admin,
        routes_dlq,
        routes_snapshots,
        routes_webhooks,
        routes_fork,
        routes_preview,
    ):
        app.include_router(routes.router)
    app.mount("/dashboard", StaticFiles(directory=STATIC, html=True), name="dashboard")

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/dashboard/")

    return app
