"""Huge images (issue 18 item 13): bounded decoding for analysis, display and sending.

- an image over ``analysis.max_image_pixels`` gets a per-image "too large" result and is never decoded: the
  drill runs a real inference worker and measures its pool process's peak RSS;
- a large image under the limit is reduced at decode (JPEG by DCT scaling), with the same colours, and is
  reported at its stored size;
- the review page's PNG is bounded the same way.

The sender's streaming is in ``tests/dicom_node/test_node_limits.py``.
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid
from sqlalchemy import select

from model.schema import StudyAnalysis
from tests.dicom_node.dicom_fixtures import make_op
from tests.support.roles import Roles, wait_for
from worker.api.images import render_png
from worker.celery_app import make_celery
from worker.config import load_settings
from worker.db import Analysis, Database, Instance, Job, JobState, Series, Study, StudyState
from worker.db.migrate import upgrade
from worker.pipeline.jobs import Pipeline
from worker.pipeline.sources import DecodeLimits, ImageTooLarge, load_dicom, ophthalmic_photograph
from worker.pipeline.study import _to_stored_size

MIB = 1 << 20
OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


def jpeg_op(folder: Path, name: str, rgb: np.ndarray | None = None, size: tuple[int, int] = (0, 0),
            **keys: str) -> Path:
    """A JPEG Baseline OP instance made by dcmtk's ``img2dcm -oph``."""
    image = Image.fromarray(rgb) if rgb is not None else Image.new("RGB", size, (120, 40, 20))
    jpeg = folder / f"{name}.jpg"
    image.save(jpeg, quality=90)
    return make_op(jpeg, folder / f"{name}.dcm", **keys)


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory) -> Path:
    """8192 × 8192 RGB: 201 MB once decoded."""
    return jpeg_op(tmp_path_factory.mktemp("huge"), "huge", size=(8192, 8192))


@pytest.fixture
def large_retina(tmp_path: Path, retina_rgb: np.ndarray) -> Path:
    big = np.asarray(Image.fromarray(retina_rgb).resize((3000, 2000), Image.Resampling.LANCZOS))
    return jpeg_op(tmp_path, "large", big)


def test_large_jpeg_is_reduced_at_decode_with_the_same_colours(large_retina: Path) -> None:
    source = load_dicom(large_retina, DecodeLimits(max_pixels=50_000_000, max_side=1024))
    assert max(source.rgb.shape[:2]) <= 1024 and source.original_size == (2000, 3000)
    full = pydicom.dcmread(large_retina).pixel_array
    reference = np.asarray(Image.fromarray(full).resize(source.rgb.shape[1::-1], Image.Resampling.BOX))
    assert np.abs(reference.astype(int) - source.rgb.astype(int)).mean() < 3
    assert source.scale == pytest.approx(source.rgb.shape[1] / 3000)


def test_reduced_image_is_reported_at_its_stored_size(large_retina: Path) -> None:
    from model.schema import ImageAnalysis

    source = load_dicom(large_retina, DecodeLimits(max_pixels=50_000_000, max_side=1024))
    h, w = source.rgb.shape[:2]
    image = ImageAnalysis(sop_instance_uid="1.2.3", width=w, height=h, pixel_spacing_um=10.0)
    mask = _to_stored_size(source, image, np.ones((h, w), dtype=bool))
    assert (image.width, image.height) == (3000, 2000) and mask.shape == (2000, 3000)
    assert image.pixel_spacing_um == pytest.approx(10.0 * w / 3000)


def test_too_large_image_is_refused_before_decoding(huge_jpeg: Path) -> None:
    with pytest.raises(ImageTooLarge, match=r"image too large: 8192 × 8192 = 67.1 megapixels"):
        load_dicom(huge_jpeg, DecodeLimits(max_pixels=50_000_000, max_side=4096))
    with pytest.raises(ImageTooLarge):
        render_png(huge_jpeg, 4096, 50_000_000)


def test_review_png_is_decoded_at_the_requested_size(large_retina: Path) -> None:
    png = render_png(large_retina, 512, 50_000_000)
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (512, 341)


def _memory(pid: int) -> dict[str, int]:
    """The process's resident set now (VmRSS) and at its peak (VmHWM), in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


def _peak_growth(pid: int, run: Callable[[], None]) -> int:
    """How far the process's resident set rose above where it stood while ``run`` ran: the peak is reset
    first (``/proc/PID/clear_refs`` 5, Linux 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    start = _memory(pid)["VmRSS"]
    run()
    return _memory(pid)["VmHWM"] - start


def test_too_large_image_gets_a_per_image_result_with_the_worker_memory_bounded(
        tmp_path: Path, retina_rgb: np.ndarray, huge_jpeg: Path) -> None:
    """Drill with a real inference worker: a study with an 8192² image and a normal one is analysed from the
    normal one; the huge one is a 'too large' note. The pool process's peak while it analyses that study rises
    no more than while it analyses the normal image alone (decoding the huge one would add 192 MiB)."""
    config = tmp_path / "config.toml"
    config.write_text(f'home = "{tmp_path / "home"}"\n[model]\nenabled = false\n')
    settings = load_settings(config)
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    small = np.asarray(Image.fromarray(retina_rgb).resize((512, 512), Image.Resampling.LANCZOS))

    def study(files: list[Path]) -> str:
        uid = generate_uid()
        with db.session() as session:
            row = Study(study_instance_uid=uid, state=StudyState.COMPLETE, patient_id="P1")
            session.add(row)
            session.flush()
            series = Series(study_id=row.id, series_instance_uid=generate_uid(), modality="OP")
            session.add(series)
            session.flush()
            for number, path in enumerate(files, 1):
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                session.add(Instance(study_id=row.id, series_id=series.id, sop_instance_uid=str(ds.SOPInstanceUID),
                                     sop_class_uid=OP_8BIT, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                                     instance_number=number, path=str(path), size_bytes=path.stat().st_size,
                                     sha256="0" * 64, calling_ae_title="CAMERA1", peer_host="127.0.0.1",
                                     revision=1, analysable=True))
        return uid

    def normal(name: str) -> Path:
        ds = ophthalmic_photograph(small, study_instance_uid=generate_uid(), series_instance_uid=generate_uid(),
                                   patient_id="P1", patient_name="Big^Eye")
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    pipeline = Pipeline(settings, db, make_celery(settings))
    roles = Roles(config, tmp_path / "logs")
    worker = roles.start("inference", "worker", "--queues", "inference")

    def state(job_id: int) -> JobState:
        with db.reading() as session:
            return session.get(Job, job_id).state

    def analyse(files: list[Path]) -> tuple[str, int]:
        uid = study(files)
        job = pipeline.enqueue(uid, 1, actor="drill")
        wait_for(lambda: state(job) in (JobState.SUCCEEDED, JobState.DEAD, JobState.FAILED), 240,
                 f"the study of {[f.name for f in files]}", diagnostics=lambda: roles.log("inference"))
        return uid, job

    try:
        analyse([normal("warm")])
        child = int(subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()[0])
        alone = _peak_growth(child, lambda: analyse([normal("alone")]))
        result: list[tuple[str, int]] = []
        with_huge = _peak_growth(child, lambda: result.append(analyse([huge_jpeg, normal("eye")])))
        (uid, job), = result
    finally:
        roles.stop_all()
    print(f"pool process peak rise: +{alone / MIB:.1f} MiB for a normal image, +{with_huge / MIB:.1f} MiB for it "
          f"with the 8192² image")
    assert with_huge - alone < 64 * MIB, f"the 8192² image added {(with_huge - alone) / MIB:.0f} MiB"
    assert state(job) == JobState.SUCCEEDED
    with db.reading() as session:
        analysis = StudyAnalysis.model_validate(session.scalars(select(Analysis.result).join(Study)
                                                                .where(Study.study_instance_uid == uid)).one())
    assert len(analysis.images) == 1
    (note,) = [n for n in analysis.notes if "too large" in n]
    assert str(huge_jpeg) in note and "8192 × 8192 = 67.1 megapixels" in note
    db.dispose()
