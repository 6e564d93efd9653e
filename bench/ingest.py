"""Ingest benchmark: our DICOM node against dcmtk's storescp, both fed by dcmtk's storescu.

Sends the same N Ophthalmic Photography files (uncompressed RGB, about 0.5 MB each, made from real fundus
photographs: ../shared/data/fundus when present, else scikit-image's retina) over one association and over
four parallel associations, to ``storescp`` and to our node (listener + SQLite database, exactly as
``retinalgpt node`` records them), and prints images/s and the ratio node/storescp. Runs are interleaved and
repeated; the median is reported. storescp does not fsync; our node is measured with fsync (the durable
default) and without it (like for like). Last, the durability steps are timed alone (no network) to show the
ratio they leave any receiver that answers Success only after them.

    .venv/bin/python bench/ingest.py [--count 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

STORESCU, STORESCP, IMG2DCM = "/usr/bin/storescu", "/usr/bin/storescp", "/usr/bin/img2dcm"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
SHARED_FUNDUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "fundus"
SIDE = 416  # 416 × 416 × 3 bytes ≈ 0.52 MB of pixel data


def fundus_images(count: int) -> list[np.ndarray]:
    """``count`` RGB fundus photographs resized to SIDE × SIDE."""
    sources = sorted(SHARED_FUNDUS.glob("*/images/*.jpg"))[:count] if SHARED_FUNDUS.is_dir() else []
    images = [np.asarray(Image.open(p).convert("RGB").resize((SIDE, SIDE))) for p in sources]
    if len(images) < count:
        from skimage import data

        retina = Image.fromarray(data.retina())
        for i in range(count - len(images)):
            images.append(np.asarray(retina.rotate(i * 360 / count).resize((SIDE, SIDE))))
    return images


def make_files(folder: Path, count: int) -> list[Path]:
    """OP 8-bit images (PS3.3 A.39) from an ``img2dcm -oph`` template, pixel data replaced, 10 per study."""
    images = fundus_images(count)
    jpeg = folder / "template.jpg"
    Image.fromarray(images[0]).save(jpeg)
    template_path = folder / "template.dcm"
    subprocess.run(
        [IMG2DCM, "-oph", "-k", "ImageLaterality=R", "-k", "AcquisitionDeviceTypeCodeSequence[0].CodeValue=409899009",
         "-k", "AcquisitionDeviceTypeCodeSequence[0].CodingSchemeDesignator=SCT",
         "-k", "AcquisitionDeviceTypeCodeSequence[0].CodeMeaning=Fundus camera", str(jpeg), str(template_path)],
        check=True, capture_output=True,
    )
    template = dcmread(template_path)
    files = []
    for index, rgb in enumerate(images):
        ds = template.copy()
        if index % 10 == 0:
            study_uid, series_uid = generate_uid(), generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = index + 1
        ds.Rows, ds.Columns = rgb.shape[:2]
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.PixelData = np.ascontiguousarray(rgb).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"op{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def send(port: int, called: str, files: list[Path], associations: int) -> float:
    """Seconds for ``associations`` parallel storescu processes to send ``files`` between them."""
    batches = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    processes = [
        subprocess.Popen([STORESCU, "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port), *map(str, batch)],
                         env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for batch in batches
    ]
    errors = [p.communicate()[1] for p in processes]
    elapsed = time.perf_counter() - start
    if any(p.returncode for p in processes):
        raise RuntimeError(f"storescu failed: {[e.decode()[-300:] for e in errors if e]}")
    return elapsed


def images_per_second(server: list[str], port: int, called: str, files: list[Path], associations: int,
                      env: dict[str, str] | None = None) -> float:
    """Start the receiver ``server`` (a command listening on ``port``), send ``files`` to it, stop it."""
    process = subprocess.Popen(server, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        elapsed = send(port, called, files, associations)
    finally:
        process.terminate()
        process.wait()
    return len(files) / elapsed


def run_storescp(work: Path, files: list[Path], associations: int) -> float:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    rate = images_per_second([STORESCP, "--fork", "-aet", "STORESCP", "-od", str(out), str(port)], port, "STORESCP",
                             files, associations, env=DCMTK_ENV)
    assert len(list(out.iterdir())) == len(files)
    return rate


def run_node(work: Path, files: list[Path], associations: int, fsync: bool) -> float:
    from worker.config import load_settings
    from worker.db.migrate import upgrade
    from worker.ingest import start_node

    port = free_port()
    settings = load_settings(
        None,
        home=work / "node",
        dicom={"port": port, "bind_address": "127.0.0.1", "allowed_callers": [{"ae_title": "STORESCU"}],
               "stable_seconds": 3600, "max_wait_seconds": 3600},
        storage={"fsync": fsync},
    )
    upgrade(settings.database.url)
    node = start_node(settings)
    try:
        elapsed = send(port, settings.dicom.ae_title, files, associations)
    finally:
        node.stop()
    assert len(list(settings.storage.path.rglob("*.dcm"))) == len(files)
    return len(files) / elapsed


def write_ms(work: Path, files: list[Path], durable: bool) -> float:
    """Median milliseconds to store one image with no network and no DICOM, through the node's
    :class:`~dicom_node.storage.InstanceStore`. Durable: temp file, fsync, rename, directory fsync, then one row
    committed to a SQLite database opened as the node opens it (WAL, ``synchronous=FULL``). Not durable: temp
    file and rename only, all storescp does."""
    from sqlalchemy import text

    from dicom_node.storage import InstanceStore
    from worker.db.session import make_engine

    store = InstanceStore(work / "instances", fsync=durable)
    engine = make_engine(f"sqlite:///{work / 'instances.db'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE instance (path TEXT, sha256 TEXT)"))
    times = []
    for number, path in enumerate(files):
        dataset = path.read_bytes()
        start = time.perf_counter()
        temp, digest = store.write_temp(b"", dataset)
        final = store.path_for("1.2", "1.2.3", f"1.2.3.{number}")
        store.commit(temp, final)
        if durable:
            with engine.begin() as connection:
                connection.execute(text("INSERT INTO instance VALUES (:path, :sha256)"),
                                   {"path": str(final), "sha256": digest})
        times.append(time.perf_counter() - start)
    engine.dispose()
    return statistics.median(times) * 1e3


def in_fresh_folder(root: Path, run: Callable[[Path], float]) -> float:
    work = Path(tempfile.mkdtemp(dir=root))
    try:
        return run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


Receiver = Callable[..., float]
"""``run(work, files=…, associations=…, fsync=…) -> images/s`` of a receiver under test."""


def compare_with_storescp(count: int, repeat: int, label: str, receiver: Receiver) -> None:
    """Print images/s of storescp and of ``receiver`` (with and without fsync), one and four associations, runs
    interleaved so that machine load hits all three alike, medians of ``repeat``; then what durable storage
    alone costs per image and the ratio to storescp that this cost leaves on one association."""
    with tempfile.TemporaryDirectory(prefix="ingest-bench-", dir=Path(__file__).resolve().parent) as tmp:
        root = Path(tmp)
        files = make_files(root, count)
        size = statistics.mean(p.stat().st_size for p in files) / 1e6
        source = "../shared/data/fundus" if SHARED_FUNDUS.is_dir() else "skimage.data.retina()"
        print(f"{len(files)} OP files, {size:.2f} MB each on average, from {source}; median of {repeat} runs")
        print(f"{'associations':>12} {'storescp img/s':>15} {label + ' img/s':>12} {'ratio':>6} "
              f"{label + ' no-fsync img/s':>21} {'ratio':>6}")
        single_association_ms, durability_ms = 0.0, []
        for associations in (1, 4):
            reference, durable, unsynced = [], [], []
            for _ in range(repeat):
                if associations == 1:
                    durability_ms.append(in_fresh_folder(root, partial(write_ms, files=files, durable=True))
                                         - in_fresh_folder(root, partial(write_ms, files=files, durable=False)))
                reference.append(in_fresh_folder(root, partial(run_storescp, files=files, associations=associations)))
                durable.append(in_fresh_folder(root, partial(receiver, files=files, associations=associations,
                                                             fsync=True)))
                unsynced.append(in_fresh_folder(root, partial(receiver, files=files, associations=associations,
                                                              fsync=False)))
            ref, synced, fast = (statistics.median(x) for x in (reference, durable, unsynced))
            print(f"{associations:>12} {ref:>15.1f} {synced:>12.1f} {synced / ref:>6.2f} {fast:>21.1f} "
                  f"{fast / ref:>6.2f}")
            if associations == 1:
                single_association_ms = 1e3 / ref
        extra = statistics.median(durability_ms)
        print(f"Durability alone (fsync of file and directory, database commit; no network) adds {extra:.2f} ms per "
              f"image to writing it; storescp takes {single_association_ms:.2f} ms per image on one association.\n"
              f"storescu sends the next image only after Success, so a receiver that answers after a durable write "
              f"needs about both: ceiling ≈ {single_association_ms / (single_association_ms + extra):.2f}× storescp.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    compare_with_storescp(args.count, args.repeat, "node", run_node)


if __name__ == "__main__":
    main()
