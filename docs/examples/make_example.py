"""Regenerate the examples of docs/results.md: ``.venv/bin/python docs/examples/make_example.py``.

Builds the result objects of the test analysis (tests/reporting/reporting_fixtures.py: one right-eye OP image
made from skimage's retina photograph, reduced to a few findings and measurements) and writes
``sr-dump.txt`` (dcmtk ``dsrdump +Pc``) and ``fhir-bundle.json`` (PDF bytes shortened) next to this file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from skimage import data

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests" / "reporting"))

from reporting_fixtures import make_analysis, make_source  # noqa: E402

from reporting import ReportOptions, build_report_objects  # noqa: E402

STUDY = "1.2.826.0.1.3680043.8.498.10000000000000000000000000000000001"
SERIES = "1.2.826.0.1.3680043.8.498.10000000000000000000000000000000002"
IMAGE = "1.2.826.0.1.3680043.8.498.10000000000000000000000000000000003"


def main() -> None:
    source = make_source("op8", data.retina(), STUDY, SERIES, "R", 1)
    source.SOPInstanceUID = IMAGE
    analysis = make_analysis([source])
    image = analysis.images[0]
    keep = {"Fractal_dimension", "CRAE_Knudtson_zone_c", "Artery_Vessel_density_zone_b", "CDR_vertical"}
    image.measurements = [m for m in image.measurements if m.key in keep]
    image.findings = image.findings[:2]
    image.landmarks = image.landmarks[:1]
    image.landmarks[0].contour = image.landmarks[0].contour[::4]
    image.lesions = image.lesions[:1]
    objects = build_report_objects(analysis, [source], ReportOptions(key_image=False))
    with tempfile.TemporaryDirectory() as tmp:
        sr_file = Path(tmp) / "sr.dcm"
        objects.sr.save_as(sr_file, enforce_file_format=True)
        dump = subprocess.run(
            ["/usr/bin/dsrdump", "+Pc", str(sr_file)], capture_output=True, text=True, check=True
        )
    (HERE / "sr-dump.txt").write_text(dump.stdout)
    for entry in objects.fhir_bundle["entry"]:
        for form in entry["resource"].get("presentedForm", []):
            form["data"] = form["data"][:24] + "..."
    (HERE / "fhir-bundle.json").write_text(
        json.dumps(objects.fhir_bundle, indent=1, ensure_ascii=False) + "\n"
    )


if __name__ == "__main__":
    main()
