"""The running app, looked at while it is built (local provider): the scripted build serves its
page in the background; the preview appears in GET /v1/builds/{id} and on the event stream; the
gateway's proxy shows the page to the build's owner (API key, or a preview token in the path)
and to no one else, and reaches nothing but that port of the build's sandbox: not a port no
process of the build listens on, not another loopback service, not the gateway's own port, not
another host however the path is written. The dashboard shows the page in a frame beside the
conversation (Chromium). Once the build has ended the preview is gone, and says so.

The scripted model's server is paused (SIGSTOP) once the preview is there, so the build stays
running, with its app up, for as long as the checks take; it resumes (SIGCONT) after them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiln_contracts import PreviewAvailable, ProcessStarted
from kiln_devstack.stack import DEV_API_KEY, DEV_USER, Stack
from kiln_runtime.bus import Bus
from kiln_runtime.settings import CommonSettings
from tests.e2e.stacks import own_stack
from tests.e2e.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.e2e

ADMIN = "kiln_admin_preview_test"
BRIEF = "textstats, with a page that shows a text's statistics."
DEADLINE_S = 240


@pytest.fixture(scope="module")
def stack(infra: dict[str, str]) -> Iterator[Stack]:
    env = {"KILN_ADMIN_API_KEY": ADMIN, "KILN_SCRIPTED_LATENCY_S": "0.2"}
    with own_stack(infra, "preview", lambda data_dir: env) as s:
        yield s


class Listener:
    """A loopback service that is no build's: it must never see a connection from the proxy."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
            conn.close()

    def close(self) -> None:
        self.running = False
        self.thread.join(timeout=5)
        self.sock.close()


def publish(stack: Stack, message: PreviewAvailable | ProcessStarted) -> None:
    async def send() -> None:
        bus = Bus(CommonSettings(nats_url=stack.env["NATS_URL"]), "previewtest")
        await bus.connect()
        try:
            await bus.publish(message)
        finally:
            await bus.stop()

    asyncio.run(send())


def available_all(client: httpx.Client, build_id: str) -> list[dict[str, Any]]:
    previews = client.get(f"/v1/builds/{build_id}").json()["previews"]
    return [p for p in previews if p["status"] == "available"]


def wait_until(what: str, check: Any, stack: Stack, timeout: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        stack.check_alive()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_the_preview_shows_the_app_to_its_owner_only_and_reaches_nothing_else(
    stack: Stack, tmp_path: Path
) -> None:
    owner = httpx.Client(
        base_url=stack.gateway_url, headers={"Authorization": f"Bearer {DEV_API_KEY}"}, timeout=30
    )
    anon = httpx.Client(base_url=stack.gateway_url, timeout=30)
    made = httpx.post(
        f"{stack.gateway_url}/v1/admin/keys",
        headers={"Authorization": f"Bearer {ADMIN}"},
        json={"user_id": "someone-else", "tier": "free"},
        timeout=30,
    )
    assert made.status_code == 201, made.text
    other = httpx.Client(
        base_url=stack.gateway_url,
        headers={"Authorization": f"Bearer {made.json()['api_key']}"},
        timeout=30,
    )
    listener = Listener()
    model = stack.model_server
    assert model is not None
    paused = False
    try:
        created = owner.post("/v1/builds", json={"idea_brief": BRIEF})
        assert created.status_code == 201, created.text
        build_id = created.json()["build_id"]

        def available() -> dict[str, Any] | None:
            b = owner.get(f"/v1/builds/{build_id}").json()
            assert b["status"] in ("queued", "running"), b
            return next((p for p in b["previews"] if p["status"] == "available"), None)

        preview = wait_until("the build's preview", available, stack)
        os.kill(model.popen.pid, signal.SIGSTOP)  # the build waits on its next think
        paused = True
        port = preview["port"]
        assert preview["url"] == f"/v1/builds/{build_id}/preview/{port}/"
        assert preview["provider"] == "local" and preview["process_id"].startswith("bash_")

        # the owner sees the app's page, under a sandbox policy, without cookies
        page = owner.get(preview["url"] + "?text=a+b+a")
        assert page.status_code == 200, page.text
        assert "<h1>textstats</h1>" in page.text and "a (2)" in page.text
        assert page.headers["content-security-policy"].startswith("sandbox")
        assert "set-cookie" not in page.headers
        stats = owner.get(f"{preview['url']}stats.json", params={"text": "x y"}).json()
        assert stats["words"] == 2

        # with a preview token in the path (what a frame carries); relative links keep it
        token = owner.post(f"/v1/builds/{build_id}/preview/token").json()
        assert token["url_prefix"] == f"/v1/builds/{build_id}/preview/t/{token['token']}/"
        framed = anon.get(f"{token['url_prefix']}{port}/")
        assert framed.status_code == 200 and "<h1>textstats</h1>" in framed.text
        # a token is this build's only, and not an API key; a forged one is refused
        assert (
            anon.get(f"/v1/builds/{build_id}/preview/t/x{token['token']}/{port}/").status_code
            == 401
        )
        assert anon.get(preview["url"], params={"token": token["token"]}).status_code == 401
        assert anon.get(f"/v1/builds/{build_id}/events", params={"token": token["token"]}).status_code == 401  # fmt: skip

        # no one else: no key, another user's key (the build does not exist for them)
        assert anon.get(preview["url"]).status_code == 401
        assert other.get(preview["url"]).status_code == 404
        assert other.post(f"/v1/builds/{build_id}/preview/token").status_code == 404

        # nothing but that port: another loopback service, a port no process of the build
        # listens on, the gateway's own port: a page that says so, nothing reached
        gateway_port = int(stack.gateway_url.rsplit(":", 1)[1].split("/")[0])
        for elsewhere, status in ((listener.port, 404), (gateway_port, 403)):
            refused = owner.get(f"/v1/builds/{build_id}/preview/{elsewhere}/")
            assert refused.status_code == status, refused.text
            assert refused.headers["x-kiln-preview"] == "unavailable"
            assert "secret" not in refused.text
        # another build's port: named through another build (the other user's, with no preview
        # on it), it is not reached; the owner cannot name the other's build at all
        theirs = other.post("/v1/builds", json={"idea_brief": "another"})
        assert theirs.status_code == 201, theirs.text
        second = theirs.json()["build_id"]
        through = other.get(f"/v1/builds/{second}/preview/{port}/")
        # no preview there (404), or none any more if that build has already ended (410)
        assert through.status_code in (404, 410) and "textstats" not in through.text
        assert owner.get(f"/v1/builds/{second}/preview/{port}/").status_code == 404
        assert other.post(f"/v1/builds/{second}/cancel").status_code == 202
        assert owner.get(f"/v1/builds/{build_id}/preview/0/").status_code == 422
        assert owner.get(f"/v1/builds/{build_id}/preview/70000/").status_code == 422

        # path tricks: every one is a path on the app's port (the app answers), never a host
        for trick in (
            "//evil.example/x",
            "http://10.0.0.1/x",
            f"@127.0.0.1:{listener.port}/x",
            f"..%2F..%2F{listener.port}%2F",
            f"%2F%2F127.0.0.1:{listener.port}/",
            f"../{listener.port}/",
        ):
            r = owner.get(f"/v1/builds/{build_id}/preview/{port}/{trick}")
            if r.status_code == 200:
                assert r.headers["x-kiln-preview"] == str(port), trick
                assert "<h1>textstats</h1>" in r.text, trick
            else:  # normalised away by the client or the router: not a preview at all
                assert r.headers.get("x-kiln-preview") != "unavailable" or r.status_code == 404
                assert "secret" not in r.text, trick
        raw = httpx.get(
            f"{stack.gateway_url}/v1/builds/{build_id}/preview/{port}/",
            headers={
                "Authorization": f"Bearer {DEV_API_KEY}",
                "Host": f"127.0.0.1:{listener.port}",
            },
            timeout=30,
        )
        assert raw.status_code == 200 and "<h1>textstats</h1>" in raw.text
        assert listener.accepted == 0, "the proxy reached a loopback service that is no build's"

        # the dashboard shows the page in a frame beside the conversation
        from playwright.sync_api import expect, sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                view = browser.new_page(viewport={"width": 1400, "height": 900})
                view.set_default_timeout(60_000)
                errors: list[str] = []
                view.on("pageerror", lambda e: errors.append(str(e)))
                view.goto(stack.gateway_url)
                view.fill("#api-key", DEV_API_KEY)
                view.click("#save-key")
                view.locator(f'#builds tr[data-build-id="{build_id}"]').click()
                expect(view.locator("#preview")).to_be_visible()
                expect(view.locator("#preview-port")).to_have_text(f"port {port}")
                frame = view.frame_locator("#preview-frame")
                expect(frame.locator("h1")).to_have_text("textstats")
                expect(frame.locator("#stats")).to_contain_text("words")
                # the app's own form works inside the frame (a relative link keeps the token)
                frame.locator("textarea").fill("one two two")
                frame.locator("button").click()
                expect(frame.locator("#stats")).to_contain_text("two (2)")
                view.screenshot(path=str(tmp_path / "preview.png"), full_page=True)
                assert errors == [], errors
            finally:
                browser.close()

        # WebSocket (a dev server's hot reload): to a port the build's preview holds (announced
        # here as a producer may, for a WebSocket echo server of the test's), with the token only
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect
        from websockets.sync.server import serve

        def echo(ws: Any) -> None:
            for message in ws:
                ws.send(f"echo {message} {ws.request.path}")

        with serve(echo, "127.0.0.1", 0) as ws_server:
            threading.Thread(target=ws_server.serve_forever, daemon=True).start()
            ws_port = int(ws_server.socket.getsockname()[1])
            base = f"ws://{stack.gateway_url.split('://', 1)[1]}"
            with pytest.raises(InvalidStatus):  # not a preview yet
                connect(f"{base}{token['url_prefix']}{ws_port}/hot", open_timeout=30).close()
            # its process: the test's own session (the proxy checks in /proc that the socket
            # listening on the port is held by the session of the process the preview names)
            publish(stack, ProcessStarted(
                build_id=build_id, user_id=DEV_USER, process_id="bash_ws", call_id="toolu_ws",
                iteration=1, command="(the test's WebSocket echo server)", sandbox_id=build_id,
                pid=os.getsid(0),
            ))  # fmt: skip
            publish(stack, PreviewAvailable(
                build_id=build_id, user_id=DEV_USER, process_id="bash_ws", port=ws_port,
                provider="local", sandbox_id=build_id,
                url=f"/v1/builds/{build_id}/preview/{ws_port}/",
            ))  # fmt: skip
            wait_until(
                "the WebSocket preview",
                lambda: any(p["port"] == ws_port for p in available_all(owner, build_id)),
                stack,
            )
            with connect(f"{base}{token['url_prefix']}{ws_port}/hot?x=1", open_timeout=30) as ws:
                ws.send("hello")
                assert ws.recv(timeout=30) == "echo hello /hot?x=1"
            with pytest.raises(InvalidStatus):  # a forged token
                connect(f"{base}/v1/builds/{build_id}/preview/t/x{token['token']}/{ws_port}/",
                        open_timeout=30).close()  # fmt: skip

        # the build goes on to its end: its processes stop, the preview is gone and says so
        os.kill(model.popen.pid, signal.SIGCONT)
        paused = False

        def ended() -> dict[str, Any] | None:
            b = owner.get(f"/v1/builds/{build_id}").json()
            return b if b["status"] == "completed" else None

        assert "running in the background" in wait_until("the build's end", ended, stack)["summary"]
        gone = wait_until(
            "the preview gone",
            lambda: next(
                (p for p in owner.get(f"/v1/builds/{build_id}").json()["previews"]
                 if p["port"] == port and p["status"] == "gone"), None,
            ),
            stack,
        )  # fmt: skip
        assert gone["reason"]
        after = owner.get(preview["url"])
        assert after.status_code == 410 and "completed" in after.text
        # on the event stream (which ends with the build; the gone comes after, with the stop)
        events = owner.get(f"/v1/builds/{build_id}/events", timeout=60).text
        assert f'"port":{port}' in events.split("event: preview_available", 1)[1].split("\n\n")[0]
    finally:
        if paused:
            os.kill(model.popen.pid, signal.SIGCONT)
        listener.close()
        for c in (owner, anon, other):
            c.close()
