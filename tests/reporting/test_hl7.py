"""The HL7 v2.5.1 ORU^R01 builder: parsed back with hl7apy (structure validated against the 2.5.1 message
definition), patient and order identity, the SR's codes, probabilities, grades, UCUM units, the PDF as ED,
result status P / F / C, escaping, and refusal of data that could misfile the result."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from pydicom.dataset import Dataset

from reporting import ReportOptions, codes, summary
from reporting.hl7 import Hl7BuildError, OruOptions, build_oru, parse, parse_ack, unescape
from reporting.sr.sop import build_sr
from reporting.verification import Verification
from tests.reporting.reporting_fixtures import make_analysis
from tests.support.mllp import build_ack

PDF = b"%PDF-1.4\n% a tiny report\n%%EOF\n"


@pytest.fixture(scope="module")
def sources(source_factory):
    return source_factory("op8")


def _observations(message: str) -> list:
    msg = parse(message)
    order = msg.oru_r01_patient_result.oru_r01_order_observation
    return [group.obx for group in order.oru_r01_observation]


def _component(field, index: int) -> str:
    parts = field.to_er7().split("^")
    return unescape(parts[index]) if index < len(parts) else ""


def _sr_codes(ds: Dataset) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()

    def walk(items) -> None:
        for item in items:
            for keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence", "MeasurementUnitsCodeSequence"):
                for code in item.get(keyword, []):
                    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue")
                    found.add((str(value), str(code.CodingSchemeDesignator)))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return found


def test_oru_parses_back_with_the_patient_the_order_and_the_srs_codes(sources):
    analysis = make_analysis(sources)
    message = build_oru(analysis, sources[0], OruOptions(control_id="C1", sending_facility="EYE", include_pdf=True,
                                                          receiving_application="EHR"), PDF)
    msg = parse(message)
    msg.validate()  # strict structure and required fields of ORU_R01 in HL7 v2.5.1
    assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and msg.msh.msh_10.to_er7() == "C1"
    assert msg.msh.msh_4.to_er7() == "EYE" and msg.msh.msh_5.to_er7() == "EHR" and msg.msh.msh_12.to_er7() == "2.5.1"
    patient = msg.oru_r01_patient_result.oru_r01_patient
    assert patient.pid.pid_3.to_er7().split("^")[0] == "RGPT-0001"
    assert patient.pid.pid_5.to_er7() == "Fundus^Test"
    assert patient.pid.pid_7.to_er7() == "19600101" and patient.pid.pid_8.to_er7() == "F"
    assert patient.oru_r01_visit.pv1.pv1_2.to_er7() == "U"
    order = msg.oru_r01_patient_result.oru_r01_order_observation
    assert order.orc.orc_2.to_er7() == order.orc.orc_3.to_er7() == "ACC42"
    assert order.obr.obr_2.to_er7() == order.obr.obr_3.to_er7() == "ACC42"
    assert order.obr.obr_25.to_er7() == "P" and order.obr.obr_7.to_er7() == "20260101093000"  # unsigned
    assert unescape(order.nte.nte_3.to_er7()) == "AI result, not verified by a clinician."

    obx = _observations(message)
    assert [o.obx_1.to_er7() for o in obx] == [str(n) for n in range(1, len(obx) + 1)]
    assert {o.obx_11.to_er7() for o in obx} == {"P"}
    by_sub: dict[tuple[str, str], list] = {}
    for o in obx:
        by_sub.setdefault((o.obx_4.to_er7(), _component(o.obx_3, 0)), []).append(o)

    # right eye = image 1: DR grade 2 coded as the SR codes it, with its probability in the same sub-ID
    (dr,) = by_sub[("1.1", "4855003")]
    assert dr.obx_2.to_er7() == "CWE" and _component(dr.obx_5, 0) == "312904009" and _component(dr.obx_5, 2) == "SCT"
    (p_dr,) = by_sub[("1.1", "P-diabetic_retinopathy")]
    assert p_dr.obx_2.to_er7() == "NM" and float(p_dr.obx_5.to_er7()) == pytest.approx(0.91)
    assert _component(p_dr.obx_6, 0) == "1" and _component(p_dr.obx_6, 2) == "UCUM"
    (laterality,) = by_sub[("1", "272741003")]
    assert _component(laterality.obx_5, 0) == codes.RIGHT.value
    (glaucoma,) = by_sub[("2.3", "23986001")]
    assert _component(glaucoma.obx_5, 0) == codes.PRESENT.value
    (amd,) = by_sub[("1.5", "267718000")]
    assert _component(amd.obx_5, 0) == codes.NOT_ASSESSED.value  # not assessed, never absent

    # key measurements: measured values only, UCUM units, reference range and flag, the key as alternate code
    (crae,) = by_sub[("1", "CRAE-K")]
    assert float(crae.obx_5.to_er7()) == pytest.approx(141.2) and _component(crae.obx_6, 0) == "um"
    assert _component(crae.obx_3, 3) == "CRAE_Knudtson_zone_c" and crae.obx_7.to_er7() == "120-180"
    (cdr_left,) = by_sub[("2", "VCDR")]
    assert float(cdr_left.obx_5.to_er7()) == pytest.approx(0.71) and cdr_left.obx_8.to_er7() == "H"
    assert _component(cdr_left.obx_17, 0) == codes.DERIVATION[codes.Source.MEASURED].value
    fds = by_sub[("1", "FD")]
    assert [float(o.obx_5.to_er7()) for o in fds] == [pytest.approx(1.47)]  # the model's 1.39 is not a value
    assert not any(_component(o.obx_3, 3) == "Disc_height" for o in obx)  # not a key measurement

    # impression and referral as text / coded text, each eye's summary as TX, the PDF as ED
    referral = next(o for o in obx if _component(o.obx_3, 0) == codes.REFERRAL.value)
    assert _component(referral.obx_5, 0) == codes.REFERRAL_VALUES[analysis.referral].value
    eye = by_sub[("1", codes.EYE_FINDINGS.value)][0]
    assert unescape(eye.obx_5.to_er7()).startswith("Right eye, quality gradable (0.88): Diabetic retinopathy")
    (pdf,) = [o for o in obx if o.obx_2.to_er7() == "ED"]
    assert pdf.obx_5.to_er7().split("^")[1:4] == ["AP", "PDF", "Base64"]
    assert base64.b64decode(pdf.obx_5.to_er7().split("^")[4]) == PDF

    # every code of a finding, probability, quality, laterality and measurement is one the SR uses
    sr_codes = _sr_codes(build_sr(analysis, sources, ReportOptions(), None))
    coded_rows = [o for o in obx if o.obx_2.to_er7() in {"CWE", "NM"} and _component(o.obx_3, 2) != "99RGPT"
                  or _component(o.obx_3, 0).startswith("P-")]
    assert len(coded_rows) > 20
    for o in coded_rows:
        assert (_component(o.obx_3, 0), _component(o.obx_3, 2)) in sr_codes, o.to_er7()
        if o.obx_2.to_er7() == "CWE":
            assert (_component(o.obx_5, 0), _component(o.obx_5, 2)) in sr_codes, o.to_er7()


def test_pdf_is_left_out_unless_asked(sources):
    message = build_oru(make_analysis(sources), sources[0], OruOptions(control_id="C2"), PDF)
    assert not [o for o in _observations(message) if o.obx_2.to_er7() == "ED"]


def _status(message: str) -> tuple[str, set[str]]:
    obr = parse(message).oru_r01_patient_result.oru_r01_order_observation.obr
    return obr.obr_25.to_er7(), {o.obx_11.to_er7() for o in _observations(message)}


def test_unsigned_results_have_the_configured_status_and_c_only_after_a_final_one(sources):
    assert _status(build_oru(make_analysis(sources), sources[0], OruOptions(control_id="C3"))) == ("P", {"P"})
    again = build_oru(make_analysis(sources, revision=2), sources[0], OruOptions(control_id="C4", result_status="P"))
    assert _status(again) == ("P", {"P"})  # a preliminary result replaced by a preliminary one
    final = build_oru(make_analysis(sources), sources[0], OruOptions(control_id="C5", result_status="F"))
    assert _status(final) == ("F", {"F"})
    corrected = build_oru(make_analysis(sources, revision=2), sources[0], OruOptions(control_id="C6", result_status="F"))
    assert _status(corrected) == ("C", {"C"})


def test_signed_results_are_final_and_a_signed_correction_is_c(sources):
    signed = Verification(observer_name="Smith^Jane", observer_id="api:dr-smith", organisation="Eye Clinic",
                          verified_at=dt.datetime(2026, 1, 2, 9, 0, tzinfo=dt.UTC), changed=True)
    message = build_oru(make_analysis(sources, revision=2), sources[0], OruOptions(control_id="C7"), None, signed)
    assert _status(message) == ("F", {"F"})
    again = signed.model_copy(update={"corrects_signed": True})
    message = build_oru(make_analysis(sources, revision=3), sources[0], OruOptions(control_id="C8"), None, again)
    assert _status(message) == ("C", {"C"})


def test_delimiters_in_the_data_are_escaped_and_read_back(sources):
    analysis = make_analysis(sources)
    analysis.impression = "Moderate NPDR | right ^ eye & more ~ see \\ notes"
    context = sources[0].copy()
    context.PatientName = "O'Brien-Smith^Anne Marie"
    context.AccessionNumber = "A|1^2"
    message = build_oru(analysis, context, OruOptions(control_id="C5"))
    msg = parse(message)
    msg.validate()
    impression = next(o for o in _observations(message) if _component(o.obx_3, 0) == codes.IMPRESSION.value)
    assert unescape(impression.obx_5.to_er7()) == analysis.impression
    order = msg.oru_r01_patient_result.oru_r01_order_observation
    assert unescape(order.obr.obr_2.to_er7()) == "A|1^2"
    assert [unescape(p) for p in msg.oru_r01_patient_result.oru_r01_patient.pid.pid_5.to_er7().split("^")] == [
        "O'Brien-Smith", "Anne Marie"]


def test_no_accession_number_files_under_the_study_uid_as_filler_order(sources):
    context = sources[0].copy()
    context.AccessionNumber = ""
    analysis = make_analysis(sources)
    analysis.accession_number = None
    order = parse(build_oru(analysis, context, OruOptions(control_id="C6"))).oru_r01_patient_result \
        .oru_r01_order_observation
    assert order.obr.obr_3.to_er7() == context.StudyInstanceUID and order.obr.obr_2.to_er7() == ""


@pytest.mark.parametrize("change, message", [
    ({"PatientID": ""}, "no Patient ID"),
    ({"PatientID": "SOMEONE-ELSE"}, "differ"),
    ({"StudyInstanceUID": "1.2.3"}, "belong to study 1.2.3"),
])
def test_data_that_could_misfile_the_result_is_refused(sources, change, message):
    analysis = make_analysis(sources)
    analysis.patient_id = "RGPT-0001"
    context = sources[0].copy()
    for keyword, value in change.items():
        setattr(context, keyword, value)
    if not change.get("PatientID", "x"):
        analysis.patient_id = None
    with pytest.raises(Hl7BuildError, match=message):
        build_oru(analysis, context, OruOptions(control_id="C7"))


def test_ack_is_read_with_its_code_control_id_and_text(sources):
    message = build_oru(make_analysis(sources), sources[0], OruOptions(control_id="C8"))
    ack = parse_ack(build_ack(message, "AE", "PID-3 unknown | check"))
    assert (ack.code, ack.control_id, ack.accepted, ack.rejected) == ("AE", "C8", False, False)
    assert "PID-3 unknown | check" in ack.text
    assert parse_ack(build_ack(message, "AR")).rejected and parse_ack(build_ack(message, "AA")).accepted


def test_measurement_only_analysis_says_the_model_did_not_run(sources):
    analysis = make_analysis(sources, with_model=False)
    message = build_oru(analysis, sources[0], OruOptions(control_id="C9"))
    msg = parse(message)
    msg.validate()
    order = msg.oru_r01_patient_result.oru_r01_order_observation
    notes = [unescape(nte.nte_3.to_er7()) for nte in order.children if nte.name == "NTE"]
    assert summary.NO_MODEL in notes
    obx = _observations(message)
    assert not [o for o in obx if _component(o.obx_3, 0) == "4855003"]  # no finding invented
    assert [o for o in obx if _component(o.obx_3, 0) == "VCDR"]  # the measured values are still sent
