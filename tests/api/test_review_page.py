"""The review page in headless Chromium (Debian's, driven by Playwright): sign in, worklist, study view with
images and overlay, chat; a screenshot of the study view is kept under test-artifacts/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api.api_fixtures import SPECS
from tests.api.conftest import READ_TOKEN, Deployment
from tests.support.services import service_missing

pytestmark = pytest.mark.xdist_group("api")

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_worklist_study_chat_in_chromium(deployment: Deployment) -> None:
    if not CHROMIUM.exists():
        service_missing("Debian chromium is not installed (scripts/bootstrap.sh installs it)")
    from playwright.sync_api import expect, sync_playwright

    spec = SPECS[0]
    ARTIFACTS.mkdir(exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            pngs: list[int] = []
            page.on("response", lambda r: pngs.append(r.status) if r.url.split("?")[0].endswith("/image.png") else None)
            page.goto(f"{deployment.base_url}/ui/")
            expect(page).to_have_url(f"{deployment.base_url}/ui/login?next=/ui/")
            page.fill("#token", READ_TOKEN)
            page.click("#sign-in")

            rows = page.locator("#worklist tbody tr")
            expect(rows).to_have_count(len(SPECS))
            expect(rows.first.locator(".badge")).to_have_text("urgent")
            page.select_option("select[name=urgency]", "urgent")
            page.click("#filters button[type=submit]")
            expect(rows).to_have_count(1)
            page.click(f"a[href='/ui/studies/{spec.uid}']")

            expect(page.locator("#referral")).to_have_text("urgent")
            images = page.locator("figure.fundus img")
            expect(images).to_have_count(2)
            page.wait_for_load_state("load")  # images included
            assert pngs == [200, 200]
            expect(page.locator("svg.overlay rect.lesion")).to_have_count(2)  # right eye, DR grade 3
            expect(page.locator("svg.overlay polygon.optic_disc")).to_have_count(2)
            expect(page.locator("svg.overlay ellipse.optic_cup")).to_have_count(2)
            expect(page.locator("table.measurements tr.flag-high").first).to_contain_text("cup-to-disc")
            expect(page.locator("#rerun")).to_have_count(0)  # read role: no rerun button

            page.fill("#chat-question", "Why is this study urgent?")
            page.click("#chat-send")
            answer = page.locator("#chat-log li.message.assistant")
            expect(answer).to_contain_text("Referral urgent", timeout=30_000)
            page.fill("#chat-question", "And the left eye?")
            page.click("#chat-send")
            expect(answer.nth(1)).to_contain_text("2 earlier turns", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "review-study.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert (ARTIFACTS / "review-study.png").stat().st_size > 10_000
