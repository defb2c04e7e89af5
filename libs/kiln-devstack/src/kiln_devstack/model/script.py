"""A deterministic scripted model: the demo, and the model of the tests.

It decides the next assistant turn from the request's messages alone (no hidden state): the phase
of the last assistant turn is encoded in its tool_use ids, and the tool results that answered it
decide what comes next. The script builds a small standard-library Python package, ``textstats``,
with the real sandbox tools: it plans (narrate + list_dir in parallel), writes the package with a
deliberate bug, its unittest suite and a README (three parallel calls), runs the tests (they fail),
reads the code, fixes the bug with edit_file, runs the tests again, writes a page for it on the
standard library's HTTP server (``textstats/web.py``), starts that server in the background
(``bash`` with ``run_in_background``), reads its output (``bash_output``) for the address it
serves on, fetches the page with Python's ``urllib`` and reports. A step the platform cut short
(its sandbox went away, its call was interrupted) it does again, once. Whenever a result is not
what the script expects, it ends its turn and says so instead of pressing on.

It answers the user too: a user text after its last turn (a message sent to the build) that says
``add a file NAME with TEXT`` or ``please write NAME`` makes it write that file (one write_file per
request, in the order asked); then it goes on with its work where it was, or, if its work had
ended, ends its turn with a summary of what it wrote. Any other text is acknowledged. The agent's
own notes in a user turn (they start with ``(Kiln)``) are not the user's words.

What it builds is in ``textstats``; a request to summarise is answered by ``summaries``.
"""

import re
from typing import Any

from .summaries import digest, summarise, summary_reply, text_of
from .textstats import (
    BUG,
    CHECK,
    FIX,
    MAX_LOOKS,
    PACKAGE,
    README,
    SERVE_COMMAND,
    SUMMARY,
    TEST_COMMAND,
    TESTS,
    WEB,
)
from .usage import UsageEstimator, response_body


class ScriptedModel:
    """The script as a Messages API responder (a request body in, a response body out)."""

    def __init__(self) -> None:
        self.usage = UsageEstimator()

    def respond(self, request: dict[str, Any]) -> dict[str, Any]:
        """A Messages API response body for a request body."""
        messages = request.get("messages") or []
        if (summary := summarise(request)) is not None:
            return self.reply(request, *summary_reply(request, summary))
        content, stop = next_turn(messages, digest(messages))
        return self.reply(request, content, stop)

    def reply(
        self, request: dict[str, Any], content: list[dict[str, Any]], stop: str
    ) -> dict[str, Any]:
        """A Messages API response body with ``content``, usage as the API would report it."""
        return response_body(request, content, stop, self.usage.estimate(request, content))


ADD = re.compile(r"^\s*(?:please\s+)?add\s+(?:a\s+)?file\s+(\S+)\s+with\s+(.+?)\s*$", re.I | re.S)
WRITE = re.compile(r"^\s*(?:please\s+)?write\s+(?:a\s+file\s+)?(\S+?)[.!]?\s*$", re.I)
NOTE = "(Kiln)"
ASK = "ask"  # the phase of a turn that does what the user asked


def next_turn(messages: list[dict[str, Any]], digest: str) -> tuple[list[dict[str, Any]], str]:
    """The next assistant turn (content blocks, stop_reason) given the conversation so far: the
    user's requests first, else the script's next step."""
    said = _said(messages)
    if said:
        return _answer(messages, said, digest)
    phase, results = _last_phase(messages)
    if phase == ASK:
        if any(r.get("is_error") for r in results):
            return _end(f"I could not do what you asked: {text_of(results[-1])[:500]}")
        if _work_ended(messages):
            return _end(f"Done: wrote {', '.join(_asked_paths(messages))} as you asked.")
        phase, results = _last_phase(messages, skip=ASK)  # back to the work, where it was
    return _script(phase, results, digest)


def _end(text: str) -> tuple[list[dict[str, Any]], str]:
    return [{"type": "text", "text": text}], "end_turn"


def _answer(
    messages: list[dict[str, Any]], said: list[str], digest: str
) -> tuple[list[dict[str, Any]], str]:
    """Write the files the user asked for; acknowledge anything else."""
    files: list[tuple[str, str]] = []
    for words in said:
        if m := ADD.match(words):
            files.append((m.group(1), m.group(2).strip().strip("'\"") + "\n"))
        elif m := WRITE.match(words):
            files.append((m.group(1), f"Written as the user asked: {m.group(1)}\n"))
    if files:
        names = ", ".join(name for name, _ in files)
        calls = [
            {"type": "tool_use", "id": f"toolu_{ASK}_{i}_{digest}", "name": "write_file",
             "input": {"path": name, "content": content}}
            for i, (name, content) in enumerate(files)
        ]  # fmt: skip
        return [{"type": "text", "text": f"You asked for {names}: writing it now."}, *calls], (
            "tool_use"
        )
    quoted = " / ".join(said)[:300]
    if _work_ended(messages):
        return _end(
            f"I read your message ({quoted}), but I only know how to 'add a file NAME with "
            "TEXT' or 'please write NAME'; nothing changed."
        )
    content, stop = _script(*_last_phase(messages, skip=ASK), digest)
    return [{"type": "text", "text": f"Noted your message: {quoted}"}, *content], stop


def _said(messages: list[dict[str, Any]]) -> list[str]:
    """The user's texts after the last assistant turn (not the brief's first turn, not the
    agent's notes)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=0)
    out = []
    for m in messages[last + 1 :]:
        if m.get("role") != "user":
            continue
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for b in blocks or []:
            words = b.get("text") if isinstance(b, dict) and b.get("type") == "text" else None
            if isinstance(words, str) and words.strip() and not words.startswith(NOTE):
                out.append(words.strip())
    return out


def _work_ended(messages: list[dict[str, Any]]) -> bool:
    """Whether the script's last turn before the user's requests ended its turn."""
    for m in reversed(messages):
        if m.get("role") != "assistant" or not isinstance(m.get("content"), list):
            continue
        ids = [b.get("id", "") for b in m["content"] if b.get("type") == "tool_use"]
        if ids and ids[0].startswith(f"toolu_{ASK}_"):
            continue
        return not ids
    return False


def _asked_paths(messages: list[dict[str, Any]]) -> list[str]:
    """The paths written by the last turn that did what the user asked."""
    for m in reversed(messages):
        content = m.get("content") if m.get("role") == "assistant" else None
        calls = [b for b in content or [] if isinstance(b, dict) and b.get("type") == "tool_use"]
        if calls and str(calls[0].get("id", "")).startswith(f"toolu_{ASK}_"):
            return [str(b["input"].get("path")) for b in calls]
    return []


def _script(
    phase: str | None, results: list[dict[str, Any]], digest: str
) -> tuple[list[dict[str, Any]], str]:
    """The textstats script's next step after ``phase`` and its ``results``."""

    def call(name: str, i: int, **tool_input: Any) -> dict[str, Any]:
        return {"type": "tool_use", "id": f"toolu_{phase_next}_{i}_{digest}", "name": name,
                "input": tool_input}  # fmt: skip

    def say(text: str) -> dict[str, Any]:
        return {"type": "text", "text": text}

    def end(text: str) -> tuple[list[dict[str, Any]], str]:
        return [say(text)], "end_turn"

    if any(r.get("is_error") for r in results) and phase not in ("test1", "test2", "check"):
        return end(f"I stopped: a tool failed unexpectedly: {text_of(results[-1])[:500]}")
    if phase is None:
        phase_next = "plan"
        return [
            say("I'll build a small Python package, textstats, test it, and fix what fails."),
            call(
                "narrate",
                0,
                text="Plan: write the textstats package, its unit tests and a README, then run "
                "the tests and fix anything that fails.",
            ),
            call("list_dir", 1, path="."),
        ], "tool_use"
    if phase == "plan":
        phase_next = "write"
        return [
            call("write_file", 0, path="textstats/__init__.py", content=PACKAGE),
            call("write_file", 1, path="tests/test_textstats.py", content=TESTS),
            call("write_file", 2, path="README.md", content=README),
        ], "tool_use"
    if phase == "write":
        phase_next = "test1"
        return [call("bash", 0, command=TEST_COMMAND, timeout_s=60)], "tool_use"
    if phase == "test1":
        if _passed(results[0]):
            phase_next = "web"
            return [call("write_file", 0, path="textstats/web.py", content=WEB)], "tool_use"
        if "test_top_words" not in text_of(results[0]):
            return end("The tests fail in a way I did not expect:\n" + text_of(results[0])[-1500:])
        phase_next = "read"
        return [
            say("test_top_words fails: the order is wrong. Let me read the code."),
            call("read_file", 0, path="textstats/__init__.py"),
        ], "tool_use"
    if phase == "read":
        if BUG not in text_of(results[0]):
            return end("I could not find the line to fix in textstats/__init__.py; stopping.")
        phase_next = "fix"
        return [
            say("top_words sorts by ascending count; it must sort by descending count."),
            call("edit_file", 0, path="textstats/__init__.py", old_string=BUG, new_string=FIX),
        ], "tool_use"
    if phase == "fix":
        phase_next = "test2"
        return [call("bash", 0, command=TEST_COMMAND, timeout_s=60)], "tool_use"
    if phase == "test2":
        if not _passed(results[0]):
            return end(
                "I gave up: the tests still fail after my fix:\n" + text_of(results[0])[-1500:]
            )
        phase_next = "web"
        return [
            say("Fixed the sorting bug in top_words; all 5 tests pass. Now a page for it."),
            call("write_file", 0, path="textstats/web.py", content=WEB),
        ], "tool_use"
    if phase == "web":
        phase_next = "serve"
        return [
            say("Starting the page's server in the background."),
            call("bash", 0, command=SERVE_COMMAND, run_in_background=True),
        ], "tool_use"
    if phase == "serve" or (phase or "").startswith("look"):
        text = text_of(results[-1])
        if (m := re.search(r"\bbash_\d+\b", text)) is None:
            return end("I could not start the page's server:\n" + text[-1500:])
        if (port := re.search(r"http://127\.0\.0\.1:(\d+)/", text)) is not None:
            phase_next = "check"
            return [call("bash", 0, command=CHECK.format(port=port.group(1)), timeout_s=60)], (
                "tool_use"
            )
        looks = int(phase[4:]) if phase and phase.startswith("look") else 0
        if looks >= MAX_LOOKS or "running" not in text.splitlines()[0]:
            return end("The page's server did not say where it serves:\n" + text[-1500:])
        phase_next = f"look{looks + 1}"
        # a longer wait at each look: a slow start is waited for, and no two waits are the same
        # call (three in a row would trip the agent's repetition guard)
        wait = [call("bash", 0, command=f"sleep {0.5 * looks:g}")] if looks else []
        return [*wait, call("bash_output", len(wait), bash_id=m.group(0))], "tool_use"
    if phase == "check":
        if results[0].get("is_error") or "the page answers" not in text_of(results[0]):
            return end("The page did not answer as it should:\n" + text_of(results[0])[-1500:])
        phase_next = "report"
        return [
            call("narrate", 0, text="All tests pass, and " + text_of(results[0]).strip()),
        ], "tool_use"
    if phase == "report":
        return end(SUMMARY)
    return end("I lost track of the script; stopping here.")


def _last_phase(
    messages: list[dict[str, Any]], skip: str | None = None
) -> tuple[str | None, list[dict[str, Any]]]:
    """The phase of the last assistant turn with tool calls (not of phase ``skip``), and the
    results that answered it. A step the platform cut short (its sandbox went away, its call
    was interrupted) is done again once, as a model would: the phase before it is returned (no
    phase: the script starts again); cut short twice, it stops at the error."""
    lost = False
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.get("role") != "assistant" or not isinstance(m.get("content"), list):
            continue
        ids = [b["id"] for b in m["content"] if b.get("type") == "tool_use"]
        if not ids:
            continue
        match = re.match(r"toolu_([a-z0-9]+)_", ids[0])
        phase = match.group(1) if match else "unknown"
        if skip is not None and phase == skip:
            continue
        answer = messages[i + 1]["content"] if i + 1 < len(messages) else []
        by_id = {
            b.get("tool_use_id"): b
            for b in (answer if isinstance(answer, list) else [])
            if b.get("type") == "tool_result"
        }
        results = [by_id.get(x, {"content": "(missing result)", "is_error": True}) for x in ids]
        if not lost and phase != ASK and any(_cut_short(r) for r in results):
            lost = True
            continue
        return phase, results
    return None, []


def _cut_short(result: dict[str, Any]) -> bool:
    """A result that says the platform lost the call, not that the tool failed."""
    text = text_of(result) if result.get("is_error") else ""
    return "went away while running this call" in text or "this call was interrupted" in text


def _passed(result: dict[str, Any]) -> bool:
    text = text_of(result)
    return (
        not result.get("is_error")
        and "FAILED" not in text
        and re.search(r"^OK", text, re.M) is not None
    )
