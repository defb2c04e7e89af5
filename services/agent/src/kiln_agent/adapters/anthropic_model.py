"""The model: one Anthropic Messages call per think, retried with jittered backoff on 408 / 409 /
429 / 5xx / 529 / timeouts / connection errors (retry-after honoured), then ModelError; a request
too long for the context window raises ContextWindowExceeded (the loop compacts or fails)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anthropic
import pydantic_core

from kiln_contracts import CacheCreation, Usage
from kiln_runtime.retry import retry

from ..checkpoint import Verbatim
from ..ports import ContextWindowExceeded, ModelError, ModelReply, ModelRequest

log = logging.getLogger(__name__)

RETRYABLE = (
    anthropic.RateLimitError,  # 429
    anthropic.InternalServerError,  # 5xx, 529 overloaded
    anthropic.APIConnectionError,  # includes APITimeoutError
    anthropic.ConflictError,  # 409
)
TOO_LONG = ("prompt is too long", "context window", "context_window", "too many tokens")


class ModelUnavailable(Exception):
    """A configured model the Models API does not offer (unknown or retired)."""


class _RequestTimeout(Exception):
    """A 408 from the server, retried like a timeout."""


def _too_long(err: anthropic.APIStatusError) -> bool:
    return err.status_code in (400, 413) and any(s in err.message.lower() for s in TOO_LONG)


def retry_after(err: BaseException, attempt: int) -> float | None:
    """The server's advice (retry-after-ms / retry-after seconds), capped at 60 s."""
    response = getattr(err, "response", None) or getattr(err.__cause__, "response", None)
    if response is None:
        return None
    headers = response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return min(60.0, max(0.0, float(value) * scale))
            except ValueError:
                continue
    return None


MESSAGES_PATH = "/v1/messages"
POOL_CONNECTIONS = 16  # connections per client (see ``connect``)
# An idle connection is kept this long (the SDK's default is 5 s): a build's next call comes after
# its tools have run, often later than that, and each new connection costs a TLS handshake. Under
# the 60 s after which load balancers commonly close idle connections.
KEEPALIVE_S = 30.0


class AnthropicModel:
    def __init__(
        self,
        client: anthropic.AsyncAnthropic | Sequence[anthropic.AsyncAnthropic],
        *,
        attempts: int = 6,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 30.0,
    ) -> None:
        self.clients = [client] if isinstance(client, anthropic.AsyncAnthropic) else list(client)
        if not self.clients:
            raise ValueError("AnthropicModel needs at least one client")
        self._busy = [0] * len(self.clients)  # calls in flight per client
        self.attempts = attempts
        self.base = backoff_base_s
        self.cap = backoff_cap_s

    @classmethod
    def connect(
        cls,
        *,
        base_url: str | None,
        api_key: str,
        timeout_s: float,
        connections: int = 100,
        keepalive_s: float = KEEPALIVE_S,
        **kwargs: Any,
    ) -> AnthropicModel:
        """``connections``: the most calls in flight at once, each on a connection kept open for
        the next. They are spread over clients of ``POOL_CONNECTIONS`` each (a call goes to the
        least busy): the HTTP pool looks at every idle connection of its own on each request and
        response, so one pool of hundreds cost more CPU per call the more builds there were; and
        the SDK's default pool keeps only 100 alive, so above that every call opened and closed
        a connection of its own. The SDK's aiohttp transport carries the calls: it spends less
        CPU per call than the default httpx one (figures: docs/BENCHMARKS.md, model client)."""
        per = min(POOL_CONNECTIONS, max(1, connections))
        limits = type(anthropic.DEFAULT_CONNECTION_LIMITS)(
            max_connections=per, max_keepalive_connections=per, keepalive_expiry=keepalive_s
        )
        clients = [
            anthropic.AsyncAnthropic(
                api_key=api_key,
                base_url=base_url,
                max_retries=0,
                timeout=timeout_s,
                http_client=anthropic.DefaultAioHttpClient(limits=limits, timeout=timeout_s),
            )
            for _ in range(-(-max(1, connections) // per))
        ]
        return cls(clients, **kwargs)

    async def complete(self, request: ModelRequest) -> ModelReply:
        i = min(range(len(self.clients)), key=self._busy.__getitem__)
        client = self.clients[i]

        # The request is sent as bytes through the SDK's own POST (its auth headers, retries'
        # bookkeeping, errors): given as arguments of ``messages.create`` instead, the SDK walks
        # and copies the whole conversation and encodes it again on every call. The reply comes
        # back as bytes too: its content blocks are kept as the JSON they are, not built into
        # the SDK's models and dumped back to the same dicts (figures: docs/BENCHMARKS.md).
        body = request_body(request)
        options: Any = (
            {"headers": {"anthropic-beta": ",".join(request.betas)}} if request.betas else {}
        )

        async def call() -> bytes:
            try:
                return await client.post(
                    MESSAGES_PATH, cast_to=bytes, content=body, options=options
                )
            except anthropic.APIStatusError as err:
                if err.status_code == 408:
                    raise _RequestTimeout(err.message) from err
                raise

        self._busy[i] += 1
        try:
            raw = await retry(
                call,
                attempts=self.attempts,
                retry_on=(*RETRYABLE, _RequestTimeout),
                base=self.base,
                cap=self.cap,
                delay_for=retry_after,
            )
        except _RequestTimeout as err:
            raise ModelError(f"HTTP 408: {err}"[:2000]) from err
        except anthropic.APIStatusError as err:
            if _too_long(err):
                raise ContextWindowExceeded(
                    f"HTTP {err.status_code}: {err.message}"[:2000]
                ) from err
            raise ModelError(f"HTTP {err.status_code}: {err.message}"[:2000]) from err
        except anthropic.APIError as err:
            raise ModelError(f"{type(err).__name__}: {err}"[:2000]) from err
        finally:
            self._busy[i] -= 1
        return _reply(raw, request.model)

    async def check_models(self, models: dict[str, str]) -> dict[str, str]:
        """Ask the Models API for each configured model (``{model: where it is configured}``):
        {model: the id it resolves to}. A model the API does not know, or reports retired, is a
        ModelUnavailable naming it and where it is configured; a deprecated one is logged."""
        client = self.clients[0]
        resolved: dict[str, str] = {}
        for model, where in models.items():

            async def get(model: str = model) -> bytes:
                return await client.get(f"/v1/models/{model}", cast_to=bytes)

            try:
                raw = await retry(
                    get, attempts=self.attempts, retry_on=RETRYABLE, base=self.base, cap=self.cap
                )
                info = pydantic_core.from_json(raw)
            except anthropic.NotFoundError as err:
                raise ModelUnavailable(
                    f"model {model!r} ({where}) does not exist for this API key: {err.message}"
                ) from err
            except (anthropic.APIError, ValueError) as err:
                raise ModelUnavailable(f"could not look model {model!r} up: {err}") from err
            lifecycle = info.get("lifecycle", "active")
            if lifecycle == "retired":
                raise ModelUnavailable(
                    f"model {model!r} ({where}) is retired (since {info.get('retires_at')}); "
                    "name a current model in kiln.yaml"
                )
            if lifecycle == "deprecated":
                log.warning(
                    "model %r (%s) is deprecated and retires at %s",
                    model,
                    where,
                    info.get("retires_at"),
                )
            resolved[model] = str(info.get("id") or model)
        return resolved

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


def request_fields(request: ModelRequest) -> dict[str, Any]:
    """The Messages request's fields other than its messages, as they are sent to the API."""
    fields: dict[str, Any] = {
        "model": request.model,
        "max_tokens": request.max_tokens,
        "system": request.system,
        "tools": request.tools,
    }
    if request.thinking is not None:
        fields["thinking"] = request.thinking
    if request.output_config is not None:
        fields["output_config"] = request.output_config
    return fields


def request_body(request: ModelRequest) -> bytes:
    """The Messages request as JSON. The messages that are turns sent unchanged carry their JSON
    (``Verbatim``, encoded once per turn), so the body is joined from it: only the fields and the
    few messages that differ are encoded at each call, not the whole conversation."""
    parts = [pydantic_core.to_json(request_fields(request))[:-1], b',"messages":[']
    for m in request.messages:
        parts += (m.json if isinstance(m, Verbatim) else pydantic_core.to_json(m), b",")
    if request.messages:
        parts.pop()  # the last comma
    parts.append(b"]}")
    return b"".join(parts)


def _reply(raw: bytes, model: str) -> ModelReply:
    """A Messages response as a reply: its content blocks as the API sent them, fields that are
    null left out (as the SDK's ``model_dump(exclude_none=True)`` of them did); a body that is
    not a Messages response is a ModelError."""
    try:
        data = pydantic_core.from_json(raw)
        usage = data.get("usage") or {}
        return ModelReply(
            model=data.get("model") or model,
            content=[_block(block) for block in data["content"]],
            stop_reason=data.get("stop_reason") or "end_turn",
            usage=_usage(usage),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelError(
            f"not a Messages response ({type(err).__name__}: {err}): {raw[:200]!r}"
        ) from err


def _block(block: dict[str, Any]) -> dict[str, Any]:
    """A content block as received; fields that are null are left out, except in thinking
    blocks, which go back to the API exactly as they came."""
    if block.get("type") in ("thinking", "redacted_thinking"):
        return block
    return {k: v for k, v in block.items() if v is not None}


def _usage(usage: dict[str, Any]) -> Usage:
    split = usage.get("cache_creation")
    return Usage(
        input_tokens=usage.get("input_tokens") or 0,
        output_tokens=usage.get("output_tokens") or 0,
        cache_creation_input_tokens=usage.get("cache_creation_input_tokens") or 0,
        cache_read_input_tokens=usage.get("cache_read_input_tokens") or 0,
        cache_creation=(
            CacheCreation(
                ephemeral_5m_input_tokens=split.get("ephemeral_5m_input_tokens") or 0,
                ephemeral_1h_input_tokens=split.get("ephemeral_1h_input_tokens") or 0,
            )
            if isinstance(split, dict)
            else None
        ),
    )
