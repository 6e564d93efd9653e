"""The FHIR R4 facade: a real FHIR client (fhirclient) searches and reads; responses pass the npm ``fhir`` R4
validator; search parameters, paging, _include, versions and OperationOutcome errors behave."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhirclient import client
from fhirclient.models.diagnosticreport import DiagnosticReport
from fhirclient.models.observation import Observation

from tests.api.api_fixtures import SPECS, reindex_revision
from tests.api.conftest import READ_TOKEN, Deployment
from tests.support.services import service_missing
from worker.db import Study
from worker.fhir_store import FhirResource, index_bundle

pytestmark = pytest.mark.xdist_group("api")

REPO = Path(__file__).resolve().parents[2]
FHIR_NODE = REPO / "tools" / "node" / "node_modules" / "fhir"
VALIDATE_JS = """
const {Fhir} = require(process.argv[2]);
const fhir = new Fhir();
const resources = JSON.parse(require('fs').readFileSync(process.argv[3], 'utf8'));
process.stdout.write(JSON.stringify(resources.map(r => ({type: r.resourceType, result: fhir.validate(r)}))));
"""
ANALYSED = [s for s in SPECS if s.referral is not None]


def r4_errors(resources: list[dict[str, Any]], tmp_path: Path) -> list[dict[str, Any]]:
    """Error and 'not in R4' messages of the npm fhir R4 validator for each resource."""
    if not FHIR_NODE.is_dir():
        service_missing("npm fhir validator not installed (scripts/bootstrap.sh)")
    (tmp_path / "resources.json").write_text(json.dumps(resources))
    (tmp_path / "validate.js").write_text(VALIDATE_JS)
    run = subprocess.run(["node", str(tmp_path / "validate.js"), str(FHIR_NODE), str(tmp_path / "resources.json")],
                         capture_output=True, text=True, check=True, timeout=120)
    results = json.loads(run.stdout)
    assert len(results) == len(resources)
    return [dict(m, resource=r["type"]) for r in results for m in r["result"]["messages"]
            if m["severity"] == "error" or "Unexpected property" in m["message"]]


@pytest.fixture()
def smart(deployment: Deployment) -> client.FHIRClient:
    fhir = client.FHIRClient(settings={"app_id": "retinalgpt-tests", "api_base": deployment.fhir + "/"})
    fhir.server.session.headers["Authorization"] = f"Bearer {READ_TOKEN}"
    return fhir


def get(deployment: Deployment, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{deployment.fhir}/{path}", params=params, timeout=30,
                     headers={"Authorization": f"Bearer {READ_TOKEN}"})


def test_fhirclient_searches_by_patient_and_reads_reports(deployment: Deployment, smart: client.FHIRClient) -> None:
    spec = SPECS[0]
    patients = get(deployment, "Patient", identifier=f"urn:retinalgpt:patient-id|{spec.patient_id}").json()
    assert patients["total"] == 1
    patient_id = patients["entry"][0]["resource"]["id"]
    reports = DiagnosticReport.where(struct={"patient": patient_id}).perform_resources(smart.server)
    assert len(reports) == 1
    report = DiagnosticReport.read(reports[0].id, smart.server)
    assert report.status == "preliminary"  # an unsigned AI result
    assert report.subject.reference == f"Patient/{patient_id}"
    assert "Referral: urgent." in report.conclusion
    observations = [Observation.read(ref.reference.split("/")[1], smart.server) for ref in report.result]
    assert {o.bodySite.coding[0].code for o in observations if o.bodySite} == {"18944008", "8966001"}
    severity = [o for o in observations if o.code.coding[0].code == "71491-5"]
    assert severity[0].valueCodeableConcept.coding[0].code == "LA18646-2"  # ICDR grade 3: severe NPDR
    same = DiagnosticReport.where(struct={"subject:identifier": f"urn:retinalgpt:patient-id|{spec.patient_id}"})
    assert [r.id for r in same.perform_resources(smart.server)] == [report.id]


def test_fhirclient_pages_through_observations(deployment: Deployment, smart: client.FHIRClient) -> None:
    total = get(deployment, "Observation", _count=0).json()["total"]
    search = Observation.where(struct={"_count": "4", "_sort": "_id"})
    pages = list(search.perform_iter(smart.server))
    ids = [e.resource.id for page in pages for e in page.entry or []]
    assert total > 12 and len(pages) == -(-total // 4)
    assert len(ids) == len(set(ids)) == total
    assert ids == sorted(ids)


def test_paging_links(deployment: Deployment) -> None:
    first = get(deployment, "Observation", status="preliminary", _count=5).json()
    links = {link["relation"]: link["url"] for link in first["link"]}
    assert set(links) == {"self", "first", "next", "last"}
    assert "status=preliminary" in links["next"] and "_offset=5" in links["next"]
    last = httpx.get(links["last"], headers={"Authorization": f"Bearer {READ_TOKEN}"}).json()
    last_links = {link["relation"] for link in last["link"]}
    assert "previous" in last_links and "next" not in last_links
    assert len(last["entry"]) == first["total"] - (first["total"] - 1) // 5 * 5


def test_include_results_and_imaging_study(deployment: Deployment, smart: client.FHIRClient, tmp_path: Path) -> None:
    spec = SPECS[0]
    bundle = get(deployment, "DiagnosticReport", identifier=f"urn:retinalgpt:result|{spec.uid}/report",
                 _include=["DiagnosticReport:result", "DiagnosticReport:imaging-study"]).json()
    matches = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "match"]
    included = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "include"]
    assert len(matches) == 1 and bundle["total"] == 1
    wanted = {r["reference"] for r in matches[0]["result"]} | {matches[0]["imagingStudy"][0]["reference"]}
    assert {f"{r['resourceType']}/{r['id']}" for r in included} == wanted
    study = next(r for r in included if r["resourceType"] == "ImagingStudy")
    assert study["identifier"][0]["value"] == f"urn:oid:{spec.uid}"
    via_client = DiagnosticReport.where(struct={"_id": matches[0]["id"]}).include("result").perform(smart.server)
    assert len(via_client.entry) == 1 + len(matches[0]["result"])
    assert r4_errors([bundle], tmp_path) == []


def test_every_served_resource_and_searchset_is_valid_r4(deployment: Deployment, tmp_path: Path) -> None:
    resources: list[dict[str, Any]] = [get(deployment, "metadata").json()]
    for rtype in ("DiagnosticReport", "Observation", "ImagingStudy", "Device", "Provenance", "Patient"):
        response = get(deployment, rtype, _count=200)
        assert response.headers["content-type"].startswith("application/fhir+json")
        bundle = response.json()
        assert bundle["type"] == "searchset" and bundle["total"] >= 1
        resources.append(bundle)
        for entry in bundle["entry"]:
            read = get(deployment, f"{rtype}/{entry['resource']['id']}")
            assert read.status_code == 200 and read.headers["etag"] == f'W/"{entry["resource"]["meta"]["versionId"]}"'
            resources.append(read.json())
    resources.append(get(deployment, "DiagnosticReport/does-not-exist").json())
    resources.append(get(deployment, "Observation", nonsense="1").json())
    assert r4_errors(resources, tmp_path) == []


def test_capability_statement_tells_the_truth(deployment: Deployment) -> None:
    statement = httpx.get(f"{deployment.fhir}/metadata").json()
    assert statement["fhirVersion"] == "4.0.1"
    served = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert set(served) == {"DiagnosticReport", "Observation", "ImagingStudy", "Device", "Provenance", "Patient"}
    for rtype, resource in served.items():
        assert {i["code"] for i in resource["interaction"]} == {"read", "vread", "search-type"}
        for param in resource["searchParam"]:  # every declared parameter is accepted
            value = "ge2000-01-01" if param["type"] == "date" else "x"
            assert get(deployment, rtype, **{param["name"]: value}).status_code == 200, (rtype, param)
        for include in resource.get("searchInclude", []):
            assert get(deployment, rtype, _include=include).status_code == 200
    assert get(deployment, "DiagnosticReport", conclusion="x").status_code == 400  # undeclared: refused


@pytest.mark.parametrize(("params", "expected"), [
    ({"date": "2026-01"}, {"P-001"}),
    ({"date": "ge2026-02-10"}, {"P-002", "P-003", "P-004"}),
    ({"date": ["ge2026-02-01", "lt2026-03-10"]}, {"P-002", "P-003"}),
    ({"date": "le2026-02-10T10:00:00Z"}, {"P-001", "P-002"}),
    ({"code": "urn:retinalgpt:codes|FUNDUS-REPORT", "date": "2026-03-01"}, {"P-003"}),
    ({"code": "http://loinc.org|71491-5"}, set()),
    ({"status": "preliminary,final", "date": "lt2026-02"}, {"P-001"}),
    ({"status": "final,amended", "date": "lt2026-02"}, set()),  # nothing signed
    ({"status:not": "preliminary", "date": "lt2026-04"}, set()),
])
def test_diagnostic_report_search_parameters(deployment: Deployment, params: dict[str, Any], expected: set[str]) -> None:
    bundle = get(deployment, "DiagnosticReport", **params).json()
    by_uid = {s.uid: s.patient_id for s in SPECS}
    found = {by_uid[e["resource"]["identifier"][0]["value"].split("/")[0]] for e in bundle.get("entry", [])}
    assert found - {"P-006"} == expected  # P-006 is re-run by another test


def test_observation_search_by_code_patient_and_last_updated(deployment: Deployment) -> None:
    severity = get(deployment, "Observation", code="http://loinc.org|71491-5").json()
    assert severity["total"] == sum(1 for s in ANALYSED if "R" in s.eyes and s.referral.value != "ungradable")
    assert all(e["resource"]["code"]["coding"][0]["code"] == "71491-5" for e in severity["entry"])
    right_eye = get(deployment, "Observation", **{"component-code": "http://snomed.info/sct|23986001"}).json()
    assert right_eye["total"] >= 1
    everything = get(deployment, "Observation", _count=0).json()["total"]
    assert get(deployment, "Observation", _lastUpdated="ge2000-01-01").json()["total"] == everything
    assert get(deployment, "Observation", _lastUpdated="lt2000-01-01").json()["total"] == 0
    study = get(deployment, "ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{SPECS[1].uid}").json()
    study_id = study["entry"][0]["resource"]["id"]
    derived = get(deployment, "Observation", **{"derived-from": f"ImagingStudy/{study_id}"}).json()
    assert derived["total"] == 4  # right eye: DR severity, CDR, findings; study: DR screening
    device = get(deployment, "Device", identifier="urn:dicom:uid|urn:oid:2.25.113059749145936325402354257176981405696")
    assert device.json()["total"] == 1
    provenance = get(deployment, "Provenance", agent=f"Device/{device.json()['entry'][0]['resource']['id']}").json()
    assert provenance["total"] == len(ANALYSED)


@pytest.mark.parametrize(("path", "params", "status", "code"), [
    ("DiagnosticReport/unknown-id", {}, 404, "not-found"),
    ("Condition", {}, 404, "not-found"),
    ("Observation", {"date": "yesterday"}, 400, "invalid"),
    ("Observation", {"_count": "-1"}, 400, "invalid"),
    ("Observation", {"_include": "Observation:nothing"}, 400, "invalid"),
    ("Observation", {"patient:exact": "x"}, 400, "invalid"),
    ("DiagnosticReport/x/_history/abc", {}, 404, "not-found"),
])
def test_errors_are_operation_outcomes(deployment: Deployment, path: str, params: dict[str, str], status: int,
                                       code: str) -> None:
    response = get(deployment, path, **params)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/fhir+json")
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == code
    unauthenticated = httpx.get(f"{deployment.fhir}/{path}", params=params)
    assert unauthenticated.status_code == (404 if path == "Condition" else 401)  # no such route: nothing to guard
    assert unauthenticated.json()["issue"][0]["code"] == ("not-found" if path == "Condition" else "login")
    posted = httpx.post(f"{deployment.fhir}/Observation", json={}, headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert posted.status_code == 405 and posted.json()["resourceType"] == "OperationOutcome"


def test_index_bundle_is_idempotent_and_versions_new_revisions(deployment: Deployment) -> None:
    spec = SPECS[3]
    with deployment.db.session() as session:
        before = session.query(FhirResource).count()
    first = reindex_revision(deployment.db, spec, deployment.storage, revision=1)
    with deployment.db.session() as session:
        assert session.query(FhirResource).count() == before  # same revision again: nothing new
    assert first.revision == 1
    reindex_revision(deployment.db, spec, deployment.storage, revision=2)
    report = get(deployment, "DiagnosticReport", identifier=f"urn:retinalgpt:result|{spec.uid}/report").json()
    current = report["entry"][0]["resource"]
    assert current["status"] == "preliminary" and current["meta"]["versionId"] == "2"  # unsigned
    old = get(deployment, f"DiagnosticReport/{current['id']}/_history/1").json()
    assert old["status"] == "preliminary" and old["issued"] < current["issued"]
    study_id = get(deployment, "ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{spec.uid}").json()["entry"][0]
    provenances = get(deployment, "Provenance", entity=f"ImagingStudy/{study_id['resource']['id']}").json()
    assert provenances["total"] == 2
    with deployment.db.session() as session:
        study = session.query(Study).filter_by(study_instance_uid=spec.uid).one()
        with pytest.raises(ValueError, match="transaction Bundle"):
            index_bundle(session, study.id, 3, {"resourceType": "Bundle", "type": "collection"})


def test_types_not_served_are_stored_with_resolved_references(deployment: Deployment) -> None:
    patient_url, document_url = "urn:uuid:8e1f7d1c-7a52-4d5e-9a61-0c1f4e1a2b3c", "urn:uuid:1b2c3d4e-5f60-4718-8a9b-0c1d2e3f4a5b"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": document_url, "resource": {"resourceType": "DocumentReference", "status": "current",
                                               "subject": {"reference": patient_url}},
         "request": {"method": "POST", "url": "DocumentReference"}},
        {"fullUrl": patient_url, "resource": {"resourceType": "Patient",
                                              "identifier": [{"system": "urn:test", "value": "doc-owner"}]},
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:test|doc-owner"}},
    ]}
    with deployment.db.session() as session:
        study = session.query(Study).filter_by(study_instance_uid=SPECS[2].uid).one()
        index_bundle(session, study.id, 1, bundle)
        stored = session.query(FhirResource).filter_by(resource_type="DocumentReference").one()
        assert stored.resource["subject"]["reference"] == f"Patient/{patient_url.removeprefix('urn:uuid:')}"
    assert get(deployment, "Patient", identifier="urn:test|doc-owner").json()["total"] == 1
    assert get(deployment, f"DocumentReference/{stored.resource_id}").status_code == 404  # stored, not served


def test_summary_count_and_elements(deployment: Deployment) -> None:
    everything = get(deployment, "DiagnosticReport").json()
    counted = get(deployment, "DiagnosticReport", _summary="count").json()
    assert counted["total"] == everything["total"] and "entry" not in counted
    slim = get(deployment, "DiagnosticReport", _elements="status,conclusion").json()
    resource = slim["entry"][0]["resource"]
    assert set(resource) == {"resourceType", "id", "meta", "status", "conclusion"}
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED",
            "display": "subsetted"} in resource["meta"]["tag"]
    full = get(deployment, f"DiagnosticReport/{resource['id']}").json()
    assert "tag" not in full["meta"] and "code" in full  # the stored resource is untouched
    assert get(deployment, "DiagnosticReport", _summary="text").status_code == 400


@pytest.mark.parametrize("path", [
    "/fhir/r4/Observation/x/_history/\u00b2",  # a Unicode digit: str.isdigit() is True, int() fails
    "/fhir/r4/Observation?_count=\u00b2",
    "/fhir/r4/DiagnosticReport?_offset=\u0663",
])
def test_non_ascii_digits_are_client_errors(deployment: Deployment, path: str) -> None:
    """Found by schemathesis: numbers are ASCII decimal digits only; anything else is a 4xx OperationOutcome."""
    response = httpx.get(deployment.base_url + path, headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("params", [
    {"_offset": "99999999999999999999"},  # was a 500: SQLite integer overflow
    {"_offset": "1000001"},
    {"_count": "99999999999999999999"},
    {"_offset": "18446744073709551616", "_count": "5"},
])
def test_paging_parameters_are_bounded(deployment: Deployment, params: dict[str, str]) -> None:
    """Every paging parameter is bounded (issue 19): out of range is a 400 OperationOutcome, never a 500."""
    for rtype in ("DiagnosticReport", "Observation", "ImagingStudy", "Patient"):
        response = get(deployment, rtype, **params)
        assert response.status_code == 400, (rtype, params, response.text)
        outcome = response.json()
        assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "invalid"
        assert "_offset" in outcome["issue"][0]["diagnostics"] or "_count" in outcome["issue"][0]["diagnostics"]
    assert get(deployment, "Observation", _offset="1000000").status_code == 200  # the bound itself is served


def test_a_fhir_id_with_a_trailing_newline_is_not_valid() -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Device", "id": "abc\n"},
         "request": {"method": "PUT", "url": "Device/abc\n"}}]}
    from worker.fhir_store import BundleError

    with pytest.raises(BundleError, match="not a valid FHIR id"):
        index_bundle(None, 1, 1, bundle)  # type: ignore[arg-type]
