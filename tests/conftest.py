"""Fixtures shared by every test suite."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.dicom_node.dicom_fixtures import make_op, write_jpeg
from tests.support.base_install import BaseVenv, make_base_venv
from tests.support.net import free_port

__all__ = ["free_port"]

REPO = Path(__file__).resolve().parents[1]
SHARED_FUNDUS = REPO.parent / "shared" / "data" / "fundus"


@pytest.fixture(scope="session")
def shared_fundus() -> Path:
    """The shared labelled fundus datasets; tests using them skip cleanly when ../shared is absent."""
    if not SHARED_FUNDUS.is_dir():
        pytest.skip("../shared/data/fundus is not available")
    return SHARED_FUNDUS


@pytest.fixture(scope="session")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> BaseVenv:
    """A real venv holding only the base install's dependency closure: no torch, no GPL decoder."""
    return make_base_venv(tmp_path_factory.mktemp("base-venv") / "venv")


@pytest.fixture(scope="session")
def retina_rgb() -> np.ndarray:
    """A real colour fundus photograph shipped by scikit-image (1411×1411×3, uint8)."""
    from skimage import data

    return data.retina()


@pytest.fixture(scope="session")
def retina_jpeg(tmp_path_factory: pytest.TempPathFactory, retina_rgb: np.ndarray) -> Path:
    """skimage's retina photograph as a JPEG file (what ``img2dcm -oph`` is fed)."""
    return write_jpeg(retina_rgb, tmp_path_factory.mktemp("jpeg") / "retina.jpg")


@pytest.fixture
def op_file(tmp_path: Path, retina_jpeg: Path) -> Callable[..., Path]:
    """Make OP files with ``img2dcm -oph``: ``op_file(name, study_uid=..., series_uid=...)``."""

    def make(name: str = "op.dcm", **kwargs: object) -> Path:
        return make_op(retina_jpeg, tmp_path / name, **kwargs)

    return make
