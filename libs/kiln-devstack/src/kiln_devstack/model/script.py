"""A deterministic scripted model: the demo, and the model of the tests.

It decides the next assistant turn from the request's messages alone (no hidden state): the phase
of the last assistant turn is encoded in its tool_use ids, and the tool results that answered it
decide what comes next. The script builds a small standard-library Python package, ``textstats``,
with the real sandbox tools: it plans (narrate + list_dir in parallel), writes the package with a
deliberate bug, its unittest suite and a README (three parallel calls), runs the tests (they fail),
reads the code, fixes the bug with edit_file, runs the tests again, writes a page for it on the
standard library's HTTP server (``textstats/web.py``), starts that server in the background
(``bash`` with ``run_in_background``), reads its output (``bash_output``) for the address it
serves on, fetches the page with Python's ``urllib`` and reports. Whenever a result
is not what the script expects, it ends its turn and says so instead of pressing on.

It answers the user too: a user text after its last turn (a message sent to the build) that says
``add a file NAME with TEXT`` or ``please write NAME`` makes it write that file (one write_file per
request, in the order asked); then it goes on with its work where it was, or, if its work had
ended, ends its turn with a summary of what it wrote. Any other text is acknowledged. The agent's
own notes in a user turn (they start with ``(Kiln)``) are not the user's words.

Asked to summarise (a request with no tools whose message holds a ``<transcript>``, as the agent
sends when a conversation outgrows the context window), it answers with a summary of that
transcript, as a model would: the summary so far, the user's words, the files written and edited,
the commands run and the last results.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from typing import Any

TEST_COMMAND = "python -m unittest discover -s tests -v"
BUG = "key=lambda item: (item[1], item[0])"
FIX = "key=lambda item: (-item[1], item[0])"

PACKAGE = f'''"""textstats: count words, lines and characters, and find the most common words."""

from __future__ import annotations

import re
from collections import Counter

__all__ = ["char_count", "line_count", "top_words", "word_count", "words"]

_WORD = re.compile(r"[A-Za-z0-9']+")


def words(text: str) -> list[str]:
    """The words of ``text``, lower-cased."""
    return [w.lower() for w in _WORD.findall(text)]


def word_count(text: str) -> int:
    return len(words(text))


def line_count(text: str) -> int:
    return len(text.splitlines())


def char_count(text: str, *, spaces: bool = True) -> int:
    return len(text) if spaces else len(re.sub(r"\\s", "", text))


def top_words(text: str, n: int = 3) -> list[tuple[str, int]]:
    """The ``n`` most common words with their counts, most common first (ties: alphabetical)."""
    counts = Counter(words(text))
    return sorted(counts.items(), {BUG})[:n]
'''

TESTS = """import unittest

from textstats import char_count, line_count, top_words, word_count

TEXT = "the cat sat on the mat\\nthe dog sat too\\n"


class TextStatsTest(unittest.TestCase):
    def test_word_count(self):
        self.assertEqual(word_count(TEXT), 10)

    def test_line_count(self):
        self.assertEqual(line_count(TEXT), 2)

    def test_char_count(self):
        self.assertEqual(char_count("a b"), 3)
        self.assertEqual(char_count("a b", spaces=False), 2)

    def test_top_words(self):
        self.assertEqual(top_words(TEXT, 2), [("the", 3), ("sat", 2)])

    def test_empty(self):
        self.assertEqual(word_count(""), 0)
        self.assertEqual(top_words(""), [])


if __name__ == "__main__":
    unittest.main()
"""

SERVE_COMMAND = "python -u -m textstats.web --port 0"
MAX_LOOKS = 10  # bash_output calls for the server's address before the script gives up

WEB = '''"""textstats on the web: a page that shows a text's statistics (``python -m textstats.web``).

Standard library only: ``http.server``. ``--port 0`` (the default) takes a free port; the address
is printed on the first line, ``serving textstats on http://127.0.0.1:PORT/``.
"""

from __future__ import annotations

import argparse
import html
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from . import char_count, line_count, top_words, word_count

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>textstats</title>
<style>body{{font:16px system-ui,sans-serif;margin:2em;max-width:40em}}
textarea{{width:100%;height:8em}}td{{padding:.2em 1em}}</style></head>
<body><h1>textstats</h1>
<form method="get" action="./"><textarea name="text">{text}</textarea>
<p><button>Count</button></p></form>
<table id="stats"><tr><td>words</td><td>{words}</td></tr><tr><td>lines</td><td>{lines}</td></tr>
<tr><td>characters</td><td>{chars}</td></tr><tr><td>most common</td><td>{top}</td></tr></table>
</body></html>
"""


def stats(text: str) -> dict[str, object]:
    return {
        "words": word_count(text),
        "lines": line_count(text),
        "chars": char_count(text),
        "top": top_words(text, n=3),
    }


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urlsplit(self.path)
        text = parse_qs(url.query).get("text", ["the cat and the hat"])[0]
        if url.path.endswith("/stats.json"):
            body, kind = json.dumps(stats(text)).encode(), "application/json"
        else:
            s = stats(text)
            top = ", ".join(f"{w} ({n})" for w, n in s["top"])
            body = PAGE.format(
                text=html.escape(text), words=s["words"], lines=s["lines"], chars=s["chars"],
                top=html.escape(top),
            ).encode()
            kind = "text/html; charset=utf-8"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"serving textstats on http://127.0.0.1:{server.server_port}/", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
'''

CHECK = (
    'python -c "import urllib.request as u; '
    "page = u.urlopen('http://127.0.0.1:{port}/?text=a+b+a', timeout=10).read().decode(); "
    "assert '<h1>textstats</h1>' in page, page[:300]; print('the page answers:', len(page), 'bytes')\""
)

README = f"""# textstats

Word, line and character counts for text, and its most common words. Standard library only.

```python
from textstats import top_words, word_count
word_count("the cat sat")        # 3
top_words("a b a", n=1)          # [("a", 2)]
```

Run the tests: `{TEST_COMMAND}`

See it in a browser: `python -m textstats.web` (it prints its address).
"""

SUMMARY = (
    "Built `textstats`, a small standard-library Python package: `word_count`, `line_count`, "
    "`char_count` and `top_words` in `textstats/__init__.py`, a unittest suite in "
    "`tests/test_textstats.py` and a README. The first test run caught a bug in `top_words` "
    "(least common words came first); it is fixed and all tests pass. "
    f"Run them with `{TEST_COMMAND}`. `textstats/web.py` serves a page that counts a text's "
    "words (`python -m textstats.web`); it is running in the background now."
)


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
        return {
            "id": f"msg_{digest(request.get('messages') or [])}",
            "type": "message",
            "role": "assistant",
            "model": request.get("model") or "scripted",
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": self.usage.estimate(request, content),
        }


TRANSCRIPT = re.compile(r"<transcript>\n?(.*?)</transcript>", re.S)
SO_FAR = re.compile(r"<summary_so_far>\n?(.*?)</summary_so_far>", re.S)
CALL = re.compile(r"^\[call (\w+)\] (.*)$")


def summarise(request: dict[str, Any]) -> str | None:
    """The summary asked for, if the request asks for one (no tools, a ``<transcript>`` in its
    last message), else None: what a model would keep of the transcript, merged with the summary
    so far (the lines it had are kept, deduplicated)."""
    messages = request.get("messages") or []
    if request.get("tools") or not messages:
        return None
    text = _text({"content": messages[-1].get("content", "")})
    found = TRANSCRIPT.search(text)
    if found is None:
        return None
    previous = SO_FAR.search(text)
    kept: list[str] = []
    if previous and previous.group(1).strip() not in ("", "(none)"):
        kept += [line for line in previous.group(1).strip().splitlines() if line.strip()]
    files: dict[str, str] = {}
    commands: list[str] = []
    last: list[str] = []
    for line in found.group(1).splitlines():
        if line.startswith("[user] "):
            kept.append(f"- The user said: {line[7:].strip()[:300]}")
        elif call := CALL.match(line):
            name, raw = call.groups()
            try:
                args = json.loads(raw)
            except ValueError:
                args = {}
            args = args if isinstance(args, dict) else {}
            if name in ("write_file", "edit_file") and "path" in args:
                files[str(args["path"])] = "written" if name == "write_file" else "edited"
            elif name == "bash":
                commands.append(str(args.get("command", ""))[:120])
        elif line.startswith(("[result] ", "[error] ")):
            last = [line[:200]]
    for path, how in files.items():
        kept.append(f"- {path}: {how} (in the sandbox)")
    if commands:
        kept.append(f"- Ran {len(commands)} command(s), the last: {commands[-1]}")
    kept += [f"- Last result: {line}" for line in last]
    return "\n".join(dict.fromkeys(kept)) or "- Nothing of note happened yet."


def summary_reply(request: dict[str, Any], summary: str) -> tuple[list[dict[str, Any]], str]:
    """The summary as a reply: cut at ``max_tokens`` (stop_reason ``max_tokens``), as a model's
    output is."""
    limit = 4 * int(request.get("max_tokens") or 0)
    if limit and len(summary) > limit:
        return [{"type": "text", "text": summary[:limit]}], "max_tokens"
    return [{"type": "text", "text": summary}], "end_turn"


def digest(messages: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]


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
            return _end(f"I could not do what you asked: {_text(results[-1])[:500]}")
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
        return end(f"I stopped: a tool failed unexpectedly: {_text(results[-1])[:500]}")
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
        if "test_top_words" not in _text(results[0]):
            return end("The tests fail in a way I did not expect:\n" + _text(results[0])[-1500:])
        phase_next = "read"
        return [
            say("test_top_words fails: the order is wrong. Let me read the code."),
            call("read_file", 0, path="textstats/__init__.py"),
        ], "tool_use"
    if phase == "read":
        if BUG not in _text(results[0]):
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
                "I gave up: the tests still fail after my fix:\n" + _text(results[0])[-1500:]
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
        text = _text(results[-1])
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
        wait = [call("bash", 0, command="sleep 0.5")] if looks else []
        return [*wait, call("bash_output", len(wait), bash_id=m.group(0))], "tool_use"
    if phase == "check":
        if results[0].get("is_error") or "the page answers" not in _text(results[0]):
            return end("The page did not answer as it should:\n" + _text(results[0])[-1500:])
        phase_next = "report"
        return [
            call("narrate", 0, text="All tests pass, and the page answers: " + _text(results[0])),
        ], "tool_use"
    if phase == "report":
        return end(SUMMARY)
    return end("I lost track of the script; stopping here.")


def _last_phase(
    messages: list[dict[str, Any]], skip: str | None = None
) -> tuple[str | None, list[dict[str, Any]]]:
    """The phase of the last assistant turn with tool calls (not of phase ``skip``), and the
    results that answered it."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.get("role") != "assistant" or not isinstance(m.get("content"), list):
            continue
        ids = [b["id"] for b in m["content"] if b.get("type") == "tool_use"]
        if not ids:
            continue
        match = re.match(r"toolu_([a-z0-9]+)_", ids[0])
        if skip is not None and match and match.group(1) == skip:
            continue
        answer = messages[i + 1]["content"] if i + 1 < len(messages) else []
        by_id = {
            b.get("tool_use_id"): b
            for b in (answer if isinstance(answer, list) else [])
            if b.get("type") == "tool_result"
        }
        results = [by_id.get(x, {"content": "(missing result)", "is_error": True}) for x in ids]
        return (match.group(1) if match else "unknown"), results
    return None, []


def _text(result: dict[str, Any]) -> str:
    content = result.get("content", "")
    if isinstance(content, list):
        return "\n".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return str(content)


def _passed(result: dict[str, Any]) -> bool:
    text = _text(result)
    return (
        not result.get("is_error")
        and "FAILED" not in text
        and re.search(r"^OK", text, re.M) is not None
    )


# -------------------------------------------------------------------- usage and prompt caching


def tokens(value: Any) -> int:
    """A rough token count: a quarter of the characters of the value's JSON."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return len(text) // 4


class UsageEstimator:
    """Usage with prompt caching as the API reports it. The request is read as tools, then system,
    then message blocks. Each cache_control block writes a cache entry for the prefix ending there
    (if at least ``min_cache_tokens`` long); at each one the API looks for an earlier entry at that
    block or up to ``lookback`` blocks before it, and the longest hit is read from the cache.
    ``cache_read_input_tokens`` is that hit, ``cache_creation_input_tokens`` the rest of the prefix
    up to the last breakpoint written, ``input_tokens`` what follows."""

    def __init__(
        self, max_entries: int = 10_000, min_cache_tokens: int = 1024, lookback: int = 20
    ) -> None:
        self.cache: OrderedDict[str, None] = OrderedDict()
        self.max_entries = max_entries
        self.min_cache_tokens = min_cache_tokens
        self.lookback = lookback

    def estimate(self, request: dict[str, Any], output: list[dict[str, Any]]) -> dict[str, int]:
        parts: list[tuple[Any, bool]] = []
        for tool in request.get("tools") or []:
            parts.append((tool, "cache_control" in tool))
        system = request.get("system") or []
        for block in [{"type": "text", "text": system}] if isinstance(system, str) else system:
            parts.append((block, "cache_control" in block))
        for m in request.get("messages") or []:
            content = m.get("content")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for block in blocks:
                parts.append(({"role": m.get("role"), **block}, "cache_control" in block))
        hasher = hashlib.sha256()
        keys: list[str] = []
        sizes: list[int] = []
        total = 0
        for part, _ in parts:
            clean = {k: v for k, v in part.items() if k != "cache_control"}
            hasher.update(json.dumps(clean, sort_keys=True).encode())
            total += tokens(clean)
            keys.append(hasher.hexdigest())
            sizes.append(total)
        marked = [i for i, (_, m) in enumerate(parts) if m]
        read = 0
        for m in marked:
            for j in range(m, max(-1, m - self.lookback), -1):
                if keys[j] in self.cache:
                    read = max(read, sizes[j])
                    self.cache.move_to_end(keys[j])
                    break
        written = read
        for m in marked:
            if sizes[m] >= self.min_cache_tokens:
                self.cache[keys[m]] = None
                written = max(written, sizes[m])
        while len(self.cache) > self.max_entries:
            self.cache.popitem(last=False)
        return {
            "input_tokens": max(1, total - written),
            "output_tokens": max(1, sum(tokens(b) for b in output)),
            "cache_creation_input_tokens": written - read,
            "cache_read_input_tokens": read,
        }


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
        return {
            "id": f"msg_{key}",
            "type": "message",
            "role": "assistant",
            "model": request.get("model") or "scripted",
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": self.usage.estimate(request, content),
        }


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
