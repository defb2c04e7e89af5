"""Background processes: ``bash`` with ``run_in_background``, ``bash_output``, ``kill_shell``.

A process runs in the build's sandbox in a session (and process group) of its own, started by
a small wrapper that keeps, in the machine's ``process_dir`` (outside the workspace, so never
snapshotted), a directory per process: ``pid`` (the session leader's id), ``out`` (stdout and
stderr, appended) and, once the command has ended by itself, ``rc`` (its exit status). Every
step is one ``Machine.run`` of a short shell script, written once here for every provider.

What the service knows of a process is its ``ProcessRecord`` (Postgres, ``processes``): which
call started it (one process per call: a redelivered call finds the record, and the wrapper
refuses to start a second process in the same directory), its sandbox, its status, the bytes of
output already shown. A process lives and dies with its sandbox: before the sandbox is paused
(sleep) or stopped (cancel, failure, the final snapshot) its processes are stopped; when the
build goes on in another sandbox (restored after a loss, or continued) those still recorded as
live are ``lost``. Processes are not restarted: the next tool result of the build tells the
model which processes ended that way (``notes``), and it starts again what it needs.
Events: ``ProcessStarted`` and ``ProcessExited`` (stable ids: one each per process).

The wrapper and the other steps' shell scripts are in ``process_scripts``; the events of a
process's end and of its previews are published by ``process_events``.
"""

from __future__ import annotations

import base64
import logging
import re
import shlex
from collections.abc import Sequence
from dataclasses import replace

from kiln_contracts import Envelope, ProcessStarted, ToolCall, stable_id

from .ports import Publisher, SandboxError
from .process_events import ProcessEvents
from .process_records import describe, ended_as_seen, short
from .process_scripts import (
    CHECK,
    LISTENING,
    MAX_COMMAND_CHARS,
    OUTPUT,
    READ_CHUNK,
    SCRIPT_TIMEOUT_S,
    SHOW_CHARS,
    START,
    STOP,
    STOP_GRACE_S,
    script,
)
from .records import ProcessRecord, ProcessStatus, ProcessStore
from .workspace import Workspace

log = logging.getLogger(__name__)


class Processes:
    """A build's background processes: started, read, stopped, reported (see the module)."""

    def __init__(self, store: ProcessStore, bus: Publisher) -> None:
        self.store = store
        self.bus = bus
        self.events = ProcessEvents(bus)

    async def _sh(self, ws: Workspace, body: str, *args: str) -> str:
        command = script(body, ws.machine.process_dir, *(shlex.quote(a) for a in args))
        result = await ws.run(command, timeout_s=SCRIPT_TIMEOUT_S, max_output=4 * READ_CHUNK)
        if result.timed_out or result.exit_code:
            out = (result.head + result.tail).decode("utf-8", errors="replace").strip()
            raise SandboxError(
                f"the process wrapper failed (exit {result.exit_code}): {out[-500:]}"
            )
        return (result.head + result.tail).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ the tools

    async def start(self, ws: Workspace, call: ToolCall, command: str) -> ProcessRecord:
        """Start ``command`` in the background for ``call`` (at most one process per call)."""
        record, new = await self.store.register(
            call.build_id, call.call_id, call.iteration, command, ws.sandbox_id
        )
        if not new and record.status != "starting":
            return record
        out = await self._sh(ws, START, record.process_id, command)
        word, _, pid = out.strip().partition(" ")
        if word not in ("started", "already"):
            raise SandboxError(f"could not start the process: {out.strip()[-500:]}")
        record = replace(record, status="running", pid=int(pid) if pid.isdigit() else None)
        await self.store.update(record)
        await self.bus.publish(
            call.caused(
                ProcessStarted,
                process_id=record.process_id,
                call_id=call.call_id,
                iteration=call.iteration,
                command=command[:MAX_COMMAND_CHARS],
                sandbox_id=ws.sandbox_id,
                pid=record.pid,
            ).with_id(stable_id(call.build_id, "process_started", record.process_id))
        )
        log.info("started %s (pid %s)", record.process_id, record.pid,
                 extra={"build_id": call.build_id})  # fmt: skip
        return record

    async def find(self, build_id: str, process_id: str) -> ProcessRecord:
        record = await self.store.get(build_id, process_id)
        if record is None:
            known = [r.process_id for r in await self.store.all(build_id)]
            raise SandboxError(
                f"no background process {process_id!r}"
                + (f"; this build's are: {', '.join(known)}" if known else "; none was started")
            )
        return record

    async def output(
        self, ws: Workspace, call: ToolCall, process_id: str, pattern: re.Pattern[str] | None
    ) -> str:
        """The process's output since the last read (lines matching ``pattern`` only, if given;
        the others are skipped for good) and its status."""
        record = await self.find(call.build_id, process_id)
        if record.sandbox_id != ws.sandbox_id or record.status in ("stopped", "lost"):
            return f"{describe(record)}\n(its output is gone with it)"
        out = await self._sh(
            ws, LISTENING + OUTPUT, process_id, str(record.read_offset), str(READ_CHUNK)
        )
        first, _, rest = out.partition("\n")
        ports_line, _, data = rest.partition("\n")
        ports = tuple(int(x) for x in ports_line.split()[1:] if x.isdigit())
        status, rc, size = [*first.split(), "-", "-", "0"][:3]
        raw = base64.b64decode(data.strip() or b"")
        total = int(size) if size.isdigit() else record.read_offset + len(raw)
        chunk = raw
        if record.read_offset + len(raw) < total and b"\n" in raw:
            chunk = raw[: raw.rindex(b"\n") + 1]  # a whole number of lines; the rest next time
        text = chunk.decode("utf-8", errors="replace")
        shown_bytes = len(chunk)
        notes: list[str] = []
        if pattern is not None:
            lines = [line for line in text.splitlines() if pattern.search(line)]
            text = "\n".join(lines)
            notes.append(f"{len(lines)} matching line{'s' if len(lines) != 1 else ''} shown")
        elif len(text) > SHOW_CHARS:
            cut = text[:SHOW_CHARS]
            if "\n" in cut:
                cut = cut[: cut.rindex("\n") + 1]
            shown_bytes = len(cut.encode("utf-8"))
            text = cut
        offset = record.read_offset + shown_bytes
        left = total - offset
        if left > 0:
            notes.append(f"{left:,} more bytes of output not read yet; call bash_output again")
        ended = status in ("exited", "killed", "gone")
        new = replace(record, read_offset=offset, ports=record.ports if ended else ports)
        if not ended and record.live and ports != record.ports:
            await self.events.ports_changed(ws, call, record, ports)
        if ended and record.live:
            new = ended_as_seen(new, "exited" if status == "exited" else "killed", rc)
            await self.store.update(new)
            await self.events.exited(call, new)
        elif offset != record.read_offset or ports != record.ports:
            await self.store.update(new)
        body = text if text.strip() else "(no new output)"
        tail = f"\n[{'; '.join(notes)}]" if notes else ""
        return f"{describe(new)}\n{body.rstrip()}{tail}"

    async def kill(self, ws: Workspace, call: ToolCall, process_id: str) -> str:
        record = await self.find(call.build_id, process_id)
        if not record.live:
            return f"{process_id} is not running: {describe(record)}"
        if record.sandbox_id != ws.sandbox_id:
            stopped = await self._lost(call, [record])
            return f"{process_id} is not running: {describe(stopped[0])}"
        (ended,) = await self._stop(ws, [record], how="killed", reason="killed by kill_shell")
        await self.events.exited(call, ended)
        return f"{describe(ended)}"

    # ------------------------------------------------------------------ the platform

    async def any_live(self, build_id: str) -> bool:
        return any(r.live for r in await self.store.all(build_id))

    async def stop_all(self, ws: Workspace | None, event: Envelope, reason: str) -> int:
        """Stop the build's live processes (before its sandbox is paused or stopped); with no
        sandbox (``ws`` None: it is gone) they are recorded lost. How many there were."""
        live = [r for r in await self.store.all(event.build_id) if r.live]
        if not live:
            return 0
        here = [r for r in live if ws is not None and r.sandbox_id == ws.sandbox_id]
        elsewhere = [r for r in live if r not in here]
        if elsewhere:
            await self._lost(event, elsewhere)
        if here and ws is not None:
            for ended in await self._stop(ws, here, how="stopped", reason=reason):
                await self.events.exited(event, ended)
        return len(live)

    async def notes(self, call: ToolCall, ws: Workspace) -> str:
        """What to tell the model, in this call's result, of its background processes: those the
        platform ended (lost with a sandbox that is gone, stopped at a sleep or the build's end)
        and those that have exited by themselves since (seen now, with one look at the live ones
        in the sandbox, which also updates the ports they listen on)."""
        lost, ended = await self.store.to_report(call.build_id, ws.sandbox_id, call.call_id)
        for record in lost:
            await self.events.exited(call, record)
        exited = await self._check(ws, call)
        notes: list[str] = []
        if ended:
            listed = "; ".join(f"{r.process_id} ({short(r.command)}): {r.reason}" for r in ended)
            notes.append(
                f"[background processes no longer running: {listed}. They were not restarted; "
                "start again what you need with bash and run_in_background]"
            )
        if exited:
            listed = "; ".join(describe(r) for r in exited)
            notes.append(
                f"[background processes that have ended: {listed}. Their last output: bash_output]"
            )
        return "\n".join(notes)

    async def _check(self, ws: Workspace, event: ToolCall) -> list[ProcessRecord]:
        """Look at the build's live processes in ``ws`` (one command): record the ones that have
        ended (``ProcessExited``; returned) and the ports the others listen on."""
        live = [
            r for r in await self.store.all(event.build_id)
            if r.live and r.sandbox_id == ws.sandbox_id and r.call_id != event.call_id
        ]  # fmt: skip
        if not live:
            return []
        try:
            out = await self._sh(ws, LISTENING + CHECK, *(r.process_id for r in live))
        except SandboxError as err:
            log.warning("could not look at the background processes: %s", err,
                        extra={"build_id": event.build_id})  # fmt: skip
            return []
        seen = {p[0]: p[1:] for line in out.splitlines() if len(p := line.split()) == 4}
        ended: list[ProcessRecord] = []
        for r in live:
            status, rc, ports = seen.get(r.process_id, ("gone", "-", "-"))
            if status == "running":
                found = tuple(int(x) for x in ports.split(",") if x.isdigit())
                if found != r.ports:
                    await self.events.ports_changed(ws, event, r, found)
                    await self.store.update(replace(r, ports=found))
                continue
            new = ended_as_seen(r, status, rc)
            await self.store.update(new)
            await self.events.exited(event, new)
            ended.append(new)
        return ended

    # ------------------------------------------------------------------ helpers

    async def _stop(
        self, ws: Workspace, records: Sequence[ProcessRecord], *, how: ProcessStatus, reason: str
    ) -> list[ProcessRecord]:
        out = await self._sh(ws, STOP, str(STOP_GRACE_S), *(r.process_id for r in records))
        seen: dict[str, tuple[str, str]] = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3:
                seen[parts[0]] = (parts[1], parts[2])
        ended: list[ProcessRecord] = []
        for r in records:
            status, rc = seen.get(r.process_id, ("gone", "-"))
            if status in ("exited", "gone"):
                new = ended_as_seen(r, status, rc)
            else:
                new = replace(r, status=how, reason=reason)
            await self.store.update(new)
            ended.append(new)
        return ended

    async def _lost(self, event: Envelope, records: Sequence[ProcessRecord]) -> list[ProcessRecord]:
        out = []
        for r in records:
            new = replace(r, status="lost", reason="its sandbox went away")
            await self.store.update(new)
            await self.events.exited(event, new)
            out.append(new)
        return out
