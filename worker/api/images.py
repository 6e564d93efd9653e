"""Fundus images for the review page: a stored DICOM instance rendered as PNG (first frame, RGB, 8-bit)."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
from PIL import Image

from worker.pipeline.sources import to_rgb8


def render_png(path: Path, max_size: int) -> bytes:
    """The instance's first frame as a PNG no larger than ``max_size`` on its longer side. Photometric
    interpretation (YBR, MONOCHROME1/2) and 16-bit pixels are handled as for analysis."""
    dataset = pydicom.dcmread(path)
    image = Image.fromarray(to_rgb8(dataset))
    image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()
