"""Measurement pipeline speed (issue 3 target: ≤ 3 s per 768-px image on 2 CPU cores; issue 13: still so with
the bundled RetinalGPT) and, with ``--validation``, its validation figures on ../shared/data/fundus.

Speed: seconds per image for the whole pipeline (framing, vessels, quality, disc/cup/fovea, segments, A/V,
all features, overlay), then the same plus the bundled model's whole protocol (``--model DIR`` for another,
``--no-model`` to leave it out), on 768-px photographs (skimage's retina and, when ../shared is present, HEI-MED and
CODRAS images), median of ``--repeat`` runs, for the network and the classical vessel method. Reference in the
same run: decoding the JPEG and resizing it to 768 px with Pillow (the unavoidable work).

Validation: DRIVE test Dice/AUC (1st observer, inside the FOV) for both vessel methods, CODRAS test optic-disc
localisation rate (centre inside the ground-truth box), ODOC vertical-CDR mean absolute error.

Run: ``nice -n 10 .venv/bin/python bench/measure.py [--repeat 3] [--threads 2] [--validation]``
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fundus"


def images() -> list[np.ndarray]:
    out = [np.asarray(Image.fromarray(data.retina()).resize((768, 768), Image.Resampling.LANCZOS))]
    for rel in ("HEI-MED/images/00000003.jpg", "CODRAS/images/0001.jpg"):
        if (SHARED / rel).is_file():
            out.append(np.asarray(Image.open(SHARED / rel).convert("RGB")))
    return out


def timed(fn, repeat: int) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds of this process (all threads) over ``repeat`` calls; on a
    shared machine the CPU time is the comparable figure, the wall time depends on the load."""
    walls, cpus = [], []
    for _ in range(repeat):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


BUNDLED = Path(__file__).resolve().parents[1] / "model" / "bundled" / "retinalgpt-tiny"


def speed(repeat: int, model: Path | None) -> None:
    from model.analysis import AnalysisOptions, MeasurementPipeline

    pics = images()
    encoded = []
    for rgb in pics:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
        encoded.append(buf.getvalue())

    def reference() -> None:
        for blob in encoded:
            Image.open(io.BytesIO(blob)).convert("RGB").resize(
                (768, 768), Image.Resampling.BILINEAR
            ).tobytes()

    ref = timed(reference, repeat)[0] / len(pics)
    print(
        f"{len(pics)} images, median of {repeat}; reference (JPEG decode + resize): {ref * 1000:.1f} ms/image"
    )
    print(f"{'vessel method':<12} {'wall s/image':>12} {'CPU s/image':>12} {'wall x reference':>17}")
    for method in ("network", "classical"):
        pipeline = MeasurementPipeline(AnalysisOptions(vessel_method=method))

        def run(p: MeasurementPipeline = pipeline) -> None:
            for rgb in pics:
                p.analyze(rgb, file_path="bench").overlay()

        run()  # warm-up (first-call allocations, torch kernels)
        wall, cpu = (v / len(pics) for v in timed(run, repeat))
        print(f"{method:<12} {wall:>12.2f} {cpu:>12.2f} {wall / ref:>17.0f}")
    if model is None:
        return
    from model.engine import EngineOptions, RetinalGPTEngine

    engine = RetinalGPTEngine.load(model, EngineOptions())
    pipeline = MeasurementPipeline(AnalysisOptions(vessel_method="network"))

    def whole(p: MeasurementPipeline = pipeline) -> None:
        for rgb in pics:
            p.analyze(rgb, file_path="bench").overlay()
            engine.analyze([rgb])

    whole()
    wall, cpu = (v / len(pics) for v in timed(whole, repeat))
    label = f"network + {engine.metadata.name} {engine.metadata.version}"
    print(f"{label}: {wall:.2f} s/image wall, {cpu:.2f} s/image CPU, {wall / ref:.0f} x reference")


def validation() -> None:
    from model.analysis.disc import locate_disc, segment_disc_cup
    from model.analysis.evaluation import drive_metrics, drive_samples
    from model.analysis.fov import frame
    from model.analysis.vessels import ClassicalVessels, NetworkVessels

    drive = drive_samples(SHARED / "DRIVE", "test")
    for name, segmenter in (("network", NetworkVessels()), ("classical", ClassicalVessels())):
        m = drive_metrics(segmenter, drive)
        print(
            f"DRIVE test {name}: Dice {m.dice:.4f} AUC {m.auc:.4f} acc {m.accuracy:.4f} "
            f"sens {m.sensitivity:.4f} spec {m.specificity:.4f}"
        )
    import csv

    segmenter = NetworkVessels()
    hits = total = 0
    root = SHARED / "CODRAS"
    for row in csv.DictReader((root / "manifest.csv").open()):
        label = root / row["yolo_labels"]
        if row["split"] != "test" or not label.is_file():
            continue
        boxes = [b.split() for b in label.read_text().splitlines() if b.startswith("0 ")]
        if not boxes:
            continue
        cx, cy, bw, bh = map(float, boxes[0][1:5])
        rgb = np.asarray(Image.open(root / row["file"]).convert("RGB"))
        work = frame(rgb, 384)
        _, vessels = segmenter.segment(work.rgb, work.fov, work.fov_diameter_px)
        loc = locate_disc(work.rgb, work.fov, vessels, work.fov_diameter_px)
        sx, sy = work.framing.to_source(loc.x, loc.y)
        h, w = rgb.shape[:2]
        hits += abs(float(sx) / w - cx) <= bw / 2 and abs(float(sy) / h - cy) <= bh / 2
        total += 1
    print(f"CODRAS test disc localisation: {hits}/{total} = {hits / total:.3f}")
    errors = []
    root = SHARED / "ODOC_samples"
    for row in csv.DictReader((root / "manifest.csv").open()):
        rgb = np.asarray(Image.open(root / row["file"]).convert("RGB")).astype(np.float32) / 255
        h, w = rgb.shape[:2]
        result = segment_disc_cup(rgb, w / 2, h / 2, 0.25 * min(h, w))
        errors.append(abs(result.cdr_vertical - float(row["vertical_cdr"])))
    print(f"ODOC vertical CDR: MAE {np.mean(errors):.3f}, max {np.max(errors):.3f} (n={len(errors)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch intra-op threads (2 = the target machine)"
    )
    parser.add_argument("--validation", action="store_true", help="also compute the validation figures")
    parser.add_argument("--model", type=Path, default=BUNDLED, help="RetinalGPT model directory timed with the "
                        "network pipeline (the whole per-image analysis of a worker)")
    parser.add_argument("--no-model", dest="model", action="store_const", const=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    speed(args.repeat, args.model)
    if args.validation:
        validation()


if __name__ == "__main__":
    main()
