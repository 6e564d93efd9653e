"""``retinalgpt data export-feedback`` (issue 17 item 2): a study signed by a clinician with corrections (a DR
grade, one AI box right, one wrong, one missed lesion drawn, the referral) is exported, read back by the generic
adapter with the clinician's labels (ungraded conditions unknown, never absent), carries the AI's original answers
and no patient identifier, and goes through ``retinalgpt data build``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select
from typer.testing import CliRunner

from model.schema import Condition, LesionType
from tests.worker.delivery_world import World
from training.adapters import load_dataset
from training.records import LabelledBox
from worker.cli.app import app
from worker.config import ApiToken
from worker.db import Analysis
from worker.pipeline.sources import ophthalmic_photograph
from worker.signoff import SignOffRequest, sign

runner = CliRunner()
DESTINATION = 'name = "pacs"\nkind = "dicom"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
HAEM, EXUDATE, MISSED = (0.1, 0.1, 0.2, 0.2), (0.5, 0.5, 0.6, 0.6), (0.6, 0.3, 0.7, 0.4)
CLINICIAN = ApiToken(name="dr-smith", sha256="0" * 64, role="clinician", observer_name="Smith^Jane",
                     organisation="Eye Clinic")


@pytest.fixture
def signed(tmp_path: Path, retina_rgb: np.ndarray) -> World:
    world = World(tmp_path / "home", retina_rgb, DESTINATION)
    left = world.settings.home / "2.dcm"  # the left eye as a mirror image, so the two photographs differ
    stored = pydicom.dcmread(left)
    mirrored = ophthalmic_photograph(np.ascontiguousarray(stored.pixel_array[:, ::-1]),
                                     study_instance_uid=world.study_uid, series_instance_uid=world.series_uid,
                                     patient_id="P1", patient_name="Test^Patient", instance_number=2)
    stored.PixelData = mirrored.PixelData
    stored.save_as(left)
    with world.db.session() as session:  # the AI drew two boxes on the right eye and graded glaucoma on the left
        row = session.scalars(select(Analysis)).one()
        result = json.loads(json.dumps(row.result))
        result["images"][0]["lesions"] = [{"type": "haemorrhage", "box": list(HAEM), "score": 0.7},
                                          {"type": "hard_exudate", "box": list(EXUDATE), "score": 0.6}]
        result["images"][1]["findings"].append({"condition": "glaucoma", "grade": 0, "probability": 0.1})
        row.result = result
    right, _ = world.uids
    request = SignOffRequest(
        revision=1, decision="correct", referral="urgent",
        grades=[{"eye": "R", "condition": "diabetic_retinopathy", "grade": 3}],
        lesions=[{"sop_instance_uid": right, "index": 0, "verdict": "right"},
                 {"sop_instance_uid": right, "index": 1, "verdict": "wrong"}],
        missed=[{"sop_instance_uid": right, "type": "microaneurysm", "box": list(MISSED)}])
    with world.db.session() as session:
        sign(session, world.settings, world.study_uid, request, CLINICIAN, "api:dr-smith")
    return world


def _export(world: World, out: Path, *args: str):
    return runner.invoke(app, ["data", "export-feedback", "--since", "2020-01-01", "--out", str(out), "--json",
                               "--config", str(world.settings.home / "config.toml"), *args])


def test_export_feedback_round_trips_through_the_generic_adapter(signed: World, tmp_path: Path) -> None:
    out = tmp_path / "feedback"
    result = _export(signed, out)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"studies": 1, "images": 2, "skipped": []}

    records = {r.eye.value: r for r in load_dataset("generic", out)}
    assert set(records) == {"R", "L"}
    right, left = records["R"], records["L"]
    referable = Condition.REFERABLE_DIABETIC_RETINOPATHY  # derived from the DR grade by the records
    assert right.grades == {Condition.DIABETIC_RETINOPATHY: 3, referable: 1}  # the clinician's; glaucoma unknown
    assert left.grades == {Condition.DIABETIC_RETINOPATHY: 2, Condition.GLAUCOMA: 0, referable: 1}  # as the AI said
    assert right.lesions == {LesionType.HAEMORRHAGE: True, LesionType.MICROANEURYSM: True}  # never "absent"
    assert left.lesions == {} and not right.boxes_complete
    assert sorted(right.boxes, key=lambda b: b.label.value) == [
        LabelledBox(LesionType.HAEMORRHAGE, HAEM), LabelledBox(LesionType.MICROANEURYSM, MISSED)]
    assert right.patient == left.patient and right.patient not in (None, "P1")
    assert right.split == left.split and right.split in {"train", "test"}
    for record in records.values():
        assert Image.open(record.image).size == (128, 128) and record.image.suffix == ".png"

    rows = {r["eye"]: r for r in csv.DictReader((out / "labels.csv").open())}
    assert [rows["R"]["sop_instance_uid"], rows["L"]["sop_instance_uid"]] == signed.uids
    assert rows["R"]["ai_diabetic_retinopathy"] == "2" and rows["R"]["diabetic_retinopathy"] == "3"
    assert rows["R"]["glaucoma"] == "" and rows["R"]["diabetic_macular_edema"] == ""
    assert rows["R"]["referral"] == "urgent" and rows["R"]["ai_referral"] == "routine"
    assert json.loads(rows["R"]["lesions_right"]) == [{"label": "haemorrhage", "box": list(HAEM), "source": "model"}]
    assert json.loads(rows["R"]["lesions_wrong"]) == [{"label": "hard_exudate", "box": list(EXUDATE),
                                                       "source": "model"}]
    assert json.loads(rows["R"]["lesions_missed"]) == [{"label": "microaneurysm", "box": list(MISSED),
                                                        "source": "clinician"}]
    assert json.loads(rows["R"]["boxes"]) == [{"label": "haemorrhage", "box": list(HAEM), "source": "model"},
                                              {"label": "microaneurysm", "box": list(MISSED), "source": "clinician"}]
    assert {b["label"] for b in json.loads(rows["R"]["ai_boxes"])} == {"haemorrhage", "hard_exudate"}
    assert json.loads(rows["L"]["lesions_missed"]) == [] and rows["R"]["changed"] == "1"

    everything = (out / "labels.csv").read_text() + (out / "export.json").read_text() + " ".join(
        str(p.relative_to(out)) for p in out.rglob("*"))
    for identifier in ("P1", "Test^Patient", "ACC-7", signed.study_uid, signed.series_uid):
        assert identifier not in everything
    assert not any(uid in " ".join(p.name for p in out.rglob("*")) for uid in signed.uids)

    again = _export(signed, tmp_path / "again")  # the site key keeps the patient key stable across exports
    assert again.exit_code == 0, again.output
    assert {r.patient for r in load_dataset("generic", tmp_path / "again")} == {right.patient}


def test_exported_feedback_builds_instruction_data(signed: World, tmp_path: Path) -> None:
    out = tmp_path / "feedback"
    assert _export(signed, out, "--test-fraction", "0").exit_code == 0
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[data]\ndatasets = [{ kind = "generic", root = "feedback" }]\n[run]\noutput = "out"\n')
    result = runner.invoke(app, ["data", "build", str(recipe), "--out", str(tmp_path / "built"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["images_per_source"] == {"feedback": 2} and summary["conversations"] == 2
    items = json.loads((tmp_path / "built" / "instructions.json").read_text())
    texts = [" ".join(turn["value"] for turn in item["conversations"]) for item in items]
    (right,) = [t for t in texts if "Diabetic retinopathy: grade 3" in t]  # the clinician's grade, not the AI's 2
    assert "Glaucoma" not in right and "exudate" not in right.lower()  # unknown stays unasked, wrong box gone
    assert "Microaneurysm: [0.6000, 0.3000, 0.7000, 0.4000]" in right or "microaneurysm" in right.lower()


def test_export_feedback_since_and_errors(signed: World, tmp_path: Path) -> None:
    later = runner.invoke(app, ["data", "export-feedback", "--since", "2999-01-01", "--out", str(tmp_path / "none"),
                                "--json", "--config", str(signed.settings.home / "config.toml")])
    assert later.exit_code == 0 and json.loads(later.output)["images"] == 0
    assert list(csv.DictReader((tmp_path / "none" / "labels.csv").open())) == []
    bad_date = _export(signed, tmp_path / "x", "--since", "yesterday")
    assert bad_date.exit_code == 1 and "not a date" in bad_date.output
    assert _export(signed, tmp_path / "none").exit_code == 1  # never writes into a non-empty folder


def test_a_purged_original_is_skipped_and_named_without_identifiers(signed: World, tmp_path: Path) -> None:
    from worker.db import Instance, utcnow

    with signed.db.session() as session:
        session.scalars(select(Instance).where(Instance.sop_instance_uid == signed.uids[1])).one().purged_at = utcnow()
    result = _export(signed, tmp_path / "feedback")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["images"] == 1 and summary["studies"] == 1 and len(summary["skipped"]) == 1
    assert "purged" in summary["skipped"][0] and signed.uids[1] not in summary["skipped"][0]
    assert [r.eye.value for r in load_dataset("generic", tmp_path / "feedback")] == ["R"]


def test_a_re_signed_study_exports_the_latest_labels_and_the_first_ai_answers(signed: World, tmp_path: Path) -> None:
    right, _ = signed.uids
    jones = ApiToken(name="dr-jones", sha256="1" * 64, role="clinician", observer_name="Jones^Tom",
                     organisation="Eye Clinic")
    again = SignOffRequest(revision=2, decision="correct",  # revision 2 lists [haemorrhage, microaneurysm]
                           grades=[{"eye": "R", "condition": "diabetic_retinopathy", "grade": 4}],
                           lesions=[{"sop_instance_uid": right, "index": 0, "verdict": "wrong"},
                                    {"sop_instance_uid": right, "index": 1, "verdict": "right"}])
    with signed.db.session() as session:
        sign(session, signed.settings, signed.study_uid, again, jones, "api:dr-jones")
    result = _export(signed, tmp_path / "feedback")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["images"] == 2  # one study, its latest sign-off only
    rows = {r["eye"]: r for r in csv.DictReader((tmp_path / "feedback" / "labels.csv").open())}
    assert rows["R"]["diabetic_retinopathy"] == "4" and rows["R"]["ai_diabetic_retinopathy"] == "2"
    drawn = [{"label": "microaneurysm", "box": list(MISSED), "source": "clinician"}]  # by dr-smith, kept
    assert json.loads(rows["R"]["boxes"]) == drawn
    assert json.loads(rows["R"]["lesions_wrong"]) == [{"label": "haemorrhage", "box": list(HAEM), "source": "model"}]
    assert json.loads(rows["R"]["lesions_right"]) == []  # the box dr-jones confirmed is a clinician's, not the AI's
    assert json.loads(rows["R"]["lesions_missed"]) == drawn  # still a lesion the AI missed
    assert {b["label"] for b in json.loads(rows["R"]["ai_boxes"])} == {"haemorrhage", "hard_exudate"}
    assert rows["R"]["ai_referral"] == "routine" and rows["R"]["referral"] == "urgent"
    assert rows["R"]["haemorrhage"] == "" and rows["R"]["microaneurysm"] == "1"


def test_a_box_drawn_before_the_clinician_source_existed_is_still_a_clinician_label(signed: World,
                                                                                     tmp_path: Path) -> None:
    """A signed analysis stored with schema 1.1 has the drawn box under the default source (no ``source`` key):
    it still validates and the export still calls the box the clinician's (from the sign-off's changes)."""
    with signed.db.session() as session:
        row = session.scalars(select(Analysis).where(Analysis.revision == 2)).one()
        result = json.loads(json.dumps(row.result))
        assert result["images"][0]["lesions"][1]["source"] == "clinician"
        for lesion in result["images"][0]["lesions"]:
            del lesion["source"]
        result["schema_version"] = "1.1"
        row.result = result
    assert _export(signed, tmp_path / "feedback").exit_code == 0
    rows = {r["eye"]: r for r in csv.DictReader((tmp_path / "feedback" / "labels.csv").open())}
    assert json.loads(rows["R"]["lesions_missed"]) == [{"label": "microaneurysm", "box": list(MISSED),
                                                        "source": "clinician"}]
    assert [b["source"] for b in json.loads(rows["R"]["boxes"])] == ["model", "clinician"]
