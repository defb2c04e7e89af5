"""envd's ``process.Process`` RPC: ``Start`` and ``Connect`` (server streams of a command's
start, output and end), ``SendSignal`` and ``List``.

A command runs as the SDK sends it (``/bin/bash -l -c``) with ``HOME=/home/user``, inside the
sandbox's namespace when it has one; at its ``Connect-Timeout-Ms`` deadline it is killed and its
stream ends with exit -1, "signal: killed"."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

from aiohttp import web
from e2b.envd.process import process_pb
from protobuf import Oneof

from .box import HOME, Box, Proc, RpcError
from .namespaces import entering, killpg
from .wire import end_frame, for_envd, frame, rpc_error, unary, unenveloped


class Processes:
    """The RPC over the server's sandboxes; ``dropped``: the sandboxes whose streams end
    without their end events (a fault)."""

    def __init__(self, sandboxes: dict[str, Box]) -> None:
        self.sandboxes = sandboxes
        self.dropped: set[str] = set()

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/process.Process/{method}", for_envd(self.sandboxes, self._rpc))]

    async def _rpc(self, request: web.Request, box: Box) -> web.StreamResponse:
        method = request.match_info["method"]
        box.calls.append(f"process.{method}")
        try:
            if method in ("Start", "Connect"):
                return await self._stream(box, method, request)
            if method == "SendSignal":
                req = process_pb.SendSignalRequest.from_json(await request.read())
                proc = _selected(box, req.process)
                sig = signal.SIGKILL if req.signal == process_pb.Signal.SIGKILL else signal.SIGTERM
                killpg(proc.pid, sig)
                reply: Any = process_pb.SendSignalResponse()
            elif method == "List":
                reply = process_pb.ListResponse(
                    processes=[
                        process_pb.ProcessInfo(config=p.config, pid=p.pid, tag=p.tag)
                        for p in box.procs.values()
                        if not p.done.is_set()
                    ]
                )
            else:
                raise RpcError("unimplemented", f"{method} is not served here")
        except RpcError as err:
            return rpc_error(err)
        return unary(reply)

    async def _stream(self, box: Box, method: str, request: web.Request) -> web.StreamResponse:
        payload = unenveloped(await request.read())
        deadline_ms = request.headers.get("Connect-Timeout-Ms")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        reply_cls: Any
        if method == "Start":
            req = process_pb.StartRequest.from_json(payload)
            proc = await self._spawn(box, req)
            reply_cls = process_pb.StartResponse
        else:
            creq = process_pb.ConnectRequest.from_json(payload)
            proc = _selected(box, creq.process)
            reply_cls = process_pb.ConnectResponse
        proc.subscribers.append(queue)
        if method == "Start":
            deadline = int(deadline_ms) / 1000 if deadline_ms and int(deadline_ms) > 0 else None
            if box.deadline_cap_s is not None:
                deadline = min(deadline or box.deadline_cap_s, box.deadline_cap_s)
            if deadline is not None:
                asyncio.get_running_loop().call_later(deadline, _deadline, proc)
        resp = web.StreamResponse(headers={"Content-Type": "application/connect+json"})
        box.streams.add(resp)
        try:
            await resp.prepare(request)
            start = process_pb.ProcessEvent.StartEvent(pid=proc.pid)
            await frame(
                resp,
                reply_cls(event=process_pb.ProcessEvent(event=Oneof[Any, Any]("start", start))),
            )
            while True:
                item = await queue.get()
                if item is None:  # the stream is dropped without its end event
                    await end_frame(resp, None)
                    return resp
                await frame(resp, reply_cls(event=process_pb.ProcessEvent(event=item)))
                if item.field == "end":
                    break
            await end_frame(resp, None)
            return resp
        except asyncio.CancelledError:
            if box.state == "paused":  # E2B cancels the request: the client sees CANCELED
                with contextlib.suppress(Exception):
                    await asyncio.shield(end_frame(resp, RpcError("canceled", "request canceled")))
                    return resp
            if request.transport is not None:  # killed: the connection drops
                request.transport.abort()
            raise
        finally:
            box.streams.discard(resp)
            with contextlib.suppress(ValueError):
                proc.subscribers.remove(queue)

    async def _spawn(self, box: Box, req: process_pb.StartRequest) -> Proc:
        cfg = req.process
        if cfg is None:
            raise RpcError("invalid_argument", "no process")
        cwd = cfg.cwd or HOME
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": HOME,
            "USER": "user",
            "LOGNAME": "user",
            "LANG": "C.UTF-8",
            "E2B_SANDBOX": "true",
            "E2B_SANDBOX_ID": box.sandbox_id,
            **box.env,
            **dict(cfg.envs),
        }
        argv = [cfg.cmd, *cfg.args]
        if box.init_pid is not None:
            host_cmd = entering(box.init_pid, cwd, argv)
            host_cwd: str | Path = box.dir
        else:
            env["HOME"] = str(box.dir)
            host_cmd = argv
            try:
                host_cwd = box.host_path(cwd)
            except RpcError:
                host_cwd = cwd
        try:
            child = await asyncio.create_subprocess_exec(
                *host_cmd, cwd=host_cwd, env=env, start_new_session=True,
                stdin=asyncio.subprocess.PIPE if req.stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
        except OSError as err:
            raise RpcError("invalid_argument", f"cannot start {cfg.cmd}: {err}") from err
        proc = Proc(pid=child.pid, proc=child, config=cfg, tag=req.tag or None)
        box.procs[child.pid] = proc
        proc.pump = asyncio.create_task(self._pump(box, proc))
        return proc

    async def _pump(self, box: Box, proc: Proc) -> None:
        def send(ev: Any) -> None:
            for q in list(proc.subscribers):
                q.put_nowait(ev)

        async def read(stream: asyncio.StreamReader | None, name: str) -> None:
            assert stream is not None
            while chunk := await stream.read(32768):
                send(
                    Oneof(
                        "data",
                        process_pb.ProcessEvent.DataEvent(output=Oneof[Any, Any](name, chunk)),
                    )
                )

        await asyncio.gather(read(proc.proc.stdout, "stdout"), read(proc.proc.stderr, "stderr"))
        rc = await proc.proc.wait()
        if proc.killed_at_deadline or rc < 0:
            name = signal.Signals(-rc).name.removeprefix("SIG").lower() if rc < 0 else "killed"
            status = "signal: killed" if proc.killed_at_deadline else f"signal: {name}"
            end = process_pb.ProcessEvent.EndEvent(
                exit_code=-1, exited=False, status=status, error=status
            )
        else:
            end = process_pb.ProcessEvent.EndEvent(
                exit_code=rc, exited=True, status=f"exit status {rc}",
                error=None if rc == 0 else f"exit status {rc}",
            )  # fmt: skip
        proc.end = end
        proc.done.set()
        if box.state != "killed" and box.sandbox_id not in self.dropped:
            send(Oneof("end", end))


def _selected(box: Box, selector: Any) -> Proc:
    chosen = selector.selector if selector is not None else None
    for p in box.procs.values():
        if chosen is not None and (
            (chosen.field == "pid" and p.pid == chosen.value)
            or (chosen.field == "tag" and p.tag == chosen.value)
        ):
            if p.done.is_set():
                break
            return p
    raise RpcError("not_found", f"process {chosen.value if chosen else '?'} not found")


def _deadline(proc: Proc) -> None:
    if not proc.done.is_set():
        proc.killed_at_deadline = True
        killpg(proc.pid, signal.SIGKILL)
