"""Fixtures of the measurement-pipeline tests: small real fundus photographs and shared pipelines."""

from __future__ import annotations

import numpy as np
import pytest

from model.analysis import AnalysisOptions, MeasurementPipeline
from tests.model.analysis.analysis_fixtures import rescaled


@pytest.fixture(scope="session")
def retina_small(retina_rgb: np.ndarray) -> np.ndarray:
    """skimage's retina photograph at 720 px."""
    return rescaled(retina_rgb, 720)


@pytest.fixture(scope="session")
def classical_pipeline() -> MeasurementPipeline:
    return MeasurementPipeline(AnalysisOptions(vessel_method="classical"))


@pytest.fixture(scope="session")
def network_pipeline() -> MeasurementPipeline:
    from model.analysis.vessels import WEIGHTS

    if not WEIGHTS.is_file():
        pytest.fail(f"vessel network weights {WEIGHTS} are not committed")
    return MeasurementPipeline(AnalysisOptions(vessel_method="network"))
