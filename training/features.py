"""Measurement-pipeline features for the vascular answers, cached on disk per image.

The measurement pipeline (:mod:`model.analysis`, issue 3) takes seconds per image, so each image's features
and quality grade are computed once and stored as JSON under the cache folder, keyed by the SHA-256 of the
image bytes. At most ``limit`` images get features per build, cached or not (the vascular task only needs
enough examples to learn the answer form); images beyond the limit or without a pipeline get no vascular
answer. The same records in the same order therefore reuse exactly the cached images.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model.schema import QualityGrade, Source, VesselType, Zone
from training.records import Record

log = logging.getLogger(__name__)


def measurement_pipeline() -> Any | None:
    """The measurement pipeline with default options, or None when :mod:`model.analysis` does not provide it."""
    try:
        from model.analysis import AnalysisOptions, MeasurementPipeline  # type: ignore[attr-defined]
    except ImportError:
        return None
    try:
        return MeasurementPipeline(AnalysisOptions())
    except FileNotFoundError:  # vessel-network weights not trained yet: the classical segmenter
        return MeasurementPipeline(AnalysisOptions(vessel_method="classical"))


def whole_image_features(image: Any) -> dict[str, float]:
    """Measured whole-image, all-vessel features (plus keys that encode their own zone/vessel) by key."""
    out: dict[str, float] = {}
    for m in image.measurements:
        if m.source == Source.MEASURED and (m.zone == Zone.WHOLE and m.vessel == VesselType.ALL or m.key.startswith("CDR")):
            out.setdefault(m.key, float(m.value))
    return out


class FeatureCache:
    """``lookup(record) -> (features, quality)`` backed by JSON files in ``folder``."""

    def __init__(self, folder: Path, limit: int = 200, pipeline: Any | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self.used = 0
        self._pipeline = pipeline
        self._resolved = pipeline is not None

    @property
    def pipeline(self) -> Any | None:
        if not self._resolved:
            self._pipeline = measurement_pipeline()
            self._resolved = True
            if self._pipeline is None:
                log.warning("model.analysis provides no MeasurementPipeline: no vascular answers")
        return self._pipeline

    def _path(self, record: Record) -> Path:
        return self.folder / f"{hashlib.sha256(record.image.read_bytes()).hexdigest()}.json"

    def lookup(self, record: Record) -> tuple[Mapping[str, float] | None, QualityGrade | None]:
        if self.used >= self.limit:
            return None, None
        path = self._path(record)
        if path.is_file():
            self.used += 1
            data = json.loads(path.read_text())
            return data["features"], QualityGrade(data["quality"]) if data.get("quality") else None
        if self.pipeline is None:
            return None, None
        from training.images import load_rgb

        try:
            result = self.pipeline.analyze(load_rgb(record.image), file_path=str(record.image))
        except Exception as exc:  # noqa: BLE001 - one unmeasurable image must not stop a build
            log.warning("measurement failed for %s: %s", record.key, exc)
            return None, None
        self.used += 1
        image = getattr(result, "image", result)
        features = whole_image_features(image)
        quality = image.quality.grade.value if getattr(image, "quality", None) is not None else None
        path.write_text(json.dumps({"record": record.key, "features": features, "quality": quality}))
        return features, QualityGrade(quality) if quality else None
