"""The review page in headless Chromium (Debian's, driven by Playwright): sign in, worklist, study view with
images and overlay, chat; a screenshot of the study view is kept under test-artifacts/. Its result wording
(not-assessed conditions, measured values only, ungradable eyes) is checked on the served HTML."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from model.schema import Referral
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


def test_review_page_says_not_assessed_and_shows_measured_values_only(deployment: Deployment) -> None:
    """Each condition the model was not trained on is listed as "not assessed" per eye; the model's fractal
    dimension (1.39) is nowhere on the page or in the API's measurement table, the measured one (1.47) is, and
    the disagreement stays as a flag; an ungradable study says so instead of "no findings"."""
    spec, ungradable = SPECS[0], next(s for s in SPECS if s.referral == Referral.UNGRADABLE)
    with httpx.Client(base_url=deployment.base_url, timeout=30) as http:
        http.post("/ui/login", data={"token": READ_TOKEN, "next": "/ui/"})
        page = http.get(f"/ui/studies/{spec.uid}").text
        blocked = http.get(f"/ui/studies/{ungradable.uid}").text
        detail = http.get(f"/api/studies/{spec.uid}", headers={"Authorization": f"Bearer {READ_TOKEN}"}).json()
    for name in ("Age-related macular degeneration", "Cataract"):
        assert page.count(f'<li class="not-assessed">{name}: not assessed (model not trained on it)</li>') == 2
    assert "1.39" not in page and "1.47" in page
    assert page.count("Quality flag: the model&#39;s estimate of vessel fractal dimension disagrees with the "
                      "measured value 1.47") == 2
    assert blocked.count('<li class="none">Not gradable: no condition assessed</li>') == 2
    assert "not-assessed" not in blocked and "No findings" not in blocked and "finding present" not in blocked
    rows = [row for table in detail["measurements"].values() for row in table]
    assert rows and {row["source"] for row in rows} == {"measured"}
    assert not [row for row in rows if row["key"] == "Fractal_dimension" and row["value"] == "1.39"]
