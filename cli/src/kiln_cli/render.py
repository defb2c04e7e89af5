"""Live rendering of a build's events with rich: iterations, tool calls, narration, cost, sleep."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.markup import escape

from .client import SseEvent

_EXIT_LINE = re.compile(r"^\[exit (code|status)[^\]]*\]$")


def usd(micro: int) -> str:
    return f"${micro / 1_000_000:,.4f}"


def short(value: Any, width: int = 80) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def tool_summary(tool: str, data: dict[str, Any]) -> str:
    """The gist of a tool call's input: the command, the path, the pattern."""
    for key in ("command", "pattern", "path", "file_path"):
        if key in data:
            extra = f" in {data['path']}" if key == "pattern" and "path" in data else ""
            return short(f"{data[key]}{extra}")
    return short(", ".join(f"{k}={v}" for k, v in data.items()))


class Renderer:
    """Turns events into lines on a console; remembers the build's status and cost."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.iteration = 0
        self.cost_micro_usd = 0
        self.status: str | None = None
        self.summary: str | None = None
        self.tool: str | None = None
        self.woken = False
        self.quiet = False  # follow the events without printing them (history not to show)

    def __call__(self, event: SseEvent) -> None:
        handler = getattr(self, f"on_{event.kind}", None)
        if handler:
            handler(event.data)

    def print(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False)

    # ------------------------------------------------------------------ per kind

    def on_build_requested(self, d: dict[str, Any]) -> None:
        self.status = "running"
        fork = d.get("fork") if isinstance(d.get("fork"), dict) else None
        self.print(
            f"[bold]▶ build {escape(d.get('build_id', '?'))}[/] started (tier {d.get('tier', '?')})"
            + (
                f", a fork of build {escape(str(fork.get('build_id')))} at iteration "
                f"{fork.get('iteration')}"
                if fork
                else ""
            )
        )
        if fork:
            self.iteration = int(fork.get("iteration") or 0)

    def on_sandbox_started(self, d: dict[str, Any]) -> None:
        self.print(
            f"[dim]  sandbox {escape(str(d.get('sandbox_id')))} ({d.get('provider')}) started[/]"
        )

    def on_sandbox_restored(self, d: dict[str, Any]) -> None:
        self.print(
            f"[dim]  sandbox {escape(str(d.get('sandbox_id')))} restored from snapshot "
            f"{escape(str(d.get('from_snapshot')))}[/]"
        )

    def on_agent_narrated(self, d: dict[str, Any]) -> None:
        text = str(d.get("text", "")).strip()
        if text and d.get("source") == "thinking":  # the notes the model wrote as it worked
            self.print(f"[dim italic]  {escape(text)}[/]")
        elif text:
            self.print(f"[italic cyan]  {escape(text)}[/]")

    def on_tool_call(self, d: dict[str, Any]) -> None:
        self.iteration = max(self.iteration, int(d.get("iteration", 0)))
        tool = str(d.get("tool", "?"))
        self.tool = tool
        inp = d.get("input") or {}
        summary = tool_summary(tool, inp if isinstance(inp, dict) else {})
        self.print(f"  [dim]\\[iter {self.iteration}][/] [bold]{escape(tool)}[/] {escape(summary)}")

    def on_tool_result(self, d: dict[str, Any]) -> None:
        lines = [
            ln
            for ln in str(d.get("output", "")).splitlines()
            if ln.strip() and not _EXIT_LINE.match(ln.strip())
        ]
        first = short(lines[-1] if lines else "", 100)
        code = d.get("exit_code")
        if d.get("is_error") or code not in (0, None):
            label = f"exit {code}" if code not in (0, None) else "error"
            self.print(f"    [red]✗ {label}[/] {escape(first)}")
        elif first:
            self.print(f"    [green]✓[/] [dim]{escape(first)}[/]")

    def on_iteration_completed(self, d: dict[str, Any]) -> None:
        self.iteration = max(self.iteration, int(d.get("iteration", 0)))
        self.cost_micro_usd += int(d.get("cost_micro_usd", 0))
        what = (
            "older turns summarised to fit the context window"
            if d.get("purpose") == "summary"
            else f"iteration {self.iteration} done"
        )
        self.print(
            f"[dim]  {what} · {d.get('model', '')} · cost so far {usd(self.cost_micro_usd)}[/]"
        )

    def on_snapshot_saved(self, d: dict[str, Any]) -> None:
        self.print(
            f"[dim]  snapshot {escape(str(d.get('snapshot_id')))}: {d.get('files', 0)} files, "
            f"{d.get('bytes_uploaded', 0)} bytes uploaded[/]"
        )

    def on_build_sleeping(self, d: dict[str, Any]) -> None:
        self.status = "sleeping"
        until = f" until {d['wake_at']}" if d.get("wake_at") else ""
        self.print(f"[yellow]💤 sleeping ({escape(str(d.get('reason', '')))}){until}[/]")

    def on_send_user_message(self, d: dict[str, Any]) -> None:
        self.print(f"[bold magenta]› you:[/] {escape(str(d.get('text', '')))}")

    def on_build_continued(self, d: dict[str, Any]) -> None:
        self.status = "running"
        self.print(
            f"[bold]↻ continued[/] (continuation {d.get('continuation')}, after it "
            f"{escape(str(d.get('after', 'ended')))}; iterations go on from {d.get('iterations')})"
        )

    def on_build_resumed(self, d: dict[str, Any]) -> None:
        self.status = "running"
        self.woken = True
        self.print(f"[yellow]⏰ waking up ({escape(str(d.get('reason', '')))})[/]")

    def _final(self, d: dict[str, Any]) -> str:
        self.iteration = max(self.iteration, int(d.get("iterations", 0)))
        self.cost_micro_usd = max(self.cost_micro_usd, int(d.get("cost_micro_usd", 0)))
        return f"{self.iteration} iterations, {usd(self.cost_micro_usd)}"

    def on_build_completed(self, d: dict[str, Any]) -> None:
        self.status = "completed"
        self.summary = str(d.get("summary", ""))
        self.print(f"[bold green]✔ completed[/] ({self._final(d)})")
        if self.summary:
            self.print(escape(self.summary))

    def on_build_failed(self, d: dict[str, Any]) -> None:
        self.status = "failed"
        detail = f": {d['detail']}" if d.get("detail") else ""
        self.print(
            f"[bold red]✘ failed[/] ({escape(str(d.get('reason')))}{escape(detail)}; {self._final(d)})"
        )

    def on_build_cancelled(self, d: dict[str, Any]) -> None:
        self.status = "cancelled"
        self.print(
            f"[bold yellow]■ cancelled[/] ({escape(str(d.get('reason', '')))}; {self._final(d)})"
        )

    def on_build_rejected(self, d: dict[str, Any]) -> None:
        self.status = "rejected"
        self.print(f"[bold red]✘ not started[/] ({escape(str(d.get('reason', '')))})")


def render(events: Iterable[SseEvent], console: Console) -> Renderer:
    """Render every event; returns the renderer (its ``status`` is the build's final status)."""
    renderer = Renderer(console)
    for event in events:
        renderer(event)
    return renderer
