"""The ``Machine`` primitives of a sandbox that can only run commands (E2B's), as one shell script.

``scripts/sandbox.sh`` (package data) holds them: ``run`` (a command in its own session, killed
at its timeout, only the head and tail of its output sent back), ``locate``, ``walk`` (one
``find`` for a whole tree, ``sha256sum`` inside the sandbox), ``put`` / ``get`` (``curl`` to and
from presigned URLs: the bytes go sandbox <-> S3 directly) and ``apply``. Each call is
``bash -c <the script> kiln <command> <arguments>`` with every argument quoted; its records are
NUL-terminated, parsed here. A subclass says how a command is run (``_exec``) and how files are
read and written.
"""

from __future__ import annotations

import base64
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import replace
from functools import cache
from importlib.resources import files

from ..ports import (
    CommandResult,
    DigestMismatch,
    EntryKind,
    FileInfo,
    FsOp,
    Located,
    PathOutsideWorkspace,
    SandboxError,
    TransferFailed,
)

# A command travels as one argument of ``bash -c``; Linux caps one at 128 KiB.
MAX_ARGS_CHARS = 64_000
# A file read with its ``locate`` in one command (base64 on stdout) up to this size; a larger one
# is read apart, through the provider's file API.
FETCH_INLINE_BYTES = 1024 * 1024
# A file written with its ``locate`` in one command (base64 in the command line, within
# MAX_ARGS_CHARS with the script); a larger one is located, then written through the file API.
STORE_INLINE_BYTES = 32 * 1024
_KINDS: dict[str, EntryKind] = {"f": "file", "d": "dir", "l": "symlink"}


@cache
def script() -> str:
    return files("kiln_sandbox").joinpath("scripts/sandbox.sh").read_text()


def command(args: Sequence[str]) -> str:
    """The shell command line that runs the script with ``args``."""
    return " ".join(["bash", "-c", shlex.quote(script()), "kiln", *map(shlex.quote, args)])


class ScriptMachine:
    """The primitives as script commands; a subclass provides ``_exec``, ``read``, ``write``."""

    manifest_timeout_s: float = 120.0
    transfer_timeout_s: float = 300.0
    put_confines = True  # ``put`` refuses a path whose real path is outside: no ``locate`` first
    request_timeout_s: float = 30.0

    async def _exec(
        self, args: Sequence[str], *, timeout_s: float, what: str
    ) -> tuple[int, str, str]:
        """Run the script with ``args`` in the workspace: (exit code, stdout, stderr)."""
        raise NotImplementedError

    async def write(self, path: str, data: bytes) -> None:
        """Write a file through the provider's file API (a subclass's)."""
        raise NotImplementedError

    async def _exec_run(self, args: Sequence[str], timeout_s: float) -> tuple[int, str, str]:
        """``_exec`` of the ``run`` command (a subclass may watch over it)."""
        return await self._exec(args, timeout_s=timeout_s, what="bash")

    async def _before_run(self, timeout_s: float) -> None:
        """Called before a command of ``timeout_s`` runs (E2B: keep the sandbox alive)."""

    async def run(self, command: str, *, timeout_s: float, max_output: int) -> CommandResult:
        await self._before_run(timeout_s)
        half = max(1, max_output // 2)
        code, out, err = await self._exec_run(
            ["run", command, f"{timeout_s:g}", str(half)], timeout_s
        )
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

    async def locate(self, paths: Sequence[str]) -> list[Located]:
        found: list[Located] = []
        for batch in _batches(list(paths)):
            code, out, err = await self._exec(
                ["locate", *batch], timeout_s=self.request_timeout_s, what="resolve paths"
            )
            if code != 0:
                raise SandboxError(f"cannot resolve {batch[0]!r}: {err.strip() or f'exit {code}'}")
            fields = out.split("\0")
            for real, meta in zip(fields[0::2], fields[1::2], strict=False):
                real = "" if real == "." else real
                found.append(Located(real, _info(real, meta) if meta else None))
        return found

    async def fetch(self, path: str, max_bytes: int) -> tuple[Located, bytes | None]:
        inline = min(max_bytes, FETCH_INLINE_BYTES)
        code, out, err = await self._exec(
            ["fetch", str(inline), path], timeout_s=self.request_timeout_s, what="read a file"
        )
        if code != 0:
            raise SandboxError(f"cannot read {path!r}: {err.strip() or f'exit {code}'}")
        real, meta, data = out.split("\0", 2)
        real = "" if real == "." else real
        info = _info(real, meta) if meta else None
        # outside the workspace the script says nothing of it (no info) and sends nothing
        fetched = info is not None and info.kind == "file" and info.size <= inline
        return Located(real, info), base64.b64decode(data) if fetched else None

    async def store(self, path: str, data: bytes) -> Located:
        if len(data) > STORE_INLINE_BYTES:  # too big for one argument: locate, then the file API
            (found,) = await self.locate([path])
            info = found.info
            if found.real and not _outside(found.real) and not (info is not None and info.is_dir):
                await self.write(found.real, data)
            return found
        code, out, err = await self._exec(
            ["store", path, base64.b64encode(data).decode()],
            timeout_s=self.request_timeout_s,
            what="write a file",
        )
        if code != 0:
            raise SandboxError(f"cannot write {path!r}: {err.strip() or f'exit {code}'}")
        real, meta = out.split("\0")[:2]
        real = "" if real == "." else real
        return Located(real, _info(real, meta) if meta else None)

    async def walk(
        self,
        path: str,
        *,
        depth: int | None,
        skip_dirs: frozenset[str] = frozenset(),
        exclude: Sequence[str] = (),
        content: bool = False,
        limit: int | None = None,
    ) -> list[FileInfo]:
        args = [
            "walk", path, "" if depth is None else str(int(depth)),
            "" if limit is None else str(int(limit)), "1" if content else "0",
            str(len(skip_dirs)), *sorted(skip_dirs), *exclude,
        ]  # fmt: skip
        timeout = self.manifest_timeout_s if content else self.request_timeout_s
        code, out, err = await self._exec(args, timeout_s=timeout, what="list files")
        if code != 0:
            raise SandboxError(f"listing {path or '.'} failed: {err.strip() or f'exit {code}'}")
        fields = out.split("\0")
        entries: list[tuple[str, str]] = []
        i = 0
        while i + 1 < len(fields) and fields[i] != "--sha256--":
            entries.append((fields[i], fields[i + 1]))
            i += 2
        if content and i >= len(fields):
            raise SandboxError(f"listing {path or '.'} failed: {err.strip() or 'no hashes'}")
        digests: dict[str, str] = {}
        for rec in fields[i + 1 :] if content else []:
            if rec.strip():
                digest, name = rec.split("  ", 1)
                digests[name.removeprefix("./")] = digest
        out_entries: list[FileInfo] = []
        for meta, target in entries:
            kind, size, mtime, mode, name = meta.split("\t", 4)
            info = _info(name.removeprefix("./"), "\t".join((kind, size, mtime, mode)))
            if content and info.kind == "file":
                if info.path not in digests:  # gone (or not readable) before it was hashed
                    continue
                info = replace(info, sha256=digests[info.path])
            elif content and info.kind == "symlink":
                info = replace(info, target=target)
            out_entries.append(info)
        return out_entries

    async def put(self, path: str, url: str, *, sha256: str) -> int:
        t = self.transfer_timeout_s
        code, out, err = await self._exec(
            ["put", path, sha256, url, f"{t:g}"], timeout_s=t, what=f"upload {path}"
        )
        return _transferred(code, out, err)

    async def get(self, url: str, path: str, *, sha256: str, mode: int) -> int:
        t = self.transfer_timeout_s
        code, out, err = await self._exec(
            ["get", url, path, sha256, f"{mode:o}", f"{t:g}"], timeout_s=t, what=f"download {path}"
        )
        return _transferred(code, out, err)

    async def apply(self, ops: Sequence[FsOp]) -> None:
        for batch in _batches([x for op in ops for x in (op.op, op.path, op.arg)], step=3):
            code, _, err = await self._exec(
                ["apply", *batch], timeout_s=self.manifest_timeout_s, what="change files"
            )
            if code != 0:
                raise SandboxError(err.strip()[-500:] or f"changing files failed (exit {code})")


def _transferred(code: int, out: str, err: str) -> int:
    if code == 6:
        raise PathOutsideWorkspace(err.strip())
    if code == 4:
        raise DigestMismatch(err.strip())
    if code == 3:
        raise TransferFailed(f"cannot read or write the file: {err.strip()[-500:]}")
    if code != 0:
        raise TransferFailed(err.strip()[-500:] or f"exit {code}")
    return int(out.strip())


def _batches(items: list[str], step: int = 1) -> Iterator[list[str]]:
    """``items`` in slices (of whole groups of ``step``) whose quoted length fits a command."""
    start, size = 0, 0
    for i in range(0, len(items), step):
        group = sum(len(shlex.quote(x)) + 1 for x in items[i : i + step])
        if size and size + group > MAX_ARGS_CHARS:
            yield items[start:i]
            start, size = i, 0
        size += group
    if start < len(items):
        yield items[start:]


def _signed(rc: int) -> int:
    """bash reports death by signal N as 128+N; the local provider reports -N, as Python does."""
    return -(rc - 128) if 128 < rc < 160 else rc


def _outside(real: str) -> bool:
    """``locate``'s real path leads outside the workspace (absolute, or up from it)."""
    return real.startswith("/") or real == ".." or real.startswith("../")


def _info(path: str, meta: str) -> FileInfo:
    """A FileInfo from find's "%y\\t%s\\t%T@\\t%m"."""
    kind, size, mtime, mode = meta.split("\t")
    secs, _, frac = mtime.partition(".")
    return FileInfo(
        path=path,
        kind=_KINDS.get(kind, "other"),
        size=int(size),
        mtime_ns=int(secs) * 1_000_000_000 + int((frac + "000000000")[:9]),
        mode=int(mode, 8),
    )
