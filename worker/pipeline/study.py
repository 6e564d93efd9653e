"""Analysis of one study revision: measurement pipeline on every image, RetinalGPT on the gradable ones.

DESIGN step 3: select analysable images, check quality, run RetinalGPT in one batch for all images of the
study, run the measurement pipeline, merge into a :class:`StudyAnalysis`. Model-emitted numbers are compared
with measured ones and disagreements beyond each feature's tolerance are recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from model.schema import ImageAnalysis, ModelIdentity, StudyAnalysis
from worker.pipeline.referral import impression, study_referral
from worker.pipeline.sources import SourceImage

if TYPE_CHECKING:
    from model.analysis import MeasurementPipeline, MeasurementResult
    from model.engine import RetinalGPTEngine

log = logging.getLogger(__name__)

MEASURE_THREADS = 2
"""Images of a study measured at once: the pipeline's numpy/scipy/torch work releases the GIL, so two images
overlap (2 × 768 px on 2 cores: 2.6 s one after the other, 2.2 s together); the pipeline is thread-safe."""


@dataclass
class StudyResult:
    """A study's analysis plus the per-image masks the reports draw (vessel maps keyed by SOP Instance UID)."""

    analysis: StudyAnalysis
    vessel_masks: dict[str, np.ndarray] = field(default_factory=dict)


class StudyAnalyzer:
    """Runs the measurement pipeline and (when present) RetinalGPT; both are loaded once and reused."""

    def __init__(
        self,
        pipeline: MeasurementPipeline,
        engine: RetinalGPTEngine | None = None,
        *,
        pipeline_identity: ModelIdentity,
        model_note: str | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.engine = engine
        self.pipeline_identity = pipeline_identity
        self.model_note = model_note

    def analyze(self, sources: Sequence[SourceImage], *, revision: int = 1) -> StudyResult:
        if not sources:
            raise ValueError("a study analysis needs at least one analysable image")
        first = sources[0].dataset
        images: list[ImageAnalysis] = []
        masks: dict[str, np.ndarray] = {}
        with ThreadPoolExecutor(max_workers=min(len(sources), MEASURE_THREADS)) as pool:
            for source, measured in zip(sources, pool.map(self._measure, sources), strict=True):
                image = measured.image
                image.series_instance_uid = source.series_instance_uid
                images.append(image)
                masks[source.sop_instance_uid] = _to_stored_size(source, image, measured.vessels)
        notes: list[str] = []
        if self.engine is not None:
            self._run_model(sources, images)
        else:
            notes.append(self.model_note or "RetinalGPT is not configured; measurement pipeline only.")
        analysis = StudyAnalysis(
            study_instance_uid=str(first.StudyInstanceUID),
            revision=revision,
            patient_id=str(first.get("PatientID", "")) or None,
            patient_name=str(first.get("PatientName", "")) or None,
            accession_number=str(first.get("AccessionNumber", "")) or None,
            model=self.engine.identity if self.engine is not None else None,
            pipeline=self.pipeline_identity,
            images=images,
            referral=study_referral(images),
            impression=impression(images, model_ran=self.engine is not None),
            notes=notes,
        )
        return StudyResult(analysis=analysis, vessel_masks=masks)

    def _measure(self, source: SourceImage) -> MeasurementResult:
        return self.pipeline.analyze(
            source.rgb,
            pixel_spacing_um=source.pixel_spacing_um,
            sop_instance_uid=source.sop_instance_uid,
            file_path=str(source.path) if source.from_plain_file and source.path else None,
            laterality=source.laterality,
        )

    def _run_model(self, sources: Sequence[SourceImage], images: list[ImageAnalysis]) -> None:
        """One batched RetinalGPT pass over the gradable images of the study, merged into their results."""
        assert self.engine is not None
        chosen = [i for i, image in enumerate(images) if image.quality is None or image.quality.gradable]
        if not chosen:
            return
        results = self.engine.analyze([sources[i].rgb for i in chosen])
        for index, result in zip(chosen, results, strict=True):
            images[index] = result.merge_into(images[index])


def _to_stored_size(source: SourceImage, image: ImageAnalysis, vessels: np.ndarray) -> np.ndarray:
    """An image reduced at decode was measured at its decoded size: report it at the stored size (width,
    height, µm per stored pixel; landmarks and lesions are already normalised) and bring its vessel mask to
    the stored Rows × Columns, which the SEG requires."""
    if source.original_size is None or source.original_size == source.rgb.shape[:2]:
        return vessels
    from PIL import Image

    rows, columns = source.original_size
    image.height, image.width = rows, columns
    if image.pixel_spacing_um is not None:
        image.pixel_spacing_um *= source.scale
    return np.asarray(Image.fromarray(vessels.astype(np.uint8) * 255).resize((columns, rows), Image.Resampling.NEAREST)) > 0
