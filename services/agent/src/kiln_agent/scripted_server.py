"""An Anthropic-compatible HTTP server for the scripted model (asyncio, standard library only).

``python -m kiln_agent.scripted_server --port 8765 [--host 127.0.0.1] [--latency-s 0.2]``

POST /v1/messages (non-streaming) answers with a Messages API response; GET /healthz answers ok.
HTTP/1.1 with keep-alive; each connection is its own task, so many clients can be served at once.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import scripted_api as api
from .scripted import ScriptedModel

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
        self.issued = api.Issued()  # thinking blocks sent with each tool call, to check them
        self.refused: list[api.ApiError] = []  # the requests the rules refused
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                arrived_at = time.time()
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                if length > MAX_BODY:
                    await _send(writer, 413, _error("request_too_large", "body too large"))
                    return
                body = await reader.readexactly(length) if length else b""
                status, payload, extra = await self._handle(
                    method, path.split("?")[0], body, arrived_at, headers
                )
                if status == 0:
                    return  # an injected hang-up
                await _send(writer, status, payload, extra)
                if headers.get("connection", "").lower() == "close":
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

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
        except api.ApiError as err:
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
            headers = {}
            if fault.retry_after is not None:
                headers["retry-after"] = fault.retry_after
            if fault.retry_after_ms is not None:
                headers["retry-after-ms"] = fault.retry_after_ms
            return fault.status, _error(kind, fault.message or f"injected {fault.status}"), headers
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
        content = api.with_thinking(request, checked, response["content"], str(response["id"]))
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
        data = [m.card() for m in api.CATALOGUE if m.lifecycle != "retired"]
        return 200, {"data": data, "first_id": data[0]["id"], "last_id": data[-1]["id"],
                     "has_more": False}, {}  # fmt: skip
    try:
        return 200, api.lookup(rest.strip("/"), for_messages=False).card(), {}
    except api.ApiError as err:
        return err.status, _error(err.kind, err.message), {}


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    529: "Overloaded",
}


async def _send(
    writer: asyncio.StreamWriter,
    status: int,
    payload: dict[str, Any],
    extra: dict[str, str] | None = None,
) -> None:
    data = json.dumps(payload).encode()
    headers = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        "Connection: keep-alive",
        f"request-id: req_scripted_{id(payload):x}",
    ]
    headers += [f"{k}: {v}" for k, v in (extra or {}).items()]
    writer.write(("\r\n".join(headers) + "\r\n\r\n").encode() + data)
    await writer.drain()


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
