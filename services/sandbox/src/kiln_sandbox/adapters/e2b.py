"""The ``e2b`` sandbox provider: one E2B sandbox (a microVM) per build, on ``e2b.AsyncSandbox``.

Everything the tools need is done with four SDK calls: ``files.read`` / ``files.write`` /
``files.get_info`` and ``commands.run``. Commands always run with ``cwd`` = the workspace and
print paths relative to it, so nothing depends on where the workspace is:

- path checks resolve symlinks inside the sandbox (``realpath -m --relative-base=.``): a path
  that resolves outside the workspace is refused;
- a ``bash`` command runs in a wrapper that puts it in its own session (process group), sends its
  output to a file, kills the whole group at the timeout and prints the exit code, the output's
  size and its head and tail (base64), so a 10 MB output never crosses the network whole;
- listings, the snapshot manifest (sha256 computed inside the sandbox, one command) and the
  snapshot transfers (``curl`` to presigned URLs: bytes go sandbox <-> S3 directly) are commands.

Every SDK call has a timeout; "sandbox not found / not running" becomes ``SandboxGone`` (the
service restores a fresh sandbox from the latest snapshot), other SDK errors a ``SandboxError``
with the reason. ``connect`` resumes a paused sandbox and extends its life (keep-alive: each
call pushes the sandbox's timeout to ``idle_timeout_s`` from now; a long command pushes it past
its own timeout first).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import posixpath
import shlex
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from e2b import (
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    FileType,
    NotFoundException,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
)

from kiln_contracts.manifest import ManifestEntry

from ..ports import CommandResult, FileInfo, PathOutsideWorkspace, SandboxError, SandboxGone

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_WORKDIR = "/home/user/workspace"
# Extra seconds an SDK call may take beyond the work it waits for.
_SLACK_S = 30.0
_RECORD = "\x00"


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


def _gone(err: BaseException) -> bool:
    return isinstance(err, SandboxNotFoundException | SandboxNotRunningException)


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
        raise SandboxError(f"{what} failed: {type(err).__name__}: {err}") from err


# The wrapper a bash command runs in. $1 the command, $2 the timeout (s), $3 the head/tail size.
_WRAPPER = r"""
out=$(mktemp) || exit 90
setsid bash -c "$1" >"$out" 2>&1 </dev/null &
pid=$!
setsid bash -c 'sleep "$1"; kill -KILL -- "-$2" 2>/dev/null && : >"$3"' _ "$2" "$pid" "$out.to" \
  >/dev/null 2>&1 </dev/null &
dog=$!
wait "$pid"; rc=$?
kill -KILL -- "-$dog" 2>/dev/null
to=0; [ -e "$out.to" ] && to=1
total=$(stat -c %s "$out")
printf '%s %s %s\n' "$rc" "$total" "$to"
head -c "$3" "$out" | base64 -w0; echo
rest=$((total - $3)); [ "$rest" -gt "$3" ] && rest=$3
[ "$rest" -gt 0 ] && tail -c "$rest" "$out" | base64 -w0; echo
rm -f "$out" "$out.to"
exit "$rc"
"""


class E2BSandbox:
    def __init__(self, provider: E2BProvider, sdk_sandbox: Any) -> None:
        self._provider = provider
        self._sb: SdkSandbox = sdk_sandbox
        self._root = provider.workdir

    @property
    def sandbox_id(self) -> str:
        return self._sb.sandbox_id

    @property
    def root(self) -> str:
        return self._root

    def _abs(self, rel: str) -> str:
        return posixpath.join(self._root, rel) if rel else self._root

    async def _sh(
        self, script: str, *, timeout_s: float | None = None, what: str = "command"
    ) -> tuple[int, str, str]:
        """Run a shell snippet in the workspace: (exit code, stdout, stderr); never raises on
        a non-zero exit (``CommandExitException`` carries the output)."""
        limit = timeout_s if timeout_s is not None else self._provider.request_timeout_s
        slack = self._provider.slack_s
        try:
            result = await _guard(
                what,
                self._sb.commands.run(
                    script,
                    cwd=self._root,
                    timeout=limit + slack,
                    request_timeout=self._provider.request_timeout_s,
                ),
                limit + 2 * slack,
            )
        except CommandExitException as err:
            return err.exit_code, err.stdout or "", err.stderr or ""
        return result.exit_code, result.stdout or "", result.stderr or ""

    # ------------------------------------------------------------------ paths

    async def resolve(self, rel: str) -> str:
        """The workspace-relative real path of ``rel``; refuses what resolves outside."""
        if "\x00" in rel:
            raise PathOutsideWorkspace("path contains a NUL byte")
        if rel.startswith("/") or ".." in rel.split("/"):
            raise PathOutsideWorkspace(f"{rel!r} is outside the workspace")
        if rel in ("", "."):
            return ""
        code, out, err = await self._sh(
            f"realpath -m --relative-base=. -- {shlex.quote(rel)}", what="resolve path"
        )
        if code != 0:
            raise SandboxError(f"cannot resolve {rel!r}: {err.strip() or f'exit {code}'}")
        real = out.rstrip("\n")
        if real.startswith("/") or real == ".." or real.startswith("../"):
            raise PathOutsideWorkspace(f"{rel!r} resolves outside the workspace")
        return "" if real == "." else real

    # ------------------------------------------------------------------ files

    async def read(self, path: str) -> bytes:
        real = await self.resolve(path)
        try:
            data = await _guard(
                f"read {path}",
                self._sb.files.read(
                    self._abs(real),
                    format="bytes",
                    request_timeout=self._provider.request_timeout_s,
                ),
                self._provider._limit(),
            )
        except FileNotFoundException as err:
            raise SandboxError(f"file not found: {path}") from err
        return bytes(data)

    async def write(self, path: str, data: bytes) -> None:
        real = await self.resolve(path)
        if not real:
            raise SandboxError("cannot write to the workspace directory itself")
        await _guard(
            f"write {path}",
            self._sb.files.write(
                self._abs(real), data, request_timeout=self._provider.request_timeout_s
            ),
            self._provider._limit(),
        )

    async def stat(self, path: str) -> FileInfo | None:
        real = await self.resolve(path)
        try:
            info = await _guard(
                f"stat {path}",
                self._sb.files.get_info(
                    self._abs(real), request_timeout=self._provider.request_timeout_s
                ),
                self._provider._limit(),
            )
        except (FileNotFoundException, NotFoundException):
            return None
        return FileInfo(
            path=real,
            is_dir=info.type == FileType.DIR,
            size=int(info.size),
            mtime_ns=int(info.modified_time.timestamp() * 1_000_000_000),
            mode=int(info.mode) & 0o7777,
        )

    async def list_entries(
        self, path: str = "", *, depth: int = 1, skip_dirs: frozenset[str] = frozenset(), limit: int
    ) -> list[FileInfo]:
        real = await self.resolve(path)
        fmt = r"%y\t%s\t%T@\t%m\t%p\0"
        prune = ""
        if skip_dirs:
            names = " -o ".join(f"-name {shlex.quote(d)}" for d in sorted(skip_dirs))
            prune = f"\\( -type d \\( {names} \\) -printf '{fmt}' -prune \\) -o "
        start = shlex.quote(f"./{real}" if real else ".")
        _, out, _ = await self._sh(
            f"find {start} -mindepth 1 -maxdepth {int(depth)} {prune}-printf '{fmt}' "
            f"2>/dev/null | head -z -n {int(limit)}",
            what="list files",
        )
        entries = [_parse_entry(rec) for rec in out.split(_RECORD) if rec]
        entries.sort(key=lambda e: e.path)
        return entries

    # ------------------------------------------------------------------ snapshots

    async def manifest(
        self, excludes: list[str], *, dirs_and_symlinks: bool = False
    ) -> list[ManifestEntry]:
        prune = ""
        if excludes:
            conds = " -o ".join(
                f"-name {shlex.quote(p)} -o -path {shlex.quote('./' + p)}" for p in excludes
            )
            prune = f"\\( {conds} \\) -prune -o "
        select = f"find . -mindepth 1 {prune}-type f"
        script = (
            f"{select} -printf '%m %s %P\\0'; printf '\\n--sha256--\\n'; "
            f"{select} -print0 | xargs -0 -r sha256sum -z --"
        )
        if dirs_and_symlinks:
            script += (
                "; printf '\\n--dirs--\\n'; "
                f"find . -mindepth 1 {prune}-type d -printf '%m %P\\0'; "
                "printf '\\n--links--\\n'; "
                f"find . -mindepth 1 {prune}-type l -printf '%P\\0%l\\0'"
            )
        code, out, err = await self._sh(script, timeout_s=self._provider.manifest_timeout_s)
        if "\n--sha256--\n" not in out or (dirs_and_symlinks and "\n--links--\n" not in out):
            raise SandboxError(f"manifest failed: {err.strip() or f'exit {code}'}")
        stats_part, sums_part = out.split("\n--sha256--\n", 1)
        dirs_part = links_part = ""
        if dirs_and_symlinks:
            sums_part, rest = sums_part.split("\n--dirs--\n", 1)
            dirs_part, links_part = rest.split("\n--links--\n", 1)
        stats: dict[str, tuple[int, int]] = {}
        for rec in stats_part.split(_RECORD):
            if rec:
                mode_s, size_s, rel = rec.split(" ", 2)
                stats[rel] = (int(mode_s, 8), int(size_s))
        out_entries: list[ManifestEntry] = []
        for rec in sums_part.split(_RECORD):
            if not rec.strip():
                continue
            digest, name = rec.split("  ", 1)
            rel = name.removeprefix("./")
            if rel in stats:  # a file that appeared between the two walks is left out
                mode, size = stats[rel]
                out_entries.append(ManifestEntry(path=rel, sha256=digest, size=size, mode=mode))
        for rec in dirs_part.split(_RECORD):
            if rec:
                mode_s, rel = rec.split(" ", 1)
                out_entries.append(ManifestEntry.directory(rel, int(mode_s, 8)))
        fields = links_part.split(_RECORD)
        for rel, target in zip(fields[0::2], fields[1::2], strict=False):
            if rel:
                out_entries.append(ManifestEntry.symlink(rel, target))
        out_entries.sort(key=lambda e: e.path)
        return out_entries

    async def upload(self, path: str, sha256: str, url: str) -> int:
        real = await self.resolve(path)
        t = self._provider.transfer_timeout_s
        p = shlex.quote(real)
        script = (
            f"h=$(sha256sum -- {p} | cut -c1-64) || exit 3; "
            f'[ "$h" = {shlex.quote(sha256)} ] || {{ echo "sha256 $h" >&2; exit 4; }}; '
            f"curl -sS --fail-with-body --max-time {t:g} -X PUT -T {p} "
            f"-o /dev/null -w '%{{http_code}}' {shlex.quote(url)} >&2 || exit 5; "
            f"stat -c %s -- {p}"
        )
        code, out, err = await self._sh(script, timeout_s=t, what=f"upload {path}")
        if code == 4:
            actual = err.strip().removeprefix("sha256 ")
            raise SandboxError(f"{path} changed since the manifest (sha256 {actual}, not {sha256})")
        if code != 0:
            raise SandboxError(f"upload of {path} failed: {err.strip()[-500:] or f'exit {code}'}")
        return int(out.strip())

    async def download(self, path: str, sha256: str, mode: int, url: str) -> int:
        real = await self.resolve(path)
        if not real:
            raise SandboxError("cannot download onto the workspace directory")
        t = self._provider.transfer_timeout_s
        p = shlex.quote(real)
        script = (
            f'mkdir -p -- "$(dirname -- {p})" || exit 3; tmp=$(mktemp -p . .kiln-dl.XXXXXX); '
            f'curl -sS --fail --max-time {t:g} -o "$tmp" {shlex.quote(url)} '
            f'|| {{ rm -f "$tmp"; exit 5; }}; '
            f'h=$(sha256sum -- "$tmp" | cut -c1-64); '
            f'[ "$h" = {shlex.quote(sha256)} ] || {{ rm -f "$tmp"; echo "sha256 $h" >&2; exit 4; }}; '
            f'chmod {mode & 0o7777:o} "$tmp" && mv -f -- "$tmp" {p} && stat -c %s -- {p}'
        )
        code, out, err = await self._sh(script, timeout_s=t, what=f"download {path}")
        if code == 4:
            actual = err.strip().removeprefix("sha256 ")
            raise SandboxError(f"download of {path} has sha256 {actual}, not {sha256}")
        if code != 0:
            raise SandboxError(f"download of {path} failed: {err.strip()[-500:] or f'exit {code}'}")
        return int(out.strip())

    async def restore_tree(
        self, dirs: list[ManifestEntry], symlinks: list[ManifestEntry]
    ) -> list[str]:
        lines = ["set -e"]
        for d in dirs:
            await self.resolve(d.path)
            lines.append(f"mkdir -p -- {shlex.quote(d.path)}")
        for link in symlinks:
            if link.target is None:
                continue
            parent = posixpath.dirname(link.path)
            if parent:
                await self.resolve(parent)
                lines.append(f"mkdir -p -- {shlex.quote(parent)}")
            lines.append(f"ln -sfn -- {shlex.quote(link.target)} {shlex.quote(link.path)}")
        for link in symlinks:  # checked once every link exists (one may lead through another)
            p = shlex.quote(link.path)
            lines.append(
                f"r=$(realpath -m --relative-base=. -- {p}); "
                f'case "$r" in /*|..|../*) rm -f -- {p}; printf "%s\\0" {p};; esac'
            )
        for d in sorted(dirs, key=lambda e: e.path.count("/"), reverse=True):
            lines.append(f"chmod {d.mode & 0o7777:o} -- {shlex.quote(d.path)}")
        code, out, err = await self._sh(
            "\n".join(lines), timeout_s=self._provider.manifest_timeout_s, what="restore tree"
        )
        if code != 0:
            raise SandboxError(f"restoring directories and symlinks failed: {err.strip()[-500:]}")
        return [p for p in out.split(_RECORD) if p]

    # ------------------------------------------------------------------ commands

    async def run(self, command: str, *, timeout_s: float, max_output: int) -> CommandResult:
        await self._provider.keep_alive(self.sandbox_id, timeout_s)
        half = max(1, max_output // 2)
        script = (
            f"bash -c {shlex.quote(_WRAPPER)} kiln-run {shlex.quote(command)} {timeout_s:g} {half}"
        )
        code, out, err = await self._sh(script, timeout_s=timeout_s, what="bash")
        lines = out.split("\n")
        try:
            rc, total, timed_out = (int(x) for x in lines[0].split())
            head = base64.b64decode(lines[1]) if len(lines) > 1 else b""
            tail = base64.b64decode(lines[2]) if len(lines) > 2 else b""
        except (ValueError, IndexError) as parse_error:
            raise SandboxError(
                f"the command wrapper failed (exit {code}): {(err or out).strip()[-500:]}"
            ) from parse_error
        return CommandResult(
            exit_code=None if timed_out else _signed(rc),
            head=head,
            tail=tail,
            total_bytes=total,
            timed_out=bool(timed_out),
        )


def _signed(rc: int) -> int:
    """bash reports death by signal N as 128+N; the local provider reports -N, as Python does."""
    return -(rc - 128) if 128 < rc < 160 else rc


def _parse_entry(rec: str) -> FileInfo:
    kind, size, mtime, mode, path = rec.split("\t", 4)
    secs, _, frac = mtime.partition(".")
    return FileInfo(
        path=path.removeprefix("./"),
        is_dir=kind == "d",
        size=int(size),
        mtime_ns=int(secs) * 1_000_000_000 + int((frac + "000000000")[:9]),
        mode=int(mode, 8),
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
        self._opts: dict[str, Any] = {"api_key": api_key, "request_timeout": request_timeout_s}

    def _limit(self) -> float:
        return self.request_timeout_s * 2 + self.slack_s

    async def create(self, build_id: str, *, user_id: str = "") -> E2BSandbox:
        kwargs: dict[str, Any] = {
            "timeout": self.idle_timeout_s,
            "metadata": {"kiln_build_id": build_id, "kiln_user_id": user_id},
            **self._opts,
        }
        if self.template:
            kwargs["template"] = self.template
        sb = await _guard("create an E2B sandbox", self.sdk.create(**kwargs), self._limit())
        await _guard(
            "create the workspace",
            sb.files.make_dir(self.workdir, request_timeout=self.request_timeout_s),
            self._limit(),
        )
        log.info("created E2B sandbox %s", sb.sandbox_id, extra={"build_id": build_id})
        return E2BSandbox(self, sb)

    async def connect(self, build_id: str, sandbox_id: str) -> E2BSandbox:
        try:
            sb = await _guard(
                f"connect to sandbox {sandbox_id}",
                self.sdk.connect(sandbox_id, timeout=self.idle_timeout_s, **self._opts),
                self._limit(),
            )
        except SandboxError as err:
            if isinstance(err.__cause__, NotFoundException):
                raise SandboxGone(str(err)) from err
            raise
        return E2BSandbox(self, sb)

    async def keep_alive(self, sandbox_id: str, busy_s: float) -> None:
        """Make sure the sandbox outlives a command of ``busy_s`` seconds, plus the idle time."""
        if busy_s + self.slack_s <= self.idle_timeout_s:
            return  # connect already pushed the timeout to idle_timeout_s from now
        await _guard(
            "extend the sandbox's timeout",
            self.sdk.set_timeout(sandbox_id, int(busy_s + self.idle_timeout_s), **self._opts),
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
