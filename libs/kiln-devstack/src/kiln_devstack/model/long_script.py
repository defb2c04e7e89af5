"""A long scripted build, for benchmarks and tests: as many model calls and parallel tool calls
as asked."""

import re
from typing import Any

from .summaries import digest, summarise, summary_reply
from .usage import UsageEstimator, response_body


class LongScript:
    """A long build for benchmarks and tests: ``iterations`` model calls; each of the first
    ``iterations - 1`` makes ``parallel`` bash calls (a narration every tenth turn), the last ends
    the turn. ``write_chars``: each turn writes a file of that many characters too (a large
    write_file, whose content stays in the conversation). The turn number is read from the ids of
    the last turn's calls (no hidden state; it survives the oldest turns being summarised), and a
    request to summarise is answered with a summary."""

    def __init__(
        self,
        iterations: int = 50,
        parallel: int = 1,
        usage: UsageEstimator | None = None,
        write_chars: int = 0,
    ):
        self.iterations = iterations
        self.parallel = parallel
        self.write_chars = write_chars
        self.usage = usage or UsageEstimator()

    def respond(self, request: dict[str, Any]) -> dict[str, Any]:
        messages = request.get("messages") or []
        key = digest(messages)
        content: list[dict[str, Any]]
        if (summary := summarise(request)) is not None:
            content, stop = summary_reply(request, summary)
        elif (n := _long_turn(messages)) + 1 >= self.iterations:
            content = [{"type": "text", "text": f"Done after {n} turns."}]
            stop = "end_turn"
        else:
            content = [{"type": "text", "text": f"Step {n + 1}: checking the next part."}]
            if self.write_chars:
                line = f"# module {n + 1}: generated code, line after line of it.\n"
                body = (line * (self.write_chars // len(line) + 1))[: self.write_chars]
                content.append(
                    {
                        "type": "tool_use",
                        "id": f"toolu_long{n}_w_{key}",
                        "name": "write_file",
                        "input": {"path": f"src/module_{n + 1}.py", "content": body},
                    }
                )
            content += [
                {
                    "type": "tool_use",
                    "id": f"toolu_long{n}_{i}_{key}",
                    "name": "bash",
                    "input": {"command": f"echo step {n + 1} part {i}"},
                }
                for i in range(self.parallel)
            ]
            if n % 10 == 0:
                content.append(
                    {
                        "type": "tool_use",
                        "id": f"toolu_long{n}_n_{key}",
                        "name": "narrate",
                        "input": {"text": f"Working on step {n + 1}."},
                    }
                )
            stop = "tool_use"
        return response_body(request, content, stop, self.usage.estimate(request, content))


LONG_ID = re.compile(r"^toolu_long(\d+)_")


def _long_turn(messages: list[dict[str, Any]]) -> int:
    """The number of the next turn: one past the step of the last turn's calls (0 for none)."""
    for m in reversed(messages):
        if m.get("role") != "assistant" or not isinstance(m.get("content"), list):
            continue
        for b in m["content"]:
            if b.get("type") == "tool_use" and (found := LONG_ID.match(str(b.get("id")))):
                return int(found.group(1)) + 1
    return 0
