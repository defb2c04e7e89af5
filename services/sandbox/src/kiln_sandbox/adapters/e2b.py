"""The ``e2b`` sandbox provider: one E2B sandbox (a microVM) per build, on ``e2b.AsyncSandbox``.

Three SDK calls do the work: ``files.read`` / ``files.write`` for file contents and
``commands.run`` (always with ``cwd`` = the workspace) for everything else, as the shipped
script's commands (``script.py``): a listing of the whole tree, the manifest's hashes and a
transfer to or from S3 are one call each.

Every SDK call has a timeout; "sandbox not found / not running" becomes ``SandboxGone`` (the
service restores a fresh sandbox from the latest snapshot), other SDK errors a ``SandboxError``
with the reason. ``connect`` resumes a paused sandbox and extends its life (keep-alive: each
call pushes the sandbox's timeout to ``idle_timeout_s`` from now; a long command pushes it past
its own timeout first), never past ``max_lifetime_s`` (the plan's cap).

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

import asyncio
import hashlib
import logging
import posixpath
import shlex
import uuid
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol, TypeVar

from e2b import (
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    GuestUnresponsiveException,
    NotFoundException,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxQuery,
    SandboxState,
    SandboxUnreachableException,
    TimeoutException,
)

from ..ports import SandboxError, SandboxGone
from .script import ScriptMachine, command

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_WORKDIR = "/home/user/workspace"
# Extra seconds an SDK call may take beyond the work it waits for.
_SLACK_S = 30.0
# Printed before each command's own output: what a login shell's profile prints comes before it.
MARKER = "--kiln-e2b-output-7c1f--"
_NO_END_EVENT = "Command ended without an end event"


class KilledAtDeadline(SandboxError):
    """envd killed the command at its deadline (exit -1, "signal: killed")."""


class SdkSandbox(Protocol):
    """The part of an ``AsyncSandbox`` instance the adapter uses."""

    sandbox_id: str

    @property
    def files(self) -> Any: ...

    @property
    def commands(self) -> Any: ...


class Sdk(Protocol):
    """The part of the ``AsyncSandbox`` class the adapter uses (its class-method variants)."""

    async def create(self, **kwargs: Any) -> Any: ...

    async def connect(self, sandbox_id: str, **kwargs: Any) -> Any: ...

    async def set_timeout(self, sandbox_id: str, timeout: int, **kwargs: Any) -> None: ...

    async def pause(self, sandbox_id: str, **kwargs: Any) -> bool: ...

    async def kill(self, sandbox_id: str, **kwargs: Any) -> bool: ...

    def list(self, query: Any = None, **kwargs: Any) -> Any: ...


def _gone(err: BaseException) -> bool:
    """The SDK's ways of saying the sandbox is not there for us any more."""
    if isinstance(err, SandboxNotFoundException | SandboxNotRunningException):
        return True
    if isinstance(err, SandboxUnreachableException):  # the health probe got no answer either
        return True
    # a pause (or shutdown) cancels the streams in flight
    return isinstance(err, TimeoutException) and "cancelled by the server" in str(err)


async def _guard(what: str, call: Awaitable[T], timeout_s: float) -> T:
    """Await an SDK call with a timeout; map its errors to the ports' exceptions."""
    try:
        return await asyncio.wait_for(call, timeout=timeout_s)
    except TimeoutError as err:
        raise SandboxError(f"{what}: no answer from E2B within {timeout_s:g}s") from err
    except (SandboxGone, SandboxError, CommandExitException, FileNotFoundException):
        raise
    except AuthenticationException as err:
        raise RuntimeError(f"{what}: E2B refused the API key ({err})") from err
    except SandboxException as err:
        if _gone(err):
            raise SandboxGone(f"{what}: {err}") from err
        raise SandboxError(f"{what} failed: {err}") from err
    except Exception as err:  # ServiceBusyException (503), network errors ...: reported, not lost
        if type(err) is Exception and str(err) == _NO_END_EVENT:  # the stream just stopped
            raise SandboxGone(f"{what}: the command's stream ended without its end") from err
        raise SandboxError(f"{what} failed: {type(err).__name__}: {err}") from err


def _after_marker(text: str) -> str:
    head, found, rest = text.partition(MARKER)
    return rest if found else head


class E2BSandbox(ScriptMachine):
    def __init__(self, provider: E2BProvider, sdk_sandbox: Any) -> None:
        self._provider = provider
        self._sb: SdkSandbox = sdk_sandbox
        self._root = provider.workdir
        self.request_timeout_s = provider.request_timeout_s
        self.manifest_timeout_s = provider.manifest_timeout_s
        self.transfer_timeout_s = provider.transfer_timeout_s

    @property
    def sandbox_id(self) -> str:
        return self._sb.sandbox_id

    @property
    def root(self) -> str:
        return self._root

    @property
    def process_dir(self) -> str:
        return '"$HOME"/.kiln/processes'

    def _abs(self, rel: str) -> str:
        return posixpath.join(self._root, rel) if rel else self._root

    async def _exec(
        self,
        args: Sequence[str],
        *,
        timeout_s: float,
        what: str,
        envs: dict[str, str] | None = None,
    ) -> tuple[int, str, str]:
        slack = self._provider.slack_s
        marked = f"printf %s {MARKER}; printf %s {MARKER} >&2; exec {command(args)}"
        try:
            result = await _guard(
                what,
                self._sb.commands.run(
                    marked,
                    cwd=self._root,
                    envs=envs,
                    timeout=timeout_s + slack,
                    request_timeout=self._provider.request_timeout_s,
                ),
                timeout_s + 2 * slack,
            )
        except CommandExitException as err:  # a non-zero exit: its output is what matters
            if err.exit_code == -1 and "killed" in (err.error or ""):
                raise KilledAtDeadline(
                    f"{what} did not finish within {timeout_s + slack:g}s ({err.error})"
                ) from err
            return err.exit_code, _after_marker(err.stdout or ""), _after_marker(err.stderr or "")
        out, err_text = _after_marker(result.stdout or ""), _after_marker(result.stderr or "")
        return result.exit_code, out, err_text

    async def _exec_run(self, args: Sequence[str], timeout_s: float) -> tuple[int, str, str]:
        """When envd kills ``run`` at its deadline first: a timed-out result ("rc total
        timed_out" = "0 0 1"), and the command's own session (out of envd's reach) killed."""
        pidfile = f"/tmp/kiln-run-{uuid.uuid4().hex}"
        try:
            return await self._exec(
                args, timeout_s=timeout_s, what="bash", envs={"KILN_RUN_PIDFILE": pidfile}
            )
        except KilledAtDeadline:
            await self._kill_session(pidfile)
            return -1, "0 0 1\n\n\n", ""

    async def _kill_session(self, pidfile: str) -> None:
        p = shlex.quote(pidfile)
        kill = (
            f'for g in $(cat {p} 2>/dev/null); do kill -KILL -- "-$g" 2>/dev/null; done; rm -f {p}'
        )
        try:
            await _guard(
                "kill a timed-out command",
                self._sb.commands.run(kill, timeout=self._provider.request_timeout_s),
                self._provider._limit(),
            )
        except CommandExitException:
            pass

    async def _before_run(self, timeout_s: float) -> None:
        await self._provider.keep_alive(self.sandbox_id, timeout_s)

    async def read(self, path: str) -> bytes:
        try:
            data = await _guard(
                f"read {path}",
                self._sb.files.read(
                    self._abs(path),
                    format="bytes",
                    request_timeout=self._provider.request_timeout_s,
                ),
                self._provider._limit(),
            )
        except FileNotFoundException as err:
            raise SandboxError(f"file not found: {path}") from err
        return bytes(data)

    async def write(self, path: str, data: bytes) -> None:
        await _guard(
            f"write {path}",
            self._sb.files.write(
                self._abs(path), data, request_timeout=self._provider.request_timeout_s
            ),
            self._provider._limit(),
        )


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
        slack_s: float = _SLACK_S,
        max_lifetime_s: int = 3600,
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
        self._opts: dict[str, Any] = {"api_key": api_key, "request_timeout": request_timeout_s}
        if api_url:
            self._opts["api_url"] = api_url
        if sandbox_url:
            self._opts["sandbox_url"] = sandbox_url

    def _cap(self, timeout_s: float) -> int:
        """A sandbox timeout to ask for, within the plan's maximum lifetime."""
        return int(min(timeout_s, self.max_lifetime_s))

    def _limit(self) -> float:
        return self.request_timeout_s * 2 + self.slack_s

    async def create(self, build_id: str, *, user_id: str = "") -> E2BSandbox:
        # One key per attempt: the SDK's retries of this create (429, 5xx) make one sandbox; a
        # later create (the build's sandbox is gone) is a new one.
        digest = hashlib.sha256(build_id.encode()).hexdigest()[:16]
        kwargs: dict[str, Any] = {
            "timeout": self._cap(self.idle_timeout_s),
            "metadata": {"kiln_build_id": build_id, "kiln_user_id": user_id},
            "idempotency_key": f"kiln-{digest}-{uuid.uuid4().hex[:16]}",
            **self._opts,
        }
        if self.template:
            kwargs["template"] = self.template
        sb = await _guard("create an E2B sandbox", self.sdk.create(**kwargs), self._limit())
        try:
            await _guard(
                "create the workspace",
                sb.files.make_dir(self.workdir, request_timeout=self.request_timeout_s),
                self._limit(),
            )
        except BaseException:
            await self.stop(build_id, sb.sandbox_id)
            raise
        log.info("created E2B sandbox %s", sb.sandbox_id, extra={"build_id": build_id})
        return E2BSandbox(self, sb)

    async def connect(self, build_id: str, sandbox_id: str) -> E2BSandbox:
        try:
            sb = await _guard(
                f"connect to sandbox {sandbox_id}",
                self.sdk.connect(sandbox_id, timeout=self._cap(self.idle_timeout_s), **self._opts),
                self._limit(),
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
        return E2BSandbox(self, sb)

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
            items = await _guard("list the build's sandboxes", pages.next_items(), self._limit())
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
            return  # connect already pushed the timeout to idle_timeout_s from now
        await _guard(
            "extend the sandbox's timeout",
            self.sdk.set_timeout(sandbox_id, self._cap(busy_s + self.idle_timeout_s), **self._opts),
            self._limit(),
        )

    async def pause(self, build_id: str, sandbox_id: str) -> None:
        try:
            await _guard(
                f"pause sandbox {sandbox_id}",
                self.sdk.pause(sandbox_id, **self._opts),
                self._limit(),
            )
        except SandboxGone:
            log.info("sandbox %s was already gone", sandbox_id, extra={"build_id": build_id})

    async def stop(self, build_id: str, sandbox_id: str) -> None:
        try:
            await _guard(
                f"kill sandbox {sandbox_id}", self.sdk.kill(sandbox_id, **self._opts), self._limit()
            )
        except SandboxGone:
            pass

    async def close(self) -> None:
        return None
