"""Content of the PDF report and the key image."""

from __future__ import annotations

import base64
import re
import zlib

import numpy as np

from model.schema import Condition, Source
from reporting import summary
from reporting.key_image import annotate, summary_lines
from reporting.pdf import render_pdf
from reporting.sources import rgb_pixels
from tests.reporting.reporting_fixtures import MODEL, make_analysis


def pdf_text(pdf: bytes) -> str:
    """The literal strings shown by the page content streams (reportlab: ASCII85 + Flate encoded)."""
    shown = []
    for stream in re.findall(rb"stream\r?\n(.*?)endstream", pdf, flags=re.S):
        stream = stream.strip()
        try:
            content = zlib.decompress(base64.a85decode(stream[:-2]) if stream.endswith(b"~>") else stream)
        except (zlib.error, ValueError):
            continue
        shown += re.findall(rb"\((.*?)\) Tj", content)
    return " ".join(s.decode("latin-1").replace("\\(", "(").replace("\\)", ")") for s in shown)


def test_pdf_says_what_a_reader_needs(source_factory):
    sources = source_factory("op8")
    analysis = make_analysis(sources)
    pdf = render_pdf(analysis, sources, summary.notes(analysis))
    assert pdf.startswith(b"%PDF") and pdf.count(b"/Subtype /Image") == 2  # one annotated photograph per eye
    text = pdf_text(pdf)
    for expected in [
        "AI result, not verified by a clinician.",
        MODEL.name,
        MODEL.version,
        MODEL.device_uid,
        "Referral",
        "urgent",
        "Right eye, quality gradable (0.88)",
        "Left eye, quality usable (0.61)",
        "uneven illumination",
        "Diabetic retinopathy",
        "grade 2 (moderate NPDR), p=0.91",
        "Central retinal artery equivalent (Knudtson) artery zone C",
        "141.2",
        "Measurement (measured)",
        "high",
        "normal",
        "Age-related macular degeneration",
        "Cataract",
        "not assessed",
        "model not trained on it",
        "Quality flag: the model's estimate of vessel fractal dimension disagrees with the measured value",
        "1.47",
    ]:
        assert expected in text, expected


def test_pdf_presents_measured_values_only(source_factory):
    """The model's fractal dimension (1.39) and CDRs are not in the PDF; the measured ones are, once per
    eye."""
    sources = source_factory("op8")
    analysis = make_analysis(sources)
    text = pdf_text(render_pdf(analysis, sources, summary.notes(analysis)))
    assert "1.39" not in text and "model estimate" not in text
    assert text.count("Vessel fractal dimension") == 2 and text.count("Vertical cup-to-disc ratio") == 2
    assert "1.47" in text and "0.42" in text and "0.71" in text


def test_pdf_without_model(source_factory):
    sources = source_factory("op8")
    analysis = make_analysis(sources, with_model=False)
    text = pdf_text(render_pdf(analysis, sources, summary.notes(analysis)))
    assert "RetinalGPT was not run for this study" in text and "RetinalGPT not configured" in text
    assert "Vertical cup-to-disc ratio" in text and "Diabetic retinopathy" not in text


def test_key_image_draws_results_only_where_they_are(source_factory):
    sources = source_factory("op8")
    analysis = make_analysis(sources)
    right = analysis.images[0]
    pixels = rgb_pixels(sources[0])
    drawn = annotate(pixels, analysis, right)
    assert drawn.shape == pixels.shape and drawn.dtype == np.uint8
    rows, cols = pixels.shape[:2]
    x0, y0, x1, y1 = right.lesions[1].box  # haemorrhage box outline is yellow
    top = drawn[round(y0 * rows), round(x0 * cols) + 2 : round(x1 * cols) - 2]
    assert (np.abs(top.astype(int) - (255, 215, 0)).sum(axis=1) < 30).all()
    untouched = (slice(rows - 40, rows), slice(cols - 40, cols))
    assert np.array_equal(drawn[untouched], pixels[untouched])
    lines = summary_lines(analysis, right)
    assert lines[-1] == summary.NOT_VERIFIED and "Referral: urgent" in lines
    assert "Diabetic retinopathy: grade 2 (moderate NPDR), p=0.91" in lines
    assert "Not assessed (model not trained on them): age-related macular degeneration, cataract" in lines
    assert "Vertical CDR 0.42 (measured)" in lines
    no_model = make_analysis(sources, with_model=False)
    assert "RetinalGPT not run: no AI finding" in summary_lines(no_model, no_model.images[0])


def test_summaries_name_not_assessed_conditions_and_hide_model_numbers(source_factory):
    """Conclusion and key image text: every not-assessed condition is named as such per eye; a CDR only the
    model emitted is not shown; the disagreement is a flag without the model's number."""
    sources = source_factory("op8")
    analysis = make_analysis(sources)
    left = analysis.images[1]
    left.measurements = [m for m in left.measurements if m.key != "CDR_vertical" or m.source == Source.MODEL]
    conclusion = summary.conclusion(analysis)
    missing = "Not assessed (model not trained on them): age-related macular degeneration, cataract"
    assert conclusion.count(missing) == 2
    assert "Left eye, quality usable (0.61): Glaucoma: present, p=0.74; " + missing + "." in conclusion
    assert "1.39" not in conclusion and conclusion.count("disagrees with the measured value 1.47") == 2
    lines = summary_lines(analysis, left)
    assert missing in lines and not [line for line in lines if "CDR" in line]
    assert not [line for line in lines if "0.8" in line or "estimate" in line]
    left.not_assessed = [Condition.DIABETIC_RETINOPATHY]
    left.findings = [f for f in left.findings if not f.present]
    assert (
        "Left eye, quality usable (0.61): No AI finding present among the conditions assessed; Not assessed "
        "(model not trained on it): diabetic retinopathy."
    ) in summary.conclusion(analysis)
