"""What the Anthropic adapter puts on the wire: the SDK's own headers and the request as JSON."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
import pytest

from kiln_agent.adapters.anthropic_model import AnthropicModel
from kiln_agent.ports import ModelError, ModelRequest

REPLY = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-x",
    "content": [{"type": "tool_use", "id": "toolu_1", "name": "list_dir", "input": {"path": "."}}],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 3, "cache_read_input_tokens": 7},
}


def _client(answer: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key="sk-test",
        base_url="http://model.test",
        max_retries=0,
        http_client=anthropic.DefaultAsyncHttpxClient(transport=httpx2.MockTransport(answer)),
    )


async def test_the_request_goes_out_as_json_with_the_sdks_headers() -> None:
    seen: list[httpx2.Request] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200, json=REPLY)

    client = _client(answer)
    request = ModelRequest(
        model="claude-x",
        system=[{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        tools=[{"name": "list_dir", "input_schema": {"type": "object"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "héllo"}]}],
        max_tokens=64,
    )
    reply = await AnthropicModel(client).complete(request)

    (sent,) = seen
    assert sent.method == "POST" and sent.url.path == "/v1/messages"
    body: dict[str, Any] = json.loads(sent.content)
    assert body == request.model_dump(exclude={"thinking", "output_config", "betas"})
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["anthropic-version"]  # the SDK's headers, auth among them
    assert "sk-test" in (sent.headers.get("x-api-key", "") + sent.headers.get("authorization", ""))
    assert reply.stop_reason == "tool_use" and reply.content == REPLY["content"]
    assert reply.usage.input_tokens == 12 and reply.usage.cache_read_input_tokens == 7
    await client.close()


REQUEST = ModelRequest(
    model="claude-x",
    system=[],
    tools=[],
    messages=[{"role": "user", "content": "go"}],
    max_tokens=64,
)


async def test_reply_blocks_are_kept_as_sent_without_their_null_fields() -> None:
    content = [
        {"type": "text", "text": "looking", "citations": None},
        {"type": "tool_use", "id": "t1", "name": "write_file",
         "input": {"path": "a", "mode": None, "opts": {"x": None}}},
        {"type": "some_future_block", "data": {"k": 1}},
    ]  # fmt: skip
    reply_body = REPLY | {"content": content, "usage": {"input_tokens": 5, "output_tokens": None}}
    client = _client(lambda request: httpx2.Response(200, json=reply_body))
    reply = await AnthropicModel(client).complete(REQUEST)
    assert reply.content == [
        {"type": "text", "text": "looking"},  # a null field of a block is left out
        {"type": "tool_use", "id": "t1", "name": "write_file",
         "input": {"path": "a", "mode": None, "opts": {"x": None}}},  # the input as sent
        {"type": "some_future_block", "data": {"k": 1}},  # an unknown block kept whole
    ]  # fmt: skip
    assert reply.usage.input_tokens == 5 and reply.usage.output_tokens == 0
    await client.close()


@pytest.mark.parametrize(
    "body",
    [b"<html>bad gateway</html>", b'{"type": "message"}', b'{"content": "text"}', b"[1, 2]"],
)
async def test_a_body_that_is_not_a_messages_response_is_a_model_error(body: bytes) -> None:
    client = _client(
        lambda request: httpx2.Response(
            200, content=body, headers={"content-type": "application/json"}
        )
    )
    with pytest.raises(ModelError, match="not a Messages response"):
        await AnthropicModel(client).complete(REQUEST)
    await client.close()
