"""A lesion box the clinician drew at sign-off (``Source.CLINICIAN``, issue 17 item 2) is told apart from the AI's
in every result object: the SR region group names no algorithm, says Observer Type = Person and is tracked as
"drawn by clinician"; the FHIR findings Observation has a note; the key image draws it in its own colour and says
so. The schema still reads analyses stored before the source existed."""

from __future__ import annotations

import json
import os
import subprocess

import highdicom as hd
import pytest
from pydantic import ValidationError

from model.schema import SCHEMA_VERSION, Lesion, LesionType, Source, StudyAnalysis
from reporting import build_report_objects
from reporting.key_image import CLINICIAN_COLOUR, LESION_COLOUR, annotate, summary_lines
from reporting.sources import rgb_pixels
from tests.reporting.reporting_fixtures import OPTIONS, make_analysis, write_all

DRAWN = (0.6, 0.3, 0.7, 0.4)


@pytest.fixture(scope="module")
def built(source_factory, tmp_path_factory):
    sources = source_factory("op8")
    analysis = make_analysis(sources)
    analysis.images[0].lesions.append(Lesion(type=LesionType.HAEMORRHAGE, box=DRAWN, source=Source.CLINICIAN))
    objects = build_report_objects(analysis, sources, OPTIONS)
    return sources, analysis, objects, write_all(objects, sources, tmp_path_factory.mktemp("clinician"))


def test_the_sr_says_a_person_drew_the_box(built) -> None:
    *_, files = built
    regions = hd.sr.srread(files["sr"][0]).content.get_planar_roi_measurement_groups()
    lesions = [g for g in regions if g.finding_category.meaning == "Morphologically abnormal structure"]
    drawn = [g for g in lesions if g.tracking_identifier.endswith("drawn by clinician")]
    assert len(drawn) == 1 and drawn[0].finding_type.meaning == "Hemorrhage"

    def coded(group) -> dict[str, str]:
        return {e.name.value: e.value.value for e in group.get_qualitative_evaluations()}

    def algorithms(group) -> list[str]:
        return [i.TextValue for i in group[0].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111001"]

    assert coded(drawn[0]).get("121005") == "121006"  # Observer Type = Person
    assert algorithms(drawn[0]) == [] and "111001" not in str(drawn[0])  # no Algorithm Name (TID 4019)
    ai = [g for g in lesions if g not in drawn]
    assert len(ai) == 2 and all(algorithms(g) == ["RetinalGPT"] for g in ai)
    assert not any("121005" in coded(g) for g in ai)
    run = subprocess.run(["/usr/bin/dciodvfy", str(files["sr"][0])], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TCP_NODELAY": "1"})
    assert [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")] == []


def test_fhir_and_key_image_name_the_clinicians_box(built) -> None:
    sources, analysis, objects, _ = built
    notes = [n["text"] for e in objects.fhir_bundle["entry"] if e["resource"]["resourceType"] == "Observation"
             for n in e["resource"].get("note", [])]
    expected = "Hemorrhage drawn by the clinician at sign-off (missed by the AI), box [0.60, 0.30, 0.70, 0.40]."
    assert notes.count(expected) == 1
    right, left = analysis.images
    assert "Red boxes: drawn by the clinician (hemorrhage)" in summary_lines(analysis, right)
    assert not any("drawn by the clinician" in line for line in summary_lines(analysis, left))
    pixels = annotate(rgb_pixels(sources[0]), analysis, right)
    h, w = pixels.shape[:2]
    x0, y0, x1, y1 = DRAWN
    assert tuple(pixels[int(y0 * h) + (int(y1 * h) - int(y0 * h)) // 2, int(x0 * w)]) == CLINICIAN_COLOUR
    ai = right.lesions[0].box
    assert tuple(pixels[int((ai[1] + ai[3]) / 2 * h), int(ai[0] * w)]) == LESION_COLOUR


def test_stored_analyses_without_the_source_still_read_and_drawn_boxes_have_no_score(built) -> None:
    _, analysis, _, _ = built
    stored = json.loads(analysis.model_dump_json())
    assert stored["schema_version"] == SCHEMA_VERSION == "1.3"
    assert stored["images"][0]["lesions"][-1]["source"] == "clinician"
    stored["schema_version"] = "1.1"
    for image in stored["images"]:
        for lesion in image["lesions"]:
            lesion.pop("source")
    old = StudyAnalysis.model_validate(stored)
    assert {lesion.source for image in old.images for lesion in image.lesions} == {Source.MODEL}
    with pytest.raises(ValidationError, match="no detection score"):
        Lesion(type=LesionType.HAEMORRHAGE, box=DRAWN, score=0.5, source=Source.CLINICIAN)
