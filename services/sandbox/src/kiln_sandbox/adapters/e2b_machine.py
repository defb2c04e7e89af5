"""One E2B sandbox as a ``Machine``: the shipped script's commands through ``commands.run``
(always with ``cwd`` = the workspace, output after a marker so a chatty login shell does not
confuse the parsing), file contents through ``files.read`` / ``files.write``; each call keeps
the sandbox alive (``E2BProvider.keep_alive``)."""

from __future__ import annotations

import logging
import posixpath
import shlex
import uuid
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from e2b import CommandExitException, FileNotFoundException

from ..ports import PreviewTarget, SandboxError, SandboxGone
from .e2b_sdk import MARKER, KilledAtDeadline, SdkSandbox, after_marker, guard
from .script import ScriptMachine, command

if TYPE_CHECKING:
    from .e2b import E2BProvider

log = logging.getLogger(__name__)

T = TypeVar("T")


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

    def preview(self, port: int) -> PreviewTarget:
        """The sandbox's host for ``port`` (the SDK's ``get_host``) and, where the sandbox's
        traffic is private, the token its requests carry (``traffic_access_token``)."""
        host = self._sb.get_host(port)
        token = getattr(self._sb, "traffic_access_token", None)
        return PreviewTarget(
            provider="e2b",
            url=f"https://{host}/",
            traffic_access_token=token if isinstance(token, str) and token else None,
        )

    async def _guard(self, what: str, call: Awaitable[T], timeout_s: float) -> T:
        """``guard``; a sandbox found gone has its handle dropped (the next connect asks)."""
        try:
            return await guard(what, call, timeout_s)
        except SandboxGone:
            self._provider.drop_handle(self.sandbox_id)
            raise

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
            result = await self._guard(
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
            return err.exit_code, after_marker(err.stdout or ""), after_marker(err.stderr or "")
        out, err_text = after_marker(result.stdout or ""), after_marker(result.stderr or "")
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
            await self._guard(
                "kill a timed-out command",
                self._sb.commands.run(kill, timeout=self._provider.request_timeout_s),
                self._provider.limit(),
            )
        except CommandExitException:
            pass

    async def _before_run(self, timeout_s: float) -> None:
        await self._provider.keep_alive(self.sandbox_id, timeout_s)

    async def read(self, path: str) -> bytes:
        try:
            data = await self._guard(
                f"read {path}",
                self._sb.files.read(
                    self._abs(path),
                    format="bytes",
                    request_timeout=self._provider.request_timeout_s,
                ),
                self._provider.limit(),
            )
        except FileNotFoundException as err:
            raise SandboxError(f"file not found: {path}") from err
        return bytes(data)

    async def write(self, path: str, data: bytes) -> None:
        await self._guard(
            f"write {path}",
            self._sb.files.write(
                self._abs(path), data, request_timeout=self._provider.request_timeout_s
            ),
            self._provider.limit(),
        )
