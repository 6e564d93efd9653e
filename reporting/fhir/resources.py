"""FHIR R4 resources of a fundus analysis (DESIGN.md "Standards decisions", FHIR R4 §ImagingStudy, Device,
Observation, DiagnosticReport, Provenance).

fhir.resources ships R4B and R5 models but not R4; each resource is validated by its R4B model and only
elements that R4 also has are emitted (R4B changed none of the elements used here). Identifiers are stable
across re-runs so that conditional create / update keeps the server free of duplicates:

* ImagingStudy ``urn:dicom:uid`` / ``urn:oid:<Study Instance UID>``; Device ``urn:dicom:uid`` /
  ``urn:oid:<Device UID>`` (changes with every model version);
* Observations and the DiagnosticReport :data:`RESULT_SYSTEM` / ``<study>/<image>/<kind>`` (no revision:
  a new revision updates them in place and the report becomes ``amended``).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
from collections.abc import Sequence
from typing import Any

from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.provenance import Provenance
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from model.schema import (
    Condition,
    Finding,
    ImageAnalysis,
    Measurement,
    ModelIdentity,
    Referral,
    Source,
    StudyAnalysis,
)
from reporting import codes, summary
from reporting.sources import algorithms, laterality
from reporting.verification import Verification, fhir_status, status_label

DICOM_UID_SYSTEM = "urn:dicom:uid"
RESULT_SYSTEM = "urn:retinalgpt:result"
UCUM = "http://unitsofmeasure.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SOP_CLASS_SYSTEM = "urn:ietf:rfc:3986"

Resource = dict[str, Any]


def r4(model: type, data: Resource) -> Resource:
    """``data`` validated by the R4B ``model`` and dumped as plain JSON (normalised, no empty elements)."""
    return json.loads(model.model_validate(data).model_dump_json(exclude_none=True))


def oid(uid: str) -> str:
    return f"urn:oid:{uid}"


def codeable(*code_list: codes.Code, text: str | None = None) -> Resource:
    out: Resource = {"coding": [codes.fhir_coding(c) for c in code_list]}
    if text:
        out["text"] = text
    return out


def quantity(value: float, ucum: str) -> Resource:
    unit = codes.unit(ucum)
    return {"value": round(float(value), 6), "unit": unit.meaning, "system": UCUM, "code": unit.value}


def acquired(ds: Dataset) -> str | None:
    """FHIR dateTime of the study (StudyDate / StudyTime). DICOM times are local: with Timezone Offset From
    UTC (0008,0201) the full time is given, without it only the date, as FHIR needs a zone with a time."""
    date = str(ds.get("StudyDate", "") or "")
    if len(date) != 8 or not date.isdigit():
        return None
    day = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    clock = str(ds.get("StudyTime", "") or "").split(".")[0]
    offset = str(ds.get("TimezoneOffsetFromUTC", "") or "")
    if len(clock) < 4 or not clock.isdigit() or len(offset) != 5:
        return day
    clock = clock.ljust(6, "0")
    return f"{day}T{clock[:2]}:{clock[2:4]}:{clock[4:6]}{offset[:3]}:{offset[3:]}"


def _instant(moment: dt.datetime) -> str:
    moment = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def patient(analysis: StudyAnalysis, source: Dataset, system: str) -> Resource:
    """The Patient the study belongs to, identified by the DICOM Patient ID in ``system``."""
    data: Resource = {
        "resourceType": "Patient",
        "identifier": [{"system": system, "value": analysis.patient_id or str(source.PatientID)}],
    }
    name = PersonName(str(source.get("PatientName", "") or analysis.patient_name or ""))
    if name.family_name or name.given_name:
        data["name"] = [
            {
                k: v
                for k, v in {
                    "family": name.family_name or None,
                    "given": [name.given_name] if name.given_name else None,
                }.items()
                if v
            }
        ]
    sex = {"F": "female", "M": "male", "O": "other"}.get(str(source.get("PatientSex", "")))
    if sex:
        data["gender"] = sex
    birth = str(source.get("PatientBirthDate", ""))
    if len(birth) == 8:
        data["birthDate"] = f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"
    return r4(Patient, data)


def imaging_study(analysis: StudyAnalysis, sources: Sequence[Dataset], patient_ref: str) -> Resource:
    """ImagingStudy with every source series and instance (FHIR R4 ImagingStudy, DICOM mapping)."""
    series: dict[str, Resource] = {}
    for ds in sources:
        entry = series.setdefault(
            str(ds.SeriesInstanceUID),
            {
                "uid": str(ds.SeriesInstanceUID),
                "modality": {"system": DCM, "code": str(ds.get("Modality", "OP"))},
                "instance": [],
            },
        )
        if "SeriesNumber" in ds and ds.SeriesNumber is not None:
            entry["number"] = int(ds.SeriesNumber)
        side = str(ds.get("ImageLaterality", ""))
        if side in {"R", "L"}:
            entry["laterality"] = codes.fhir_coding(codes.RIGHT if side == "R" else codes.LEFT)
        instance: Resource = {
            "uid": str(ds.SOPInstanceUID),
            "sopClass": {"system": SOP_CLASS_SYSTEM, "code": oid(str(ds.SOPClassUID))},
        }
        if ds.get("InstanceNumber") is not None:
            instance["number"] = int(ds.InstanceNumber)
        entry["instance"].append(instance)
    for entry in series.values():
        entry["numberOfInstances"] = len(entry["instance"])
    first = sources[0]
    data: Resource = {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": oid(analysis.study_instance_uid)}],
        "status": "available",
        "subject": {"reference": patient_ref},
        "numberOfSeries": len(series),
        "numberOfInstances": sum(len(s["instance"]) for s in series.values()),
        "series": list(series.values()),
    }
    started = acquired(first)
    if started:
        data["started"] = started
    if first.get("StudyDescription"):
        data["description"] = str(first.StudyDescription)
    return r4(ImagingStudy, data)


def device(identity: ModelIdentity) -> Resource:
    """The algorithm as a Device; its identifier is the DICOM Device UID of that exact version."""
    data: Resource = {
        "resourceType": "Device",
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": oid(identity.device_uid)}],
        "status": "active",
        "manufacturer": identity.manufacturer,
        "deviceName": [{"name": identity.name, "type": "model-name"}],
        "type": codeable(codes.ALGORITHM_FAMILY),
        "version": [{"value": identity.version}],
    }
    if identity.checkpoint_sha256:
        data["note"] = [{"text": f"checkpoint sha256 {identity.checkpoint_sha256}"}]
    return r4(Device, data)


def result_identifier(analysis: StudyAnalysis, *parts: str) -> Resource:
    return {"system": RESULT_SYSTEM, "value": "/".join([analysis.study_instance_uid, *parts])}


def _finding_value(finding: Finding) -> Resource:
    grade = finding.grade if finding.grade is not None else int(finding.present)
    return codeable(codes.grade_code(finding.condition, grade), text=summary.finding_text(finding))


def _not_performed(conditions: Sequence[Condition]) -> Resource:
    """``dataAbsentReason`` of an observation of ``conditions`` the reading model was not trained to assess
    (FHIR R4 data-absent-reason ``not-performed``: the observation procedure was not performed)."""
    names = " or ".join(summary.condition_name(c).lower() for c in conditions)
    return {
        "coding": [dict(codes.DATA_ABSENT_NOT_PERFORMED)],
        "text": f"Not assessed: the model was not trained on {names}",
    }


def _measurement_component(m: Measurement) -> Resource:
    row = summary.measurement_row(m)
    component: Resource = {
        "code": codeable(codes.feature(m.key).code, text=f"{row.name} ({row.source})"),
        "valueQuantity": quantity(m.value, m.unit),
    }
    feature = codes.feature(m.key)
    if row.flag:
        component["referenceRange"] = [
            {"low": quantity(feature.low, m.unit), "high": quantity(feature.high, m.unit)}
        ]
        flag = {"low": ("L", "Low"), "high": ("H", "High"), "normal": ("N", "Normal")}[row.flag]
        component["interpretation"] = [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": flag[0],
                        "display": flag[1],
                    }
                ]
            }
        ]
    return component


class ObservationFactory:
    """Observations of one analysis; shared context (subject, study, devices, time) set once.
    ``effective`` is when the images were taken (default: when the analysis was made)."""

    def __init__(
        self,
        analysis: StudyAnalysis,
        patient_ref: str,
        study_ref: str,
        device_refs: dict[str, str],
        effective: str | None = None,
        verification: Verification | None = None,
    ) -> None:
        self.analysis = analysis
        self.verification = verification
        self.status = fhir_status(verification)
        self.patient_ref = patient_ref
        self.study_ref = study_ref
        self.device_refs = device_refs
        self.issued = _instant(analysis.created)
        self.effective = effective or self.issued
        contributors = algorithms(analysis)
        self.main_uid = contributors[0].device_uid
        self.pipeline_uid = (analysis.pipeline or contributors[0]).device_uid

    def _base(self, img: ImageAnalysis, ds: Dataset, kind: str, code: Resource, device_uid: str) -> Resource:
        data: Resource = {
            "resourceType": "Observation",
            "identifier": [result_identifier(self.analysis, str(ds.SOPInstanceUID), kind)],
            "status": self.status,
            "category": [{"coding": [codes.OBSERVATION_CATEGORY_IMAGING]}],
            "code": code,
            "subject": {"reference": self.patient_ref},
            "effectiveDateTime": self.effective,
            "issued": self.issued,
            "device": {"reference": self.device_refs[device_uid]},
            "derivedFrom": [{"reference": self.study_ref}],
        }
        side = laterality(img, ds)
        if side:
            data["bodySite"] = codeable(
                codes.BODY_SITE_RIGHT_EYE if side == "R" else codes.BODY_SITE_LEFT_EYE
            )
        return data

    def for_image(self, img: ImageAnalysis, ds: Dataset) -> list[Resource]:
        """Per eye: DR severity (LOINC 71491-5 / 71490-7; ``dataAbsentReason`` not-performed when the model
        was not trained to assess DR), the measured cup-to-disc ratio (71485-7), and all findings,
        probabilities, not-assessed conditions (``dataAbsentReason`` not-performed), quality and measured
        values as components of one findings Observation. Model-emitted numbers are not values here: a
        disagreement between one and the measurement is a note."""
        out: list[Resource] = []
        side = laterality(img, ds)
        missing = summary.not_assessed(img)
        dr = img.finding(Condition.DIABETIC_RETINOPATHY)
        if dr is None and Condition.DIABETIC_RETINOPATHY in missing and side:
            obs = self._base(img, ds, "dr-severity", codeable(codes.LOINC_DR_SEVERITY[side]), self.main_uid)
            obs["dataAbsentReason"] = _not_performed([Condition.DIABETIC_RETINOPATHY])
            out.append(r4(Observation, obs))
        elif dr is not None and dr.grade is not None and side:
            obs = self._base(img, ds, "dr-severity", codeable(codes.LOINC_DR_SEVERITY[side]), self.main_uid)
            if dr.source == Source.CLINICIAN:
                self._by_clinician(obs)
            obs["valueCodeableConcept"] = codeable(
                codes.LOINC_DR_ANSWERS[dr.grade], codes.ICDR_GRADES[dr.grade], text=summary.finding_text(dr)
            )
            if dr.probability is not None:
                obs["component"] = [
                    {
                        "code": codeable(codes.PROBABILITY, text="P(DR grade >= 1)"),
                        "valueQuantity": quantity(dr.probability, "1"),
                    }
                ]
            out.append(r4(Observation, obs))
        cdr = img.measurement("CDR_vertical", Source.MEASURED)
        if cdr is not None and math.isfinite(cdr.value):
            obs = self._base(
                img, ds, "cup-disc-ratio", codeable(codes.LOINC_CUP_DISC_RATIO), self.pipeline_uid
            )
            obs["valueQuantity"] = quantity(cdr.value, "1")
            obs["method"] = codeable(codes.DERIVATION[cdr.source])
            out.append(r4(Observation, obs))
        findings = self._base(
            img, ds, "findings", codeable(codes.EYE_FINDINGS, text=summary.image_title(img)), self.main_uid
        )
        components: list[Resource] = []
        if img.quality is not None:
            components.append(
                {
                    "code": codeable(codes.QUALITY_ASSESSMENT),
                    "valueCodeableConcept": codeable(codes.QUALITY_VALUES[img.quality.grade]),
                }
            )
            components.append(
                {"code": codeable(codes.QUALITY_RATING), "valueQuantity": quantity(img.quality.score, "1")}
            )
        for finding in (f for f in img.findings if f.source != Source.CLINICIAN):
            condition = codes.CONDITIONS[finding.condition]
            components.append({"code": codeable(condition), "valueCodeableConcept": _finding_value(finding)})
            if finding.probability is not None:
                components.append(
                    {
                        "code": codeable(
                            codes.PROBABILITY, text=f"Probability of {condition.meaning.lower()}"
                        ),
                        "valueQuantity": quantity(finding.probability, "1"),
                    }
                )
        components += [
            {
                "code": codeable(
                    codes.CONDITIONS[condition],
                    text=f"{summary.condition_name(condition)}: {summary.NOT_ASSESSED}",
                ),
                "dataAbsentReason": _not_performed([condition]),
            }
            for condition in missing
        ]
        components += [_measurement_component(m) for m in summary.reported_measurements(img)]
        if components:
            findings["component"] = components
        notes = [summary.disagreement_text(d) for d in img.disagreements]
        notes += [summary.clinician_lesion_text(lesion) for lesion in summary.clinician_lesions(img)]
        if missing:
            notes.append(summary.not_assessed_text(img) + ".")
        if self.analysis.model is None:
            notes.append(summary.NO_MODEL)
        if notes:
            findings["note"] = [{"text": n} for n in notes]
        out.append(r4(Observation, findings))
        graded = [f for f in img.findings if f.source == Source.CLINICIAN]
        if graded:
            clinician = self._base(img, ds, "clinician-findings",
                                   codeable(codes.EYE_FINDINGS, text=f"{summary.image_title(img)}: graded by the "
                                            "clinician at sign-off"), self.main_uid)
            self._by_clinician(clinician)
            clinician["component"] = [{"code": codeable(codes.CONDITIONS[f.condition]),
                                       "valueCodeableConcept": _finding_value(f)} for f in graded]
            out.append(r4(Observation, clinician))
        return out

    def _by_clinician(self, observation: Resource) -> None:
        """The signing clinician, not the algorithm, made ``observation``: performer instead of device."""
        observation.pop("device", None)
        if self.verification is not None:
            observation["performer"] = [clinician_reference(self.verification)]

    def screening(self) -> Resource | None:
        """Study-level autonomous AI DR screening result (LOINC 105914-6), when the model graded DR or DME
        or the study was ungradable. A negative answer needs both DR and DME assessed on every gradable
        image: when the model was not trained on one of them (and nothing referable was found) the result
        has ``dataAbsentReason`` not-performed instead of claiming "without macular edema"."""
        screened = {Condition.DIABETIC_RETINOPATHY, Condition.DIABETIC_MACULAR_EDEMA}
        grades = [f for img in self.analysis.images for f in img.findings if f.condition in screened]
        unscreened = sorted(
            {c for img in self.analysis.images for c in summary.not_assessed(img) if c in screened}
        )
        if self.analysis.model is None:
            return None
        answer: codes.Code | None = None
        if self.analysis.referral == Referral.UNGRADABLE:
            answer = codes.Code(
                "LA34400-4", "LN", "Insufficient image quality to support autonomous analysis"
            )
        elif any(
            f.grade is not None and f.grade >= (2 if f.condition == Condition.DIABETIC_RETINOPATHY else 1)
            for f in grades
        ):
            answer = codes.Code("LA35099-3", "LN", "ETDRS 35 or higher and/or macular edema")
        elif unscreened:
            answer = None
        elif grades:
            answer = codes.Code("LA34398-0", "LN", "ETDRS Level 20 or lower, without macular edema")
        else:
            return None
        data: Resource = {
            "resourceType": "Observation",
            "identifier": [result_identifier(self.analysis, "dr-screening")],
            "status": self.status,
            "category": [{"coding": [codes.OBSERVATION_CATEGORY_IMAGING]}],
            "code": codeable(codes.LOINC_AI_DR_SCREENING),
            "subject": {"reference": self.patient_ref},
            "effectiveDateTime": self.effective,
            "issued": self.issued,
            "device": {"reference": self.device_refs[self.analysis.model.device_uid]},
            "derivedFrom": [{"reference": self.study_ref}],
        }
        if answer is None:
            data["dataAbsentReason"] = _not_performed(unscreened)
        else:
            data["valueCodeableConcept"] = codeable(answer)
        if any(f.source == Source.CLINICIAN for f in grades) and self.verification is not None:
            data["performer"] = [clinician_reference(self.verification)]  # it answers from the clinician's grades
        return r4(Observation, data)


def diagnostic_report(
    analysis: StudyAnalysis,
    patient_ref: str,
    study_ref: str,
    result_refs: Sequence[str],
    pdf: bytes | None,
    effective: str | None = None,
    verification: Verification | None = None,
) -> Resource:
    """The DiagnosticReport: imagingStudy, result, conclusion and the PDF as presentedForm. In R4 a Device
    cannot be a performer; the algorithm is named by the Observations' device and by the Provenance.
    Unsigned it is ``preliminary``; signed it is ``final`` (``amended`` when the clinician changed something)
    with the clinician as ``resultsInterpreter`` (:mod:`reporting.verification`)."""
    data: Resource = {
        "resourceType": "DiagnosticReport",
        "identifier": [result_identifier(analysis, "report")],
        "status": fhir_status(verification),
        "category": [codeable(codes.OPHTHALMOLOGY)],
        "code": codeable(codes.REPORT_CODE, text="Fundus photograph AI analysis"),
        "subject": {"reference": patient_ref},
        "effectiveDateTime": effective or _instant(analysis.created),
        "issued": _instant(analysis.created),
        "imagingStudy": [{"reference": study_ref}],
        "result": [{"reference": ref} for ref in result_refs],
        "conclusion": summary.conclusion(analysis),
    }
    if verification is not None:
        data["resultsInterpreter"] = [clinician_reference(verification)]
    dr_grades = [
        f.grade
        for img in analysis.images
        for f in img.findings
        if f.condition == Condition.DIABETIC_RETINOPATHY and f.grade
    ]
    if dr_grades:
        data["conclusionCode"] = [codeable(codes.ICDR_GRADES[max(dr_grades)])]
    if pdf is not None:
        data["presentedForm"] = [
            {
                "contentType": "application/pdf",
                "language": "en",
                "data": base64.b64encode(pdf).decode("ascii"),
                "title": f"RetinalGPT fundus analysis report ({status_label(verification)})",
                "creation": _instant(analysis.created),
            }
        ]
    return r4(DiagnosticReport, data)


CLINICIAN_SYSTEM = "urn:retinalgpt:clinician"
"""Identifier system of the signing clinicians (their API token names, the identity the sign-off records)."""


def clinician_reference(verification: Verification) -> Resource:
    """A logical Reference (R4 Reference.identifier) to the verifying clinician, displayed by name."""
    return {"identifier": {"system": CLINICIAN_SYSTEM, "value": verification.observer_id},
            "display": verification.display_name}


def provenance(
    analysis: StudyAnalysis, target_refs: Sequence[str], device_refs: Sequence[str], study_ref: str,
    verification: Verification | None = None,
) -> Resource:
    """Provenance of the results: the algorithm Devices as agents, the ImagingStudy as source entity, and the
    verifying clinician as ``verifier`` agent when the revision is signed."""
    data: Resource = {
        "resourceType": "Provenance",
        "target": [{"reference": ref} for ref in target_refs],
        "recorded": _instant(analysis.created),
        "activity": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                    "code": "UPDATE" if analysis.revision > 1 else "CREATE",
                }
            ]
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "performer",
                            "display": "Performer",
                        }
                    ]
                },
                "who": {"reference": ref},
            }
            for ref in device_refs
        ],
        "entity": [{"role": "source", "what": {"reference": study_ref}}],
    }
    if verification is not None:
        data["agent"].append({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                 "code": "verifier", "display": "Verifier"}]},
            "who": clinician_reference(verification),
        })
    return r4(Provenance, data)
