"""The gateway's HTTP API from the command line: builds, and their events as Server-Sent Events.

A little over 300 lines: one method per endpoint the commands call, kept together as the one
client of the API (the SSE parser and the follower that reconnects beside them)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import httpx

from kiln_contracts import TERMINAL_KINDS

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "rejected"})


class ApiError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class SseEvent:
    """One Server-Sent Event; ``data`` is the message, parsed. A comment has kind ''."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    id: int | None = None

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL_KINDS


def parse_sse(lines: Iterable[str]) -> Iterator[SseEvent]:
    """Events from the lines of a text/event-stream (heartbeat comments too, as kind '')."""
    kind, ident = "", None
    data: list[str] = []
    for line in lines:
        if line.startswith(":"):
            yield SseEvent("")
            continue
        if line == "":
            if kind or data:
                text = "\n".join(data)
                try:
                    payload = json.loads(text) if text else {}
                except json.JSONDecodeError:
                    payload = {"raw": text}
                yield SseEvent(
                    kind or "message", payload if isinstance(payload, dict) else {}, ident
                )
            kind, data, ident = "", [], None
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            ident = int(value) if value.isdigit() else None


class KilnClient:
    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> KilnClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _json(self, resp: httpx.Response) -> Any:
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise ApiError(resp.status_code, str(detail))
        return resp.json()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Any JSON endpoint (``json=``, ``params=``); an empty answer (204) is ``{}``."""
        resp = self.http.request(method, path, **kwargs)
        if resp.status_code == 204:
            return {}
        return self._json(resp)

    def create_build(
        self,
        idea_brief: str,
        understanding_qna: list[dict[str, str]] | None = None,
        *,
        limits: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "idea_brief": idea_brief,
            "understanding_qna": understanding_qna or [],
        }
        if limits:
            body["limits"] = limits
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        result: dict[str, Any] = self._json(
            self.http.post("/v1/builds", json=body, headers=headers)
        )
        return result

    def list_builds(
        self, status: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        result: dict[str, Any] = self._json(self.http.get("/v1/builds", params=params))
        return result

    def send_message(
        self, build_id: str, text: str, *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Write to a build: ``{message_id, build_id, seq, created_at}``."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        result: dict[str, Any] = self._json(
            self.http.post(f"/v1/builds/{build_id}/messages", json={"text": text}, headers=headers)
        )
        return result

    def fork(
        self,
        build_id: str,
        *,
        iteration: int | None = None,
        snapshot_id: str | None = None,
        idempotency_key: str | None = None,
        retries: int = 10,
    ) -> dict[str, Any]:
        """Fork a build at an iteration (or one of its snapshots): the new build. While the
        snapshot of that iteration is still being written (503), asked again after the
        ``Retry-After`` it gives, a few times."""
        body: dict[str, Any] = (
            {"iteration": iteration} if snapshot_id is None else {"snapshot_id": snapshot_id}
        )
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        for _ in range(retries):
            resp = self.http.post(f"/v1/builds/{build_id}/fork", json=body, headers=headers)
            if resp.status_code != 503:
                break
            time.sleep(min(10.0, float(resp.headers.get("retry-after") or 1)))
        result: dict[str, Any] = self._json(resp)
        return result

    def command(self, build_id: str, what: str) -> dict[str, Any]:
        """``wake`` or ``cancel``."""
        result: dict[str, Any] = self._json(self.http.post(f"/v1/builds/{build_id}/{what}"))
        return result

    def preview_url(self, build_id: str, preview: dict[str, Any]) -> str:
        """An address a browser can open for a preview event's or a build's preview: E2B's host
        as it is; the gateway's proxy with a short-lived preview token in its path."""
        url = str(preview.get("url") or "")
        if not url.startswith("/"):
            return url
        token: dict[str, Any] = self._json(self.http.post(f"/v1/builds/{build_id}/preview/token"))
        return f"{str(self.http.base_url).rstrip('/')}{token['url_prefix']}{preview['port']}/"

    def budget(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json(self.http.get("/v1/budget"))
        return result

    def download(self, build_id: str, out: BinaryIO) -> int:
        """Write the build's files (tar.gz of the latest snapshot) to ``out``; returns bytes."""
        written = 0
        timeout = httpx.Timeout(10.0, read=120.0)
        with self.http.stream("GET", f"/v1/builds/{build_id}/files", timeout=timeout) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._json(resp)
            for chunk in resp.iter_bytes():
                out.write(chunk)
                written += len(chunk)
        return written

    # -- admin (the admin key, KILN_ADMIN_API_KEY on the gateway) --------------------------

    def create_key(self, user_id: str, tier: str) -> dict[str, Any]:
        body = {"user_id": user_id, "tier": tier}
        result: dict[str, Any] = self._json(self.http.post("/v1/admin/keys", json=body))
        return result

    def revoke_key(self, ident: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json(self.http.delete(f"/v1/admin/keys/{ident}"))
        return result

    def list_keys(self, user_id: str | None = None) -> dict[str, Any]:
        params = {"user_id": user_id} if user_id else {}
        result: dict[str, Any] = self._json(self.http.get("/v1/admin/keys", params=params))
        return result

    def list_dead_letters(
        self, service: str | None = None, kind: str | None = None, after: int = 0, limit: int = 100
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"after": after, "limit": limit}
        params |= {k: v for k, v in (("service", service), ("kind", kind)) if v}
        result: dict[str, Any] = self._json(self.http.get("/v1/admin/dlq", params=params))
        return result

    def get_dead_letter(self, seq: int) -> dict[str, Any]:
        result: dict[str, Any] = self._json(self.http.get(f"/v1/admin/dlq/{seq}"))
        return result

    def replay_dead_letter(self, seq: int, keep: bool = False) -> dict[str, Any]:
        params = {"keep": "true"} if keep else {}
        result: dict[str, Any] = self._json(
            self.http.post(f"/v1/admin/dlq/{seq}/replay", params=params)
        )
        return result

    def get_build(self, build_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json(self.http.get(f"/v1/builds/{build_id}"))
        return result

    def events(self, build_id: str, last_event_id: int | None = None) -> Iterator[SseEvent]:
        """One connection to the build's event stream (history after ``last_event_id``, then live)."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        timeout = httpx.Timeout(10.0, read=60.0)  # the server sends a heartbeat every 15 s
        with self.http.stream(
            "GET", f"/v1/builds/{build_id}/events", headers=headers, timeout=timeout
        ) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._json(resp)
            yield from parse_sse(resp.iter_lines())

    def follow(
        self,
        build_id: str,
        *,
        on_idle: Callable[[], None] | None = None,
        retries: int = 30,
        after_message: str | None = None,
    ) -> Iterator[SseEvent]:
        """The build's events until a terminal one, reconnecting (Last-Event-ID) if cut off.

        ``on_idle`` runs on each heartbeat (e.g. to check a deadline); it may raise to stop.
        ``after_message``: a message id; the events before that message are yielded too, but
        only a terminal event after it ends the stream (a finished build continues with it).
        """
        last: int | None = None
        failures = 0
        waiting = after_message is not None
        while True:
            try:
                for event in self.events(build_id, last):
                    failures = 0
                    if not event.kind:
                        if on_idle:
                            on_idle()
                        continue
                    if event.id is not None:
                        last = event.id
                    if waiting and event.kind == "send_user_message":
                        waiting = event.data.get("message_id") != after_message
                    yield event
                    if event.terminal and not waiting:
                        return
            except httpx.TransportError:
                failures += 1
                if failures > retries:
                    raise
                time.sleep(min(5.0, 0.5 * failures))
                continue
            # The server ended the stream without a terminal event: done if the build is (and
            # the message to wait for has been seen: else its continuation is still to come).
            if not waiting and self.get_build(build_id).get("status") in TERMINAL_STATUSES:
                return
            if on_idle:
                on_idle()
            time.sleep(0.5)
