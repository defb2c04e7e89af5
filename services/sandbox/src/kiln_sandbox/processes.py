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

Previews: whenever the service looks at a live process (every tool call of the build looks at
the others; ``bash_output`` at its own) it records the TCP ports the process's session listens
on; a port newly seen is a ``PreviewAvailable`` (its URL from the provider: E2B's host for the
port, or the gateway's proxy path locally), a port no longer seen, or the process's end, a
``PreviewGone``. Each is published before the record is updated, with an id stable per process,
port and the event that saw the change: a redelivered message republishes the same ids, and a
crash in between publishes the change again (the gateway's projection takes it once).
"""

from __future__ import annotations

import base64
import logging
import re
import shlex
from collections.abc import Sequence
from dataclasses import replace

from kiln_contracts import (
    Envelope,
    PreviewAvailable,
    PreviewGone,
    ProcessExited,
    ProcessStarted,
    ToolCall,
    stable_id,
)

from .ports import ProcessRecord, ProcessStatus, ProcessStore, Publisher, SandboxError
from .workspace import Workspace

log = logging.getLogger(__name__)

MAX_COMMAND_CHARS = 2_000  # of a command, in the events
READ_CHUNK = 256 * 1024  # bytes of new output bash_output fetches at most per call
SHOW_CHARS = 28_000  # characters of output bash_output shows at most (its header and notes fit
# beside them under the 30,000 of any tool result)
STOP_GRACE_S = 3  # SIGTERM, then SIGKILL after this long
SCRIPT_TIMEOUT_S = 30.0

_START = r"""
D=$1/$2
mkdir -p -- "$1" || exit 90
if ! mkdir -- "$D" 2>/dev/null; then printf 'already %s\n' "$(cat -- "$D/pid" 2>/dev/null)"; exit 0; fi
: >"$D/out"
setsid bash -c 'echo $$ >"$1/pid.tmp" && mv "$1/pid.tmp" "$1/pid"
bash -c "$2" >>"$1/out" 2>&1 </dev/null
echo $? >"$1/rc.tmp" && mv "$1/rc.tmp" "$1/rc"' _ "$D" "$3" >/dev/null 2>&1 </dev/null &
i=0
while [ ! -s "$D/pid" ] && [ "$i" -lt 500 ]; do sleep 0.01; i=$((i + 1)); done
printf 'started %s\n' "$(cat -- "$D/pid" 2>/dev/null)"
"""

# listening SID: the TCP ports on which the processes of session SID listen (from /proc: their
# sockets' inodes, matched against /proc/net/tcp{,6} entries in state LISTEN).
_LISTENING = r"""
listening() {
  local sid=$1 d s inodes=
  for d in /proc/[0-9]*; do
    s=$(cat "$d/stat" 2>/dev/null) || continue
    s=${s##*) }; set -- $s
    [ "$4" = "$sid" ] || continue
    inodes="$inodes $(ls -l "$d/fd" 2>/dev/null | sed -n 's/.*socket:\[\([0-9]*\)\].*/\1/p' | tr '\n' ' ')"
  done
  [ -n "${inodes// /}" ] || return 0
  cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk -v want="$inodes" '
    BEGIN { n = split(want, w, " "); for (i = 1; i <= n; i++) ok[w[i]] = 1 }
    $4 == "0A" && ($10 in ok) { split($2, a, ":"); print a[2] }
  ' 2>/dev/null | while read -r h; do echo $((16#$h)); done | sort -un | tr '\n' ' '
}
"""

# state OFFSET MAX: "<status> <rc> <size>" then the output from OFFSET (at most MAX bytes, base64).
# The status is taken before the output is read: an exited process's output is all there.
_OUTPUT = r"""
D=$1/$2
[ -d "$D" ] || { echo 'gone - 0'; exit 0; }
p=$(cat -- "$D/pid" 2>/dev/null)
if [ -e "$D/rc" ]; then st="exited $(cat -- "$D/rc")"
elif [ -n "$p" ] && kill -0 -- "-$p" 2>/dev/null; then st='running -'
else st='killed -'; fi
size=$(stat -c %s -- "$D/out" 2>/dev/null || echo 0)
printf '%s %s\n' "$st" "$size"
ports=
[ "$st" = 'running -' ] && ports=$(listening "$p")
printf 'ports %s\n' "$ports"
tail -c "+$(($3 + 1))" -- "$D/out" 2>/dev/null | head -c "$4" | base64 -w0
echo
"""

# check ID...: per process "<id> <status> <rc> <ports>" (status: running, exited, killed, gone;
# ports: comma-separated, '-' for none).
_CHECK = r"""
dir=$1; shift
for id in "$@"; do
  D=$dir/$id; p=$(cat -- "$D/pid" 2>/dev/null)
  if [ ! -d "$D" ]; then echo "$id gone - -"
  elif [ -e "$D/rc" ]; then echo "$id exited $(cat -- "$D/rc") -"
  elif [ -n "$p" ] && kill -0 -- "-$p" 2>/dev/null; then
    ports=$(listening "$p" | tr -s ' ' ','); ports=${ports%,}; echo "$id running - ${ports:--}"
  else echo "$id killed - -"; fi
done
"""

# stop GRACE ID...: SIGTERM each live one's group, SIGKILL after GRACE seconds; then per process
# "<id> <status> <rc>" (status: exited, killed, gone).
_STOP = r"""
dir=$1; grace=$2; shift 2
live=()
for id in "$@"; do
  D=$dir/$id; p=$(cat -- "$D/pid" 2>/dev/null) || continue
  [ -e "$D/rc" ] && continue
  kill -TERM -- "-$p" 2>/dev/null && live+=("$p")
done
i=0
while [ "${#live[@]}" -gt 0 ] && [ "$i" -lt $((grace * 20)) ]; do
  left=(); for p in "${live[@]}"; do kill -0 -- "-$p" 2>/dev/null && left+=("$p"); done
  live=("${left[@]}"); [ "${#live[@]}" -gt 0 ] && sleep 0.05; i=$((i + 1))
done
for p in "${live[@]}"; do kill -KILL -- "-$p" 2>/dev/null; done
for id in "$@"; do
  D=$dir/$id
  if [ ! -d "$D" ]; then echo "$id gone -"
  elif [ -e "$D/rc" ]; then echo "$id exited $(cat -- "$D/rc")"
  else echo "$id killed -"; fi
done
"""


def _script(body: str, *args: str) -> str:
    """``body`` as a ``bash -c`` command line with positional arguments (every one quoted,
    the process directory left as the machine gives it: a shell word)."""
    return " ".join(["bash", "-c", shlex.quote(body), "kiln", *args])


class Processes:
    """A build's background processes: started, read, stopped, reported (see the module)."""

    def __init__(self, store: ProcessStore, bus: Publisher) -> None:
        self.store = store
        self.bus = bus

    async def _sh(self, ws: Workspace, body: str, *args: str) -> str:
        command = _script(body, ws.machine.process_dir, *(shlex.quote(a) for a in args))
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
        out = await self._sh(ws, _START, record.process_id, command)
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
            return f"{_describe(record)}\n(its output is gone with it)"
        out = await self._sh(
            ws, _LISTENING + _OUTPUT, process_id, str(record.read_offset), str(READ_CHUNK)
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
            await self._ports_changed(ws, call, record, ports)
        if ended and record.live:
            how: ProcessStatus = "exited" if status == "exited" else "killed"
            new = replace(
                new,
                status=how,
                exit_code=int(rc) if rc.lstrip("-").isdigit() else None,
                reason="exited by itself" if how == "exited" else "ended without an exit status",
            )
            await self.store.update(new)
            await self._exited(call, new)
        elif offset != record.read_offset or ports != record.ports:
            await self.store.update(new)
        body = text if text.strip() else "(no new output)"
        tail = f"\n[{'; '.join(notes)}]" if notes else ""
        return f"{_describe(new)}\n{body.rstrip()}{tail}"

    async def kill(self, ws: Workspace, call: ToolCall, process_id: str) -> str:
        record = await self.find(call.build_id, process_id)
        if not record.live:
            return f"{process_id} is not running: {_describe(record)}"
        if record.sandbox_id != ws.sandbox_id:
            stopped = await self._lost(call, [record])
            return f"{process_id} is not running: {_describe(stopped[0])}"
        (ended,) = await self._stop(ws, [record], how="killed", reason="killed by kill_shell")
        await self._exited(call, ended)
        return f"{_describe(ended)}"

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
                await self._exited(event, ended)
        return len(live)

    async def notes(self, call: ToolCall, ws: Workspace) -> str:
        """What to tell the model, in this call's result, of its background processes: those the
        platform ended (lost with a sandbox that is gone, stopped at a sleep or the build's end)
        and those that have exited by themselves since (seen now, with one look at the live ones
        in the sandbox, which also updates the ports they listen on)."""
        lost, ended = await self.store.to_report(call.build_id, ws.sandbox_id, call.call_id)
        for record in lost:
            await self._exited(call, record)
        exited = await self._check(ws, call)
        notes: list[str] = []
        if ended:
            listed = "; ".join(f"{r.process_id} ({_short(r.command)}): {r.reason}" for r in ended)
            notes.append(
                f"[background processes no longer running: {listed}. They were not restarted; "
                "start again what you need with bash and run_in_background]"
            )
        if exited:
            listed = "; ".join(_describe(r) for r in exited)
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
            out = await self._sh(ws, _LISTENING + _CHECK, *(r.process_id for r in live))
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
                    await self._ports_changed(ws, event, r, found)
                    await self.store.update(replace(r, ports=found))
                continue
            new = replace(
                r,
                status="exited"
                if status == "exited"
                else "killed"
                if status == "killed"
                else "lost",
                exit_code=int(rc) if rc.lstrip("-").isdigit() else None,
                reason="exited by itself"
                if status == "exited"
                else "ended without an exit status"
                if status == "killed"
                else "gone from its sandbox",
            )
            await self.store.update(new)
            await self._exited(event, new)
            ended.append(new)
        return ended

    # ------------------------------------------------------------------ helpers

    async def _stop(
        self, ws: Workspace, records: Sequence[ProcessRecord], *, how: ProcessStatus, reason: str
    ) -> list[ProcessRecord]:
        out = await self._sh(ws, _STOP, str(STOP_GRACE_S), *(r.process_id for r in records))
        seen: dict[str, tuple[str, str]] = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3:
                seen[parts[0]] = (parts[1], parts[2])
        ended: list[ProcessRecord] = []
        for r in records:
            status, rc = seen.get(r.process_id, ("gone", "-"))
            if status == "exited":
                new = replace(
                    r,
                    status="exited",
                    exit_code=int(rc) if rc.lstrip("-").isdigit() else None,
                    reason="exited by itself",
                )
            elif status == "gone":
                new = replace(r, status="lost", reason="gone from its sandbox")
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
            await self._exited(event, new)
            out.append(new)
        return out

    async def _ports_changed(
        self, ws: Workspace, event: Envelope, record: ProcessRecord, ports: tuple[int, ...]
    ) -> None:
        """Publish the previews a change of ``record``'s listening ports makes and ends."""
        for port in sorted(set(record.ports) - set(ports)):
            await self._gone(event, record, port, "no longer listening")
        for port in sorted(set(ports) - set(record.ports)):
            try:
                target = ws.machine.preview(port)
            except Exception as err:  # a provider that cannot say: no preview, the rest goes on
                log.warning("no preview for port %s: %s", port, err,
                            extra={"build_id": event.build_id})  # fmt: skip
                continue
            url = target.url or f"/v1/builds/{event.build_id}/preview/{port}/"
            await self.bus.publish(
                event.caused(
                    PreviewAvailable,
                    process_id=record.process_id,
                    port=port,
                    provider=target.provider,
                    sandbox_id=record.sandbox_id,
                    url=url,
                    traffic_access_token=target.traffic_access_token,
                ).with_id(
                    stable_id(
                        event.build_id,
                        "preview_available",
                        record.process_id,
                        str(port),
                        str(event.event_id),
                    )
                )
            )
            log.info("preview of %s on port %s: %s", record.process_id, port, url,
                     extra={"build_id": event.build_id})  # fmt: skip

    async def _gone(self, event: Envelope, record: ProcessRecord, port: int, reason: str) -> None:
        await self.bus.publish(
            event.caused(
                PreviewGone, process_id=record.process_id, port=port, reason=reason
            ).with_id(
                stable_id(
                    event.build_id,
                    "preview_gone",
                    record.process_id,
                    str(port),
                    str(event.event_id),
                )
            )
        )

    async def _exited(self, event: Envelope, record: ProcessRecord) -> None:
        for port in record.ports:
            await self._gone(event, record, port, f"its process {record.status}")
        await self.bus.publish(
            event.caused(
                ProcessExited,
                process_id=record.process_id,
                how=record.status if record.status != "starting" else "lost",
                exit_code=record.exit_code,
                reason=record.reason,
            ).with_id(stable_id(event.build_id, "process_exited", record.process_id))
        )


def _short(command: str, limit: int = 80) -> str:
    one = " ".join(command.split())
    return one if len(one) <= limit else one[: limit - 3] + "..."


def _describe(r: ProcessRecord) -> str:
    what = f"{r.process_id} ({_short(r.command)})"
    if r.live:
        ports = ", ".join(map(str, r.ports))
        return (
            f"{what}: running"
            + (f", pid {r.pid}" if r.pid else "")
            + (f", listening on port{'s' if len(r.ports) > 1 else ''} {ports}" if ports else "")
        )
    if r.status == "exited":
        return f"{what}: exited with code {r.exit_code}"
    return f"{what}: {r.status} ({r.reason})" if r.reason else f"{what}: {r.status}"
