"""HL7 v2.5.1 ORU^R01 result message of one study revision, and reading the ACK that answers it.

Pure builders (no network I/O: the MLLP sender lives in :mod:`worker.pipeline.hl7_delivery`). The message is
built and parsed with hl7apy, whose datatypes also escape text (HL7 v2.5.1 Ch. 2 §2.7.4: ``\\F\\ \\S\\ \\T\\
\\R\\ \\E\\``). Segment structure (HL7 v2.5.1 Ch. 7 §7.3.1, ORU^R01)::

    MSH  PID  PV1  ORC  OBR  {NTE}  {OBX [{NTE}]}

* PID / PV1 come from the Patient and General Study modules of the study (a source instance or the SR, which
  copies them): PID-3 Patient ID (with Issuer of Patient ID or the configured assigning authority), PID-5 name,
  PID-7 birth date, PID-8 sex; PV1-2 patient class (configured), PV1-8 referring physician, PV1-19 Admission ID.
* ORC / OBR carry the Accession Number as placer (ORC-2 / OBR-2) and filler (ORC-3 / OBR-3) order number, so
  the EHR files the result onto the order that asked for the imaging; without an accession number the filler
  order number is the Study Instance UID and there is no placer order number.
* OBX rows use the very codes the DICOM SR uses (:mod:`reporting.codes`): the condition as OBX-3 and its grade
  code as OBX-5, the probability as NM, quality, laterality, key measurements with UCUM units, reference range
  and abnormal flag; the impression and each eye's summary as TX; the referral as CWE; optionally the PDF as an
  ED value. The mapping is documented in docs/results.md.
* Result status (OBR-25, OBX-11; HL7 table 0085): an unsigned AI result is sent with the configured status
  (``P`` preliminary by default; a later unsigned revision is ``C`` only where ``F`` was configured); a result a
  clinician signed off (:class:`reporting.verification.Verification`) is ``F``, or ``C`` when it corrects a
  result that was already signed.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from dataclasses import dataclass
from typing import Literal

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message, Segment
from hl7apy.factories import datatype_factory
from hl7apy.parser import parse_message
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.valuerep import PersonName

from model.schema import ImageAnalysis, Measurement, ModelIdentity, Source, StudyAnalysis, VesselType, Zone
from reporting import codes, summary
from reporting.sources import algorithms
from reporting.verification import Verification

VERSION = "2.5.1"
MESSAGE_TYPE = "ORU^R01^ORU_R01"
CHARACTER_SET = "UNICODE UTF-8"
"""MSH-18 (HL7 table 0211): the message is sent as UTF-8."""

KEY_FEATURES = ("Fractal_dimension", "Vessel_density", "CDR_vertical", "CDR_horizontal")
"""Whole-image, all-vessel features sent as key measurements (besides the zone features below)."""
ZONE_FEATURES = ("CRAE_Knudtson", "CRVE_Knudtson", "AVR_Knudtson")
"""Calibre summaries, defined per zone (B / C), sent for every zone measured."""
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")

ResultStatus = Literal["P", "F", "C"]
SEX = {"F": "F", "M": "M", "O": "O"}
"""DICOM Patient's Sex (0010,0040) → HL7 table 0001 (anything else: U, unknown)."""


class Hl7BuildError(ValueError):
    """The study's data cannot make a valid ORU (e.g. no Patient ID): a message would misfile the result."""


@dataclass(frozen=True)
class OruOptions:
    """Per-destination parameters of the message (built by :mod:`worker` from the destination).

    ``control_id`` is MSH-10 (at most 20 characters): the same for every attempt at the same message, so a
    receiver can recognise a repeat. ``result_status`` is the status of unsigned results (:func:`result_status`).
    """

    control_id: str
    sending_application: str = "RETINALGPT"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: Literal["P", "T", "D"] = "P"
    result_status: Literal["P", "F"] = "P"
    patient_class: str = "U"
    assigning_authority: str = ""
    include_pdf: bool = False


@dataclass(frozen=True)
class Ack:
    """An HL7 acknowledgement: MSA-1 code (AA, AE, AR; CA, CE, CR in enhanced mode), MSA-2 the control ID of
    the acknowledged message, and the error text (MSA-3 and ERR)."""

    code: str
    control_id: str
    text: str

    @property
    def accepted(self) -> bool:
        return self.code in {"AA", "CA"}

    @property
    def rejected(self) -> bool:
        """AR / CR: the receiver refuses the message itself (type, version, processing ID): resending it as it
        is cannot succeed. AE / CE is an application error the receiver may get past on a later attempt."""
        return self.code in {"AR", "CR"}


def result_status(analysis: StudyAnalysis, options: OruOptions,
                  verification: Verification | None = None) -> ResultStatus:
    """OBR-25 / OBX-11: signed ``F`` (``C`` when correcting a signed result); unsigned the configured status,
    ``C`` for a later revision only when unsigned results are configured ``F`` (a P result is replaced by P)."""
    if verification is not None:
        return "C" if verification.corrects_signed else "F"
    if options.result_status == "F" and analysis.revision > 1:
        return "C"
    return options.result_status


def text(value: object) -> str:
    """``value`` as an escaped ER7 text value (hl7apy's ST datatype escapes the delimiters)."""
    return datatype_factory("ST", str(value), version=VERSION, validation_level=VALIDATION_LEVEL.TOLERANT).to_er7()


_ESCAPES = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}


def unescape(value: str) -> str:
    """The text of an escaped ER7 value (the delimiter escapes of HL7 v2.5.1 §2.7.4)."""
    return re.sub(r"\\([FSTRE])\\", lambda m: _ESCAPES[m.group(1)], value)


def coded(code: Code, alternate: tuple[str, str, str] | None = None) -> str:
    """A CWE / CE value: identifier ^ text ^ coding system (the DICOM coding scheme designator: SCT, LN, DCM,
    UCUM, 99RGPT, as in the SR) [^ alternate identifier ^ text ^ system]."""
    parts = [code.value, code.meaning, code.scheme_designator]
    if alternate is not None:
        parts += list(alternate)
    return "^".join(text(p) for p in parts)


def hl7_time(moment: dt.datetime) -> str:
    """DTM with seconds and UTC offset (HL7 v2.5.1 §2.A.22)."""
    moment = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    return moment.strftime("%Y%m%d%H%M%S%z")


def study_time(ds: Dataset) -> str:
    """The study's date and time as DTM: DICOM dates and times are local; the offset is given only when the
    source has Timezone Offset From UTC (0008,0201)."""
    date = str(ds.get("StudyDate", "") or "")
    if len(date) != 8 or not date.isdigit():
        return ""
    clock = str(ds.get("StudyTime", "") or "").split(".")[0]
    if not clock.isdigit():
        return date
    offset = str(ds.get("TimezoneOffsetFromUTC", "") or "")
    return date + clock[:6] + (offset if len(offset) == 5 else "")


def person(name: object) -> list[str]:
    """DICOM PN (family^given^middle^prefix^suffix) → XPN / XCN order (family^given^middle^suffix^prefix)."""
    pn = PersonName(str(name or ""))
    return [pn.family_name, pn.given_name, pn.middle_name, pn.name_suffix, pn.name_prefix]


def _join(parts: list[str]) -> str:
    return "^".join(text(p) for p in parts).rstrip("^")


def check_context(analysis: StudyAnalysis, context: Dataset) -> str:
    """The Patient ID of the message; refuse a context of another study or patient, or one without an ID."""
    if str(context.get("StudyInstanceUID", "")) != analysis.study_instance_uid:
        raise Hl7BuildError(f"the patient data given belong to study {context.get('StudyInstanceUID')}, not "
                            f"{analysis.study_instance_uid}")
    patient_id = str(context.get("PatientID", "") or "").strip()
    if analysis.patient_id and patient_id and analysis.patient_id != patient_id:
        raise Hl7BuildError("the Patient ID of the analysis and of the study's data differ: not sent")
    patient_id = patient_id or (analysis.patient_id or "")
    if not patient_id:
        raise Hl7BuildError(f"study {analysis.study_instance_uid} has no Patient ID: an ORU without PID-3 could "
                            "be filed to the wrong patient")
    return patient_id


class _Builder:
    def __init__(self, analysis: StudyAnalysis, context: Dataset, options: OruOptions,
                 verification: Verification | None = None) -> None:
        self.analysis, self.context, self.options = analysis, context, options
        self.status = result_status(analysis, options, verification)
        self.verification = verification
        self.observed = study_time(context)
        self.analysed = hl7_time(analysis.created)
        self.order: Group | None = None
        self.count = 0
        contributors = algorithms(analysis)
        self.model = analysis.model or contributors[0]
        self.pipeline = analysis.pipeline or contributors[0]

    def message(self, pdf: bytes | None) -> Message:
        msg = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
        o = self.options
        msh = msg.msh
        msh.msh_3 = text(o.sending_application)
        msh.msh_4 = text(o.sending_facility)
        msh.msh_5 = text(o.receiving_application)
        msh.msh_6 = text(o.receiving_facility)
        msh.msh_7 = self.analysed
        msh.msh_9 = MESSAGE_TYPE
        msh.msh_10 = text(o.control_id)
        msh.msh_11 = o.processing_id
        msh.msh_12 = VERSION
        msh.msh_18 = CHARACTER_SET
        result = msg.add_group("ORU_R01_PATIENT_RESULT")
        self._patient(result.add_group("ORU_R01_PATIENT"))
        self.order = result.add_group("ORU_R01_ORDER_OBSERVATION")
        self._order()
        self._study_level()
        for number, img in enumerate(self.analysis.images, 1):
            self._image(number, img)
        if pdf is not None and o.include_pdf:
            encoded = base64.b64encode(pdf).decode("ascii")
            self._obx("ED", coded(codes.REPORT_CODE), f"^AP^PDF^Base64^{encoded}")
        return msg

    def _patient(self, group: Group) -> None:
        ds, o = self.context, self.options
        pid = group.pid
        pid.pid_1 = "1"
        authority = str(ds.get("IssuerOfPatientID", "") or "") or o.assigning_authority
        pid.pid_3 = f"{text(check_context(self.analysis, ds))}^^^{text(authority)}^MR"
        name = person(ds.get("PatientName") or self.analysis.patient_name)
        if any(name):
            pid.pid_5 = _join(name)
        birth = str(ds.get("PatientBirthDate", "") or "")
        if len(birth) == 8 and birth.isdigit():
            pid.pid_7 = birth
        pid.pid_8 = SEX.get(str(ds.get("PatientSex", "") or ""), "U")
        pv1 = group.add_group("ORU_R01_VISIT").pv1
        pv1.pv1_1 = "1"
        pv1.pv1_2 = text(o.patient_class)
        referring = person(ds.get("ReferringPhysicianName"))
        if any(referring):
            pv1.pv1_8 = "^" + _join(referring)
        admission = str(ds.get("AdmissionID", "") or "")
        if admission:
            pv1.pv1_19 = text(admission)

    def _order(self) -> None:
        assert self.order is not None
        accession = str(self.context.get("AccessionNumber", "") or self.analysis.accession_number or "").strip()
        placer = text(accession) if accession else ""
        filler = text(accession or self.analysis.study_instance_uid)
        orc = self.order.orc
        orc.orc_1 = "RE"
        if placer:
            orc.orc_2 = placer
        orc.orc_3 = filler
        orc.orc_5 = "CM"
        orc.orc_9 = self.analysed
        obr = self.order.obr
        obr.obr_1 = "1"
        if placer:
            obr.obr_2 = placer
        obr.obr_3 = filler
        obr.obr_4 = coded(codes.PROCEDURE_FUNDUS_PHOTOGRAPHY)
        if self.observed:
            obr.obr_7 = self.observed
        referring = person(self.context.get("ReferringPhysicianName"))
        if any(referring):
            obr.obr_16 = "^" + _join(referring)
        obr.obr_22 = self.analysed
        obr.obr_25 = self.status
        for n, note in enumerate(summary.notes(self.analysis), 1):
            nte = self.order.add_segment("NTE")
            nte.nte_1 = str(n)
            nte.nte_2 = "L"
            nte.nte_3 = text(note)

    def _obx(self, value_type: str, identifier: str, value: str, sub_id: str = "", *, units: str = "",
             reference: str = "", flag: str = "", method: str = "", equipment: ModelIdentity | None = None,
             observer: str = "", notes: list[str] | None = None) -> Segment:
        assert self.order is not None
        group = self.order.add_group("ORU_R01_OBSERVATION")
        self.count += 1
        obx = group.obx
        obx.obx_1 = str(self.count)
        obx.obx_2 = value_type
        obx.obx_3 = identifier
        if sub_id:
            obx.obx_4 = sub_id
        obx.obx_5 = value
        if units:
            obx.obx_6 = units
        if reference:
            obx.obx_7 = reference
        if flag:
            obx.obx_8 = flag
        obx.obx_11 = self.status
        if self.observed:
            obx.obx_14 = self.observed
        if observer:
            obx.obx_16 = observer
        if method:
            obx.obx_17 = method
        if equipment is not None:
            obx.obx_18 = "^".join(text(p) for p in (f"{equipment.name} {equipment.version}", "",
                                                     equipment.device_uid, "ISO"))
        obx.obx_19 = self.analysed
        for n, note in enumerate(notes or [], 1):
            nte = group.add_segment("NTE")
            nte.nte_1 = str(n)
            nte.nte_2 = "L"
            nte.nte_3 = text(note)
        return obx

    def _clinician(self) -> str:
        """OBX-16 Responsible Observer (XCN: ID ^ family ^ given) of a grade the signing clinician set; the OBX names
        no equipment (OBX-18) and no derivation (OBX-17), which describe the algorithm's values."""
        if self.verification is None:
            return ""
        family, _, given = self.verification.observer_name.partition("^")
        return "^".join(text(part) for part in (self.verification.observer_id, family, given.split("^")[0]))

    def _study_level(self) -> None:
        a = self.analysis
        self._obx("ST", coded(STUDY_INSTANCE_UID), text(a.study_instance_uid))
        if a.impression:
            self._obx("TX", coded(codes.IMPRESSION), text(a.impression.strip()), equipment=self.model)
        referral = coded(codes.REFERRAL_VALUES[a.referral])
        if a.referral_source == Source.CLINICIAN:
            self._obx("CWE", coded(codes.REFERRAL), referral, observer=self._clinician())
        else:
            self._obx("CWE", coded(codes.REFERRAL), referral, equipment=self.model)

    def _image(self, number: int, img: ImageAnalysis) -> None:
        sub = str(number)
        self._obx("TX", coded(codes.EYE_FINDINGS), text(summary.image_text(self.analysis, img)), sub,
                  notes=[summary.disagreement_text(d) for d in img.disagreements])
        if img.laterality.value in {"R", "L"}:
            self._obx("CWE", coded(codes.LATERALITY), coded(codes.RIGHT if img.laterality.value == "R"
                                                                 else codes.LEFT), sub)
        if img.quality is not None:
            self._obx("CWE", coded(codes.QUALITY_ASSESSMENT), coded(codes.QUALITY_VALUES[img.quality.grade]), sub,
                      equipment=self.pipeline)
            self._obx("NM", coded(codes.QUALITY_RATING), _number(img.quality.score), sub,
                      units=coded(codes.unit("1")), equipment=self.pipeline)
        item = 0
        for finding in img.findings:
            if finding.grade is None and finding.probability is None:
                continue
            item += 1
            finding_sub = f"{number}.{item}"
            grade = finding.grade if finding.grade is not None else int(finding.present)
            if finding.source == Source.CLINICIAN:
                self._obx("CWE", coded(codes.CONDITIONS[finding.condition]),
                          coded(codes.grade_code(finding.condition, grade)), finding_sub,
                          observer=self._clinician())
                continue
            derived = coded(codes.DERIVATION[finding.source])
            identity = self.model if finding.source == Source.MODEL else self.pipeline
            self._obx("CWE", coded(codes.CONDITIONS[finding.condition]),
                      coded(codes.grade_code(finding.condition, grade)), finding_sub, method=derived,
                      equipment=identity)
            if finding.probability is not None:
                self._obx("NM", coded(codes.probability_code(finding.condition)), _number(finding.probability),
                          finding_sub, units=coded(codes.unit("1")), method=derived, equipment=identity)
        for condition in summary.not_assessed(img):
            item += 1
            self._obx("CWE", coded(codes.CONDITIONS[condition]), coded(codes.NOT_ASSESSED), f"{number}.{item}",
                      equipment=self.model)
        for m in key_measurements(img):
            row = summary.measurement_row(m)
            feature = codes.feature(m.key)
            reference = f"{feature.low:g}-{feature.high:g}" if row.reference else ""
            flag = {"low": "L", "high": "H", "normal": "N"}.get(row.flag, "")
            self._obx("NM", coded(feature.code, (m.key, row.name, "L")), _number(m.value), sub,
                      units=coded(codes.unit(m.unit)), reference=reference, flag=flag,
                      method=coded(codes.DERIVATION[m.source]), equipment=self.pipeline)


def _number(value: float) -> str:
    return f"{value:.6g}"


def key_measurements(img: ImageAnalysis) -> list[Measurement]:
    """The measured values an ORU carries: fractal dimension, vessel density and cup-to-disc ratios of the whole
    image and all vessels, and the Knudtson calibre summaries (CRAE, CRVE, AVR) of every zone. The SR and the
    FHIR Observation carry every measurement; an EHR result list wants the few that are read."""
    chosen = []
    for m in summary.reported_measurements(img):
        base = codes.base_feature_key(m.key)
        whole = m.zone == Zone.WHOLE and m.vessel == VesselType.ALL
        if (base in KEY_FEATURES and whole) or base in ZONE_FEATURES:
            chosen.append(m)
    return chosen


def build_oru(analysis: StudyAnalysis, context: Dataset, options: OruOptions, pdf: bytes | None = None,
              verification: Verification | None = None) -> str:
    """The ORU^R01 message of ``analysis`` in ER7 (segments separated by CR), ready for MLLP framing.

    ``context`` is a data set with the study's Patient and General Study modules (a source instance, or our SR,
    which copies them); ``pdf`` is the PDF report, sent as an ED OBX when ``options.include_pdf``;
    ``verification`` the clinician's sign-off of a signed revision (its status F or C). Raises
    :class:`Hl7BuildError` when the data cannot identify the patient safely.
    """
    if len(options.control_id) > 20 or not options.control_id:
        raise Hl7BuildError("MSH-10 message control ID must have 1 to 20 characters")
    message = _Builder(analysis, context, options, verification).message(pdf)
    return message.to_er7()


def parse(message: str) -> Message:
    """Parse an ER7 message (CR, LF or CRLF segment separators) with hl7apy, groups resolved."""
    er7 = message.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    return parse_message(er7, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=True)


def parse_ack(message: str) -> Ack:
    """The acknowledgement in an ACK message (MSA, and ERR-8 / ERR-1 text where present)."""
    msg = parse(message)
    msa = msg.msa
    code = msa.msa_1.to_er7()
    control = msa.msa_2.to_er7()
    texts = [unescape(msa.msa_3.to_er7())] + [seg.to_er7() for seg in msg.children if seg.name == "ERR"]
    return Ack(code=code, control_id=control, text="; ".join(t for t in texts if t))


def message_control_id(message: str) -> str:
    """MSH-10 of an ER7 message."""
    return parse(message).msh.msh_10.to_er7()


__all__ = ["Ack", "Hl7BuildError", "OruOptions", "build_oru", "key_measurements", "message_control_id", "parse",
           "parse_ack", "unescape"]
