"""Result objects: DICOM SR (TID 1500), SEG, key image, PDF; FHIR R4 resources and delivery.

Imports only :mod:`model.schema` from the model package (never torch, never worker). The entry point is
:func:`build_report_objects`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

import numpy as np
from pydicom.dataset import Dataset

from model.schema import StudyAnalysis
from reporting.options import ReportObjects, ReportOptions
from reporting.verification import Verification

__all__ = ["ReportObjects", "ReportOptions", "Verification", "build_report_objects"]


def build_report_objects(
    analysis: StudyAnalysis,
    sources: Sequence[Dataset],
    options: ReportOptions,
    *,
    vessel_masks: Mapping[str, np.ndarray] | None = None,
    previous_sr: Dataset | None = None,
    verification: Verification | None = None,
) -> ReportObjects:
    """Build every result object of one analysis revision.

    ``sources`` are the analysed source instances (with pixel data when a key image, PDF or SEG is wanted);
    ``vessel_masks`` maps SOP Instance UIDs to vessel masks (rows × columns, non-zero = vessel) for the SEG;
    ``previous_sr`` is the SR of the previous revision, listed as predecessor of the new one;
    ``verification`` is the clinician's sign-off of a signed revision (None: an unsigned, preliminary result), stated
    by every object (:mod:`reporting.verification`). UIDs are
    derived from study, revision and model, so building the same result twice gives identical UIDs.
    The builders are imported here, not at module level, so that importing :mod:`reporting.fhir.client`
    (delivery processes) does not load highdicom and reportlab.
    """
    from reporting import summary
    from reporting.fhir.bundle import build_bundle
    from reporting.key_image import build_key_image
    from reporting.pdf import encapsulate_pdf, render_pdf
    from reporting.seg import build_segmentation
    from reporting.sources import check_sources, paired, unmatched_images
    from reporting.sr.sop import build_sr

    check_sources(analysis, sources)
    if previous_sr is not None and previous_sr.StudyInstanceUID != analysis.study_instance_uid:
        raise ValueError("previous_sr belongs to another study")
    pairs = paired(analysis, sources)
    sr = build_sr(analysis, sources, options, previous_sr, verification)
    segmentations: list[Dataset] = []
    if options.segmentation:
        masks = vessel_masks or {}
        for n, (img, ds) in enumerate(pairs, 1):
            seg = build_segmentation(analysis, img, ds, options, masks.get(str(ds.SOPInstanceUID)), n,
                                     verification)
            if seg is not None:
                segmentations.append(seg)
    key_images = (
        [build_key_image(analysis, img, ds, options, n, verification) for n, (img, ds) in enumerate(pairs, 1)]
        if options.key_image
        else []
    )
    pdf_bytes, pdf = None, None
    if options.pdf:
        pdf_bytes = render_pdf(
            analysis, [ds for _, ds in pairs], summary.notes(analysis, unmatched_images(analysis, sources)),
            verification,
        )
        pdf = encapsulate_pdf(pdf_bytes, analysis, pairs[0][1], options, created=dt.datetime.now(dt.UTC),
                              verification=verification)
    bundle = build_bundle(analysis, sources, pdf_bytes, options.fhir_patient_system, verification)
    return ReportObjects(
        sr=sr,
        fhir_bundle=bundle,
        segmentations=segmentations,
        key_images=key_images,
        pdf=pdf,
        pdf_bytes=pdf_bytes,
    )
