"""Each build's sandbox: found, made (and restored from the latest snapshot when it existed and
is gone), paused and stopped, with the events that say so; the snapshot service's manifest and
upload requests are served from it by ``snapshot_requests``. Plain ``async def``; no bus imports."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from kiln_contracts import (
    BuildCancelled,
    BuildFailed,
    Envelope,
    ForkOrigin,
    SandboxRestored,
    SandboxStarted,
    SandboxStopped,
    SnapshotSaved,
    ToolCall,
    stable_id,
)
from kiln_runtime.errors import RetryLater

from .locks import BuildLocks
from .ports import Provider, Publisher, Restorer, SandboxError, SandboxGone
from .records import Registry, SandboxRecord, SandboxState
from .workspace import Workspace

if TYPE_CHECKING:
    from .processes import Processes

log = logging.getLogger(__name__)


class Sandboxes:
    """The builds' sandboxes of one provider, as the registry records them."""

    def __init__(
        self,
        provider: Provider,
        registry: Registry,
        bus: Publisher,
        restorer: Restorer | None = None,
        processes: Processes | None = None,
    ) -> None:
        self.provider = provider
        self.registry = registry
        self.bus = bus
        self.restorer = restorer
        self.processes = processes
        self.lifecycle = BuildLocks()  # pause/stop of one build, one at a time

    async def connect(self, record: SandboxRecord) -> Workspace | None:
        """The recorded sandbox (resumed, marked running), or None when it is gone or was made
        by another provider."""
        if record.provider != self.provider.name:
            return None
        try:
            sandbox = Workspace(
                await self.provider.connect(
                    record.build_id, record.sandbox_id, running=record.state == "running"
                )
            )
        except SandboxGone:
            log.warning("sandbox %s is gone; creating a fresh one", record.sandbox_id)
            return None
        if record.state != "running":
            await self._set_state(record, "running")
        return sandbox

    async def create(self, call: ToolCall, record: SandboxRecord | None) -> Workspace:
        """A fresh sandbox for the build, recorded by compare-and-set on the one it replaces
        (``record``, gone; None for a build's first) and restored from the latest snapshot
        when there was one; ``SandboxStarted`` or ``SandboxRestored``."""
        sandbox = Workspace(await self.provider.create(call.build_id, user_id=call.user_id))
        snapshot_id = None
        # it existed and is gone: rebuild it from the latest snapshot; a fork's first sandbox:
        # from its source's snapshot (the fork's first, copied from it)
        if record is not None or call.restore_from is not None:
            snapshot_id = await self.restore(call.build_id, sandbox, call.restore_from)
        had_processes = record is not None and record.has_processes
        held = await self.registry.replace(
            SandboxRecord(
                call.build_id,
                self.provider.name,
                sandbox.sandbox_id,
                "running",
                has_processes=had_processes,
            ),
            expected=record.sandbox_id if record is not None else None,
        )
        if held.sandbox_id != sandbox.sandbox_id:
            # Another replica made the build's sandbox meanwhile (a parallel call of the same
            # build, or a redelivery): that one is kept and used, this one is stopped.
            log.info(
                "the build's sandbox %s was made elsewhere first; stopping %s",
                held.sandbox_id,
                sandbox.sandbox_id,
                extra={"build_id": call.build_id},
            )
            await self.provider.stop(call.build_id, sandbox.sandbox_id)
            return Workspace(await self.provider.connect(call.build_id, held.sandbox_id))
        try:
            await self.provider.stop_others(call.build_id, sandbox.sandbox_id)
        except SandboxError as err:  # a sweep that fails is retried at the next creation
            log.warning("could not look for the build's unrecorded sandboxes: %s", err)
        if had_processes and self.processes is not None:
            # The old sandbox's processes are gone with it (or, where the provider reuses the
            # sandbox's id, stopped now); the call's result tells the model which.
            await self._stop_processes_in(sandbox, call, "its sandbox was replaced by a fresh one")
        if snapshot_id is not None:
            await self.bus.publish(
                call.caused(
                    SandboxRestored,
                    sandbox_id=sandbox.sandbox_id,
                    provider=self.provider.name,
                    from_snapshot=snapshot_id,
                ).with_id(
                    stable_id(call.build_id, "sandbox_restored", sandbox.sandbox_id, snapshot_id)
                )
            )
        else:
            await self.bus.publish(
                call.caused(
                    SandboxStarted, sandbox_id=sandbox.sandbox_id, provider=self.provider.name
                ).with_id(stable_id(call.build_id, "sandbox_started", sandbox.sandbox_id))
            )
        return sandbox

    async def restore(
        self, build_id: str, sandbox: Workspace, fork: ForkOrigin | None = None
    ) -> str | None:
        """Download the latest snapshot into a fresh sandbox; its id, or None if there is none.
        ``fork``: the build is a fork (with no snapshot of its own yet, its source's is its
        first).

        A failed download raises, so the call is redelivered (it has not been recorded yet).
        """
        if self.restorer is None:
            return None
        if fork is None:
            plan = await self.restorer.restore_plan(build_id)
        else:
            plan = await self.restorer.restore_plan(build_id, fork=fork)
            if plan is None:
                # a fork's files are its source's: never an empty workspace for want of an answer
                raise RetryLater(
                    f"no restore plan for fork {build_id} (is the snapshot service up?)",
                    delay_s=2.0,
                )
        if plan is None or plan.snapshot_id is None:
            return None
        if not plan.ok:
            raise RuntimeError(f"restore plan for {build_id} failed: {plan.error}")
        restored = await sandbox.restore(plan)
        log.info(
            "restored %d files (%d bytes), %d directories, %d symlinks from snapshot %s",
            restored.files,
            restored.bytes,
            len(plan.dirs),
            len(plan.symlinks),
            plan.snapshot_id,
            extra={"build_id": build_id},
        )
        if restored.skipped:
            log.warning(
                "symlinks leading outside the workspace not restored: %s",
                ", ".join(restored.skipped[:20]),
                extra={"build_id": build_id},
            )
        return plan.snapshot_id

    async def _set_state(
        self, record: SandboxRecord, state: SandboxState, iteration: int | None = None
    ) -> None:
        await self.registry.put(replace(record, state=state, iteration=iteration))

    async def after_snapshot(self, event: SnapshotSaved) -> None:
        """After the final snapshot stop the sandbox; after the sleep snapshot pause it."""
        if event.reason == "final":
            reason = f"final snapshot {event.snapshot_id} saved"
            await self.stop(event, "stopped", reason, event.snapshot_id, event.iteration)
        elif event.reason == "sleep":
            reason = f"build sleeping (snapshot {event.snapshot_id})"
            await self.stop(event, "paused", reason, event.snapshot_id, event.iteration)

    async def after_build_ended(self, event: BuildCancelled | BuildFailed) -> None:
        run = f"{event.kind}/{event.continuation}" if event.continuation else event.kind
        reason = f"build {event.kind.removeprefix('build_')}"
        await self.stop(event, "stopped", reason, run, event.iterations)

    async def stop(
        self,
        event: SnapshotSaved | BuildCancelled | BuildFailed,
        state: SandboxState,
        reason: str,
        discriminator: str,
        iteration: int,
    ) -> None:
        """Pause or stop the build's sandbox once (a repeat changes nothing), then
        ``SandboxStopped``; a stopped one is recorded with the build's ``iteration`` then. Not
        under the build's tool-call lock: stopping must also kill a command that is running."""
        async with self.lifecycle.hold(event.build_id):
            record = await self.registry.get(event.build_id)
            if record is None or record.state == "stopped" or record.state == state:
                return
            if record.provider != self.provider.name:
                log.warning("sandbox of %s belongs to provider %s", event.build_id, record.provider)
                return
            if record.has_processes and self.processes is not None:
                await self._stop_processes(event, record, reason)
            if state == "paused":
                await self.provider.pause(event.build_id, record.sandbox_id)
            else:
                await self.provider.stop(event.build_id, record.sandbox_id)
            await self.bus.publish(
                event.caused(
                    SandboxStopped,
                    sandbox_id=record.sandbox_id,
                    provider=record.provider,
                    reason=reason,
                ).with_id(
                    stable_id(event.build_id, "sandbox_stopped", record.sandbox_id, discriminator)
                )
            )
            await self._set_state(record, state, iteration if state == "stopped" else None)
            log.info(
                "sandbox %s %s: %s",
                record.sandbox_id,
                state,
                reason,
                extra={"build_id": event.build_id},
            )

    async def _stop_processes(
        self, event: SnapshotSaved | BuildCancelled | BuildFailed, record: SandboxRecord, why: str
    ) -> None:
        """Stop the build's background processes before its sandbox is paused or stopped."""
        assert self.processes is not None
        if not await self.processes.any_live(event.build_id):
            return  # nothing to stop: no need to reach (or resume) the sandbox
        try:
            sandbox: Workspace | None = Workspace(
                await self.provider.connect(event.build_id, record.sandbox_id)
            )
        except SandboxGone:
            sandbox = None
        await self._stop_processes_in(sandbox, event, why)

    async def _stop_processes_in(
        self, sandbox: Workspace | None, event: Envelope, why: str
    ) -> None:
        """``Processes.stop_all``; a sandbox that fails to answer does not hold up what comes
        next (a process it could not stop stays recorded live: the next call's look at the
        build's processes, or the next stop, sees what became of it)."""
        assert self.processes is not None
        try:
            await self.processes.stop_all(sandbox, event, why)
        except SandboxGone:
            await self.processes.stop_all(None, event, why)
        except SandboxError as err:
            log.warning(
                "could not stop the background processes: %s", err,
                extra={"build_id": event.build_id},
            )  # fmt: skip

    async def existing(self, build_id: str) -> Workspace:
        """The build's sandbox as it is (for the snapshot service); SandboxError if none."""
        record = await self.registry.get(build_id)
        if record is None:
            raise SandboxError(f"no sandbox for build {build_id}")
        try:
            return Workspace(
                await self.provider.connect(
                    build_id, record.sandbox_id, running=record.state == "running"
                )
            )
        except SandboxGone as err:
            raise SandboxError(f"the sandbox of build {build_id} is gone: {err}") from err
