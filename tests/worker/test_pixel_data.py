"""Pixel data as analysed and shown: every transfer syntax the node accepts (dicom_node.sop.TRANSFER_SYNTAXES,
docs/conformance.md section 4) decodes with the permissively licensed handlers alone, and grey images keep
their stated grey scale (MONOCHROME1, more than 8 stored bits).

Files are encoded by independent tools: dcmtk (dcmconv, dcmcjpeg, dcmcjpls, dcmcrle) and, for JPEG 2000, which
dcmtk does not write, pydicom with pylibjpeg-openjpeg. Decoding runs in a real venv holding only the base
install (tests/support/base_install.py), where the GPL-licensed pylibjpeg-libjpeg is absent, so only the
permissively licensed decoders can answer (issue 19)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from dicom_node.sop import TRANSFER_SYNTAXES
from model.schema import Laterality
from tests.support.base_install import BaseVenv
from worker.pipeline.sources import ophthalmic_photograph, to_rgb8

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

#: transfer syntax -> (dcmtk tool and option, or None for pydicom's encoder; lossless?)
ENCODINGS = {
    ExplicitVRLittleEndian: (("/usr/bin/dcmconv", "+te"), True),
    ImplicitVRLittleEndian: (("/usr/bin/dcmconv", "+ti"), True),
    DeflatedExplicitVRLittleEndian: (("/usr/bin/dcmconv", "+td"), True),
    ExplicitVRBigEndian: (("/usr/bin/dcmconv", "+tb"), True),
    JPEGBaseline8Bit: (("/usr/bin/dcmcjpeg", "+eb"), False),
    JPEGExtended12Bit: (("/usr/bin/dcmcjpeg", "+ee"), False),
    JPEGLossless: (("/usr/bin/dcmcjpeg", "+el"), True),
    JPEGLosslessSV1: (("/usr/bin/dcmcjpeg", "+e1"), True),
    JPEGLSLossless: (("/usr/bin/dcmcjpls", "+el"), True),
    JPEGLSNearLossless: (("/usr/bin/dcmcjpls", "+en"), False),
    JPEG2000Lossless: (None, True),
    JPEG2000: (None, False),
    RLELossless: (("/usr/bin/dcmcrle",), True),
}

DECODE_IN_BASE_INSTALL = """
import json, sys, importlib.util
assert importlib.util.find_spec("libjpeg") is None, "pylibjpeg-libjpeg (GPLv3) is installed"
import numpy as np, pydicom
from worker.pipeline.sources import to_rgb8
out = {}
for path in sys.argv[2:]:
    rgb = to_rgb8(pydicom.dcmread(path))
    np.save(path + ".npy", rgb)
    out[path] = list(rgb.shape)
json.dump(out, open(sys.argv[1], "w"))
"""


def test_every_accepted_transfer_syntax_has_an_encoding_here() -> None:
    assert set(ENCODINGS) == set(TRANSFER_SYNTAXES)


def _rgb_source(retina: np.ndarray) -> Dataset:
    small = np.asarray(Image.fromarray(retina).resize((256, 256), Image.Resampling.LANCZOS))
    return ophthalmic_photograph(small, study_instance_uid=generate_uid(), series_instance_uid=generate_uid(),
                                 patient_id="PIX-1", patient_name="Pixel^Test", laterality=Laterality.RIGHT)


def _grey_source(bits_stored: int, pixels: np.ndarray, interpretation: str = "MONOCHROME2") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality, ds.ConversionType = "PIX-2", "Grey^Test", "OT", "WSD"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, interpretation, 0
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelData = pixels.astype(np.uint8 if bits_stored <= 8 else np.uint16).tobytes()
    return ds


def _encode(source: Path, syntax: str, out: Path) -> Path:
    tool, _ = ENCODINGS[syntax]
    if tool is None:
        ds = pydicom.dcmread(source)
        kwargs = {} if syntax == JPEG2000Lossless else {"j2k_cr": [15]}
        ds.compress(syntax, encoding_plugin="pylibjpeg", **kwargs)
        ds.save_as(out, enforce_file_format=True)
    else:
        run = subprocess.run([*tool, str(source), str(out)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
    assert str(pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    return out


def _decode_without_gpl(base_venv: BaseVenv, paths: list[Path], tmp_path: Path) -> dict[Path, np.ndarray]:
    report = tmp_path / "decoded.json"
    run = base_venv.run(DECODE_IN_BASE_INSTALL, str(report), *map(str, paths))
    assert run.returncode == 0, run.stderr[-3000:]
    assert set(json.loads(report.read_text())) == {str(p) for p in paths}
    return {p: np.load(f"{p}.npy") for p in paths}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory, retina_rgb: np.ndarray) -> dict[str, tuple[Path, Path]]:
    """Per transfer syntax: (uncompressed original, encoded copy) of an 8-bit RGB OP image."""
    folder = tmp_path_factory.mktemp("encoded")
    original = folder / "rgb.dcm"
    _rgb_source(retina_rgb).save_as(original, enforce_file_format=True)
    return {syntax: (original, _encode(original, syntax, folder / f"rgb-{syntax}.dcm")) for syntax in ENCODINGS}


def test_every_transfer_syntax_decodes_without_gpl_code(encoded, base_venv: BaseVenv, tmp_path: Path) -> None:
    decoded = _decode_without_gpl(base_venv, [path for _, path in encoded.values()], tmp_path)
    original = to_rgb8(pydicom.dcmread(next(iter(encoded.values()))[0]))
    for syntax, (_, path) in encoded.items():
        rgb = decoded[path]
        assert rgb.shape == original.shape, syntax
        difference = np.abs(rgb.astype(int) - original.astype(int))
        if ENCODINGS[syntax][1]:
            assert difference.max() == 0, f"{syntax.name} is lossless but differs"
        else:
            assert difference.mean() < 4.0, f"{syntax.name}: mean error {difference.mean():.2f}"


def test_twelve_bit_jpeg_decodes_without_gpl_code(base_venv: BaseVenv, tmp_path: Path) -> None:
    """JPEG Extended with 12 stored bits (Process 4), JPEG Lossless and JPEG-LS on 12-bit grey: what Pillow
    cannot decode, GDCM and pyjpegls must."""
    ramp = np.tile(np.linspace(0, 4095, 200).astype(np.uint16), (120, 1))
    original = tmp_path / "grey12.dcm"
    _grey_source(12, ramp).save_as(original, enforce_file_format=True)
    syntaxes = [JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless, JPEG2000Lossless]
    paths = [_encode(original, syntax, tmp_path / f"grey12-{syntax}.dcm") for syntax in syntaxes]
    expected = np.round(ramp * (255.0 / 4095)).astype(np.uint8)
    decoded = _decode_without_gpl(base_venv, paths, tmp_path)
    for syntax, path in zip(syntaxes, paths, strict=True):
        rgb = decoded[path]
        error = np.abs(rgb[..., 0].astype(int) - expected.astype(int))
        assert error.max() <= (2 if syntax == JPEGExtended12Bit else 0), syntax.name


def test_monochrome1_is_inverted_against_the_stored_bit_depth() -> None:
    """PS3.3 C.7.6.3.1.2: in MONOCHROME1 the minimum is white. A 12-bit image whose brightest stored value is
    1000 is inverted against 4095, not against 1000, so stored 0 is white and 1000 a light grey."""
    pixels = np.array([[0, 500], [1000, 1000]], dtype=np.uint16)
    rgb = to_rgb8(_grey_source(12, pixels, "MONOCHROME1"))
    assert rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[1, 0, 0] == round((4095 - 1000) * 255 / 4095)
    assert rgb[0, 1, 0] == round((4095 - 500) * 255 / 4095)


def test_monochrome1_eight_bit_keeps_its_grey_levels() -> None:
    pixels = np.array([[0, 100], [200, 200]], dtype=np.uint8)
    rgb = to_rgb8(_grey_source(8, pixels, "MONOCHROME1"))
    assert rgb[..., 0].tolist() == [[255, 155], [55, 55]]
