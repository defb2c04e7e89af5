"""The local stack's ports: never one port for two parts, and a part that cannot bind is
started again on another port."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from kiln_devstack import host
from kiln_devstack.host import InfraError, free_port, port_in_use, reserve_port
from kiln_devstack.infra import Infra


def test_free_port_never_hands_out_a_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    # The OS gives back a port as soon as it is closed; make it give the same one every time.
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    same = held.getsockname()[1]
    held.close()
    calls = iter([same, same, same + 1 if same < 65535 else same - 1])

    class SamePortSocket(socket.socket):
        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", next(calls))

    monkeypatch.setattr(host.socket, "socket", SamePortSocket)
    monkeypatch.setattr(host, "_HANDED_OUT", set())
    first = free_port()
    second = free_port()
    assert first == same
    assert second != first


def test_a_reserved_port_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "_HANDED_OUT", set())
    port = free_port()
    monkeypatch.setattr(host, "_HANDED_OUT", set())
    reserve_port(port)
    assert all(free_port() != port for _ in range(20))


def test_a_part_that_cannot_bind_is_started_on_another_port(tmp_path: Path) -> None:
    started: list[int] = []

    def args(port: int) -> list[str]:
        started.append(port)
        if len(started) == 1:  # as if another program took the port first
            return [sys.executable, "-c", "raise SystemExit('address already in use')"]
        return [sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(port)]

    stack = Infra(tmp_path)
    try:
        port = stack._listen("web", "a web server", "WEB_URL", 0, args)
        assert len(started) == 2 and started[0] != started[1]
        assert port == started[1] and port_in_use(port)
    finally:
        stack.stop()


def test_a_port_asked_for_is_not_changed(tmp_path: Path) -> None:
    stack = Infra(tmp_path)
    port = free_port()
    with pytest.raises(InfraError, match="exited"):
        stack._listen(
            "web", "a web server", "WEB_URL", port, lambda p: [sys.executable, "-c", "exit(1)"]
        )
    stack.stop()
