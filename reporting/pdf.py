"""PDF report and its Encapsulated PDF object (PS3.3 A.45.1 Encapsulated PDF IOD, Modality DOC).

The PDF shows patient and study, the "AI result, not verified" statement (for a revision a clinician signed:
who verified it and when, :mod:`reporting.verification`), model identity, and per image the
annotated photograph, the findings with the conditions not assessed, the measured values against reference
ranges and the model-vs-measured disagreement flags (model-emitted numbers are not presented). The same bytes
are the FHIR DiagnosticReport ``presentedForm``.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Sequence
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image as PILImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import Image, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from model.schema import ImageAnalysis, StudyAnalysis
from reporting import summary
from reporting.key_image import annotate
from reporting.options import ReportOptions
from reporting.sources import algorithms, metadata, result_key, rgb_pixels, uid
from reporting.verification import Verification, is_verified_note, series_description, status_label

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
TITLE = "RetinalGPT fundus photograph analysis"
_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "IssuerOfPatientID",
)
_TABLE_STYLE = TableStyle(
    [
        ("FONTSIZE", (0, 0), (-1, -1), 8),
        ("BACKGROUND", (0, 0), (-1, 0), colors.lightgrey),
        ("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
    ]
)


def _thumbnail(pixels: np.ndarray, width_mm: float = 80) -> Image:
    picture = PILImage.fromarray(pixels)
    picture.thumbnail((768, 768))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    buffer.seek(0)
    ratio = picture.height / picture.width
    return Image(buffer, width=width_mm * mm, height=width_mm * ratio * mm)


def document_title(verification: Verification | None) -> str:
    """The report's title with its status: ``… (AI result, not verified)`` or ``… (verified by Jane Smith)``."""
    return f"{TITLE} ({status_label(verification)})"


def _image_section(analysis: StudyAnalysis, img: ImageAnalysis, source: Dataset | None, styles,
                   verification: Verification | None) -> list:
    flow: list = [Paragraph(escape(summary.image_title(img)), styles["Heading2"])]
    if source is not None:
        flow.append(_thumbnail(annotate(rgb_pixels(source), analysis, img, verification)))
    if img.quality is not None and img.quality.reasons:
        flow.append(Paragraph("Quality: " + escape("; ".join(img.quality.reasons)), styles["Normal"]))
    missing = summary.not_assessed(img)
    if img.findings or missing:
        rows = [["Finding", "Result", "Source"]]
        rows += [
            [summary.condition_name(f.condition), summary.finding_text(f).split(": ", 1)[1], f.source.value]
            for f in img.findings
        ]
        rows += [
            [summary.condition_name(c), summary.NOT_ASSESSED, "model not trained on it"] for c in missing
        ]
        flow += [Spacer(1, 2 * mm), Table(rows, style=_TABLE_STYLE, hAlign="LEFT")]
    else:
        flow.append(Paragraph(escape("; ".join(summary.image_summary(analysis, img))), styles["Normal"]))
    measured = summary.reported_measurements(img)
    if measured:
        rows = [["Measurement (measured)", "Value", "Unit", "Reference", ""]]
        for m in measured:
            r = summary.measurement_row(m)
            rows.append([r.name, r.value, r.unit, r.reference, r.flag])
        flow += [Spacer(1, 2 * mm), Table(rows, style=_TABLE_STYLE, hAlign="LEFT")]
    flow += [Paragraph(escape(summary.disagreement_text(d)), styles["Normal"]) for d in img.disagreements]
    return flow


def render_pdf(analysis: StudyAnalysis, sources: Sequence[Dataset], notes: Sequence[str],
               verification: Verification | None = None) -> bytes:
    """The PDF report of ``analysis`` (reportlab), headed by the verification statement of ``verification``
    (None: "AI result, not verified by a clinician.")."""
    statement = summary.verification_statement(verification)
    styles = getSampleStyleSheet()
    first = sources[0] if sources else Dataset()
    buffer = io.BytesIO()
    doc = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        title=document_title(verification),
        author="RetinalGPT Worker",
        leftMargin=15 * mm,
        rightMargin=15 * mm,
        topMargin=15 * mm,
        bottomMargin=15 * mm,
    )
    referral = summary.referral_text(analysis).removeprefix("Referral: ").rstrip(".")
    flow: list = [
        Paragraph(TITLE, styles["Title"]),
        Paragraph(f"<b>{escape(statement)}</b>", styles["Normal"]),
        Spacer(1, 3 * mm),
        Table(
            [
                [
                    "Patient",
                    str(first.get("PatientName", analysis.patient_name or "")),
                    "Patient ID",
                    str(first.get("PatientID", analysis.patient_id or "")),
                ],
                [
                    "Study date",
                    str(first.get("StudyDate", "")),
                    "Accession",
                    str(analysis.accession_number or ""),
                ],
                ["Study UID", analysis.study_instance_uid, "Revision", str(analysis.revision)],
            ],
            style=TableStyle([("FONTSIZE", (0, 0), (-1, -1), 8)]),
            hAlign="LEFT",
        ),
        Spacer(1, 3 * mm),
        Paragraph(
            "<b>Algorithms</b>: "
            + escape(
                "; ".join(
                    f"{a.name} {a.version} ({a.manufacturer}, device UID {a.device_uid})"
                    for a in algorithms(analysis)
                )
            ),
            styles["Normal"],
        ),
        Paragraph(f"<b>Referral</b>: {escape(referral)}", styles["Normal"]),
    ]
    if analysis.impression:
        flow.append(Paragraph(f"<b>Impression</b>: {escape(analysis.impression)}", styles["Normal"]))
    flow += [Paragraph(escape(n), styles["Italic"]) for n in notes
             if n != statement and not (verification is not None and is_verified_note(n))]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    for img in analysis.images:
        flow += _image_section(analysis, img, by_uid.get(img.sop_instance_uid or ""), styles, verification)
    doc.build(flow)
    return buffer.getvalue()


def encapsulate_pdf(
    pdf: bytes,
    analysis: StudyAnalysis,
    source: Dataset,
    options: ReportOptions,
    created: dt.datetime | None = None,
    verification: Verification | None = None,
) -> Dataset:
    """The Encapsulated PDF instance in the source's study (Modality DOC, Burned In Annotation YES); its Series
    Description and Document Title say whether a clinician verified the result."""
    created = created or dt.datetime.now(dt.UTC)
    ds = Dataset()
    reference = metadata(source)
    for keyword in _PATIENT_STUDY:
        if keyword in reference:
            ds[keyword] = reference[keyword]
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = uid(result_key(analysis), "pdf")
    ds.SeriesInstanceUID = uid(result_key(analysis), "pdf-series")
    ds.SeriesNumber = options.pdf_series_number
    ds.SeriesDescription = series_description("RetinalGPT PDF report", verification)
    ds.Modality = "DOC"
    ds.Manufacturer = options.manufacturer
    if options.institution_name:
        ds.InstitutionName = options.institution_name
    ds.ConversionType = "SYN"
    ds.InstanceNumber = analysis.revision
    ds.ContentDate = created.strftime("%Y%m%d")
    ds.ContentTime = created.strftime("%H%M%S")
    ds.AcquisitionDateTime = created.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = document_title(verification)
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.SpecificCharacterSet = source.get("SpecificCharacterSet", "ISO_IR 192")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds
