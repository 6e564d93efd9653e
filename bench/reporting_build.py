"""How long building the result objects of one study takes, per object kind.

A study is two OP 8-bit images (right and left eye, 1024 × 1024, from skimage's retina photograph) with the
realistic analysis of tests/reporting. The reference is writing and reading back the two source instances with
pydicom (the I/O a delivery does anyway); every figure is also printed as a ratio to it.

    .venv/bin/python bench/reporting_build.py [--repeat 5] [--size 1024]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reporting"))

import reporting_fixtures  # noqa: E402
from reporting_fixtures import make_analysis, make_source  # noqa: E402

from reporting import ReportOptions, build_report_objects  # noqa: E402
from reporting.fhir.bundle import build_bundle  # noqa: E402
from reporting.sr.sop import build_sr  # noqa: E402


def timed(work: Callable[[], object], repeat: int) -> float:
    work()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    reporting_fixtures.SIZE = args.size
    study, series = generate_uid(), generate_uid()
    sources = [make_source("op8", data.retina(), study, series, side, n) for n, side in enumerate("RL", 1)]
    analysis = make_analysis(sources)
    masks = {str(ds.SOPInstanceUID): ds.pixel_array[..., 1] < 60 for ds in sources}

    def io_reference() -> None:
        for ds in sources:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            buffer.seek(0)
            pydicom.dcmread(buffer).pixel_array

    none = ReportOptions(key_image=False, pdf=False)
    cases = {
        "SR only": lambda: build_sr(analysis, sources, none),
        "FHIR Bundle only": lambda: build_bundle(analysis, sources),
        "SR + FHIR": lambda: build_report_objects(analysis, sources, none),
        "SR + FHIR + key images + PDF": lambda: build_report_objects(analysis, sources, ReportOptions()),
        "all incl. SEG": lambda: build_report_objects(
            analysis, sources, ReportOptions(segmentation=True), vessel_masks=masks
        ),
    }
    reference = timed(io_reference, args.repeat)
    print(f"study: 2 OP images {args.size}x{args.size}, median of {args.repeat}")
    print(f"{'reference: write + read 2 sources':38s} {reference * 1000:8.1f} ms   1.00x")
    for name, work in cases.items():
        seconds = timed(work, args.repeat)
        print(f"{name:38s} {seconds * 1000:8.1f} ms {seconds / reference:6.2f}x")


if __name__ == "__main__":
    main()
