"""envd's files: ``GET /files``, multipart and octet-stream ``POST /files``, and the
``filesystem.Filesystem`` RPC (``Stat``, ``MakeDir``, ``Move``, ``ListDir``, ``Remove``) on the
sandbox's directory, as /home/user. ``MakeDir`` of an existing directory is ALREADY_EXISTS."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web
from e2b.envd.filesystem import filesystem_pb as fs_pb
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from .box import HOME, Box, RpcError
from .wire import error, for_envd, rpc_error, unary


class Files:
    """The files of the server's sandboxes."""

    def __init__(self, sandboxes: dict[str, Box]) -> None:
        self.sandboxes = sandboxes

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/files", for_envd(self.sandboxes, self._get)),
            web.post("/files", for_envd(self.sandboxes, self._post)),
            web.post("/filesystem.Filesystem/{method}", for_envd(self.sandboxes, self._rpc)),
        ]

    async def _get(self, request: web.Request, box: Box) -> web.StreamResponse:
        box.calls.append("files.read")
        try:
            host = box.host_path(request.query.get("path", ""))
            data = await asyncio.to_thread(host.read_bytes)
        except RpcError as err:
            return error(403, err.message)
        except FileNotFoundError:
            return error(404, f"path '{request.query.get('path')}' does not exist")
        except IsADirectoryError:
            return error(400, f"path '{request.query.get('path')}' is a directory")
        return web.Response(body=data, content_type="application/octet-stream")

    async def _post(self, request: web.Request, box: Box) -> web.StreamResponse:
        box.calls.append("files.write")
        uploads: list[tuple[str, bytes]] = []
        if request.content_type == "multipart/form-data":
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if isinstance(part, BodyPartReader):  # one file: ?path=; more: each part's name
                    name = request.query.get("path") or part.filename or ""
                    uploads.append((name, bytes(await part.read())))
        else:
            uploads.append((request.query.get("path", ""), await request.read()))
        written = []
        for path, data in uploads:
            try:
                host = box.host_path(path)
                await asyncio.to_thread(_write, host, data)
            except RpcError as err:
                return error(403, err.message)
            except OSError as err:
                return error(400, f"cannot write '{path}': {err.strerror}")
            written.append({"name": host.name, "type": "file", "path": path})
        return web.json_response(written)

    async def _rpc(self, request: web.Request, box: Box) -> web.StreamResponse:
        method = request.match_info["method"]
        box.calls.append(f"fs.{method}")
        handlers: dict[str, tuple[Any, Callable[[Box, Any], Awaitable[Any]]]] = {
            "Stat": (fs_pb.StatRequest, _stat),
            "MakeDir": (fs_pb.MakeDirRequest, _make_dir),
            "Move": (fs_pb.MoveRequest, _move),
            "ListDir": (fs_pb.ListDirRequest, _list_dir),
            "Remove": (fs_pb.RemoveRequest, _remove),
        }
        if method not in handlers:
            return rpc_error(RpcError("unimplemented", f"{method} is not served here"))
        cls, handler = handlers[method]
        try:
            reply = await handler(box, cls.from_json(await request.read()))
        except RpcError as err:
            return rpc_error(err)
        return unary(reply)


def _entry(box: Box, host: Path) -> fs_pb.EntryInfo:
    try:
        st = host.lstat()
    except FileNotFoundError as err:
        raise RpcError("not_found", f"path '{host}' does not exist") from err
    link = host.is_symlink()
    kind = (
        fs_pb.FileType.DIRECTORY
        if host.is_dir() and not link
        else fs_pb.FileType.SYMLINK
        if link
        else fs_pb.FileType.FILE
    )
    inside = HOME + str(host)[len(str(box.dir)) :]
    ts = Timestamp(seconds=int(st.st_mtime), nanos=st.st_mtime_ns % 1_000_000_000)
    return fs_pb.EntryInfo(
        name=host.name, type=kind, path=inside, size=st.st_size, mode=st.st_mode & 0o7777,
        permissions="", owner="user", group="user", modified_time=ts,
        symlink_target=os.readlink(host) if link else None, is_symlink=link,
    )  # fmt: skip


async def _stat(box: Box, req: fs_pb.StatRequest) -> fs_pb.StatResponse:
    return fs_pb.StatResponse(entry=_entry(box, box.host_path(req.path)))


async def _make_dir(box: Box, req: fs_pb.MakeDirRequest) -> fs_pb.MakeDirResponse:
    host = box.host_path(req.path)
    if host.is_dir():
        raise RpcError("already_exists", f"directory '{req.path}' already exists")
    try:
        host.mkdir(parents=True)
    except OSError as err:
        raise RpcError("invalid_argument", f"cannot make '{req.path}': {err}") from err
    return fs_pb.MakeDirResponse(entry=_entry(box, host))


async def _move(box: Box, req: fs_pb.MoveRequest) -> fs_pb.MoveResponse:
    src, dst = box.host_path(req.source), box.host_path(req.destination)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
    except FileNotFoundError as err:
        raise RpcError("not_found", f"path '{req.source}' does not exist") from err
    return fs_pb.MoveResponse(entry=_entry(box, dst))


async def _list_dir(box: Box, req: fs_pb.ListDirRequest) -> fs_pb.ListDirResponse:
    host = box.host_path(req.path)
    if not host.is_dir():
        raise RpcError("not_found", f"directory '{req.path}' does not exist")
    depth = max(1, req.depth)
    entries = []
    for child in sorted(host.rglob("*")):
        if len(child.relative_to(host).parts) <= depth:
            entries.append(_entry(box, child))
    return fs_pb.ListDirResponse(entries=entries)


async def _remove(box: Box, req: fs_pb.RemoveRequest) -> fs_pb.RemoveResponse:
    host = box.host_path(req.path)
    if host.is_dir() and not host.is_symlink():
        await asyncio.to_thread(shutil.rmtree, host)
    else:
        try:
            host.unlink()
        except FileNotFoundError as err:
            raise RpcError("not_found", f"path '{req.path}' does not exist") from err
    return fs_pb.RemoveResponse()


def _write(host: Path, data: bytes) -> None:
    host.parent.mkdir(parents=True, exist_ok=True)
    host.write_bytes(data)
