"""Give the memory a burst of work freed back to the operating system.

CPython hands every allocation over 512 bytes (message bodies, JSON, request payloads, large
dicts and lists) to the C allocator. After a burst, glibc keeps what was freed in its heap for
reuse: the process's RSS stays at the burst's high-water mark although nothing is live there.
``malloc_trim(0)`` returns the heap's whole free pages to the kernel, so a burst leaves the RSS
near what is live (with and without it: docs/BENCHMARKS.md, sleeping builds).

A worker service (one run by ``kiln_runtime.service.serve``) trims once its handlers have gone quiet after work (none running at two looks a
second apart), and at most every minute under steady load; each trim is timed and the next waits
at least a hundred times as long, so trimming never takes more than 1% of the process's time.
Not glibc (musl, macOS): nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

log = logging.getLogger(__name__)

Trim = Callable[[], object]


class Activity(Protocol):
    """What the trimmer looks at: handlers started so far, and running now (the bus)."""

    started: int
    inflight: int


def glibc_trim() -> Trim | None:
    """``malloc_trim(0)`` of this process's C library, or None if it has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


async def trim_after_work(
    activity: Activity,
    trim: Trim | None = None,
    *,
    poll_s: float = 1.0,
    every_s: float = 60.0,
    share: float = 0.01,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """Run until cancelled: trim when handlers have run since the last trim and none has been
    running at two polls in a row, or ``every_s`` after the last trim if handlers keep running;
    never more often than the last trim's duration / ``share``. ``clock`` and ``sleep``: the
    time it goes by."""
    trim = trim or glibc_trim()
    if trim is None:
        return
    trimmed_at = clock()
    seen = activity.started
    quiet = 0
    gap = poll_s
    while True:
        await sleep(poll_s)
        quiet = quiet + 1 if activity.inflight == 0 else 0
        now = clock()
        if activity.started == seen or now - trimmed_at < gap:
            continue
        if quiet < 2 and now - trimmed_at < every_s:
            continue
        seen = activity.started
        try:
            trim()
        except Exception:  # never worth more than a line in the log: stop trying
            log.warning(
                "could not give freed memory back to the OS; not trying again", exc_info=True
            )
            return
        trimmed_at = clock()
        took = trimmed_at - now
        gap = max(poll_s, took / share)
        log.debug("gave freed memory back to the OS in %.1f ms", took * 1000)
