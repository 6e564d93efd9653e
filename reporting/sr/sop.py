"""The Comprehensive 3D SR document (IHE AI Results): TID 1500 Measurement Report built with highdicom.

Patient and Study attributes come from the source instances (highdicom copies them from the evidence); the
document is complete and, until a clinician signs it off, not verified (PS3.3 C.17.2: Verification Flag
UNVERIFIED); a signed revision is VERIFIED with a Verifying Observer Sequence item (name, organisation,
Verification DateTime of the sign-off, the signing identity as observer identification code); the
ContributingEquipmentSequence names each algorithm with its Device UID (PS3.3 C.12.1.1.5 / Table C.12-1); a
new revision lists the previous document in the Predecessor Documents Sequence.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from model.schema import StudyAnalysis
from reporting import codes, summary
from reporting.options import ReportOptions
from reporting.sources import algorithms, metadata, paired, result_key, uid, unmatched_images
from reporting.verification import Verification, series_description
from reporting.sr.content import (
    ImageGroups,
    library_images,
    observation_context,
    qualitative_evaluations,
    restore_sop_classes,
)

SERIES_DESCRIPTION = "RetinalGPT AI results (not verified)"


def contributing_equipment(analysis: StudyAnalysis) -> list[Dataset]:
    """One ContributingEquipmentSequence item per algorithm, purpose Processing Equipment (CID 7005),
    described as "Processing Algorithm", with the algorithm's Device UID."""
    items: list[Dataset] = []
    for identity in algorithms(analysis):
        item = hd.ContributingEquipment(
            manufacturer=identity.manufacturer,
            purpose_of_reference=codes.PROCESSING_EQUIPMENT,
            manufacturer_model_name=identity.name,
            software_versions=identity.version,
            contribution_description="Processing Algorithm",
        )
        item.DeviceUID = identity.device_uid
        items.append(item)
    return items


def build_sr(
    analysis: StudyAnalysis,
    sources: Sequence[Dataset],
    options: ReportOptions,
    previous_sr: Dataset | None = None,
    verification: Verification | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR of ``analysis`` referencing every matched source image; VERIFIED by ``verification`` if given."""
    pairs = paired(analysis, sources)
    groups = ImageGroups(analysis)
    imaging = [group for img, ds in pairs for group in groups.for_image(img, ds)]
    library, restore = library_images([ds for _, ds in pairs])
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(analysis),
        procedure_reported=codes.PROCEDURE_FUNDUS_PHOTOGRAPHY,
        imaging_measurements=imaging,
        title=codes.REPORT_TITLE,
        referenced_images=library,
    )
    notes = summary.notes(analysis, unmatched_images(analysis, sources))
    report[0].ContentSequence.append(qualitative_evaluations(analysis, notes))
    restore_sop_classes(report, restore)
    evidence = [metadata(ds) for _, ds in pairs]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=uid(result_key(analysis), "sr-series"),
        series_number=options.sr_series_number,
        sop_instance_uid=uid(result_key(analysis), "sr"),
        instance_number=analysis.revision,
        manufacturer=options.manufacturer,
        institution_name=options.institution_name,
        is_complete=True,
        is_final=True,
        is_verified=verification is not None,
        verifying_observer_name=verification.observer_name if verification else None,
        verifying_organization=verification.organisation if verification else None,
        previous_versions=[previous_sr] if previous_sr is not None else None,
        contributing_equipment=contributing_equipment(analysis),
        series_description=series_description("RetinalGPT AI results", verification) if verification
        else SERIES_DESCRIPTION,
    )
    if verification is not None:
        _verifying_observer(sr.VerifyingObserverSequence[0], verification)
    sr.CodingSchemeIdentificationSequence = [
        *sr.get("CodingSchemeIdentificationSequence", []),
        codes.coding_scheme_identification(),
    ]
    if analysis.accession_number and not sr.get("AccessionNumber"):
        sr.AccessionNumber = analysis.accession_number
    return sr


def _verifying_observer(item: Dataset, verification: Verification) -> None:
    """Complete highdicom's Verifying Observer item (PS3.3 Table C.17-2): the sign-off's own date/time
    (highdicom writes the build time) and the signing identity as Verifying Observer Identification Code
    (Type 2, left empty by highdicom; a local code of the API identity that signed)."""
    item.VerificationDateTime = verification.verified_at.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S.%f+0000")
    code = Dataset()
    if len(verification.observer_id) <= 16:
        code.CodeValue = verification.observer_id
    else:
        code.LongCodeValue = verification.observer_id
    code.CodingSchemeDesignator = codes.PRIVATE_SCHEME
    code.CodeMeaning = verification.observer_id[:64]
    item.VerifyingObserverIdentificationCodeSequence = [code]
