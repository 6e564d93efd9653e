"""FHIR R4 Bundle: independent R4 validation (npm ``fhir``), fhir.resources parsing, mapping, idempotence."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
from fhir.resources.R4B import get_fhir_model_class

from model.schema import Condition, Source, StudyAnalysis
from reporting import ReportOptions, build_report_objects, codes
from reporting.fhir.bundle import build_bundle
from tests.reporting.reporting_fixtures import make_analysis
from tests.support.services import service_missing

REPO = Path(__file__).resolve().parents[2]
FHIR_NODE = REPO / "tools" / "node" / "node_modules" / "fhir"
VALIDATE_JS = """
const {Fhir} = require(process.argv[2]);
const fhir = new Fhir();
const bundle = JSON.parse(require('fs').readFileSync(process.argv[3], 'utf8'));
const targets = [bundle, ...bundle.entry.map(e => e.resource)];
const out = targets.map(r => ({type: r.resourceType, result: fhir.validate(r)}));
process.stdout.write(JSON.stringify(out));
"""


def r4_validate(bundle: dict, tmp_path: Path) -> list[dict]:
    """Messages of the npm fhir R4 validator for the Bundle and each of its resources."""
    if not FHIR_NODE.is_dir():
        service_missing("npm fhir validator not installed (scripts/bootstrap.sh)")
    (tmp_path / "bundle.json").write_text(json.dumps(bundle))
    (tmp_path / "validate.js").write_text(VALIDATE_JS)
    run = subprocess.run(
        ["node", str(tmp_path / "validate.js"), str(FHIR_NODE), str(tmp_path / "bundle.json")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    results = json.loads(run.stdout)
    assert len(results) == len(bundle["entry"]) + 1
    return [dict(m, resource=r["type"]) for r in results for m in r["result"]["messages"]]


@pytest.fixture(scope="module")
def op_sources(source_factory):
    return source_factory("op8")


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "no-model"])
def test_bundle_is_valid_r4(op_sources, tmp_path, with_model):
    analysis = make_analysis(op_sources, with_model=with_model)
    bundle = build_bundle(analysis, op_sources, pdf=b"%PDF-1.4\n%test\n")
    messages = r4_validate(bundle, tmp_path)
    errors = [m for m in messages if m["severity"] == "error"]
    assert errors == []
    unexpected = [m for m in messages if "Unexpected property" in m["message"]]
    assert unexpected == [], "element not in R4"
    for entry in bundle["entry"]:
        resource = entry["resource"]
        model = get_fhir_model_class(resource["resourceType"])
        assert model.model_validate(resource).get_resource_type() == resource["resourceType"]
    assert get_fhir_model_class("Bundle").model_validate(bundle).type == "transaction"


def _by_type(bundle: dict, rtype: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def test_bundle_mapping(op_sources):
    analysis = make_analysis(op_sources)
    objects = build_report_objects(analysis, op_sources, ReportOptions(key_image=False))
    bundle = objects.fhir_bundle
    study = analysis.study_instance_uid
    (imaging,) = _by_type(bundle, "ImagingStudy")
    assert imaging["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{study}"}
    assert {i["uid"] for s in imaging["series"] for i in s["instance"]} == {
        str(ds.SOPInstanceUID) for ds in op_sources
    }
    devices = _by_type(bundle, "Device")
    assert {d["identifier"][0]["value"] for d in devices} == {
        f"urn:oid:{analysis.model.device_uid}",
        f"urn:oid:{analysis.pipeline.device_uid}",
    }
    observations = _by_type(bundle, "Observation")
    dr = {
        o["code"]["coding"][0]["code"]: o
        for o in observations
        if o["code"]["coding"][0]["code"] in {"71491-5", "71490-7"}
    }
    assert dr["71491-5"]["valueCodeableConcept"]["coding"][0]["code"] == "LA18645-4"  # right eye, ICDR 2
    assert dr["71491-5"]["bodySite"]["coding"][0]["code"] == "18944008"
    assert dr["71490-7"]["valueCodeableConcept"]["coding"][0]["code"] == "LA18643-9"  # left eye, ICDR 0
    assert dr["71490-7"]["bodySite"]["coding"][0]["code"] == "8966001"
    cdr = [o for o in observations if o["code"]["coding"][0]["code"] == "71485-7"]
    assert sorted(o["valueQuantity"]["value"] for o in cdr) == [0.42, 0.71]  # measured; model's 0.5 / 0.8 not
    assert {o["method"]["coding"][0]["display"] for o in cdr} == {"Measured"}
    findings = [o for o in observations if o["code"]["coding"][0]["code"] == "EYE-FINDINGS"]
    right = next(o for o in findings if o["bodySite"]["coding"][0]["code"] == "18944008")
    vd = [c for c in right["component"] if c["code"]["coding"][0]["code"] == "VD"]
    assert {c["valueQuantity"]["value"] for c in vd} == {0.081, 0.034}
    assert any("disagrees" in n["text"] for n in right["note"])
    screening = [o for o in observations if o["code"]["coding"][0]["code"] == "105914-6"]
    assert screening[0]["valueCodeableConcept"]["coding"][0]["code"] == "LA35099-3"
    for obs in observations:
        assert obs["derivedFrom"][0]["reference"] == next(
            e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ImagingStudy"
        )
        assert obs["device"]["reference"].startswith("urn:uuid:")
    (report,) = _by_type(bundle, "DiagnosticReport")
    assert report["status"] == "preliminary" and "resultsInterpreter" not in report  # unsigned
    assert report["effectiveDateTime"] == imaging["started"] == "2026-01-01"  # no UTC offset: date only
    assert report["issued"] == "2026-01-01T10:00:00Z"
    assert len(report["result"]) == len(observations)
    assert base64.b64decode(report["presentedForm"][0]["data"]) == objects.pdf_bytes
    assert "Moderate non-proliferative" in report["conclusion"] and "not verified" in report["conclusion"]
    assert "performer" not in report
    (prov,) = _by_type(bundle, "Provenance")
    device_urls = {e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Device"}
    assert {a["who"]["reference"] for a in prov["agent"]} == device_urls
    requests = [e["request"] for e in bundle["entry"]]
    assert all(r["method"] == "PUT" or "ifNoneExist" in r for r in requests)
    assert all(
        "?identifier=" in r["url"] or r["url"].startswith("Provenance/")
        for r in requests
        if r["method"] == "PUT"
    )


def test_same_analysis_gives_same_bundle(op_sources):
    analysis = make_analysis(op_sources)
    assert build_bundle(analysis, op_sources) == build_bundle(analysis, op_sources)


def test_new_unsigned_revision_stays_preliminary_on_the_same_report(op_sources):
    bundle = build_bundle(make_analysis(op_sources, revision=2), op_sources)
    (report,) = _by_type(bundle, "DiagnosticReport")
    assert report["status"] == "preliminary"
    assert {o["status"] for o in _by_type(bundle, "Observation")} == {"preliminary"}
    first = build_bundle(make_analysis(op_sources), op_sources)
    assert report["identifier"] == _by_type(first, "DiagnosticReport")[0]["identifier"]


def test_no_model_says_so(op_sources):
    bundle = build_bundle(make_analysis(op_sources, with_model=False), op_sources)
    (report,) = _by_type(bundle, "DiagnosticReport")
    assert "RetinalGPT was not run" in report["conclusion"]
    assert len(_by_type(bundle, "Device")) == 1
    codes = {o["code"]["coding"][0]["code"] for o in _by_type(bundle, "Observation")}
    assert "71491-5" not in codes and "71485-7" in codes  # measured cup-to-disc ratio still reported
    findings = [
        o for o in _by_type(bundle, "Observation") if o["code"]["coding"][0]["code"] == "EYE-FINDINGS"
    ]
    assert all(any("not run" in n["text"] for n in o["note"]) for o in findings)


def _quantities(bundle: dict) -> set[tuple[str, float]]:
    """(code, value) of every valueQuantity in the Bundle's Observations and their components."""
    out = set()
    for obs in _by_type(bundle, "Observation"):
        for item in [obs, *obs.get("component", [])]:
            if "valueQuantity" in item:
                out.add((item["code"]["coding"][0]["code"], item["valueQuantity"]["value"]))
    return out


def test_model_emitted_numbers_are_not_fhir_values(op_sources):
    """Model-emitted vascular / CDR numbers appear nowhere as values; measured ones do; the disagreement is a
    note that names the feature and the measured value only. A model-only CDR gives no CDR Observation."""
    analysis = make_analysis(op_sources)
    left = analysis.images[1]
    left.measurements = [
        m for m in left.measurements if not (m.key == "CDR_vertical" and m.source == Source.MEASURED)
    ]
    bundle = build_bundle(analysis, op_sources)
    values = _quantities(bundle)
    for image in analysis.images:
        for m in image.measurements:
            code = codes.feature(m.key).code.value
            assert ((code, m.value) in values) == (m.source == Source.MEASURED), (m.key, m.source)
    cdr = [o for o in _by_type(bundle, "Observation") if o["code"]["coding"][0]["code"] == "71485-7"]
    assert [o["valueQuantity"]["value"] for o in cdr] == [0.42]  # the left eye has only the model's 0.8
    assert not [v for c, v in values if c == "71485-7" and v in {0.5, 0.8}]
    observations = _by_type(bundle, "Observation")
    findings = [o for o in observations if o["code"]["coding"][0]["code"] == "EYE-FINDINGS"]
    for obs in findings:
        (flag,) = [n["text"] for n in obs["note"] if "disagrees" in n["text"]]
        assert "vessel fractal dimension" in flag and "1.47" in flag and "1.39" not in flag
    (report,) = _by_type(bundle, "DiagnosticReport")
    assert "1.39" not in report["conclusion"]
    assert "disagrees with the measured value 1.47" in report["conclusion"]


def _dr_not_assessed(sources: list) -> StudyAnalysis:
    """The fixture analysis read by a model never trained on DR or DME: not assessed on every image."""
    analysis = make_analysis(sources)
    unscreened = [Condition.DIABETIC_RETINOPATHY, Condition.DIABETIC_MACULAR_EDEMA]
    for image in analysis.images:
        image.findings = [f for f in image.findings if f.condition not in unscreened]
        image.not_assessed = [*unscreened, *image.not_assessed]
    return analysis


@pytest.mark.parametrize("dr_assessed", [True, False], ids=["dr-assessed", "dr-not-assessed"])
def test_not_assessed_conditions_in_fhir(op_sources, tmp_path, dr_assessed):
    """Each not-assessed condition is a component of the eye's findings Observation with dataAbsentReason
    not-performed (never a value); DR not assessed gives the eye's DR severity Observation with that reason
    and a screening result without a "no DR" answer; the conclusion names them; the npm R4 validator accepts
    it all."""
    analysis = make_analysis(op_sources) if dr_assessed else _dr_not_assessed(op_sources)
    bundle = build_bundle(analysis, op_sources, pdf=b"%PDF-1.4\n%test\n")
    messages = r4_validate(bundle, tmp_path)
    assert [m for m in messages if m["severity"] == "error" or "Unexpected property" in m["message"]] == []
    observations = _by_type(bundle, "Observation")
    not_performed = {
        "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
        "code": "not-performed",
        "display": "Not Performed",
    }
    findings = [o for o in observations if o["code"]["coding"][0]["code"] == "EYE-FINDINGS"]
    for obs, image in zip(findings, analysis.images, strict=True):
        absent = {
            c["code"]["coding"][0]["code"]: c
            for c in obs["component"]
            if c.get("dataAbsentReason", {}).get("coding") == [not_performed]
        }
        assert set(absent) == {codes.CONDITIONS[c].value for c in image.not_assessed}
        assert not [key for component in absent.values() for key in component if key.startswith("value")]
        assert any("Not assessed (model not trained on them)" in n["text"] for n in obs["note"])
    severity = [o for o in observations if o["code"]["coding"][0]["code"] in {"71491-5", "71490-7"}]
    assert len(severity) == 2
    screening = next(o for o in observations if o["code"]["coding"][0]["code"] == "105914-6")
    (report,) = _by_type(bundle, "DiagnosticReport")
    assert "Not assessed (model not trained on them): " in report["conclusion"]
    assert "age-related macular degeneration, cataract" in report["conclusion"]
    if dr_assessed:
        assert all("valueCodeableConcept" in o for o in severity)
        assert screening["valueCodeableConcept"]["coding"][0]["code"] == "LA35099-3"
    else:
        assert all(o["dataAbsentReason"]["coding"] == [not_performed] and "valueCodeableConcept" not in o
                   for o in severity)
        assert screening["dataAbsentReason"]["coding"] == [not_performed]
        assert "valueCodeableConcept" not in screening
        assert "diabetic retinopathy, diabetic macular oedema" in report["conclusion"]
        assert "conclusionCode" not in report
