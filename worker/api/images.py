"""Fundus images for the review page: a stored DICOM instance rendered as PNG (first frame, RGB, 8-bit).

Decoding is bounded as for analysis: an image with more pixels than ``analysis.max_image_pixels`` is not
decoded at all, only the first frame is read, and it is reduced at decode to the requested size (JPEG frames
by libjpeg's DCT scaling), so a request never holds a full-size copy of a huge image."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
from PIL import Image

from worker.pipeline.sources import check_size, decode_first_frame


def render_png(path: Path, max_size: int, max_pixels: int) -> bytes:
    """The instance's first frame as a PNG no larger than ``max_size`` on its longer side. Photometric
    interpretation (YBR, MONOCHROME1/2) and 16-bit pixels are handled as for analysis; raises
    :class:`~worker.pipeline.sources.ImageTooLarge` for an image over ``max_pixels``."""
    dataset = pydicom.dcmread(path, defer_size="256 KB")
    check_size(dataset, max_pixels)
    image = Image.fromarray(decode_first_frame(path, dataset, 2 * max_size))
    image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()
