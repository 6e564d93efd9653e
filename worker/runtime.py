"""Per-process singletons built from the configuration: the study analyzer and the report options.

The measurement pipeline and RetinalGPT are loaded once per worker process (DESIGN step 3) as the pool process
starts (in a thread, :mod:`worker.roles`) or on first use, whichever comes first, and reused for every study. Heavy imports (torch) happen here, inside functions, so processes that never analyse
(listener, API, delivery) never import them.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from worker.config import Settings

if TYPE_CHECKING:
    from model.engine import EngineOptions
    from worker.pipeline.study import StudyAnalyzer

log = logging.getLogger(__name__)

_lock = threading.Lock()
_cached: list[tuple[Settings, StudyAnalyzer]] = []


class ModelUnavailable(RuntimeError):
    """The configured model cannot be loaded; the message says which path and why."""


def bundled_model() -> Path | None:
    """The default model shipped inside the package (``model/bundled/<name>/``), newest name last."""
    import model

    found = sorted(p.parent for p in (Path(model.__file__).parent / "bundled").glob("*/retinalgpt.json"))
    return found[-1] if found else None


def model_directory(settings: Settings) -> Path | None:
    """The RetinalGPT directory to run: ``model.path`` if set, else the registry's active version, else the
    bundled default model; None when the model is disabled or none exists."""
    if not settings.model.enabled:
        return None
    from model.registry import resolve_model_path

    return resolve_model_path(settings.model.path, settings.model.registry) or bundled_model()


def engine_options(settings: Settings) -> EngineOptions:
    """``[model]`` as the engine's options."""
    from model.engine import EngineOptions

    return EngineOptions(
        device=settings.model.device,
        dtype=settings.model.dtype,
        quantization=settings.model.quantization,
        batch_size=settings.model.batch_size,
        max_new_tokens=settings.model.max_new_tokens,
        constrain_answers={"auto": None, "on": True, "off": False}[settings.model.constrained_decoding],
    )


def build_analyzer(settings: Settings) -> StudyAnalyzer:
    """Load the measurement pipeline and, when a model is configured or active, RetinalGPT."""
    from model.analysis import PIPELINE_IDENTITY, AnalysisOptions, MeasurementPipeline
    from worker.pipeline.study import StudyAnalyzer

    options = AnalysisOptions(
        vessel_method=settings.analysis.vessel_method,
        definitions=settings.analysis.definitions,
        field_angle_degrees=settings.analysis.field_angle_degrees,
        working_size=settings.analysis.working_size,
    )
    pipeline = MeasurementPipeline(options)
    engine = None
    note = None
    path = model_directory(settings)
    if path is None:
        note = (
            "RetinalGPT is disabled in the configuration ([model] enabled = false); measurement pipeline only."
            if not settings.model.enabled
            else "No RetinalGPT model is configured, active or bundled; measurement pipeline only."
        )
    else:
        from model.engine import RetinalGPTEngine

        try:
            engine = RetinalGPTEngine.load(path, engine_options(settings))
        except Exception as exc:
            raise ModelUnavailable(f"RetinalGPT model at {path} cannot be loaded: {exc}") from exc
        log.info("RetinalGPT %s %s loaded from %s", engine.identity.name, engine.identity.version, path)
    return StudyAnalyzer(pipeline, engine, pipeline_identity=PIPELINE_IDENTITY, model_note=note)


def analyzer(settings: Settings) -> StudyAnalyzer:
    """The process-wide analyzer for ``settings`` (built once; the settings object is held, so a new one
    with a recycled ``id`` can never pick up an analyzer built for another configuration)."""
    with _lock:
        if not _cached or _cached[0][0] is not settings:
            _cached[:] = [(settings, build_analyzer(settings))]
        return _cached[0][1]


_shadow_cached: list[tuple[Settings, Path, StudyAnalyzer]] = []


def shadow_analyzer(settings: Settings, path: Path) -> StudyAnalyzer:
    """The process-wide analyzer running the candidate model at ``path`` in shadow mode (issue 17 item 3), kept
    next to the active one; a new shadow version replaces the old one."""
    with _lock:
        if not _shadow_cached or _shadow_cached[0][0] is not settings or _shadow_cached[0][1] != path:
            candidate = settings.model_copy(update={"model": settings.model.model_copy(update={"path": path,
                                                                                             "enabled": True})})
            _shadow_cached[:] = [(settings, path, build_analyzer(candidate))]
        return _shadow_cached[0][2]
