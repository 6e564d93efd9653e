"""Deterministic retinal measurement pipeline (issue 3): fundus mask and framing, quality, vessels,
artery/vein, optic disc/cup and fovea, AutoMorph-defined vascular and disc features.

Public interface: :class:`AnalysisOptions`, :class:`MeasurementPipeline`, :class:`MeasurementResult`,
:data:`PIPELINE_IDENTITY`. Importing this package does not import torch; only the network vessel method does,
when a :class:`MeasurementPipeline` is constructed.
"""

from model.analysis.pipeline import (
    PIPELINE_IDENTITY,
    AnalysisOptions,
    MeasurementPipeline,
    MeasurementResult,
    pipeline_identity,
)

__all__ = [
    "PIPELINE_IDENTITY",
    "AnalysisOptions",
    "MeasurementPipeline",
    "MeasurementResult",
    "pipeline_identity",
]
