"""The host's side of a sandbox: the user, mount and PID namespace it lives in (where the host
allows unprivileged ones), entering it, and finding and signalling processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

# The namespace's first process: mounts the sandbox's directory at /home/user, says so, then
# stays as its init (bash reaps the orphans reparented to it, as a VM's init does).
_NS_SETUP = (
    'mount -t tmpfs tmpfs /home && mkdir -p /home/user && mount --bind "$1" /home/user'
    ' && : >"$2" && exec bash -c "trap : CHLD; while :; do sleep 3600 & wait \\$!; done"'
)
_ENTER = 'cd -- "$1" || exit 1; shift; exec "$@"'


def namespaces_work() -> bool:
    """Whether this host lets an unprivileged user make the namespaces a sandbox lives in."""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return False
    try:
        done = subprocess.run(
            ["unshare", "-r", "-m", "-p", "--fork", "sh", "-c", "mount -t tmpfs tmpfs /home"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


async def start_namespace(home: Path) -> int:
    """A user, mount and PID namespace whose /home/user is ``home``; its first process's pid."""
    ready = home.parent / "ready"
    outer = await asyncio.create_subprocess_exec(  # dies with this server (PDEATHSIG)
        "unshare", "-r", "-m", "-p", "--fork", "--kill-child", "--mount-proc",
        "sh", "-c", _NS_SETUP, "kiln", str(home), str(ready), start_new_session=True,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent,
    )  # fmt: skip
    for _ in range(1000):
        children = _children(outer.pid)
        if children and ready.exists():
            return children[0]
        await asyncio.sleep(0.01)
    outer.kill()
    raise RuntimeError("the sandbox's namespace did not start")


def entering(init_pid: int, cwd: str, argv: list[str]) -> list[str]:
    """The host's command that runs ``argv`` in ``cwd`` inside the namespace of ``init_pid``."""
    return [
        "nsenter", "-t", str(init_pid), "-U", "-m", "-p", "--preserve-credentials",
        "--", "/bin/sh", "-c", _ENTER, "kiln", cwd, *argv,
    ]  # fmt: skip


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the server dies, however it dies."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def pids() -> list[int]:
    """Every process's pid on the host."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def pid_namespace(pid: int) -> str | None:
    """The PID namespace ``pid`` is in, or None (gone, or not ours to read)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def killpg(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
