"""Parameters of the result objects (built by :mod:`worker` from ``[reporting]`` in the configuration)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset


@dataclass(frozen=True)
class ReportOptions:
    """What to build and how to label it.

    ``manufacturer`` and ``institution_name`` go into the General Equipment module of every object; the
    series numbers keep result series apart from the camera's numbers; ``fhir_patient_system`` is the
    identifier system of the DICOM Patient ID in the EHR (FHIR ``Patient.identifier.system``).
    """

    manufacturer: str = "RetinalGPT Worker"
    institution_name: str | None = None
    segmentation: bool = False
    key_image: bool = True
    pdf: bool = True
    sr_series_number: int = 9001
    seg_series_number: int = 9002
    key_image_series_number: int = 9003
    pdf_series_number: int = 9004
    fhir_patient_system: str = "urn:retinalgpt:patient-id"


@dataclass
class ReportObjects:
    """Everything built for one analysis revision."""

    sr: Dataset
    fhir_bundle: dict
    segmentations: list[Dataset] = field(default_factory=list)
    key_images: list[Dataset] = field(default_factory=list)
    pdf: Dataset | None = None
    pdf_bytes: bytes | None = None

    @property
    def datasets(self) -> list[Dataset]:
        """All DICOM objects, SR first, in the order they should be sent."""
        return [self.sr, *self.segmentations, *self.key_images, *([self.pdf] if self.pdf is not None else [])]
