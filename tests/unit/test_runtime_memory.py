"""Giving freed memory back to the OS after work (kiln_runtime.memory)."""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from kiln_runtime.memory import glibc_trim, trim_after_work


@dataclass
class Activity:
    started: int = 0
    inflight: int = 0


class Done(Exception):
    """The test's time is up."""


class Polls:
    """The trimmer's time, kept by the test: each of its sleeps moves the clock on by what it
    asked for, then runs ``each`` with the poll's number (the work the poll will see); its
    sleep after ``n`` polls raises Done."""

    def __init__(self, n: int, each: Callable[[int], None] = lambda poll: None) -> None:
        self.now = 0.0
        self.polls = 0
        self.n = n
        self.each = each

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if self.polls == self.n:
            raise Done
        self.polls += 1
        self.now += seconds
        self.each(self.polls)


class Counting:
    """A trim that records the poll it came at, and takes ``takes_s`` of the test's time."""

    def __init__(self, polls: Polls, takes_s: float = 0.0) -> None:
        self.at: list[int] = []
        self.polls = polls
        self.takes_s = takes_s

    def __call__(self) -> None:
        self.at.append(self.polls.polls)
        self.polls.now += self.takes_s


async def run(activity: Activity, polls: Polls, trim: Callable[[], None], **kw: float) -> None:
    with pytest.raises(Done):
        await trim_after_work(
            activity, trim, poll_s=0.25, clock=polls.clock, sleep=polls.sleep, **kw
        )


async def test_nothing_is_trimmed_while_no_handler_has_run() -> None:
    polls = Polls(40)
    trim = Counting(polls)
    await run(Activity(), polls, trim)
    assert trim.at == []


async def test_trimmed_once_when_handlers_have_gone_quiet_after_work() -> None:
    """Handlers run from poll 3 to 12: no trim while they do; the second quiet poll after them
    trims, and nothing more until a handler has run again (poll 25)."""
    activity = Activity()

    def each(poll: int) -> None:
        if poll == 3:
            activity.started, activity.inflight = 5, 2  # busy
        elif poll == 13:
            activity.inflight = 0
        elif poll == 25:
            activity.started += 1

    polls = Polls(40, each)
    trim = Counting(polls)
    await run(activity, polls, trim)
    assert trim.at == [14, 25]


async def test_under_steady_load_trimmed_every_interval() -> None:
    """Always busy, new work at every poll: a trim every ``every_s`` (four polls)."""
    activity = Activity(started=1, inflight=3)

    def each(poll: int) -> None:
        activity.started += 1

    polls = Polls(30, each)
    trim = Counting(polls)
    await run(activity, polls, trim, every_s=1.0)
    assert trim.at == [4, 8, 12, 16, 20, 24, 28]


async def test_a_slow_trim_spaces_out_the_next() -> None:
    """A trim that takes 0.5 s, at most 10% of the time: the next comes 5 s after it ends
    (20 polls) although there is new work and no handler running at every poll."""
    activity = Activity()

    def each(poll: int) -> None:
        activity.started += 1

    polls = Polls(45, each)
    trim = Counting(polls, takes_s=0.5)
    await run(activity, polls, trim, share=0.1)
    assert trim.at == [2, 22, 42]


async def test_a_failing_trim_is_logged_and_not_tried_again(caplog) -> None:
    activity = Activity()

    def each(poll: int) -> None:
        activity.started += 1

    polls = Polls(40, each)
    calls = []

    def failing() -> None:
        calls.append(polls.polls)
        raise OSError("no")

    # the trimmer returns (before its time is up)
    await trim_after_work(activity, failing, poll_s=0.25, clock=polls.clock, sleep=polls.sleep)
    assert calls == [2] and polls.polls == 2
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
