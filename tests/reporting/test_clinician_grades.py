"""A grade the clinician set or corrected at sign-off (``Source.CLINICIAN`` on a finding, schema 1.3) is the
clinician's in every result object, never the algorithm's: the SR puts it in a TID 1501 group of its own without
an algorithm (Observer Type = Person, tracked "graded by clinician") and leaves it out of the AI's group; FHIR
gives it the clinician as performer and no device; the HL7 OBX names the clinician as responsible observer and
no equipment; the texts say "set by the clinician". A referral she set (``StudyAnalysis.referral_source``) is
likewise hers in the HL7 OBX, the texts and an SR comment."""

from __future__ import annotations

import datetime as dt
import os
import subprocess

import highdicom as hd
import pytest
from pydantic import ValidationError

from model.schema import Condition, Finding, Referral, Source
from reporting import build_report_objects, codes, summary
from reporting.hl7 import OruOptions, build_oru
from reporting.key_image import summary_lines
from reporting.pdf import render_pdf
from reporting.sr.sop import build_sr
from reporting.verification import Verification, verification_note
from tests.reporting.reporting_fixtures import OPTIONS, make_analysis, write_all
from tests.reporting.test_fhir import r4_validate
from tests.reporting.test_hl7 import _component, _observations
from tests.reporting.test_pdf_key_image import pdf_text

SIGNED = Verification(observer_name="Smith^Jane", observer_id="api:dr-smith", organisation="Eye Clinic",
                      verified_at=dt.datetime(2026, 12, 3, 14, 5, tzinfo=dt.UTC), changed=True)
CLINICIAN = {"identifier": {"system": "urn:retinalgpt:clinician", "value": "api:dr-smith"}, "display": "Jane Smith"}


@pytest.fixture(scope="module")
def built(source_factory, tmp_path_factory):
    sources = source_factory("op8")
    analysis = make_analysis(sources, revision=2)
    analysis.notes.insert(0, verification_note(SIGNED))
    right = analysis.images[0]
    index = next(n for n, f in enumerate(right.findings) if f.condition == Condition.DIABETIC_RETINOPATHY)
    right.findings[index] = Finding(condition=Condition.DIABETIC_RETINOPATHY, grade=3, source=Source.CLINICIAN)
    objects = build_report_objects(analysis, sources, OPTIONS, verification=SIGNED)
    return sources, analysis, objects, write_all(objects, sources, tmp_path_factory.mktemp("graded"))


FINDING_CATEGORY = "276214006"


def _evaluations(group) -> dict[str, str]:
    """The group's coded evaluations, less its Finding Category (every group has one)."""
    return {e.name.value: e.value.value for e in group.get_qualitative_evaluations()
            if e.name.value != FINDING_CATEGORY}


def _algorithm_names(group) -> list[str]:
    return [i.TextValue for i in group[0].ContentSequence if i.ConceptNameCodeSequence[0].value == "111001"]


def test_the_sr_keeps_the_clinicians_grade_out_of_the_ai_group(built) -> None:
    sources, _, _, files = built
    groups = hd.sr.srread(files["sr"][0]).content.get_image_measurement_groups()
    right_uid = str(sources[0].SOPInstanceUID)
    graded = [g for g in groups if g.tracking_identifier.startswith("graded by clinician")]
    assert len(graded) == 1 and right_uid[:30] in graded[0].tracking_identifier
    dr = codes.CONDITIONS[Condition.DIABETIC_RETINOPATHY].value
    assert _evaluations(graded[0]) == {"121005": "121006",  # Observer Type = Person
                                       dr: codes.grade_code(Condition.DIABETIC_RETINOPATHY, 3).value}
    assert _algorithm_names(graded[0]) == [] and "111001" not in str(graded[0])  # no TID 4019 algorithm
    ai = [g for g in groups if g not in graded]
    assert len(ai) == 2 and all(_algorithm_names(g) == ["RetinalGPT"] for g in ai)
    right_ai = next(g for g in ai if right_uid in str(g))
    assert dr not in _evaluations(right_ai) and "121005" not in _evaluations(right_ai)
    left_ai = next(g for g in ai if g is not right_ai)
    assert _evaluations(left_ai)[dr] == codes.grade_code(Condition.DIABETIC_RETINOPATHY, 0).value  # the AI's
    run = subprocess.run(["/usr/bin/dciodvfy", str(files["sr"][0])], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TCP_NODELAY": "1"})
    assert [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")] == []


def test_fhir_names_the_clinician_as_performer_of_the_grade(built, tmp_path) -> None:
    _, _, objects, _ = built
    observations = [e["resource"] for e in objects.fhir_bundle["entry"]
                    if e["resource"]["resourceType"] == "Observation"]
    by_kind = {}
    for o in observations:
        by_kind.setdefault(o["identifier"][0]["value"].rsplit("/", 1)[-1], []).append(o)
    right_eye = codes.BODY_SITE_RIGHT_EYE.value
    severity = [o for o in by_kind["dr-severity"] if o["bodySite"]["coding"][0]["code"] == right_eye]
    assert len(severity) == 1 and "device" not in severity[0] and severity[0]["performer"] == [CLINICIAN]
    (clinician,) = by_kind["clinician-findings"]
    assert "device" not in clinician and clinician["performer"] == [CLINICIAN]
    assert [c["valueCodeableConcept"]["text"] for c in clinician["component"]] == [
        "Diabetic retinopathy: grade 3 (severe NPDR), set by the clinician"]
    dr = codes.CONDITIONS[Condition.DIABETIC_RETINOPATHY].value
    right_ai = next(o for o in by_kind["findings"] if o["bodySite"]["coding"][0]["code"] == right_eye)
    assert "device" in right_ai and all(c["code"]["coding"][0]["code"] != dr for c in right_ai["component"])
    (screening,) = by_kind["dr-screening"]
    assert screening["performer"] == [CLINICIAN] and "device" in screening  # the AI's result from her grades
    messages = r4_validate(objects.fhir_bundle, tmp_path)
    assert [m for m in messages if m["severity"] == "error"] == []


def test_hl7_names_the_clinician_as_responsible_observer(built) -> None:
    sources, analysis, _, _ = built
    message = build_oru(analysis, sources[0], OruOptions(control_id="G1"), None, SIGNED)
    dr = codes.CONDITIONS[Condition.DIABETIC_RETINOPATHY].value
    grades = [o for o in _observations(message) if _component(o.obx_3, 0) == dr]
    assert len(grades) == 2
    clinician, ai = sorted(grades, key=lambda o: o.obx_18.to_er7())
    assert _component(clinician.obx_5, 0) == codes.grade_code(Condition.DIABETIC_RETINOPATHY, 3).value
    assert clinician.obx_16.to_er7() == "api:dr-smith^Smith^Jane"
    assert clinician.obx_17.to_er7() == "" and clinician.obx_18.to_er7() == ""
    assert ai.obx_16.to_er7() == "" and _component(ai.obx_18, 0).startswith("RetinalGPT")


def test_texts_say_the_clinician_set_it_and_clinician_findings_carry_no_probability(built) -> None:
    _, analysis, _, _ = built
    right = analysis.images[0]
    assert "Diabetic retinopathy: grade 3 (severe NPDR), set by the clinician" in summary.image_text(analysis, right)
    with pytest.raises(ValidationError, match="grade and no probability"):
        Finding(condition=Condition.GLAUCOMA, grade=1, probability=0.7, source=Source.CLINICIAN)
    with pytest.raises(ValidationError, match="grade and no probability"):
        Finding(condition=Condition.GLAUCOMA, source=Source.CLINICIAN)


def test_a_referral_the_clinician_set_is_hers(built) -> None:
    sources, analysis, _, _ = built
    theirs = analysis.model_copy(update={"referral": Referral.URGENT, "referral_source": Source.CLINICIAN})
    assert "Referral: urgent, set by the clinician." in summary.conclusion(theirs)
    assert "Referral: routine." in summary.conclusion(analysis.model_copy(update={"referral": Referral.ROUTINE}))
    assert "Referral: urgent, set by the clinician" in summary_lines(theirs, theirs.images[0])
    assert "urgent, set by the clinician" in pdf_text(render_pdf(theirs, sources, [], SIGNED))
    referral = codes.REFERRAL.value
    (obx,) = [o for o in _observations(build_oru(theirs, sources[0], OruOptions(control_id="G2"), None, SIGNED))
              if _component(o.obx_3, 0) == referral]
    assert obx.obx_16.to_er7() == "api:dr-smith^Smith^Jane" and obx.obx_18.to_er7() == ""
    (ai,) = [o for o in _observations(build_oru(analysis, sources[0], OruOptions(control_id="G3"), None, SIGNED))
             if _component(o.obx_3, 0) == referral]
    assert ai.obx_16.to_er7() == "" and _component(ai.obx_18, 0).startswith("RetinalGPT")
    comments = [i.TextValue for i in build_sr(theirs, sources, OPTIONS, verification=SIGNED).ContentSequence[-1]
                .ContentSequence if i.ValueType == "TEXT"]
    assert "Referral: urgent, set by the clinician." in comments
