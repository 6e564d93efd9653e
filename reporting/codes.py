"""Every code the result objects use, in one place.

Standard codes come from SNOMED CT (``SCT``), LOINC (``LN``), DICOM (``DCM``) and UCUM where a code with the
right meaning exists (PS3.16 code tables, the LOINC answer list LL2117-1, and DESIGN.md "Standards
decisions"). Concepts without a standard code (AutoMorph-style vascular features, zone B / C, grades of scales
other than ICDR, a few conditions) use the private, versioned coding scheme :data:`PRIVATE_SCHEME`, which
every DICOM object that uses it declares in its CodingSchemeIdentificationSequence (PS3.3 C.12.1.1.5) and
every FHIR resource names by :data:`PRIVATE_SYSTEM`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from model.schema import Condition, LandmarkType, LesionType, QualityGrade, Referral, Source, VesselType, Zone

PRIVATE_SCHEME = "99RGPT"
"""Coding Scheme Designator of the private scheme (PS3.16 §8.2: private designators start with ``99``)."""
PRIVATE_SCHEME_VERSION = "1.0"
PRIVATE_SCHEME_NAME = "RetinalGPT Worker result codes"
PRIVATE_SCHEME_ORGANIZATION = "RetinalGPT Worker"
PRIVATE_SYSTEM = "urn:retinalgpt:codes"
"""FHIR ``Coding.system`` of the private scheme; ``Coding.version`` carries :data:`PRIVATE_SCHEME_VERSION`."""

FHIR_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    PRIVATE_SCHEME: PRIVATE_SYSTEM,
}
"""FHIR code system URI of each DICOM coding scheme designator."""


def private(value: str, meaning: str) -> Code:
    """A code of the private scheme, carrying its version."""
    return Code(value, PRIVATE_SCHEME, meaning, scheme_version=PRIVATE_SCHEME_VERSION)


def coding_scheme_identification() -> Dataset:
    """The CodingSchemeIdentificationSequence item that declares the private scheme (PS3.3 C.12.1.1.5)."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeVersion = PRIVATE_SCHEME_VERSION
    item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_ORGANIZATION
    return item


def fhir_coding(code: Code) -> dict[str, str]:
    """A FHIR ``Coding`` (plain JSON) for a DICOM code."""
    coding = {"system": FHIR_SYSTEMS[code.scheme_designator], "code": code.value, "display": code.meaning}
    if code.scheme_designator == PRIVATE_SCHEME:
        coding["version"] = PRIVATE_SCHEME_VERSION
    return coding


# --- document level --------------------------------------------------------------------------------------
PROCEDURE_FUNDUS_PHOTOGRAPHY = private("FUNDUS-AI", "Automated analysis of colour fundus photographs")
REPORT_TITLE = Code("126000", "DCM", "Imaging Measurement Report")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
"""TID 1500 row 12: document-level container of coded and text evaluations."""
IMPRESSION = Code("121073", "DCM", "Impression")
COMMENT = Code("121106", "DCM", "Comment")
REFERRAL = private("REFERRAL", "Referral recommendation")
REFERRAL_VALUES = {
    Referral.NONE: private("REFER-NONE", "No referral"),
    Referral.ROUTINE: private("REFER-ROUTINE", "Routine referral"),
    Referral.URGENT: private("REFER-URGENT", "Urgent referral"),
    Referral.UNGRADABLE: private("REFER-UNGRADABLE", "Ungradable, repeat imaging"),
}
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")
"""CID 7005 purpose of reference of the ContributingEquipmentSequence item for the algorithm."""
ALGORITHM_FAMILY = Code("123110", "DCM", "Artificial Intelligence")

# --- groups ----------------------------------------------------------------------------------------------
IMAGE_FINDINGS = private("IMAGE-RESULT", "Fundus image analysis result")
FINDING_CATEGORY_ANATOMY = Code("91723000", "SCT", "Anatomical structure")
FINDING_CATEGORY_MORPHOLOGY = Code("49755003", "SCT", "Morphologically abnormal structure")
RETINA = Code("5665001", "SCT", "Retina")
EYE = Code("81745001", "SCT", "Eye")
RIGHT = Code("24028007", "SCT", "Right")
LEFT = Code("7771000", "SCT", "Left")
BODY_SITE_RIGHT_EYE = Code("18944008", "SCT", "Right eye structure")
BODY_SITE_LEFT_EYE = Code("8966001", "SCT", "Left eye structure")

# --- quality ---------------------------------------------------------------------------------------------
QUALITY_ASSESSMENT = Code("111050", "DCM", "Quality Assessment")
QUALITY_RATING = Code("111029", "DCM", "Image Quality Rating")
QUALITY_VALUES = {
    QualityGrade.GRADABLE: Code("111237", "DCM", "Usable - Meets the quality control standard"),
    QualityGrade.USABLE: Code("111236", "DCM", "Usable - Does not meet the quality control standard"),
    QualityGrade.REJECT: Code("111235", "DCM", "Unusable - Quality renders image unusable"),
}

# --- findings --------------------------------------------------------------------------------------------
CONDITIONS: dict[Condition, Code] = {
    Condition.DIABETIC_RETINOPATHY: Code("4855003", "SCT", "Diabetic retinopathy"),
    Condition.REFERABLE_DIABETIC_RETINOPATHY: private("RDR", "Referable diabetic retinopathy"),
    Condition.DIABETIC_MACULAR_EDEMA: Code("312912001", "SCT", "Diabetic macular oedema"),
    Condition.GLAUCOMA: Code("23986001", "SCT", "Glaucoma"),
    Condition.AGE_RELATED_MACULAR_DEGENERATION: Code("267718000", "SCT", "Age-related macular degeneration"),
    Condition.MYOPIC_MACULOPATHY: private("MYOPIC-MACULOPATHY", "Myopic maculopathy"),
    Condition.PATHOLOGIC_MYOPIA: private("PATHOLOGIC-MYOPIA", "Pathologic myopia"),
    Condition.RETINAL_VEIN_OCCLUSION: private("RVO", "Retinal vein occlusion"),
    Condition.HYPERTENSIVE_RETINOPATHY: private("HYPERTENSIVE-RETINOPATHY", "Hypertensive retinopathy"),
    Condition.CATARACT: Code("193570009", "SCT", "Cataract"),
}
OBSERVER_TYPE = Code("121005", "DCM", "Observer Type")
OBSERVER_PERSON = Code("121006", "DCM", "Person")
"""Observer Type = Person (PS3.16 TID 1002, CID 270): the qualitative evaluation of a TID 1410 region a clinician
drew at sign-off, or of the TID 1501 group of the grades a clinician set (``Source.CLINICIAN``), where an AI group
names its algorithm (TID 4019) instead."""
NOT_ASSESSED = Code("373121007", "SCT", "Not Evaluated")
"""Coded value of a condition the reading model was never trained to assess (``ImageAnalysis.not_assessed``):
the standard "Not Evaluated" value DICOM already uses for an evaluation that was not made (PS3.16 CID 3703
lists it beside "Not visualized" and "Unknown"), so the TID 1501 group names the condition and says it was
not evaluated instead of leaving it out (docs/results.md)."""
DATA_ABSENT_NOT_PERFORMED = {
    "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
    "code": "not-performed",
    "display": "Not Performed",
}
"""FHIR R4 ``dataAbsentReason`` of a condition not assessed: "the observation procedure was not performed"."""
GRADE = private("GRADE", "Severity grade")
PROBABILITY = Code("122157", "DCM", "Probability")
LATERALITY = Code("272741003", "SCT", "Laterality")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
ICDR_GRADES = (
    private("ICDR-0", "No apparent diabetic retinopathy"),
    Code("312903003", "SCT", "Mild nonproliferative diabetic retinopathy"),
    Code("312904009", "SCT", "Moderate nonproliferative diabetic retinopathy"),
    Code("312905005", "SCT", "Severe nonproliferative diabetic retinopathy"),
    Code("59276001", "SCT", "Proliferative diabetic retinopathy"),
)
"""International Clinical DR severity scale, grade 0 … 4."""
GRADE_VALUE_STEMS = {
    Condition.DIABETIC_MACULAR_EDEMA: ("DME", "DME risk grade"),
    Condition.MYOPIC_MACULOPATHY: ("META-PM", "META-PM category"),
}
"""Private value codes ``<stem>-<grade>`` of the non-ICDR grade scales."""


def grade_code(condition: Condition, grade: int) -> Code:
    """The coded value of ``grade`` on the scale of ``condition`` (binary conditions: present / absent)."""
    if condition == Condition.DIABETIC_RETINOPATHY:
        return ICDR_GRADES[grade]
    if condition in GRADE_VALUE_STEMS:
        stem, name = GRADE_VALUE_STEMS[condition]
        return private(f"{stem}-{grade}", f"{name} {grade}")
    return PRESENT if grade else ABSENT


def probability_code(condition: Condition) -> Code:
    """The concept name of the probability of ``condition`` (SR TID 1501 NUM, HL7 v2 OBX-3)."""
    name = CONDITIONS[condition]
    return private(f"P-{condition.value}", f"Probability of {name.meaning.lower()}")


# --- FHIR (LOINC) ----------------------------------------------------------------------------------------
LOINC_DR_SEVERITY = {
    "R": Code("71491-5", "LN", "Right eye Diabetic retinopathy severity level by Ophthalmoscopy"),
    "L": Code("71490-7", "LN", "Left eye Diabetic retinopathy severity level by Ophthalmoscopy"),
}
LOINC_DR_ANSWERS = (
    Code("LA18643-9", "LN", "No apparent retinopathy"),
    Code("LA18644-7", "LN", "Mild non-proliferative retinopathy"),
    Code("LA18645-4", "LN", "Moderate non-proliferative retinopathy"),
    Code("LA18646-2", "LN", "Severe non-proliferative retinopathy"),
    Code("LA18648-8", "LN", "Proliferative retinopathy"),
)
"""LOINC answer list LL2117-1, ICDR grade 0 … 4."""
LOINC_AI_DR_SCREENING = Code(
    "105914-6", "LN", "Eye Diabetic retinopathy screening Autonomous artificial intelligence"
)
LOINC_CUP_DISC_RATIO = Code("71485-7", "LN", "Cup-to-disc ratio")
REPORT_CODE = private("FUNDUS-REPORT", "Fundus photograph AI analysis report")
EYE_FINDINGS = private("EYE-FINDINGS", "Retinal findings of one eye")
OPHTHALMOLOGY = Code("394594003", "SCT", "Ophthalmology")
OBSERVATION_CATEGORY_IMAGING = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "imaging",
    "display": "Imaging",
}

# --- lesions and landmarks -------------------------------------------------------------------------------
LESIONS: dict[LesionType, Code] = {
    LesionType.MICROANEURYSM: private("MA", "Retinal microaneurysm"),
    LesionType.HAEMORRHAGE: Code("50960005", "SCT", "Hemorrhage"),
    LesionType.HARD_EXUDATE: private("HE", "Hard exudate"),
    LesionType.SOFT_EXUDATE: private("SE", "Soft exudate (cotton wool spot)"),
    LesionType.NEOVASCULARISATION: private("NV", "Retinal neovascularisation"),
    LesionType.DRUSEN: private("DRUSEN", "Drusen"),
}
LANDMARKS: dict[LandmarkType, Code] = {
    LandmarkType.OPTIC_DISC: Code("81016008", "SCT", "Optic disc structure"),
    LandmarkType.OPTIC_CUP: private("OPTIC-CUP", "Optic cup"),
    LandmarkType.FOVEA: private("FOVEA", "Fovea centralis"),
}
DETECTION_SCORE = private("DETECTION-SCORE", "Detection confidence")

# --- measurements ----------------------------------------------------------------------------------------
DERIVATION = {
    Source.MEASURED: Code("258104002", "SCT", "Measured"),
    Source.MODEL: Code("414135002", "SCT", "Estimated"),
}
"""TID 300 Derivation: measured by the pipeline, or estimated by the language model."""
ZONES = {
    Zone.WHOLE: private("ZONE-WHOLE", "Whole fundus image"),
    Zone.B: private("ZONE-B", "Zone B, 0.5 to 1 disc diameter from the disc margin"),
    Zone.C: private("ZONE-C", "Zone C, 0.5 to 2 disc diameters from the disc margin"),
}
VESSELS = {
    VesselType.ALL: Code("59820001", "SCT", "Blood vessel"),
    VesselType.ARTERY: Code("51114001", "SCT", "Artery"),
    VesselType.VEIN: Code("29092000", "SCT", "Vein"),
}
DISAGREEMENT = private("MODEL-DISAGREES", "Model estimate disagrees with measurement")


@dataclass(frozen=True)
class Feature:
    """A measurable feature: its code, a reference range (None where no population range applies), and
    whether it describes vessels (finding sites vessel type and zone) or the optic disc."""

    code: Code
    low: float | None = None
    high: float | None = None
    vascular: bool = True


FEATURES: dict[str, Feature] = {
    "Fractal_dimension": Feature(private("FD", "Vessel fractal dimension"), 1.35, 1.55),
    "Vessel_density": Feature(private("VD", "Vessel density"), 0.05, 0.15),
    "Average_width": Feature(private("AW", "Average vessel width")),
    "Distance_tortuosity": Feature(private("DT", "Distance tortuosity")),
    "Squared_curvature_tortuosity": Feature(private("SCT-TORT", "Squared curvature tortuosity")),
    "Tortuosity_density": Feature(private("TD", "Tortuosity density")),
    "CRAE_Knudtson": Feature(private("CRAE-K", "Central retinal artery equivalent (Knudtson)"), 120.0, 180.0),
    "CRVE_Knudtson": Feature(private("CRVE-K", "Central retinal vein equivalent (Knudtson)"), 180.0, 250.0),
    "AVR_Knudtson": Feature(private("AVR-K", "Arteriole-to-venule ratio (Knudtson)"), 0.6, 0.8),
    "CRAE_Hubbard": Feature(private("CRAE-H", "Central retinal artery equivalent (Hubbard)")),
    "CRVE_Hubbard": Feature(private("CRVE-H", "Central retinal vein equivalent (Hubbard)")),
    "AVR_Hubbard": Feature(private("AVR-H", "Arteriole-to-venule ratio (Hubbard)"), 0.6, 0.8),
    "Disc_height": Feature(vascular=False, code=private("DISC-H", "Optic disc height")),
    "Disc_width": Feature(vascular=False, code=private("DISC-W", "Optic disc width")),
    "Cup_height": Feature(vascular=False, code=private("CUP-H", "Optic cup height")),
    "Cup_width": Feature(vascular=False, code=private("CUP-W", "Optic cup width")),
    "CDR_vertical": Feature(private("VCDR", "Vertical cup-to-disc ratio"), 0.0, 0.6, vascular=False),
    "CDR_horizontal": Feature(private("HCDR", "Horizontal cup-to-disc ratio"), 0.0, 0.6, vascular=False),
}
"""Known features by base key (AutoMorph names without vessel prefix and zone suffix)."""

_VESSEL_PREFIX = {"Artery_": VesselType.ARTERY, "Vein_": VesselType.VEIN}
_ZONE_SUFFIX = {"_zone_b": Zone.B, "_zone_c": Zone.C}


def base_feature_key(key: str) -> str:
    """``Artery_Vessel_density_zone_b`` → ``Vessel_density`` (the inverse of ``automorph_key``)."""
    for prefix in _VESSEL_PREFIX:
        key = key.removeprefix(prefix)
    for suffix in _ZONE_SUFFIX:
        key = key.removesuffix(suffix)
    return key


def feature(key: str) -> Feature:
    """The feature of a measurement key; an unknown key gets a private code derived from its name."""
    base = base_feature_key(key)
    known = FEATURES.get(base)
    if known is not None:
        return known
    return Feature(private(f"F-{base.upper()[:12]}", base.replace("_", " ")))


UCUM_UNITS = {
    "px": Code("{pixels}", "UCUM", "pixels"),
    "um": Code("um", "UCUM", "micrometer"),
    "1": Code("1", "UCUM", "no units"),
    "%": Code("%", "UCUM", "percent"),
    "mm": Code("mm", "UCUM", "millimeter"),
}


def unit(ucum: str) -> Code:
    """The UCUM unit code for a schema unit string."""
    return UCUM_UNITS.get(ucum, Code(ucum, "UCUM", ucum))
