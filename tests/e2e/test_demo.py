"""`retinalgpt demo` runs the main job end to end and writes the objects it names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("e2e")]


def test_demo_exits_zero_and_writes_its_objects(tmp_path: Path) -> None:
    home = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-c", "from worker.cli.app import main; main()", "demo",
                             "--home", str(home), "--timeout", "600"], capture_output=True, text=True, timeout=800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "referral:" in out and "impression:" in out
    results = sorted((home / "results").glob("*/r1"))
    assert len(results) == 1
    folder = results[0]
    for name in ("sr.dcm", "key-image-1.dcm", "key-image-2.dcm", "report.pdf", "fhir-bundle.json", "analysis.json"):
        assert (folder / name).is_file(), name
        assert name in out
    assert pydicom.dcmread(folder / "sr.dcm").Modality == "SR"
    delivered = home / "delivered" / folder.parent.name / "r1"
    assert (delivered / "sr.dcm").read_bytes() == (folder / "sr.dcm").read_bytes()
