"""Fixtures of the reporting tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from reporting import build_report_objects
from tests.reporting.reporting_fixtures import (
    OPTIONS,
    SOURCE_KINDS,
    make_analysis,
    make_source,
    vessel_mask,
    write_all,
)


@pytest.fixture(scope="session")
def source_factory(retina_rgb: np.ndarray) -> Callable[..., list[Dataset]]:
    """``factory(kind)`` → two sources (right and left eye) of one new study."""

    def factory(kind: str) -> list[Dataset]:
        study, series = generate_uid(), generate_uid()
        return [make_source(kind, retina_rgb, study, series, side, n) for n, side in enumerate("RL", 1)]

    return factory


@pytest.fixture(scope="session", params=list(SOURCE_KINDS))
def built(request, source_factory, tmp_path_factory):
    """Per source kind: (kind, sources, analysis, result objects, written files by kind), built once."""
    sources = source_factory(request.param)
    analysis = make_analysis(sources)
    masks = {str(ds.SOPInstanceUID): vessel_mask(ds) for ds in sources}
    objects = build_report_objects(analysis, sources, OPTIONS, vessel_masks=masks)
    files = write_all(objects, sources, tmp_path_factory.mktemp(request.param))
    return request.param, sources, analysis, objects, files
