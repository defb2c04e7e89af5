"""Giving freed memory back to the OS after work (kiln_runtime.memory)."""

from __future__ import annotations

import asyncio
import platform
import time
from dataclasses import dataclass

import pytest

from kiln_runtime.memory import glibc_trim, trim_after_work


@dataclass
class Activity:
    started: int = 0
    inflight: int = 0


class Counting:
    def __init__(self, takes_s: float = 0.0) -> None:
        self.calls = 0
        self.takes_s = takes_s

    def __call__(self) -> None:
        self.calls += 1
        time.sleep(self.takes_s)


async def test_nothing_is_trimmed_while_no_handler_has_run() -> None:
    trim = Counting()
    task = asyncio.create_task(trim_after_work(Activity(), trim, poll_s=0.01))
    await asyncio.sleep(0.2)
    task.cancel()
    assert trim.calls == 0


async def test_trimmed_once_when_handlers_have_gone_quiet_after_work() -> None:
    activity, trim = Activity(), Counting()
    task = asyncio.create_task(trim_after_work(activity, trim, poll_s=0.01))
    await asyncio.sleep(0.02)
    activity.started, activity.inflight = 5, 2  # busy
    await asyncio.sleep(0.1)
    assert trim.calls == 0  # handlers running: not yet
    activity.inflight = 0
    await asyncio.sleep(0.1)
    assert trim.calls == 1
    await asyncio.sleep(0.1)
    assert trim.calls == 1  # nothing handled since
    activity.started += 1
    await asyncio.sleep(0.1)
    assert trim.calls == 2
    task.cancel()


async def test_under_steady_load_trimmed_every_interval() -> None:
    activity, trim = Activity(started=1, inflight=3), Counting()
    task = asyncio.create_task(trim_after_work(activity, trim, poll_s=0.01, every_s=0.05))
    for _ in range(30):  # always busy, always new work
        activity.started += 1
        await asyncio.sleep(0.01)
    task.cancel()
    assert 2 <= trim.calls <= 8


async def test_a_slow_trim_spaces_out_the_next() -> None:
    activity, trim = Activity(), Counting(takes_s=0.02)
    task = asyncio.create_task(trim_after_work(activity, trim, poll_s=0.01, share=0.1))
    began = time.monotonic()
    for _ in range(40):  # new work at every poll, and never a handler running at one
        activity.started += 1
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - began
    task.cancel()
    # each trim (20 ms or more) is followed by at least ten times as long without one
    assert 1 <= trim.calls <= 1 + elapsed / 0.2


async def test_a_failing_trim_is_logged_and_not_tried_again(caplog) -> None:
    calls = 0

    def failing() -> None:
        nonlocal calls
        calls += 1
        raise OSError("no")

    activity = Activity()
    task = asyncio.create_task(trim_after_work(activity, failing, poll_s=0.01))
    await asyncio.sleep(0.02)
    for _ in range(20):
        activity.started += 1
        await asyncio.sleep(0.01)
    assert task.done() and task.exception() is None
    assert calls == 1
    assert "not trying again" in caplog.text


# malloc_trim is glibc's own: with another C library (musl, macOS) there is nothing to find, and
# the trimmer does nothing (the test below). Wherever glibc is the C library, it must be found.
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the C library is not glibc")
def test_glibc_trim_is_found_and_runs_here() -> None:
    trim = glibc_trim()
    assert trim is not None
    assert trim() in (0, 1)  # 1: memory was released


async def test_without_malloc_trim_nothing_is_done(monkeypatch) -> None:
    """A C library without malloc_trim: no trim function, and the trimmer returns at once."""

    class NoTrim:  # a C library without the function
        def __init__(self, *args: object) -> None:
            pass

    monkeypatch.setattr("kiln_runtime.memory.ctypes.CDLL", NoTrim)
    assert glibc_trim() is None
    activity = Activity(started=1)
    await asyncio.wait_for(trim_after_work(activity, poll_s=0.01), timeout=5)
