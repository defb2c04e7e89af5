"""The web dashboard in headless Chromium (Debian's, driven by Playwright) against the whole
stack: create a build, watch it complete with its narration, wake a sleeping build, download."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

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
            expect(page.locator("#narration p").first).not_to_be_empty()
            assert page.locator("#narration p").count() >= 1
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
            if os.environ.get("KILN_UPDATE_DOCS_SCREENSHOT") == "1":
                shutil.copyfile(shot, DOCS_SCREENSHOT)
            assert errors == [], errors
        finally:
            browser.close()
