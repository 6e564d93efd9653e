"""Pixel data decoding with permissively licensed code only (issue 19: no GPL in the base install).

pydicom chooses among its own plugins: Pillow (JPEG Baseline, 8-bit JPEG Extended), pylibjpeg-openjpeg
(JPEG 2000), pyjpegls (JPEG-LS), GDCM's BSD-licensed wheel (JPEG Lossless, Process 14 and SV1), numpy
(RLE). None of these decodes JPEG Extended (Process 4) with 12-bit samples, which pydicom otherwise reads
only with the GPLv3 pylibjpeg-libjpeg; :func:`register` adds a decoder for that case built on imagecodecs'
libjpeg-turbo (BSD-3-Clause / IJG). Monochrome only: 12-bit colour JPEG is not made by fundus cameras, and
a colour transform pydicom could not undo would be wrong. Every transfer syntax of
:data:`dicom_node.sop.TRANSFER_SYNTAXES` is checked to decode in a venv holding only the base install
(tests/worker/test_pixel_data.py).
"""

from __future__ import annotations

import importlib.util
import threading

from pydicom import uid
from pydicom.pixels.decoders import JPEGExtended12BitDecoder
from pydicom.pixels.decoders.base import DecodeRunner

LABEL = "retinalgpt-imagecodecs"
DECODER_DEPENDENCIES = {uid.JPEGExtended12Bit: ("numpy", "imagecodecs")}
_lock = threading.Lock()
_registered: list[bool] = []


def is_available(tsyntax: uid.UID) -> bool:
    """pydicom plugin interface: whether this module can decode ``tsyntax`` here."""
    return tsyntax in DECODER_DEPENDENCIES and importlib.util.find_spec("imagecodecs") is not None


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """pydicom plugin interface: one JPEG Extended frame with 9–12-bit monochrome samples, as raw bytes."""
    import imagecodecs

    if runner.bits_stored <= 8:
        raise NotImplementedError("8-bit JPEG Extended is decoded by Pillow")
    if runner.samples_per_pixel != 1:
        raise NotImplementedError("12-bit colour JPEG Extended is not supported")
    pixels = imagecodecs.jpeg8_decode(src)
    runner.set_option("bits_allocated", 16)
    return pixels.astype("<u2", copy=False).tobytes()


def register() -> None:
    """Add the 12-bit JPEG Extended decoder to pydicom once per process (idempotent, thread-safe)."""
    with _lock:
        if not _registered:
            JPEGExtended12BitDecoder.add_plugin(LABEL, (__name__, "decode_frame"))
            _registered.append(True)


register()
