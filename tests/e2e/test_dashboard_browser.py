"""The web dashboard in headless Chromium (Debian's, driven by Playwright) against the whole
stack: create a build, watch it complete with its narration, wake a sleeping build, download;
then, on a build page, write to the build and see the conversation go on, expand a tool call, read
a file of an iteration's snapshot, see the diff of two iterations, fork from an iteration."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kiln_contracts import SleepRequested
from kiln_devstack.stack import DEV_API_KEY, DEV_USER, Stack
from kiln_runtime.bus import Bus
from kiln_runtime.settings import CommonSettings
from tests.e2e.stacks import own_stack

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("KILN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
BRIEF = "A tiny Python package `textstats` that counts words, lines and characters, with tests."
TIMEOUT_MS = 180_000
STEP_MS = 60_000


@pytest.fixture(scope="module")
def stack(infra: dict[str, str]) -> Iterator[Stack]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-browser.sh (make test does)")
    bucket = f"kiln-dash-{uuid.uuid4().hex[:8]}"
    with own_stack(infra, "dash", lambda data_dir: {"KILN_S3_BUCKET": bucket}) as s:
        yield s


def publish(stack: Stack, message: SleepRequested) -> None:
    async def send() -> None:
        bus = Bus(CommonSettings(nats_url=stack.env["NATS_URL"]), "dashtest")
        await bus.connect()
        try:
            await bus.publish(message)
        finally:
            await bus.stop()

    # Playwright's sync API runs an event loop in this thread: publish from another one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, send()).result(timeout=30)


def test_dashboard_builds_watches_wakes_and_downloads(stack: Stack, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(stack.gateway_url)
            assert page.url.endswith("/dashboard/")
            page.fill("#api-key", DEV_API_KEY)
            page.click("#save-key")
            expect(page.locator("#budget")).to_contain_text("allowance")

            # Create a build and watch it complete, with the agent's narration.
            page.fill("#brief", BRIEF)
            page.click("#create")
            expect(page.locator("#detail")).to_be_visible()
            build_id = page.locator("#build-id").inner_text()
            expect(page.locator(f'#builds tr[data-build-id="{build_id}"]')).to_be_visible()
            expect(page.locator("#log")).to_contain_text("tool_call")
            expect(page.locator("#status")).to_have_text("completed", timeout=TIMEOUT_MS)
            expect(page.locator("#conversation .turn.assistant").first).not_to_be_empty()
            expect(page.locator("#log")).to_contain_text("build_completed")
            assert page.locator("#cost").inner_text().startswith("$")
            assert page.locator("#wake").is_disabled()
            page.screenshot(path=str(tmp_path / "dashboard-completed.png"), full_page=True)

            # The files of the finished build, as the download button gets them.
            expect(page.locator(f'#builds tr[data-build-id="{build_id}"] td').nth(1)).to_have_text(
                "completed"
            )
            with page.expect_download() as got:
                page.click("#download")
            archive = tmp_path / "files.tar.gz"
            got.value.save_as(archive)
            with tarfile.open(archive) as tar:
                names = tar.getnames()
            assert f"kiln-{build_id}/textstats/__init__.py" in names, names

            # A second build is put to sleep (its tools are held back until the sleep is asked),
            # then woken from the dashboard.
            stack.services["sandbox"].stop()
            page.fill("#brief", BRIEF)
            page.click("#create")
            expect(page.locator("#build-id")).not_to_have_text(build_id)
            second = page.locator("#build-id").inner_text()
            expect(page.locator("#log")).to_contain_text("tool_call")
            publish(
                stack,
                SleepRequested(build_id=second, user_id=DEV_USER, reason="budget (test)"),
            )
            stack.start_service("sandbox")
            expect(page.locator("#status")).to_have_text("sleeping", timeout=TIMEOUT_MS)
            expect(page.locator("#log")).to_contain_text("build_sleeping")
            page.screenshot(path=str(tmp_path / "dashboard-sleeping.png"), full_page=True)
            page.click("#wake")
            expect(page.locator("#log")).to_contain_text("build_resumed")
            expect(page.locator("#status")).to_have_text("completed", timeout=TIMEOUT_MS)
            stack.check_alive()
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert errors == [], errors
        finally:
            browser.close()


NOTE = "add a file NOTES.md with hello from the dashboard"
PROBLEM_409 = {
    "type": "https://kiln.dev/problems/conflict",
    "title": "Conflict",
    "status": 409,
    "detail": "this Idempotency-Key was used for another message",
}


def test_dashboard_conversation_files_diff_and_fork(stack: Stack, tmp_path: Path) -> None:
    from playwright.sync_api import Route, expect, sync_playwright

    expect.set_options(timeout=STEP_MS)  # each step waits for the stack, never for a fixed time
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(stack.gateway_url)
            page.fill("#api-key", DEV_API_KEY)
            page.click("#save-key")
            page.fill("#brief", BRIEF)
            page.click("#create")
            expect(page.locator("#detail")).to_be_visible()
            build_id = page.locator("#build-id").inner_text()
            conversation = page.locator("#conversation")
            expect(page.locator("#status")).to_have_text("completed", timeout=TIMEOUT_MS)

            # The conversation: the brief, the agent's words, tool calls folded, iterations.
            expect(conversation.locator(".turn.brief")).to_contain_text("textstats")
            expect(conversation.locator(".turn.assistant").first).not_to_be_empty()
            expect(conversation.locator(".marker.ended")).to_have_count(1)
            write = conversation.locator("details.tool", has_text="write_file").first
            expect(write.locator("pre.input")).to_be_hidden()
            write.locator("summary").click()
            expect(write.locator("pre.input")).to_be_visible()
            expect(write.locator("pre.input")).to_contain_text('"path"')
            expect(write.locator("pre.output")).not_to_contain_text("waiting for the result")
            expect(write.locator("summary")).to_contain_text("ok")

            # A refused message is shown as the gateway said it, and the text stays to retry.
            def conflict(route: Route) -> None:
                route.fulfill(
                    status=409,
                    content_type="application/problem+json",
                    body=json.dumps(PROBLEM_409),
                )

            page.route("**/messages", conflict)
            page.fill("#message", NOTE)
            page.click("#send")
            expect(page.locator("#message-error")).to_contain_text("409")
            expect(page.locator("#message-error")).to_contain_text("another message")
            assert page.locator("#message").input_value() == NOTE
            page.unroute("**/messages")

            # Writing to the finished build continues it; the message and the run show.
            with page.expect_request("**/messages") as sent:
                page.click("#send")
            assert sent.value.method == "POST"
            assert sent.value.post_data_json == {"text": NOTE}
            assert sent.value.headers.get("idempotency-key")
            expect(page.locator("#message-error")).to_be_hidden()
            expect(conversation.locator(".turn.message")).to_contain_text(NOTE)
            # ... and once the build's history has it, it is shown once, no longer as sending
            expect(conversation.locator(".turn.message:not(.sending)")).to_contain_text(NOTE)
            expect(conversation.locator(".turn.message")).to_have_count(1)
            expect(conversation.locator(".marker.continued")).to_be_visible()
            expect(conversation.locator(".marker.ended")).to_have_count(2, timeout=TIMEOUT_MS)
            expect(page.locator("#status")).to_have_text("completed")
            expect(conversation.locator("details.tool", has_text="NOTES.md")).to_have_count(1)

            # The files of an iteration's snapshot: the newest (the continuation's final one,
            # read once the build has ended) has NOTES.md ...
            latest = page.locator("#snapshot option:checked")
            expect(latest).to_contain_text("final")
            expect(latest).to_contain_text("latest")
            expect(page.locator("#snapshot option", has_text="final")).to_have_count(2)
            last_iteration = latest.get_attribute("data-iteration")
            page.locator("#tree button", has_text="NOTES.md").click()
            expect(page.locator("#file-content")).to_have_text("hello from the dashboard\n")
            expect(page.locator("#viewer-head")).to_contain_text("text/markdown")
            # ... the first run's final one has the package and not NOTES.md.
            before = page.locator("#snapshot option", has_text="final").first
            page.select_option("#snapshot", before.get_attribute("value"))
            expect(page.locator("#tree li[data-path='NOTES.md']")).to_have_count(0)
            page.locator('#tree li[data-path="textstats/__init__.py"] button').click()
            expect(page.locator("#file-content")).to_contain_text("def ")
            expect(page.locator("#viewer-head")).to_contain_text("textstats/__init__.py")
            package = page.locator('#tree li[data-path="textstats"] button')
            package.click()  # folded
            expect(page.locator('#tree li[data-path="textstats/__init__.py"]')).to_be_hidden()
            package.click()
            expect(page.locator('#tree li[data-path="textstats/__init__.py"]')).to_be_visible()

            # The diff from the first run's end to the continuation's: NOTES.md added.
            page.select_option("#diff-from", before.get_attribute("data-iteration"))
            page.select_option("#diff-to", last_iteration)
            page.click("#diff-run")
            expect(page.locator("#diff-facts")).to_contain_text("1 added, 0 removed, 0 modified")
            added = page.locator('#diff details[data-path="NOTES.md"]')
            expect(added.locator("summary")).to_contain_text("added")
            expect(added.locator("pre .add")).to_have_text(["+hello from the dashboard\n"])
            shot = tmp_path / "dashboard-conversation.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("KILN_UPDATE_DOCS_SCREENSHOT") == "1":
                shutil.copyfile(shot, DOCS_SCREENSHOT)

            # Fork from an iteration (the first run's last, which has a snapshot of its own):
            # the request the button sends ...
            iteration = int(before.get_attribute("data-iteration") or "0")
            fork = conversation.locator(
                f'.marker.iteration button.fork[data-iteration="{iteration}"]'
            )
            expect(fork).to_have_text("Fork from here")
            with page.expect_response(f"**/v1/builds/{build_id}/fork") as answered:
                fork.click()
            request = answered.value.request
            assert request.method == "POST"
            assert request.post_data_json == {"iteration": iteration}
            # ... and its answer: the new build, which the page opens.
            assert answered.value.status == 201, answered.value.text()
            forked = answered.value.json()["build_id"]
            assert forked != build_id
            expect(page.locator("#build-id")).to_have_text(forked)
            expect(page.locator(f'#builds tr[data-build-id="{forked}"]')).to_be_visible()
            assert page.url.endswith(f"#{forked}")
            expect(page.locator("#error")).to_be_hidden()

            # Roll back the original to the same iteration: a fork there (the original has
            # ended, so nothing is cancelled) that the page opens, the original left as it was.
            page.goto(f"{stack.gateway_url}/#{build_id}")
            expect(page.locator("#build-id")).to_have_text(build_id)
            back = conversation.locator(
                f'.marker.iteration button.rollback[data-iteration="{iteration}"]'
            )
            expect(back).to_have_text("Roll back to here")
            with page.expect_response(f"**/v1/builds/{build_id}/fork") as answered:
                back.click()
            assert answered.value.status == 201, answered.value.text()
            assert answered.value.request.post_data_json == {"iteration": iteration}
            rolled = answered.value.json()["build_id"]
            assert rolled not in (build_id, forked)
            expect(page.locator("#build-id")).to_have_text(rolled)
            original = httpx.get(
                f"{stack.gateway_url}/v1/builds/{build_id}",
                headers={"Authorization": f"Bearer {DEV_API_KEY}"},
                timeout=10,
            ).json()
            assert original["status"] == "completed"
            stack.check_alive()
            assert errors == [], errors
        finally:
            browser.close()
