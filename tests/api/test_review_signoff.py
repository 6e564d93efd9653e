"""Sign-off on the review page in headless Chromium (Debian's, driven by Playwright): a clinician changes one
grade, marks one AI lesion box wrong and draws a missed lesion on the other eye, signs; the API stores exactly
those corrections, the page then shows the signed revision, and its SR is built VERIFIED. A read-only token's page
has no sign-off controls. Its own small deployment (one study), so the shared API deployment stays unsigned."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from model.schema import Referral
from tests.api.api_fixtures import SPECS, populate
from tests.api.conftest import READ_TOKEN, ServerThread, sha
from tests.api.test_review_page import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS
from tests.support.services import service_missing
from worker.api import create_app
from worker.config import Settings, load_settings
from worker.db import Database, SignOff, StudyState
from worker.db.migrate import upgrade
from worker.pipeline.delivery import deliver_revision

pytestmark = pytest.mark.xdist_group("api")

CLINICIAN_TOKEN = "clinician-token-Hq3Lx8Vb"
SPEC = dataclasses.replace(SPECS[0], patient_id="P-101", uid=generate_uid())  # both eyes, right DR 3 with 2 boxes


@dataclasses.dataclass
class Site:
    url: str
    settings: Settings
    db: Database


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, retina_rgb: np.ndarray) -> Iterator[Site]:
    home = tmp_path_factory.mktemp("signoff-home")
    settings = load_settings(None, home=home, model={"enabled": False}, api={"tokens": [
        {"name": "reader", "sha256": sha(READ_TOKEN), "role": "read"},
        {"name": "dr-smith", "sha256": sha(CLINICIAN_TOKEN), "role": "clinician", "observer_name": "Smith^Jane",
         "organisation": "Eye Clinic"}]})
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    populate(db, settings.storage.path, retina_rgb, [SPEC])
    with ServerThread(create_app(settings, db=db)) as url:
        yield Site(url, settings, db)
    db.dispose()


def test_read_only_page_has_no_sign_off_controls(site: Site) -> None:
    with httpx.Client(base_url=site.url, timeout=30) as http:
        http.post("/ui/login", data={"token": READ_TOKEN, "next": "/ui/"})
        page = http.get(f"/ui/studies/{SPEC.uid}").text
    assert 'id="signoff"' not in page and "lesion-verdict" not in page and "drawable" not in page


def test_clinician_corrects_and_signs_in_chromium(site: Site) -> None:
    if not CHROMIUM.exists():
        service_missing("Debian chromium is not installed (scripts/bootstrap.sh installs it)")
    from playwright.sync_api import expect, sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.goto(f"{site.url}/ui/login?next=/ui/studies/{SPEC.uid}")
            page.fill("#token", CLINICIAN_TOKEN)
            page.click("#sign-in")
            expect(page.locator("#signoff")).to_be_visible()
            expect(page.locator("#verification")).to_have_text("AI result, not verified (preliminary)")
            expect(page.locator("header .notice")).to_have_text("AI result, not verified by a clinician")
            expect(page.locator("select.grade")).to_have_count(4)  # DR and glaucoma, each eye
            page.wait_for_load_state("load")

            page.select_option("select.grade[data-eye=R][data-condition=diabetic_retinopathy]", "2")
            right = page.locator(f"fieldset.signoff-image[data-eye=R]")
            right.locator("select.lesion-verdict[data-index='1']").select_option("wrong")
            left_card = page.locator(".image-card", has=page.locator("fieldset.signoff-image[data-eye=L]"))
            left_card.locator(".missed-type").select_option("drusen")
            left_card.locator("figure.fundus img").scroll_into_view_if_needed()
            img = left_card.locator("figure.fundus img").bounding_box()
            assert img is not None
            page.mouse.move(img["x"] + 0.3 * img["width"], img["y"] + 0.3 * img["height"])
            page.mouse.down()
            page.mouse.move(img["x"] + 0.4 * img["width"], img["y"] + 0.38 * img["height"], steps=5)
            page.mouse.move(img["x"] + 0.5 * img["width"], img["y"] + 0.45 * img["height"], steps=5)
            page.mouse.up()
            expect(left_card.locator("svg rect.missed")).to_have_count(1)
            expect(left_card.locator(".missed-count")).to_have_text("1 missed lesion drawn")
            page.fill("#signoff-comment", "Second box is a vessel crossing.")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "review-signoff.png"), full_page=True)
            page.click("#signoff-correct")
            expect(page.locator("#signoff-status")).to_contain_text("Signed as revision 2 (3 correction(s))")

            page.reload()
            expect(page.locator("#study-state")).to_contain_text("revision 2")
            expect(page.locator("#verification")).to_contain_text("signed by Smith^Jane (Eye Clinic)")
            expect(page.locator("#verification")).to_contain_text("corrected")
            expect(page.locator("header .notice")).to_have_text("Signed off by a clinician (revision 2)")
            expect(page.locator("section.impression")).to_contain_text("Verified by a clinician: Smith^Jane (Eye Clinic)")
            expect(page.locator("section.impression")).to_contain_text("Second box is a vessel crossing.")
            expect(page.locator("svg.overlay rect.lesion")).to_have_count(2)  # one AI box kept + the drawn one
            expect(page.locator("svg.overlay rect.lesion.clinician")).to_have_count(1)  # told apart from the AI's
            expect(page.locator("svg.overlay text.lesion-label.clinician")).to_have_text("drusen (clinician)")
            expect(page.locator("fieldset.signoff-image[data-eye=L] label", has_text="drawn by a clinician")
                   ).to_have_count(1)
            expect(page.locator("select.grade[data-eye=R][data-condition=diabetic_retinopathy]")).to_have_value("2")
        finally:
            browser.close()
    assert errors == []

    with site.db.session() as session:
        row = session.scalars(select(SignOff)).one()
        changes = row.corrections["changes"]
        assert row.actor == "api:dr-smith" and row.changed and row.signed_revision == 1 and row.revision == 2
    by_kind = {c["kind"]: c for c in changes}
    assert len(changes) == 3 and set(by_kind) == {"grade", "lesion_wrong", "lesion_missed"}
    assert by_kind["grade"]["eye"] == "R" and (by_kind["grade"]["ai"], by_kind["grade"]["clinician"]) == (3, 2)
    assert by_kind["lesion_wrong"]["index"] == 1 and by_kind["lesion_wrong"]["type"] == "microaneurysm"
    assert by_kind["lesion_missed"]["type"] == "drusen"
    assert np.allclose(by_kind["lesion_missed"]["box"], [0.3, 0.3, 0.5, 0.45], atol=0.02)

    assert deliver_revision(site.settings, site.db, SPEC.uid, 2) == StudyState.DELIVERED  # no destination: built
    sr = pydicom.dcmread(Path(site.settings.home) / "results" / SPEC.uid / "r2" / "sr.dcm")
    assert sr.VerificationFlag == "VERIFIED" and sr.VerifyingObserverSequence[0].VerifyingObserverName == "Smith^Jane"
    assert SPEC.referral == Referral.URGENT and dt.date(2026, 1, 5) == SPEC.date  # the spec this test relies on
