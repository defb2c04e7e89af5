"""The E2B SDK as the ``e2b`` provider sees it: the surface it uses (``e2b.AsyncSandbox``, or a
fake with its surface), and its errors mapped to the ports' (every call with a timeout; "sandbox
not found / not running / unreachable", a stream the server cancelled or one that ended without
its end event: ``SandboxGone``; anything else a ``SandboxError`` with the reason)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from e2b import (
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxUnreachableException,
    TimeoutException,
)

from ..ports import SandboxError, SandboxGone

T = TypeVar("T")

DEFAULT_WORKDIR = "/home/user/workspace"
# Extra seconds an SDK call may take beyond the work it waits for.
SLACK_S = 30.0
# Printed before each command's own output: what a login shell's profile prints comes before it.
MARKER = "--kiln-e2b-output-7c1f--"
NO_END_EVENT = "Command ended without an end event"


class KilledAtDeadline(SandboxError):
    """envd killed the command at its deadline (exit -1, "signal: killed")."""


class SdkSandbox(Protocol):
    """The part of an ``AsyncSandbox`` instance the adapter uses."""

    sandbox_id: str

    @property
    def files(self) -> Any: ...

    @property
    def commands(self) -> Any: ...

    def get_host(self, port: int) -> str: ...


class Sdk(Protocol):
    """The part of the ``AsyncSandbox`` class the adapter uses (its class-method variants)."""

    async def create(self, **kwargs: Any) -> Any: ...

    async def connect(self, sandbox_id: str, **kwargs: Any) -> Any: ...

    async def set_timeout(self, sandbox_id: str, timeout: int, **kwargs: Any) -> None: ...

    async def pause(self, sandbox_id: str, **kwargs: Any) -> bool: ...

    async def kill(self, sandbox_id: str, **kwargs: Any) -> bool: ...

    def list(self, query: Any = None, **kwargs: Any) -> Any: ...


def gone(err: BaseException) -> bool:
    """The SDK's ways of saying the sandbox is not there for us any more."""
    if isinstance(err, SandboxNotFoundException | SandboxNotRunningException):
        return True
    if isinstance(err, SandboxUnreachableException):  # the health probe got no answer either
        return True
    # a pause (or shutdown) cancels the streams in flight
    return isinstance(err, TimeoutException) and "cancelled by the server" in str(err)


async def guard(what: str, call: Awaitable[T], timeout_s: float) -> T:
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
        if gone(err):
            raise SandboxGone(f"{what}: {err}") from err
        raise SandboxError(f"{what} failed: {err}") from err
    except Exception as err:  # ServiceBusyException (503), network errors ...: reported, not lost
        if type(err) is Exception and str(err) == NO_END_EVENT:  # the stream just stopped
            raise SandboxGone(f"{what}: the command's stream ended without its end") from err
        raise SandboxError(f"{what} failed: {type(err).__name__}: {err}") from err


def after_marker(text: str) -> str:
    head, found, rest = text.partition(MARKER)
    return rest if found else head
