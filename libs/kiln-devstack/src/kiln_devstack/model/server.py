"""An Anthropic-compatible HTTP server for the scripted model (aiohttp).

``python -m kiln_devstack.model.server --port 8765 [--host 127.0.0.1] [--latency-s 0.2]``

POST /v1/messages (non-streaming) answers with a Messages API response under the rules of
``rules.py``; GET /v1/models[/{id}] serves the model catalogue; GET /healthz answers ok.
Any path prefix before /v1/messages is accepted and recorded (``ANTHROPIC_BASE_URL=<url>/replica-a``
tells the tests which client called).

For tests: ``faults`` (statuses, retry-after, delays that outlast the client's timeout) are served
before the script, ``canned`` replies (e.g. max_tokens, refusal) next, then ``responder`` (the
scripted model by default); ``on_request`` may hold or observe a call; ``record`` keeps every
request with its raw body and the usage reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import catalogue, thinking
from . import rules as api
from .script import ScriptedModel

log = logging.getLogger(__name__)

MAX_BODY = 32 * 1024 * 1024
MESSAGES = "/v1/messages"
MODELS = "/v1/models"


@dataclass
class Fault:
    """One injected failure: ``status`` with optional retry-after headers, after ``delay_s``
    (a delay longer than the client's timeout is a timeout; status 0 then answers nothing)."""

    status: int = 0
    retry_after: str | None = None
    retry_after_ms: str | None = None
    delay_s: float = 0.0
    message: str = ""


@dataclass
class Recorded:
    """A request the server answered from the script (faults are not recorded)."""

    prefix: str
    body: bytes
    request: dict[str, Any]
    response: dict[str, Any] = field(default_factory=dict)
    arrived_at: float = 0.0  # time.time() when its request line was read

    @property
    def usage(self) -> dict[str, int]:
        return dict(self.response.get("usage") or {})


Responder = Callable[[dict[str, Any]], dict[str, Any]]


class ScriptedServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency_s: float = 0.0) -> None:
        self.host = host
        self.port = port
        self.latency_s = latency_s
        self.model = ScriptedModel()
        self.responder: Responder = self.model.respond
        self.requests = 0
        # For tests: faults first (an int is that status with retry-after: 0), then canned
        # replies (content, stop_reason), then the responder.
        self.faults: list[int | Fault] = []
        self.canned: list[tuple[list[dict[str, Any]], str]] = []
        self.on_request: Callable[[Recorded], Awaitable[None]] | None = None
        self.record = False
        self.recorded: list[Recorded] = []
        self.attempts = 0
        self.connections = 0  # accepted so far
        self.issued = thinking.Issued()  # thinking blocks sent with each tool call, to check them
        self.refused: list[catalogue.ApiError] = []  # the requests the rules refused
        # the context window of every model here, in input tokens (None: each model's own
        # max_input_tokens); a longer prompt is refused as the API refuses it
        self.window: int | None = None
        self._runner: web.AppRunner | None = None
        self._transports: weakref.WeakSet[Any] = weakref.WeakSet()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._serve)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._runner.cleanup(), 2)

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        arrived_at = time.time()
        transport = request.transport
        if transport is not None and transport not in self._transports:
            self._transports.add(transport)
            self.connections += 1
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        status, payload, extra = await self._handle(
            request.method, request.path, body, arrived_at, headers
        )
        if status == 0:  # an injected hang-up: the connection closes without an answer
            if transport is not None:
                transport.close()
            raise ConnectionResetError("injected hang-up")
        return web.json_response(
            payload,
            status=status,
            headers={"request-id": f"req_scripted_{id(payload):x}", **extra},
        )

    async def _handle(
        self,
        method: str,
        path: str,
        body: bytes,
        arrived_at: float = 0.0,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        if method == "GET" and path in ("/healthz", "/"):
            return 200, {"status": "ok", "requests": self.requests}, {}
        if method == "GET" and MODELS in path:
            return _models(path[path.index(MODELS) + len(MODELS) :])
        if not path.endswith(MESSAGES):
            return 404, _error("not_found_error", f"no route {method} {path}"), {}
        if method != "POST":
            return 405, _error("invalid_request_error", "use POST"), {}
        try:
            request = json.loads(body)
            if not isinstance(request.get("messages"), list) or not request.get("max_tokens"):
                raise ValueError("messages and max_tokens are required")
        except ValueError as err:
            return 400, _error("invalid_request_error", str(err)), {}
        if request.get("stream"):
            return 400, _error("invalid_request_error", "streaming is not supported"), {}
        betas = {b.strip() for b in (headers or {}).get("anthropic-beta", "").split(",") if b}
        try:
            checked = api.check(request, betas, self.issued)
            api.check_length(checked.tokens, self.window or checked.info.max_input_tokens)
        except catalogue.ApiError as err:
            self.refused.append(err)
            return err.status, _error(err.kind, err.message), {}
        self.attempts += 1
        if self.faults:
            fault = self.faults.pop(0)
            if isinstance(fault, int):
                fault = Fault(fault, retry_after="0" if fault in (429, 529) else None)
            if fault.delay_s:
                await asyncio.sleep(fault.delay_s)
            kind = {
                400: "invalid_request_error",
                429: "rate_limit_error",
                529: "overloaded_error",
            }.get(fault.status, "api_error")
            advice = {}
            if fault.retry_after is not None:
                advice["retry-after"] = fault.retry_after
            if fault.retry_after_ms is not None:
                advice["retry-after-ms"] = fault.retry_after_ms
            return fault.status, _error(kind, fault.message or f"injected {fault.status}"), advice
        self.requests += 1
        seen = Recorded(path[: -len(MESSAGES)], body, request, arrived_at=arrived_at)
        if self.record:
            self.recorded.append(seen)
        if self.on_request is not None:
            await self.on_request(seen)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.canned:
            content, stop = self.canned.pop(0)
            response = self.model.reply(request, content, stop)
        else:
            response = self.responder(request)
        seen.response = self._as_served(request, checked, response)
        return 200, seen.response, {}

    def _as_served(
        self, request: dict[str, Any], checked: api.Checked, response: dict[str, Any]
    ) -> dict[str, Any]:
        """The script's answer as the API sends it: the served model's id (an alias answered
        with its dated snapshot), thinking blocks, cache writes split by TTL."""
        content = thinking.with_thinking(checked, response["content"], str(response["id"]))
        self.issued.remember(content, response["stop_reason"])
        usage = dict(response["usage"])
        if checked.thinking:
            usage["output_tokens"] += 40 * sum(1 for b in content if b["type"] != "tool_use")
        usage["cache_creation"] = {
            "ephemeral_5m_input_tokens": usage.get("cache_creation_input_tokens", 0),
            "ephemeral_1h_input_tokens": 0,
        }
        served = {**response, "model": checked.info.id, "content": content, "usage": usage}
        if checked.dropped:
            served["input_transformations"] = checked.dropped
        return served


def _error(kind: str, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": f"req_scripted_{abs(hash(message)):x}",
    }


def _models(rest: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """GET /v1/models (the catalogue, newest first) or /v1/models/{id or alias}."""
    if rest in ("", "/"):
        data = [m.card() for m in catalogue.CATALOGUE if m.lifecycle != "retired"]
        return 200, {"data": data, "first_id": data[0]["id"], "last_id": data[-1]["id"],
                     "has_more": False}, {}  # fmt: skip
    try:
        return 200, catalogue.lookup(rest.strip("/"), for_messages=False).card(), {}
    except catalogue.ApiError as err:
        return err.status, _error(err.kind, err.message), {}


async def serve(host: str, port: int, latency_s: float) -> None:
    server = ScriptedServer(host, port, latency_s)
    await server.start()
    log.info("scripted model listening on %s", server.url)
    print(f"scripted model listening on {server.url}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="An Anthropic-compatible scripted model server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency-s", type=float, default=0.0, help="Delay before each reply.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.latency_s))


if __name__ == "__main__":
    main()
