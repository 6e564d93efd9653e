"""The FHIR R4 transaction Bundle of one analysis revision (FHIR R4 §3.1.0.11 transaction processing).

Every entry has a stable ``urn:uuid`` fullUrl and a conditional request, so posting the same result twice
creates nothing new:

* Patient, Device: conditional create (``POST`` + ``ifNoneExist=identifier=…``);
* ImagingStudy, Observations, DiagnosticReport: conditional update (``PUT Type?identifier=…``); a new
  revision updates them in place and marks them ``amended``;
* Provenance (no identifier in R4): ``PUT Provenance/<id>`` with an id derived from study, revision and model,
  so each revision keeps its own provenance record and a re-post replaces it.

References between entries use the fullUrls; the server rewrites them to the resolved resources.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from urllib.parse import quote

from pydicom.dataset import Dataset

from model.schema import StudyAnalysis
from reporting.fhir import resources as res
from reporting.sources import algorithms, paired, result_key
from reporting.verification import Verification

Resource = res.Resource


def _full_url(*parts: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, '|'.join(parts))}"


def _search(identifier: Resource) -> str:
    return "identifier=" + quote(f"{identifier['system']}|{identifier['value']}", safe=":/.|-_")


def _create(resource: Resource, full_url: str) -> Resource:
    rtype = resource["resourceType"]
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": "POST", "url": rtype, "ifNoneExist": _search(resource["identifier"][0])},
    }


def _update(resource: Resource, full_url: str) -> Resource:
    rtype = resource["resourceType"]
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": "PUT", "url": f"{rtype}?{_search(resource['identifier'][0])}"},
    }


def provenance_id(analysis: StudyAnalysis) -> str:
    """A FHIR id (``[A-Za-z0-9-.]{1,64}``) that is the same for the same study, revision and model."""
    return "rgpt-" + hashlib.sha256(result_key(analysis).encode()).hexdigest()[:40]


def build_bundle(
    analysis: StudyAnalysis,
    sources: Sequence[Dataset],
    pdf: bytes | None = None,
    patient_system: str = "urn:retinalgpt:patient-id",
    verification: Verification | None = None,
) -> Resource:
    """The transaction Bundle: Patient, ImagingStudy, Devices, Observations, DiagnosticReport, Provenance."""
    study = analysis.study_instance_uid
    patient = res.patient(analysis, sources[0], patient_system)
    patient_url = _full_url("Patient", patient_system, patient["identifier"][0]["value"])
    study_url = _full_url("ImagingStudy", study)
    entries = [
        _create(patient, patient_url),
        _update(res.imaging_study(analysis, sources, patient_url), study_url),
    ]
    device_refs: dict[str, str] = {}
    for identity in algorithms(analysis):
        device_refs[identity.device_uid] = _full_url("Device", identity.device_uid)
        entries.append(_create(res.device(identity), device_refs[identity.device_uid]))
    effective = res.acquired(sources[0])
    factory = res.ObservationFactory(analysis, patient_url, study_url, device_refs, effective, verification)
    observations = [obs for img, ds in paired(analysis, sources) for obs in factory.for_image(img, ds)]
    screening = factory.screening()
    if screening is not None:
        observations.append(screening)
    result_urls = []
    for obs in observations:
        result_urls.append(_full_url("Observation", obs["identifier"][0]["value"]))
        entries.append(_update(obs, result_urls[-1]))
    report_url = _full_url("DiagnosticReport", study)
    report = res.diagnostic_report(analysis, patient_url, study_url, result_urls, pdf, effective, verification)
    entries.append(_update(report, report_url))
    prov = res.provenance(analysis, [report_url, *result_urls], list(device_refs.values()), study_url,
                          verification)
    prov["id"] = provenance_id(analysis)
    entries.append(
        {
            "fullUrl": _full_url("Provenance", prov["id"]),
            "resource": prov,
            "request": {"method": "PUT", "url": f"Provenance/{prov['id']}"},
        }
    )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
