"""Instruction data: generated conversations read back through the runtime's parsers to their labels."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model import protocol
from model.protocol import ImageLabels, Task
from model.schema import Condition, LesionType
from training import instructions as inst
from training.adapters import load_dataset
from training.llm import EndpointOptions, LLMQuestionWriter
from training.records import LabelledBox, Record


def _image(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return path


def _records(tmp_path: Path) -> list[Record]:
    return [
        Record(image=_image(tmp_path / "a.png", 1), dataset="d1", record_id="a", split="train",
               grades={Condition.DIABETIC_RETINOPATHY: 3, Condition.DIABETIC_MACULAR_EDEMA: 1},
               lesions={LesionType.HAEMORRHAGE: True, LesionType.HARD_EXUDATE: False},
               boxes=[LabelledBox(LesionType.HAEMORRHAGE, (0.1, 0.2, 0.15, 0.26)),
                      LabelledBox(LesionType.HAEMORRHAGE, (0.5, 0.5, 0.6, 0.62))]),
        Record(image=_image(tmp_path / "b.png", 2), dataset="d2", record_id="b", split="train",
               grades={Condition.GLAUCOMA: 1, Condition.CATARACT: 0}),
        Record(image=_image(tmp_path / "c.png", 3), dataset="d2", record_id="c", split="test",
               grades={Condition.PATHOLOGIC_MYOPIA: 1}),
    ]


def _check_round_trip(record: Record, item: dict, labels: ImageLabels) -> int:
    """Every answer of ``item`` parses back to exactly what ``labels`` say; returns the turns checked."""
    canonical = labels.canonical()
    pairs = list(zip(item["conversations"][0::2], item["conversations"][1::2], strict=True))
    assert pairs[0][0]["value"].startswith(protocol.IMAGE_TOKEN + "\n")
    for kind, (_, gpt) in zip(item["tasks"], pairs, strict=True):
        parsed = inst.parse_turn(kind, gpt["value"])
        if kind == Task.DISEASE_GRADE.value:
            assert parsed.ok and dict(parsed.findings) == dict(canonical.findings)
        elif kind == Task.LESIONS.value:
            assert parsed.ok and parsed.lesions == canonical.lesions
        elif kind == Task.VASCULAR.value:
            assert parsed.ok and dict(parsed.measurements) == dict(canonical.measurements)
        elif kind == Task.MODALITY_QUALITY.value:
            assert parsed.ok and parsed.modality == canonical.modality and parsed.quality == canonical.quality
        elif kind.startswith("condition:"):
            condition = Condition(kind.split(":", 1)[1])
            assert parsed.ok and dict(parsed.findings) == {condition: canonical.findings[condition]}
        elif kind == "lesion:any":
            assert parsed is record.any_lesion()
        else:
            assert parsed is record.lesions[LesionType(kind.split(":", 1)[1])]
    return len(pairs)


def test_round_trip_through_runtime_parsers(tmp_path: Path) -> None:
    records = _records(tmp_path)
    features = {"Fractal_dimension": 1.48312, "Vessel_density": 0.0912, "CDR_vertical": 0.4, "Disc_width": 77.0}

    def measured(record: Record):  # noqa: ANN202
        return (features, None) if record.record_id == "a" else (None, None)

    built = inst.build(records, features=measured)
    assert len(built.instructions) == 2
    by_id = {item["id"]: item for item in built.instructions}
    labels_a = inst.hidden_description(records[0], features)
    assert set(labels_a.measurements) == {"Fractal_dimension", "Vessel_density", "CDR_vertical"}
    turns = _check_round_trip(records[0], by_id["d1/a"], labels_a)
    assert 4 <= turns <= 6 and {"modality_quality", "disease_grade", "vascular", "lesions"} <= set(by_id["d1/a"]["tasks"])
    assert 3 <= _check_round_trip(records[1], by_id["d2/b"], inst.hidden_description(records[1])) <= 6
    assert "d2/c" not in by_id  # test split is not built for training
    assert built.counts == {"d1": 1, "d2": 1}
    assert {item["id"] for item in built.alignment} == {"d1/a", "d2/b"}
    caption = {item["id"]: item for item in built.alignment}["d2/b"]["conversations"][1]["value"]
    assert caption == "This is a colour fundus photograph.\nGlaucoma: present.\nCataract: absent."


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    records = _records(tmp_path)
    assert inst.build(records).instructions == inst.build(records).instructions
    questions = {json.dumps(inst.build(records, inst.BuildOptions(seed=s)).instructions) for s in range(6)}
    assert len(questions) > 1


def test_dedup_merges_labels_and_refuses_evaluation_only(tmp_path: Path) -> None:
    image = _image(tmp_path / "same.png", 7)
    copy = tmp_path / "copy.png"
    copy.write_bytes(image.read_bytes())
    first = Record(image=image, dataset="grading", record_id="x", split="train", grades={Condition.DIABETIC_RETINOPATHY: 2})
    second = Record(image=copy, dataset="boxes", record_id="y", split="train", lesions={LesionType.HARD_EXUDATE: True},
                    boxes=[LabelledBox(LesionType.HARD_EXUDATE, (0.1, 0.1, 0.2, 0.2))])
    external = Record(image=_image(tmp_path / "ext.png", 9), dataset="eyepacs_kaggle_dr", record_id="z", split="train",
                      grades={Condition.DIABETIC_RETINOPATHY: 0}, evaluation_only=True)
    built = inst.build([first, second, external])
    assert built.duplicates == 1 and built.refused == {"eyepacs_kaggle_dr": 1}
    (item,) = built.instructions
    assert "lesions" in item["tasks"] and "disease_grade" in item["tasks"]


@pytest.mark.shared_data
def test_shared_round_trip(shared_fundus: Path) -> None:
    records = []
    for kind in ("CODRAS", "idrid_grading", "odir5k_subset", "oct_eye_fundus_mx", "palm_pm"):
        records += [r for r in load_dataset(kind, shared_fundus / kind) if r.split == "train"][:25]
    built = inst.build(records, inst.BuildOptions(max_boxes_per_type=2))
    by_key = {r.key: r for r in records}
    checked = 0
    for item in built.instructions:
        record = by_key[item["id"]]
        checked += _check_round_trip(record, item, inst.hidden_description(record, options=inst.BuildOptions(max_boxes_per_type=2)))
    assert checked >= 3 * len(built.instructions) and len(built.instructions) >= 100


class _FakeChat(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeChat.requests.append(body)
        question = body["messages"][-1]["content"].split("Question: ", 1)[1]
        reply = {"choices": [{"message": {"role": "assistant", "content": f"Rephrased: {question}"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200 if "fail" not in question else 500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        return


def test_llm_writer_against_local_endpoint(tmp_path: Path) -> None:
    server = HTTPServer(("127.0.0.1", 0), _FakeChat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        writer = LLMQuestionWriter(EndpointOptions(f"http://127.0.0.1:{server.server_port}/v1", "fake-model", "k"))
        records = _records(tmp_path)
        plain = inst.build(records)
        built = inst.build(records, writer=writer)
        for before, after in zip(plain.instructions, built.instructions, strict=True):
            for b, a in zip(before["conversations"], after["conversations"], strict=True):
                if b["from"] == "gpt":
                    assert a == b  # answers stay canonical
                else:
                    assert a["value"].replace("Rephrased: ", "") == b["value"] and "Rephrased: " in a["value"]
        assert _FakeChat.requests[0]["model"] == "fake-model" and writer.failures == 0
        assert writer.rephrase("please fail", "ctx") == "please fail" and writer.failures == 1
    finally:
        server.shutdown()
