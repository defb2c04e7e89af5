"""The ``e2b`` sandbox provider: one E2B sandbox (a microVM) per build, on ``e2b.AsyncSandbox``
(the machine in ``e2b_machine``, the SDK's surface and errors in ``e2b_sdk``).

Three SDK calls do the work: ``files.read`` / ``files.write`` for file contents and
``commands.run`` (always with ``cwd`` = the workspace) for everything else, as the shipped
script's commands (``script.py``): a listing of the whole tree, the manifest's hashes and a
transfer to or from S3 are one call each.

Every SDK call has a timeout; "sandbox not found / not running" becomes ``SandboxGone`` (the
service restores a fresh sandbox from the latest snapshot), other SDK errors a ``SandboxError``
with the reason. ``connect`` resumes a paused sandbox and extends its life (keep-alive: the
sandbox's timeout is pushed to ``idle_timeout_s`` plus the reuse window from now; a long command
pushes it past its own timeout first), never past ``max_lifetime_s`` (the plan's cap).

Handles are reused: a sandbox the registry has running that this provider connected to within
the reuse window (``reuse_s``, less if the plan's cap leaves less) is handed back without asking
the API, so most tool calls make no API request before their own; each still leaves the sandbox
at least ``idle_timeout_s`` to live. A handle is dropped when this provider pauses or stops its
sandbox and when the sandbox turns out gone; a paused one (the registry says so) is always
connected to, which resumes it. A pause from outside Kiln within the window costs the call in
flight an error result ("the sandbox went away"); the next call connects and resumes it.

What the SDK does when things go wrong, and what it means here: a sandbox not found, not
running or unreachable (its health probe got no answer), a stream the server cancelled (a pause
from outside) and a stream that ended without its end event all mean the sandbox is gone for
this build (``SandboxGone``: a fresh one is restored from the latest snapshot); so does a resume
refused because the guest was unresponsive when it was paused (that sandbox is killed). A command
envd killed at its deadline (exit -1, "signal: killed") is a timed-out call, and the command's
own process group (which ``run`` starts in a session of its own) is killed after it.

Creation carries an idempotency key (a retried create makes one sandbox) and the build's id as
metadata, by which ``stop_others`` finds a build's sandboxes that were never recorded (a crash
between creating and recording) and kills them. A login shell that prints (a chatty profile)
does not confuse the parsing: every command's output starts after a marker.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any

from e2b import GuestUnresponsiveException, NotFoundException, SandboxQuery, SandboxState

from kiln_runtime import metrics

from ..ports import SandboxError, SandboxGone
from .e2b_machine import E2BSandbox
from .e2b_sdk import DEFAULT_WORKDIR, SLACK_S, Sdk, guard

log = logging.getLogger(__name__)


class E2BProvider:
    """Sandboxes on E2B. ``sdk`` is ``e2b.AsyncSandbox`` (or a fake with its surface)."""

    name = "e2b"

    def __init__(
        self,
        *,
        api_key: str,
        template: str | None = None,
        workdir: str = DEFAULT_WORKDIR,
        idle_timeout_s: int = 900,
        request_timeout_s: float = 30.0,
        manifest_timeout_s: float = 120.0,
        transfer_timeout_s: float = 300.0,
        slack_s: float = SLACK_S,
        max_lifetime_s: int = 3600,
        reuse_s: float = 60.0,
        api_url: str | None = None,
        sandbox_url: str | None = None,
        sdk: Sdk | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("the e2b sandbox provider needs E2B_API_KEY")
        if not workdir.startswith("/"):
            raise ValueError(f"the E2B workdir must be absolute, not {workdir!r}")
        if sdk is None:
            from e2b import AsyncSandbox

            sdk = AsyncSandbox  # type: ignore[assignment]
        assert sdk is not None
        self.sdk: Sdk = sdk
        self.template = template
        self.workdir = workdir.rstrip("/") or "/"
        self.idle_timeout_s = idle_timeout_s
        self.request_timeout_s = request_timeout_s
        self.manifest_timeout_s = manifest_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.slack_s = slack_s
        self.max_lifetime_s = max_lifetime_s
        # a connect's push outlasts the idle time by this much: the window a handle is reused in
        self.reuse_s = max(0, self._cap(idle_timeout_s + reuse_s) - self._cap(idle_timeout_s))
        self._handles: OrderedDict[str, tuple[E2BSandbox, float]] = OrderedDict()  # oldest first
        self._opts: dict[str, Any] = {"api_key": api_key, "request_timeout": request_timeout_s}
        if api_url:
            self._opts["api_url"] = api_url
        if sandbox_url:
            self._opts["sandbox_url"] = sandbox_url

    def _cap(self, timeout_s: float) -> int:
        """A sandbox timeout to ask for, within the plan's maximum lifetime."""
        return int(min(timeout_s, self.max_lifetime_s))

    def limit(self) -> float:
        return self.request_timeout_s * 2 + self.slack_s

    async def create(self, build_id: str, *, user_id: str = "") -> E2BSandbox:
        # One key per attempt: the SDK's retries of this create (429, 5xx) make one sandbox; a
        # later create (the build's sandbox is gone) is a new one. Not one key per build: two
        # replicas making the build's sandbox at once (parallel calls) would be handed the same
        # sandbox, and the second's restore would overwrite what the first's call wrote; the
        # compare-and-set on the record keeps one and stops the other instead, and a sandbox a
        # crash left unrecorded is found by its metadata and killed (``stop_others``).
        digest = hashlib.sha256(build_id.encode()).hexdigest()[:16]
        kwargs: dict[str, Any] = {
            "timeout": self._cap(self.idle_timeout_s),
            "metadata": {"kiln_build_id": build_id, "kiln_user_id": user_id},
            "idempotency_key": f"kiln-{digest}-{uuid.uuid4().hex[:16]}",
            **self._opts,
        }
        if self.template:
            kwargs["template"] = self.template
        sb = await guard("create an E2B sandbox", self.sdk.create(**kwargs), self.limit())
        try:
            await guard(
                "create the workspace",
                sb.files.make_dir(self.workdir, request_timeout=self.request_timeout_s),
                self.limit(),
            )
        except BaseException:
            await self.stop(build_id, sb.sandbox_id)
            raise
        log.info("created E2B sandbox %s", sb.sandbox_id, extra={"build_id": build_id})
        return E2BSandbox(self, sb)

    async def connect(self, build_id: str, sandbox_id: str, *, running: bool = False) -> E2BSandbox:
        """``running``: the registry has the sandbox running (not paused by Kiln), so a handle
        made within the reuse window is good without asking the API."""
        now = time.monotonic()
        while self._handles and now - next(iter(self._handles.values()))[1] >= self.reuse_s:
            self._handles.popitem(last=False)
        if running and (held := self._handles.get(sandbox_id)) is not None:
            metrics.E2B_CONNECTS.labels("reused").inc()
            return held[0]
        metrics.E2B_CONNECTS.labels("api").inc()
        timeout = self._cap(self.idle_timeout_s + self.reuse_s)
        try:
            sb = await guard(
                f"connect to sandbox {sandbox_id}",
                self.sdk.connect(sandbox_id, timeout=timeout, **self._opts),
                self.limit(),
            )
        except SandboxError as err:
            if isinstance(err.__cause__, NotFoundException):
                raise SandboxGone(str(err)) from err
            if isinstance(err.__cause__, GuestUnresponsiveException):
                # its memory would bring the stuck guest back: a fresh sandbox from the snapshot
                log.warning("sandbox %s cannot be resumed (%s); killing it", sandbox_id, err)
                await self.stop(build_id, sandbox_id)
                raise SandboxGone(str(err)) from err
            raise
        machine = E2BSandbox(self, sb)
        self._handles.pop(sandbox_id, None)
        self._handles[sandbox_id] = (machine, now)
        return machine

    def drop_handle(self, sandbox_id: str) -> None:
        """Drop the sandbox's handle: the next connect asks the API."""
        self._handles.pop(sandbox_id, None)

    async def stop_others(self, build_id: str, keep: str) -> list[str]:
        """Kill the build's sandboxes (by their metadata) other than ``keep``: those made and
        never recorded (a crash in between, a lost race). The ids killed."""
        query = SandboxQuery(
            metadata={"kiln_build_id": build_id},
            state=[SandboxState.RUNNING, SandboxState.PAUSED],
        )
        pages = self.sdk.list(query=query, **self._opts)
        found: list[str] = []
        while True:
            items = await guard("list the build's sandboxes", pages.next_items(), self.limit())
            found += [i.sandbox_id for i in items if i.sandbox_id != keep]
            if not pages.has_next:
                break
        for sandbox_id in found:
            log.warning(
                "killing sandbox %s: never recorded", sandbox_id, extra={"build_id": build_id}
            )
            await self.stop(build_id, sandbox_id)
        return found

    async def keep_alive(self, sandbox_id: str, busy_s: float) -> None:
        """Make sure the sandbox outlives a command of ``busy_s`` seconds, plus the idle time."""
        if busy_s + self.slack_s <= self._cap(self.idle_timeout_s):
            return  # connect pushed the timeout to at least idle_timeout_s from now
        await guard(
            "extend the sandbox's timeout",
            self.sdk.set_timeout(sandbox_id, self._cap(busy_s + self.idle_timeout_s), **self._opts),
            self.limit(),
        )

    async def pause(self, build_id: str, sandbox_id: str) -> None:
        self.drop_handle(sandbox_id)
        try:
            await guard(
                f"pause sandbox {sandbox_id}",
                self.sdk.pause(sandbox_id, **self._opts),
                self.limit(),
            )
        except SandboxGone:
            log.info("sandbox %s was already gone", sandbox_id, extra={"build_id": build_id})

    async def stop(self, build_id: str, sandbox_id: str) -> None:
        self.drop_handle(sandbox_id)
        try:
            await guard(
                f"kill sandbox {sandbox_id}", self.sdk.kill(sandbox_id, **self._opts), self.limit()
            )
        except SandboxGone:
            pass

    async def close(self) -> None:
        return None
