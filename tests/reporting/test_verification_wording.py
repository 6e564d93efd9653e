"""Every result object of a revision a clinician signed says who verified it; unsigned ones stay preliminary
(issue 17 item 1, :mod:`reporting.verification`): SR, SEG, key image and Encapsulated PDF series descriptions,
the SEG content description, the PDF's document title, heading and burned-in key image text, the FHIR
presentedForm title. The signed objects stay dciodvfy clean."""

from __future__ import annotations

import datetime as dt
import os
import subprocess

import pytest

from reporting import build_report_objects
from reporting.key_image import summary_lines
from reporting.verification import LO_MAX, Verification, series_description, verification_note
from tests.reporting.reporting_fixtures import OPTIONS, make_analysis, vessel_mask, write_all
from tests.reporting.test_pdf_key_image import pdf_text

DCIODVFY = "/usr/bin/dciodvfy"
SIGNED = Verification(observer_name="Smith^Jane", observer_id="api:dr-smith", organisation="Eye Clinic",
                      verified_at=dt.datetime(2026, 12, 3, 14, 5, tzinfo=dt.UTC), changed=True)
STATEMENT = "Verified by a clinician: Smith^Jane (Eye Clinic), 2026-12-03 14:05 UTC; AI result corrected."


def _build(source_factory, tmp_path_factory, verification: Verification | None):
    sources = source_factory("op8")
    analysis = make_analysis(sources, revision=2 if verification else 1)
    if verification is not None:  # as worker.signoff.sign stores the signed revision
        analysis.notes.insert(0, verification_note(verification))
    masks = {str(ds.SOPInstanceUID): vessel_mask(ds) for ds in sources}
    objects = build_report_objects(analysis, sources, OPTIONS, vessel_masks=masks, verification=verification)
    folder = tmp_path_factory.mktemp("signed" if verification else "unsigned")
    return analysis, objects, write_all(objects, sources, folder)


@pytest.fixture(scope="module")
def signed(source_factory, tmp_path_factory):
    return _build(source_factory, tmp_path_factory, SIGNED)


@pytest.fixture(scope="module")
def unsigned(source_factory, tmp_path_factory):
    return _build(source_factory, tmp_path_factory, None)


def _labels(objects) -> dict[str, set[str]]:
    return {
        "sr": {objects.sr.SeriesDescription},
        "seg": {ds.SeriesDescription for ds in objects.segmentations},
        "seg content": {ds.ContentDescription for ds in objects.segmentations},
        "key": {ds.SeriesDescription for ds in objects.key_images},
        "pdf": {objects.pdf.SeriesDescription},
        "pdf title": {objects.pdf.DocumentTitle},
    }


def test_signed_objects_name_the_verifying_clinician(signed) -> None:
    analysis, objects, _ = signed
    assert _labels(objects) == {
        "sr": {"RetinalGPT AI results (verified by Jane Smith)"},
        "seg": {"RetinalGPT segmentation (verified by Jane Smith)"},
        "seg content": {"Vessels, lesions and optic disc (verified by Jane Smith)"},
        "key": {"RetinalGPT key images (verified by Jane Smith)"},
        "pdf": {"RetinalGPT PDF report (verified by Jane Smith)"},
        "pdf title": {"RetinalGPT fundus photograph analysis (verified by Jane Smith)"},
    }
    for img in analysis.images:
        lines = summary_lines(analysis, img, SIGNED)
        assert lines[-1] == STATEMENT and not any("not verified" in line for line in lines)
    text = pdf_text(objects.pdf_bytes)
    assert text.count(STATEMENT) == 1 and "not verified" not in text
    assert b"verified by Jane Smith" in objects.pdf_bytes  # the PDF's own Title (document information)
    (report,) = [e["resource"] for e in objects.fhir_bundle["entry"]
                 if e["resource"]["resourceType"] == "DiagnosticReport"]
    assert report["presentedForm"][0]["title"] == "RetinalGPT fundus analysis report (verified by Jane Smith)"


def test_unsigned_objects_stay_preliminary(unsigned) -> None:
    analysis, objects, _ = unsigned
    labels = _labels(objects)
    assert labels["sr"] == {"RetinalGPT AI results (not verified)"}
    for kind in ("seg", "seg content", "key", "pdf", "pdf title"):
        (label,) = labels[kind]
        assert label.endswith("(AI result, not verified)"), (kind, label)
    for img in analysis.images:
        assert summary_lines(analysis, img)[-1] == "AI result, not verified by a clinician."
    text = pdf_text(objects.pdf_bytes)
    assert "AI result, not verified by a clinician." in text and "Verified by a clinician" not in text


def test_signed_objects_stay_dciodvfy_clean(signed) -> None:
    _, _, files = signed
    assert all(files[kind] for kind in ("sr", "seg", "key", "pdf"))
    for kind in ("sr", "seg", "key", "pdf"):
        for path in files[kind]:
            run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "TCP_NODELAY": "1"})
            errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
            assert errors == [], f"{kind}: {errors}"


def test_a_name_too_long_for_a_description_still_says_verified() -> None:
    long = SIGNED.model_copy(update={"observer_name": "Featherstonehaugh-Cholmondeley^Maximiliana^Anastasia"})
    text = series_description("RetinalGPT segmentation", long)
    assert text == "RetinalGPT segmentation (verified by a clinician)" and len(text) <= LO_MAX
