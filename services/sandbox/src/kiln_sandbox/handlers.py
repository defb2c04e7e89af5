"""The sandbox service's domain: run tool calls exactly once in each build's sandbox
(``sandboxes.py`` finds, makes and stops those), and serve the snapshot service's manifest and
upload requests. Plain ``async def``; no bus imports."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from pathlib import Path

from kiln_contracts import (
    BuildCancelled,
    BuildFailed,
    ManifestReply,
    ManifestRequest,
    SnapshotSaved,
    ToolCall,
    ToolResult,
    UploadReply,
    UploadRequest,
)
from kiln_runtime import metrics
from kiln_runtime.errors import RetryLater

from . import snapshot_requests
from .adapters.memory import MemoryProcesses, MemoryReads
from .execution import execute, log_execution, tool_result
from .ledger import renewing
from .locks import BuildLocks
from .ports import Provider, Publisher, Restorer
from .processes import Processes
from .records import CallRecord, CallStore, ProcessStore, ReadLog, Registry, SandboxRecord
from .sandboxes import Sandboxes
from .tools import ToolContext
from .workspace import Workspace

log = logging.getLogger(__name__)

INTERRUPTED = (
    "the previous run of this call was interrupted (the sandbox service restarted); "
    "it was not re-run"
)


class SandboxService:
    def __init__(
        self,
        provider: Provider,
        registry: Registry,
        calls: CallStore,
        bus: Publisher,
        restorer: Restorer | None = None,
        *,
        owner: str | None = None,
        lease_s: float = 30.0,
        exec_log: Path | None = None,
        processes: ProcessStore | None = None,
        reads: ReadLog | None = None,
    ) -> None:
        # Without Postgres (one replica, tests): the process table and read log in memory.
        self.processes = Processes(processes or MemoryProcesses(), bus)
        self.reads: ReadLog = reads or MemoryReads()
        self.sandboxes = Sandboxes(provider, registry, bus, restorer, self.processes)
        self.provider = provider
        # An audit trail: one line per execution, appended just before a tool runs.
        self.exec_log = exec_log
        # Who runs a call (this replica) and for how long its claim holds without renewal.
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lease_s = lease_s
        self.registry = registry
        self.calls = calls
        self.bus = bus
        self.locks = BuildLocks()  # tool calls of one build run one at a time
        # calls this process began to run whose result is not stored yet: one of these found
        # claimed by this process again was cut short (interrupted), any other was never run
        self._begun: set[tuple[str, str]] = set()

    @property
    def restorer(self) -> Restorer | None:
        return self.sandboxes.restorer

    @restorer.setter
    def restorer(self, restorer: Restorer | None) -> None:
        self.sandboxes.restorer = restorer

    # ------------------------------------------------------------------ tool calls

    async def handle_tool_call(self, call: ToolCall) -> ToolResult:
        """Run a call at most once; a repeat gets the stored result, an interrupted one an error.

        The usual path is three round trips: the claim (one INSERT, with the registry lookup
        alongside it), the tool, then 'done' with the result (one UPDATE) before the ToolResult
        is published. 'done' is committed before the publish: a crash between the two leaves a
        stored result that the redelivered call republishes with the same event id.
        """
        extra = {"build_id": call.build_id, "call_id": call.call_id, "event_id": call.event_id}
        async with self.locks.hold(call.build_id):
            record, seen = await self._claim(call)
            key = (call.build_id, call.call_id)
            # claimed by this process on an earlier delivery that never began to run it (the
            # claim's answer, or giving it back, lost to a database blip): it is safe to run
            unrun = seen is not None and seen.status == "started" and seen.owner == self.owner
            if seen is None or (unrun and key not in self._begun):  # this replica holds it
                if record is not None and _of_the_ended_run(call, record):
                    result = tool_result(
                        call,
                        output="the build's sandbox has been stopped (the build ended); "
                        "the call was not run",
                        is_error=True,
                    )
                else:
                    sandbox = await self._sandbox_or_release(call, record)
                    watch = await self._watch_processes(call, record)
                    self._begun.add(key)
                    log_execution(self.exec_log, call, self.owner)
                    async with renewing(self.calls, call, self.owner, self.lease_s):
                        result = await self._run(sandbox, call, watch)
                await self.calls.finish(call.build_id, call.call_id, result.model_dump(mode="json"))
                self._begun.discard(key)  # done: a redelivery finds its result
                await self.bus.publish(result)
                log.info(
                    "ran %s (error=%s, %d ms)",
                    call.tool,
                    result.is_error,
                    result.duration_ms,
                    extra=extra,
                )
                return result
            if seen.status == "started" and seen.owner != self.owner and seen.lease_left_s > 0:
                # Another replica is running it (its lease is fresh): ask again when it expires.
                raise RetryLater(
                    f"call {call.call_id} is running on {seen.owner}",
                    delay_s=min(seen.lease_left_s, self.lease_s) + 0.2,
                )
            if seen.status == "done" and seen.result is not None:
                result = ToolResult.model_validate(seen.result)
                log.info("call already done; republishing its result", extra=extra)
            else:
                result = tool_result(call, output=await self._interrupted(call), is_error=True)
                await self.calls.finish(call.build_id, call.call_id, result.model_dump(mode="json"))
                log.warning("call was interrupted earlier; not re-running it", extra=extra)
            await self.bus.publish(result)
            return result

    async def _watch_processes(self, call: ToolCall, record: SandboxRecord | None) -> bool:
        """Whether this call must look for background processes to report: the build has had
        some, or this call starts one (recorded first, so that a crash after the start still
        leaves the build's processes looked after)."""
        if record is not None and record.has_processes:
            return True
        if call.tool == "bash" and call.input.get("run_in_background") is True:
            try:
                await self.registry.mark_processes(call.build_id)
            except BaseException:
                await self._release(call)  # not run yet: the redelivery runs it
                raise
            return True
        return False

    async def _interrupted(self, call: ToolCall) -> str:
        started = await self.processes.store.by_call(call.build_id, call.call_id)
        if started is None:
            return INTERRUPTED
        return (
            f"{INTERRUPTED}; it may have started background process {started.process_id}: "
            f"check it with bash_output(bash_id={started.process_id!r}) or stop it with "
            f"kill_shell(shell_id={started.process_id!r})"
        )

    async def _claim(self, call: ToolCall) -> tuple[SandboxRecord | None, CallRecord | None]:
        """The build's sandbox record and the call's earlier record (None: claimed just now),
        read concurrently; the claim is given back if the registry lookup fails."""
        got_record, got_seen = await asyncio.gather(
            self.registry.get(call.build_id),
            self.calls.claim(call.build_id, call.call_id, self.owner, self.lease_s, call.iteration),
            return_exceptions=True,
        )
        if isinstance(got_seen, BaseException):
            raise got_seen
        if isinstance(got_record, BaseException):
            if got_seen is None:
                await self._release(call)
            raise got_record
        return got_record, got_seen

    async def _sandbox_or_release(self, call: ToolCall, record: SandboxRecord | None) -> Workspace:
        """The build's sandbox; on a failure (creating, restoring) the claim is given back so
        that the redelivered call is run, not reported interrupted."""
        try:
            return await self._sandbox(call, record)
        except BaseException:
            await self._release(call)
            raise

    async def _release(self, call: ToolCall) -> None:
        try:
            await self.calls.release(call.build_id, call.call_id, self.owner)
        except Exception:  # the original error matters more; a later delivery sees 'started'
            log.warning(
                "could not release the claim on %s", call.call_id, exc_info=True,
                extra={"build_id": call.build_id},
            )  # fmt: skip

    async def _run(self, sandbox: Workspace, call: ToolCall, watch: bool = False) -> ToolResult:
        result = await execute(sandbox, call, ToolContext(call, self.reads, self.processes))
        if watch and (notes := await self.processes.notes(call, sandbox)):
            result = result.model_copy(update={"output": f"{result.output}\n{notes}"})
        outcome = "error" if result.is_error else "ok"
        metrics.TOOL_SECONDS.labels(call.tool, outcome).observe(result.duration_ms / 1000)
        return result

    async def _sandbox(self, call: ToolCall, record: SandboxRecord | None) -> Workspace:
        """The build's sandbox: the recorded one, else a fresh one (restored from the latest
        snapshot if the build had one before: it is gone, or it was stopped when the build
        ended and the build has continued since)."""
        if (
            record is not None
            and record.state != "stopped"
            and (found := await self.sandboxes.connect(record)) is not None
        ):
            return found
        # Creating (and restoring) takes a while: the claim is given back meanwhile, so that a
        # crash in between leaves a call that is run on redelivery, not reported interrupted.
        await self.calls.release(call.build_id, call.call_id, self.owner)
        sandbox = await self.sandboxes.create(call, record)
        seen = await self.calls.claim(
            call.build_id, call.call_id, self.owner, self.lease_s, call.iteration
        )
        if seen is not None and not (seen.owner == self.owner and seen.status == "started"):
            # Another replica took the call meanwhile: its redelivery finds out what became of it.
            raise RetryLater(f"call {call.call_id} was claimed by {seen.owner}", delay_s=0.5)
        return sandbox

    # ------------------------------------------------------------------ lifecycle

    async def handle_snapshot_saved(self, event: SnapshotSaved) -> None:
        """After the final snapshot stop the sandbox; after the sleep snapshot pause it; unless
        the build has moved on since (a call of a later iteration came: it continued, or woke).
        Under the build's tool-call lock: no call starts in between."""
        if event.reason not in ("final", "sleep"):
            return
        async with self.locks.hold(event.build_id):
            if await self._moved_on(event.build_id, event.iteration):
                return
            await self.sandboxes.after_snapshot(event)

    async def handle_build_ended(self, event: BuildCancelled | BuildFailed) -> None:
        """Stop the sandbox of a cancelled or failed build (killing a command still running: not
        under the tool-call lock), unless the build has continued since."""
        if await self._moved_on(event.build_id, event.iterations):
            return
        await self.sandboxes.after_build_ended(event)

    async def _moved_on(self, build_id: str, iteration: int) -> bool:
        if (last := await self.calls.last_iteration(build_id)) > iteration:
            log.info(
                "the build has moved on to iteration %d since iteration %d: its sandbox stays",
                last,
                iteration,
                extra={"build_id": build_id},
            )
            return True
        return False

    # ------------------------------------------------------------------ snapshot rpc

    async def manifest(self, request: ManifestRequest) -> ManifestReply:
        return await snapshot_requests.manifest(self.sandboxes, request)

    async def upload(self, request: UploadRequest) -> UploadReply:
        return await snapshot_requests.upload(self.sandboxes, request)


def _of_the_ended_run(call: ToolCall, record: SandboxRecord) -> bool:
    """A call to a stopped sandbox from the run that ended (its iteration is not past the one
    the build had reached when it was stopped; unknown: not past it). A later call is the
    build's continuation."""
    return record.state == "stopped" and (
        record.iteration is None or call.iteration <= record.iteration
    )
