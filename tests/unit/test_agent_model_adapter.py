"""What the Anthropic adapter puts on the wire: the SDK's own headers and the request as JSON."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
import pytest

from kiln_agent import config as agent_config
from kiln_agent.adapters.anthropic_model import AnthropicModel, request_body
from kiln_agent.checkpoint import Checkpoint, Turn
from kiln_agent.context import build_request
from kiln_agent.ports import ModelError, ModelRequest
from kiln_contracts import BuildLimits

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


async def test_turns_sent_unchanged_go_out_as_their_stored_json() -> None:
    # a turn read back from the store carries the text it was stored as (here in an unusual but
    # valid layout): the body holds that text itself, not the conversation encoded again
    stored = '[ {"type":"text",  "text":"héllo \\u00e9"} ]'
    turns = [
        Turn(0, "user", json.loads(stored), 0, stored),
        Turn(1, "assistant", [{"type": "text", "text": "ok", "citations": None}], 1),
        Turn(2, "user", [{"type": "tool_result", "tool_use_id": "t", "content": "x" * 50}], 1),
        Turn(3, "assistant", [{"type": "text", "text": "next"}], 2),
        Turn(4, "user", [{"type": "text", "text": "and then"}], 2),
        Turn(5, "assistant", [{"type": "text", "text": "then"}], 3),
        Turn(6, "user", [{"type": "text", "text": "last"}], 3),
    ]
    cp = Checkpoint("b", "u", "pro", "claude-x", BuildLimits(), "be brief")
    cp.state.compacted_before = 3  # the tool result is cleared: that message is made once
    config = agent_config.load().model_copy(update={"clear_over_chars": 10})
    request = build_request(cp, turns, [{"name": "glob", "input_schema": {}}], config)
    seen: list[httpx2.Request] = []

    def answer(sent: httpx2.Request) -> httpx2.Response:
        seen.append(sent)
        return httpx2.Response(200, json=REPLY)

    client = _client(answer)
    await AnthropicModel(client).complete(request)
    await client.close()

    (sent,) = seen
    assert stored.encode() in sent.content
    assert request.messages[0] is turns[0].message  # the same object at every call
    assert request.messages[1] is turns[1].message
    again = build_request(cp, turns, [{"name": "glob", "input_schema": {}}], config)
    assert again.messages[2] is request.messages[2]  # cleared once, not at every call
    assert again.messages[2] is not turns[2].message
    whole = request.model_dump(exclude={"thinking", "output_config", "betas"})
    assert json.loads(sent.content) == whole  # what a whole encoding of the request says
    assert "cleared" in json.loads(sent.content)["messages"][2]["content"][0]["content"]
    assert request.messages[4]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert "cache_control" not in turns[4].content[-1]  # marked in a new message, not the turn
    # the turn's JSON is the message as json.dumps writes it: estimates count the same
    assert turns[1].message.json == json.dumps(turns[1].message).encode()


def test_a_request_body_is_the_requests_json_with_or_without_messages() -> None:
    for messages in ([], [{"role": "user", "content": "go"}]):
        request = REQUEST.model_copy(
            update={"messages": messages, "thinking": {"type": "adaptive"}}
        )
        whole = request.model_dump(exclude={"output_config", "betas"})
        assert json.loads(request_body(request)) == whole
