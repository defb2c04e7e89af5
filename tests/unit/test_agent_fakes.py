"""Fakes for the agent's tests (a publisher, scripted replies, a tiny workspace that runs tools),
and tests that keep the fakes honest."""

from __future__ import annotations

import asyncio
import fnmatch
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from kiln_agent import config as agent_config
from kiln_agent.adapters.memory import MemoryStore
from kiln_agent.loop import Agent
from kiln_agent.ports import ModelError, ModelReply, ModelRequest
from kiln_contracts import Envelope, ToolCall, ToolResult, Usage
from kiln_devstack.model import script
from kiln_runtime import config as kiln_config


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[Envelope] = []
        self.fail_next = 0

    async def publish(self, msg: Envelope) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("bus down")
        self.sent.append(msg)

    def of(self, cls: type[Any]) -> list[Any]:
        """Distinct messages of a kind (by event id, as the server dedups them)."""
        seen: dict[Any, Any] = {}
        for m in self.sent:
            if isinstance(m, cls):
                seen.setdefault(m.event_id, m)
        return list(seen.values())


def tool_use(call_id: str, name: str, **tool_input: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": tool_input}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


class FakeModel:
    """Replies from a list (the last one repeats); records the requests."""

    def __init__(self, *replies: tuple[list[dict[str, Any]], str] | Exception) -> None:
        self.replies = list(replies)
        self.requests: list[ModelRequest] = []
        self.gate: asyncio.Event | None = None

    async def complete(self, request: ModelRequest) -> ModelReply:
        self.requests.append(request)
        if self.gate is not None:
            await self.gate.wait()
        item = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(item, Exception):
            raise item
        content, stop = item
        return ModelReply(
            model=request.model,
            content=content,
            stop_reason=stop,
            usage=Usage(input_tokens=1000, output_tokens=100, cache_read_input_tokens=500),
        )


class ScriptedModel:
    """The scripted model (kiln_devstack) as the agent's Model port, without HTTP."""

    def __init__(self) -> None:
        self.script = script.ScriptedModel()

    async def complete(self, request: ModelRequest) -> ModelReply:
        body = self.script.respond(request.model_dump())
        return ModelReply(
            model=body["model"],
            content=body["content"],
            stop_reason=body["stop_reason"],
            usage=Usage(**body["usage"]),
        )


def make_agent(model: Any, **kwargs: Any) -> tuple[Agent, MemoryStore, FakePublisher]:
    store, pub = MemoryStore(), FakePublisher()
    agent = Agent(store, model, pub, agent_config.load(), kiln_config.default(), **kwargs)
    return agent, store, pub


def result_for(call: ToolCall, output: str = "done", **fields: Any) -> ToolResult:
    return call.caused(
        ToolResult, call_id=call.call_id, iteration=call.iteration, output=output, **fields
    )


class Workspace:
    """Runs ToolCalls in a directory, just enough of the sandbox for the scripted demo."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.background: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def close(self) -> None:
        for proc, _ in self.background.values():
            proc.kill()
            proc.wait()

    def _path(self, rel: Any) -> Path:
        path = (self.root / str(rel or ".")).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"path escapes the workspace: {rel}")
        return path

    def run(self, call: ToolCall) -> ToolResult:
        args = call.input
        changed: list[str] = []
        exit_code = None
        try:
            if call.tool == "write_file":
                p = self._path(args["path"])
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(str(args["content"]))
                out, changed = f"wrote {args['path']}", [str(args["path"])]
            elif call.tool == "read_file":
                lines = self._path(args["path"]).read_text().splitlines()
                out = "\n".join(f"{i:6}\t{line}" for i, line in enumerate(lines, 1))
            elif call.tool == "edit_file":
                p = self._path(args["path"])
                body = p.read_text()
                old, new = str(args["old_string"]), str(args["new_string"])
                if body.count(old) != 1:
                    raise ValueError(f"old_string occurs {body.count(old)} times")
                p.write_text(body.replace(old, new))
                out, changed = f"edited {args['path']}", [str(args["path"])]
            elif call.tool == "bash" and args.get("run_in_background"):
                pid = f"bash_{len(self.background) + 1}"
                log = self.root.parent / f"{self.root.name}.{pid}.out"
                with log.open("wb") as f:
                    started = subprocess.Popen(  # stopped by close(), and after 120 s anyway
                        ["timeout", "120", "bash", "-c",
                         str(args["command"]).replace("python ", f"{sys.executable} ", 1)],
                        cwd=self.root, stdout=f, stderr=subprocess.STDOUT,
                    )  # fmt: skip
                self.background[pid] = (started, log)
                out = f"Command running in background with ID: {pid}"
            elif call.tool == "bash_output":
                started, log = self.background[str(args["bash_id"])]
                state = "running" if started.poll() is None else f"exited {started.returncode}"
                out = f"{args['bash_id']}: {state}\n{log.read_text()}"
            elif call.tool == "bash":
                proc = subprocess.run(
                    str(args["command"]).replace("python ", f"{sys.executable} ", 1),
                    shell=True,
                    cwd=self.root,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                )
                out, exit_code = proc.stdout + proc.stderr, proc.returncode
                if exit_code:
                    return result_for(call, out, is_error=True, exit_code=exit_code)
            elif call.tool == "list_dir":
                out = "\n".join(sorted(p.name for p in self._path(args.get("path")).iterdir()))
            elif call.tool == "glob":
                out = "\n".join(
                    str(p.relative_to(self.root))
                    for p in self.root.rglob("*")
                    if fnmatch.fnmatch(str(p.relative_to(self.root)), str(args["pattern"]))
                )
            elif call.tool == "grep":
                rx = re.compile(str(args["pattern"]))
                out = "\n".join(
                    f"{p.relative_to(self.root)}:{i}:{line}"
                    for p in self.root.rglob("*")
                    if p.is_file()
                    for i, line in enumerate(p.read_text().splitlines(), 1)
                    if rx.search(line)
                )
            else:
                raise ValueError(f"unknown tool {call.tool}")
        except Exception as err:
            return result_for(call, f"{type(err).__name__}: {err}", is_error=True)
        return result_for(call, out or "(empty)", exit_code=exit_code, files_changed=changed)


# ------------------------------------------------------------------ the fakes' own tests


def test_workspace_confines_paths_and_runs_tools(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)

    def call(tool: str, **tool_input: Any) -> ToolCall:
        return ToolCall(
            build_id="b1", user_id="u1", call_id="c", iteration=1, tool=tool, input=tool_input
        )

    assert ws.run(call("read_file", path="../etc/passwd")).is_error
    assert ws.run(call("write_file", path="a/b.txt", content="hi\n")).files_changed == ["a/b.txt"]
    assert "hi" in ws.run(call("read_file", path="a/b.txt")).output
    failed = ws.run(call("bash", command="exit 3"))
    assert failed.is_error and failed.exit_code == 3


async def test_fake_model_repeats_its_last_reply() -> None:
    model = FakeModel(([text("a")], "end_turn"), ModelError("boom"))
    req = ModelRequest(model="claude-haiku-5-5", system=[], tools=[], messages=[], max_tokens=1)
    assert (await model.complete(req)).content == [text("a")]
    for _ in range(2):
        try:
            await model.complete(req)
        except ModelError:
            pass
        else:
            raise AssertionError("expected ModelError")
