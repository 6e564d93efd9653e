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


def test_demo_summary_says_not_assessed_and_shows_measured_values_only(tmp_path: Path) -> None:
    """The demo's summary lists each condition the model was not trained on as "not assessed", an ungradable eye
    as not gradable, only measured values, and the disagreement as a flag without the model's number."""
    from rich.console import Console

    from model.schema import (
        Condition,
        Disagreement,
        Finding,
        ImageAnalysis,
        Laterality,
        Measurement,
        ModelIdentity,
        Quality,
        QualityGrade,
        Source,
        StudyAnalysis,
    )
    from worker.demo import DemoResult, print_summary

    right = ImageAnalysis(
        sop_instance_uid="1.2.3.1", laterality=Laterality.RIGHT,
        quality=Quality(grade=QualityGrade.GRADABLE, score=0.9),
        findings=[Finding(condition=Condition.DIABETIC_RETINOPATHY, grade=1, probability=0.6)],
        not_assessed=[Condition.CATARACT],
        measurements=[Measurement(key="CDR_vertical", value=0.41, unit="1"),
                      Measurement(key="CDR_vertical", value=0.566, unit="1", source=Source.MODEL)],
        disagreements=[Disagreement(key="CDR_vertical", model_value=0.566, measured_value=0.41, tolerance=0.1)],
    )
    left = ImageAnalysis(sop_instance_uid="1.2.3.2", laterality=Laterality.LEFT,
                         quality=Quality(grade=QualityGrade.REJECT, score=0.1), not_assessed=[Condition.CATARACT])
    model = ModelIdentity(name="RetinalGPT", version="t1", device_uid="2.25.1")
    analysis = StudyAnalysis(study_instance_uid="1.2.3", model=model, images=[right, left])
    console = Console(record=True, width=240)
    print_summary(DemoResult(tmp_path, "1.2.3", analysis, tmp_path / "results", tmp_path / "delivered"), console)
    out = console.export_text()
    assert [line for line in out.splitlines() if "cataract" in line and "not assessed" in line][0].startswith("│ R ")
    assert "Not gradable: no condition assessed" in out
    assert "0.410" in out and "0.566" not in out
    assert ("R: Quality flag: the model's estimate of vertical cup-to-disc ratio disagrees with the measured "
            "value 0.41") in out
