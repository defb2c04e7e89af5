"""The CLI without a server: SSE parsing, rendering, Q&A files, and `kiln build --follow`."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from kiln_cli import following, main, shared
from kiln_cli.client import KilnClient, SseEvent, parse_sse
from kiln_cli.render import Renderer, render, tool_summary


def sse(events: list[tuple[int, str, dict[str, Any]]], heartbeat: bool = True) -> str:
    out = "retry: 2000\n\n"
    for seq, kind, data in events:
        out += f"id: {seq}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
        if heartbeat:
            out += ": heartbeat\n\n"
    return out


HISTORY = [
    (1, "build_requested", {"build_id": "b1", "tier": "pro"}),
    (2, "agent_narrated", {"iteration": 1, "text": "Let me write the package."}),
    (
        3,
        "tool_call",
        {
            "iteration": 1,
            "tool": "write_file",
            "input": {"path": "textstats/__init__.py", "content": "x"},
        },
    ),
    (4, "tool_result", {"iteration": 1, "output": "wrote 1 file", "exit_code": 0}),
    (5, "iteration_completed", {"iteration": 1, "model": "scripted", "cost_micro_usd": 1500}),
    (6, "tool_call", {"iteration": 2, "tool": "bash", "input": {"command": "python -m unittest"}}),
    (
        7,
        "tool_result",
        {
            "iteration": 2,
            "output": "Ran 3 tests\nFAILED (failures=1)\n[exit code 1]",
            "exit_code": 1,
        },
    ),
    (8, "iteration_completed", {"iteration": 2, "model": "scripted", "cost_micro_usd": 2500}),
    (9, "build_sleeping", {"reason": "budget", "wake_at": "2026-01-02T00:00:00Z"}),
    (10, "build_resumed", {"reason": "allowance reset"}),
    (
        11,
        "build_completed",
        {"summary": "textstats is ready", "iterations": 3, "cost_micro_usd": 5000},
    ),
]


def test_parse_sse_events_comments_and_multiline_data():
    text = 'retry: 1\n\nid: 7\nevent: x\ndata: {"a":\ndata: 1}\n\n: heartbeat\n\nevent: y\ndata: nope\n\n'
    got = list(parse_sse(text.splitlines()))
    assert got == [SseEvent("x", {"a": 1}, 7), SseEvent(""), SseEvent("y", {"raw": "nope"}, None)]


def test_render_shows_iterations_tools_narration_cost_sleep_and_result():
    buf = io.StringIO()
    console = Console(file=buf, width=120, color_system=None)
    r = render([SseEvent(k, d, i) for i, k, d in HISTORY], console)
    out = buf.getvalue()
    assert r.status == "completed"
    assert r.cost_micro_usd == 5000 and r.iteration == 3
    for expected in (
        "build b1 started",
        "Let me write the package.",
        "[iter 1] write_file textstats/__init__.py",
        "[iter 2] bash python -m unittest",
        "✗ exit 1 FAILED (failures=1)",
        "cost so far $0.0040",
        "sleeping (budget) until 2026-01-02",
        "waking up (allowance reset)",
        "completed (3 iterations, $0.0050)",
        "textstats is ready",
    ):
        assert expected in out, (expected, out)


def test_failed_and_cancelled_statuses():
    console = Console(file=io.StringIO())
    r = Renderer(console)
    r(
        SseEvent(
            "build_failed",
            {"reason": "cost_limit", "detail": "cap", "iterations": 1, "cost_micro_usd": 1},
        )
    )
    assert r.status == "failed"
    r2 = render(
        [SseEvent("build_cancelled", {"reason": "user", "iterations": 0, "cost_micro_usd": 0})],
        console,
    )
    assert r2.status == "cancelled"
    rejected = SseEvent("build_rejected", {"reason": "daily allowance used up: spent 5 of 4"})
    assert rejected.terminal  # an ending: `kiln build --follow` stops there
    out = io.StringIO()
    assert render([rejected], Console(file=out, width=200)).status == "rejected"
    assert "not started" in out.getvalue() and "spent 5 of 4" in out.getvalue()


def test_tool_summary():
    assert tool_summary("grep", {"pattern": "def ", "path": "src"}) == "def in src"
    assert tool_summary("bash", {"command": "x" * 200}).endswith("…")
    assert tool_summary("other", {"a": 1}) == "a=1"


def test_load_qna_list_or_mapping(tmp_path: Path):
    p = tmp_path / "q.yaml"
    p.write_text("- question: Language?\n  answer: Python\n")
    assert following.load_qna(p) == [{"question": "Language?", "answer": "Python"}]
    p.write_text("Language?: Python\nTests?: unittest\n")
    assert following.load_qna(p)[1] == {"question": "Tests?", "answer": "unittest"}
    p.write_text("42\n")
    with pytest.raises(ValueError):
        following.load_qna(p)


class FakeGateway:
    """The gateway's HTTP surface, enough for `kiln build --follow`; cuts the first stream short."""

    def __init__(self, history: list[tuple[int, str, dict[str, Any]]]) -> None:
        self.history = history
        self.posted: list[dict[str, Any]] = []
        self.last_event_ids: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer k"
        if request.method == "POST" and request.url.path == "/v1/builds":
            self.posted.append(json.loads(request.content))
            return httpx.Response(201, json={"build_id": "b1", "status": "queued"})
        if request.url.path == "/v1/builds/b1/events":
            last = request.headers.get("last-event-id")
            self.last_event_ids.append(last)
            after = int(last) if last else 0
            events = [e for e in self.history if e[0] > after]
            if last is None:
                events = events[:3]  # the connection drops; the client resumes
            return httpx.Response(
                200, text=sse(events), headers={"content-type": "text/event-stream"}
            )
        if request.url.path == "/v1/builds/b1":
            return httpx.Response(200, json={"build_id": "b1", "status": "running"})
        return httpx.Response(404, json={"detail": "not found"})


@pytest.mark.parametrize(("last_kind", "code"), [("build_completed", 0), ("build_failed", 1)])
def test_build_follow_resumes_and_exits_by_final_status(
    monkeypatch, tmp_path: Path, last_kind: str, code: int
):
    history = [
        *HISTORY[:-1],
        (
            11,
            last_kind,
            {"reason": "cost_limit", "summary": "ok", "iterations": 3, "cost_micro_usd": 5},
        ),
    ]
    gateway = FakeGateway(history)
    monkeypatch.setattr(
        shared,
        "KilnClient",
        lambda url, key: KilnClient(url, key, transport=httpx.MockTransport(gateway)),
    )
    brief = tmp_path / "brief.md"
    brief.write_text("Count words")
    qna = tmp_path / "q.yaml"
    qna.write_text("Language?: Python\n")
    result = CliRunner().invoke(
        main.app, ["build", str(brief), "--qna", str(qna), "--follow", "--key", "k"]
    )
    assert result.exit_code == code, result.output
    assert gateway.posted == [
        {
            "idea_brief": "Count words",
            "understanding_qna": [{"question": "Language?", "answer": "Python"}],
        }
    ]
    assert gateway.last_event_ids == [None, "3"]
    assert result.output.count("started (tier pro)") == 1  # no repeats after resuming
    assert "[iter 2] bash" in result.output


def test_build_reports_api_errors(monkeypatch, tmp_path: Path):
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"detail": "invalid request: idea_brief: too long"})

    monkeypatch.setattr(
        shared,
        "KilnClient",
        lambda url, key: KilnClient(url, key, transport=httpx.MockTransport(refuse)),
    )
    brief = tmp_path / "brief.md"
    brief.write_text("x")
    result = CliRunner().invoke(main.app, ["build", str(brief), "--key", "k"])
    assert result.exit_code == 1
    assert "idea_brief: too long" in result.output


def test_thinking_narration_is_shown_apart_from_the_narrate_tools():
    buf = io.StringIO()
    console = Console(file=buf, width=120, color_system="truecolor")
    r = Renderer(console)
    r(SseEvent("agent_narrated", {"iteration": 1, "text": "Planning.", "source": "thinking"}))
    r(SseEvent("agent_narrated", {"iteration": 1, "text": "Writing the package."}))
    thinking, narrate = buf.getvalue().splitlines()
    assert "Planning." in thinking and "Writing the package." in narrate
    assert thinking.split("Planning.")[0] != narrate.split("Writing the package.")[0]  # styles


def test_say_follow_on_a_completed_build_waits_for_its_continuation(monkeypatch):
    """The first run's history is passed quietly; its end does not stop the follow; the stream
    is followed from the message to the end of the run that answers it."""
    first = [
        (1, "build_requested", {"build_id": "b1", "tier": "pro"}),
        (2, "build_completed", {"summary": "v1", "iterations": 3, "cost_micro_usd": 5}),
    ]
    then = [
        (3, "send_user_message", {"message_id": "m1", "seq": 1, "text": "add NOTES.md"}),
        (4, "build_continued", {"continuation": 1, "after": "completed", "iterations": 3}),
        (5, "tool_call", {"iteration": 4, "tool": "write_file", "input": {"path": "NOTES.md"}}),
        (6, "build_completed", {"summary": "v2", "iterations": 5, "cost_micro_usd": 9,
                                "continuation": 1}),
    ]  # fmt: skip
    asked: list[str | None] = []
    posted: list[dict[str, Any]] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            assert request.url.path == "/v1/builds/b1/messages"
            assert request.headers["idempotency-key"]
            posted.append(json.loads(request.content))
            return httpx.Response(202, json={"message_id": "m1", "build_id": "b1", "seq": 1})
        if request.url.path.endswith("/events"):
            after = request.headers.get("last-event-id")
            asked.append(after)
            if after is None:
                return httpx.Response(200, text=sse(first, heartbeat=False))
            if len(asked) == 2:  # the continuation is not projected yet: an empty stream
                return httpx.Response(200, text="")
            return httpx.Response(200, text=sse([e for e in then if e[0] > int(after)]))
        return httpx.Response(200, json={"build_id": "b1", "status": "completed"})

    monkeypatch.setattr(
        shared,
        "KilnClient",
        lambda url, key: KilnClient(url, key, transport=httpx.MockTransport(gateway)),
    )
    monkeypatch.setattr("kiln_cli.client.time.sleep", lambda _: None)
    result = CliRunner().invoke(main.app, ["say", "b1", "add NOTES.md", "--follow", "--key", "k"])
    assert result.exit_code == 0, result.output
    assert posted == [{"text": "add NOTES.md"}]
    assert asked == [None, "2", "2"]
    assert "message m1 (#1) sent to build b1" in result.output
    assert "started (tier pro)" not in result.output  # the history before the message: quiet
    assert "you: add NOTES.md" in result.output and "continued" in result.output
    assert "[iter 4] write_file" in result.output and "v2" in result.output
    assert "v1" not in result.output


def test_say_without_follow_only_sends(monkeypatch):
    def gateway(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json={"message_id": "m7", "build_id": "b1", "seq": 7})
        raise AssertionError(f"unexpected {request.method} {request.url}")

    monkeypatch.setattr(
        shared,
        "KilnClient",
        lambda url, key: KilnClient(url, key, transport=httpx.MockTransport(gateway)),
    )
    result = CliRunner().invoke(main.app, ["say", "b1", "hello", "--key", "k"])
    assert result.exit_code == 0 and "message m7 (#7)" in result.output


def test_a_forks_start_says_what_it_was_forked_from():
    buf = io.StringIO()
    r = Renderer(Console(file=buf, width=160))
    fork = {"build_id": "src", "iteration": 3, "snapshot_id": "s2"}
    r(SseEvent("build_requested", {"build_id": "fk", "tier": "pro", "fork": fork}))
    r(SseEvent("build_requested", {"build_id": "b2", "tier": "pro"}))
    forked, plain = buf.getvalue().splitlines()
    assert "build fk started (tier pro), a fork of build src at iteration 3" in forked
    assert "fork" not in plain and r.iteration == 3


def test_a_summary_call_is_shown_as_a_summary_not_as_another_iteration():
    buf = io.StringIO()
    r = Renderer(Console(file=buf, width=120))
    r(SseEvent("iteration_completed", {"iteration": 7, "model": "m", "cost_micro_usd": 100}))
    summary = {"iteration": 7, "model": "m", "cost_micro_usd": 50, "purpose": "summary"}
    r(SseEvent("iteration_completed", summary))
    turn, summarised = buf.getvalue().splitlines()
    assert "iteration 7 done" in turn and "$0.0001" in turn
    assert "summarised" in summarised and "iteration 7 done" not in summarised
    assert r.cost_micro_usd == 150  # the summary is charged like any call
