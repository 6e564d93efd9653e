"""Result objects on disk: one folder per study revision, written once and re-read for every delivery.

Writing the objects before the first delivery keeps their UIDs fixed, so a retried or repeated delivery
sends the very same SR, key image and PDF instances (a PACS files them once) and the FHIR transaction stays
conditional on the same identifiers. Layout::

    analysis.json        StudyAnalysis
    sr.dcm               Comprehensive 3D SR, TID 1500
    key-image-N.dcm      Secondary Capture key images
    report.pdf           the PDF report (also the FHIR presentedForm)
    report-pdf.dcm       Encapsulated PDF
    seg-N.dcm            Segmentations (optional)
    fhir-bundle.json     FHIR R4 transaction Bundle
    verification.json    the clinician's sign-off of a signed revision (absent: unsigned, preliminary)
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from model.schema import StudyAnalysis
from reporting import ReportObjects
from reporting.verification import Verification

ANALYSIS_FILE = "analysis.json"
SR_FILE = "sr.dcm"
PDF_FILE = "report.pdf"
PDF_DICOM_FILE = "report-pdf.dcm"
BUNDLE_FILE = "fhir-bundle.json"
VERIFICATION_FILE = "verification.json"


@dataclass
class WrittenResults:
    """Paths of the result objects of one study revision."""

    folder: Path
    analysis: Path
    sr: Path
    bundle: Path
    key_images: list[Path] = field(default_factory=list)
    segmentations: list[Path] = field(default_factory=list)
    pdf: Path | None = None
    pdf_dicom: Path | None = None
    verification: Path | None = None

    def read_verification(self) -> Verification | None:
        """The sign-off of this revision, None for an unsigned (preliminary) result."""
        if self.verification is None:
            return None
        return Verification.model_validate_json(self.verification.read_text())

    @property
    def dicom_objects(self) -> dict[str, list[Path]]:
        """DICOM objects by delivery object kind (``sr``, ``key_image``, ``pdf``, ``seg``)."""
        return {
            "sr": [self.sr],
            "key_image": list(self.key_images),
            "pdf": [self.pdf_dicom] if self.pdf_dicom else [],
            "seg": list(self.segmentations),
        }

    def all_files(self) -> list[Path]:
        files = [self.analysis, self.sr, self.bundle, *self.key_images, *self.segmentations]
        files += [p for p in (self.pdf, self.pdf_dicom, self.verification) if p is not None]
        return files


def _temp_for(path: Path) -> Path:
    """A temp name beside ``path`` that no concurrent writer of the same file uses."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = _temp_for(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_dicom(path: Path, dataset: Dataset) -> None:
    tmp = _temp_for(path)
    dataset.save_as(tmp, enforce_file_format=True)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_results(folder: Path, analysis: StudyAnalysis, objects: ReportObjects,
                  verification: Verification | None = None) -> WrittenResults:
    """Write every object of one revision into ``folder`` (created), each file atomically; the bundle last, as
    :func:`read_results` takes a folder with analysis, SR and bundle for complete."""
    folder.mkdir(parents=True, exist_ok=True)
    written = WrittenResults(folder=folder, analysis=folder / ANALYSIS_FILE, sr=folder / SR_FILE,
                             bundle=folder / BUNDLE_FILE)
    if verification is not None:
        written.verification = folder / VERIFICATION_FILE
        _atomic_write(written.verification, verification.model_dump_json(indent=2).encode())
    _atomic_write(written.analysis, analysis.model_dump_json(indent=2).encode())
    _write_dicom(written.sr, objects.sr)
    for number, key_image in enumerate(objects.key_images, start=1):
        path = folder / f"key-image-{number}.dcm"
        _write_dicom(path, key_image)
        written.key_images.append(path)
    for number, segmentation in enumerate(objects.segmentations, start=1):
        path = folder / f"seg-{number}.dcm"
        _write_dicom(path, segmentation)
        written.segmentations.append(path)
    if objects.pdf_bytes is not None:
        written.pdf = folder / PDF_FILE
        _atomic_write(written.pdf, objects.pdf_bytes)
    if objects.pdf is not None:
        written.pdf_dicom = folder / PDF_DICOM_FILE
        _write_dicom(written.pdf_dicom, objects.pdf)
    _atomic_write(written.bundle, json.dumps(objects.fhir_bundle, indent=2).encode())
    return written


def read_results(folder: Path) -> WrittenResults | None:
    """The results written earlier in ``folder``, or None when they are absent or incomplete."""
    analysis, sr, bundle = folder / ANALYSIS_FILE, folder / SR_FILE, folder / BUNDLE_FILE
    if not (analysis.is_file() and sr.is_file() and bundle.is_file()):
        return None
    pdf, pdf_dicom, verification = folder / PDF_FILE, folder / PDF_DICOM_FILE, folder / VERIFICATION_FILE
    return WrittenResults(
        folder=folder,
        analysis=analysis,
        sr=sr,
        bundle=bundle,
        key_images=sorted(folder.glob("key-image-*.dcm")),
        segmentations=sorted(folder.glob("seg-*.dcm")),
        pdf=pdf if pdf.is_file() else None,
        pdf_dicom=pdf_dicom if pdf_dicom.is_file() else None,
        verification=verification if verification.is_file() else None,
    )

