"""Dataset adapters on small fixtures written in each public layout, and on the shared datasets."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.schema import Condition, LandmarkType, Laterality, LesionType
from training.adapters import ADAPTERS, load_dataset
from training.records import Record


def _image(path: Path, size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 90, dtype=np.uint8)).save(path)
    return path


def _mask(path: Path, boxes: list[tuple[int, int, int, int]], size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = 255
    Image.fromarray(mask).save(path)
    return path


def _csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def _by_id(records: list[Record]) -> dict[str, Record]:
    return {r.record_id: r for r in records}


def test_idrid_grading_layout(tmp_path: Path) -> None:
    root = tmp_path / "B. Disease Grading"
    _image(root / "1. Original Images" / "a. Training Set" / "IDRiD_001.jpg")
    _image(root / "1. Original Images" / "b. Testing Set" / "IDRiD_002.jpg")
    header = ["Image name", "Retinopathy grade", "Risk of macular edema "]
    _csv(root / "2. Groundtruths" / "a. IDRiD_Disease Grading_Training Labels.csv", header, [["IDRiD_001", 3, 2]])
    _csv(root / "2. Groundtruths" / "b. IDRiD_Disease Grading_Testing Labels.csv", header, [["IDRiD_002", 1, 0]])
    records = _by_id(load_dataset("idrid-grading", root))
    assert records["IDRiD_001"].split == "train" and records["IDRiD_002"].split == "test"
    assert records["IDRiD_001"].grades == {Condition.DIABETIC_RETINOPATHY: 3, Condition.DIABETIC_MACULAR_EDEMA: 2,
                                           Condition.REFERABLE_DIABETIC_RETINOPATHY: 1}
    assert records["IDRiD_002"].grades[Condition.REFERABLE_DIABETIC_RETINOPATHY] == 0


def test_idrid_segmentation_layout(tmp_path: Path) -> None:
    root = tmp_path / "A. Segmentation"
    _image(root / "1. Original Images" / "a. Training Set" / "IDRiD_01.jpg")
    gt = root / "2. All Segmentation Groundtruths" / "a. Training Set"
    _mask(gt / "2. Haemorrhages" / "IDRiD_01_HE.tif", [(2, 2, 6, 6), (30, 20, 36, 26)])
    _mask(gt / "5. Optic Disc" / "IDRiD_01_OD.tif", [(10, 10, 20, 20)])
    (record,) = load_dataset("idrid-segmentation", root)
    assert record.split == "train" and record.boxes_complete
    assert record.lesions[LesionType.HAEMORRHAGE] is True and record.lesions[LesionType.HARD_EXUDATE] is False
    haem = sorted(b.box for b in record.boxes if b.label == LesionType.HAEMORRHAGE)
    assert haem == [(2 / 40, 2 / 30, 6 / 40, 6 / 30), (30 / 40, 20 / 30, 36 / 40, 26 / 30)]
    (disc,) = [b.box for b in record.boxes if b.label == LandmarkType.OPTIC_DISC]
    assert disc == (10 / 40, 10 / 30, 20 / 40, 20 / 30)


def test_aptos2019_layout(tmp_path: Path) -> None:
    _image(tmp_path / "train_images" / "000c1434d8d7.png")
    _image(tmp_path / "train_images" / "001639a390f0.png")
    _csv(tmp_path / "train.csv", ["id_code", "diagnosis"], [["000c1434d8d7", 2], ["001639a390f0", 4], ["missing", 0]])
    records = _by_id(load_dataset("aptos2019", tmp_path))
    assert set(records) == {"000c1434d8d7", "001639a390f0"}
    assert records["001639a390f0"].grades[Condition.DIABETIC_RETINOPATHY] == 4


def test_eyepacs_layout(tmp_path: Path) -> None:
    _image(tmp_path / "train" / "10_left.jpeg")
    _image(tmp_path / "train" / "10_right.jpeg")
    _csv(tmp_path / "trainLabels.csv", ["image", "level"], [["10_left", 0], ["10_right", 3]])
    records = _by_id(load_dataset("eyepacs", tmp_path))
    assert records["10_right"].eye == Laterality.RIGHT and records["10_left"].eye == Laterality.LEFT
    assert records["10_right"].patient == "10"
    assert records["10_right"].grades[Condition.REFERABLE_DIABETIC_RETINOPATHY] == 1


def test_messidor_layouts(tmp_path: Path) -> None:
    m2 = tmp_path / "m2"
    _image(m2 / "IMAGES" / "20051020_43808_0100_PP.png")
    _csv(m2 / "messidor_data.csv", ["image_id", "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable"],
         [["20051020_43808_0100_PP.png", 2, 1, 1]])
    (record,) = load_dataset("messidor", m2)
    assert record.grades[Condition.DIABETIC_RETINOPATHY] == 2 and record.grades[Condition.DIABETIC_MACULAR_EDEMA] == 1
    m1 = tmp_path / "m1"
    _image(m1 / "Base11" / "20051019_38557_0100_PP.tif")
    _csv(m1 / "Base11" / "Annotation_Base11.csv",
         ["Image name", "Ophthalmologic department", "Retinopathy grade", "Risk of macular edema "],
         [["20051019_38557_0100_PP.tif", "Service Ophtalmologie Lariboisière", 3, 0]])
    (record,) = load_dataset("messidor", m1)
    assert record.is_present(Condition.DIABETIC_RETINOPATHY) is True
    assert Condition.DIABETIC_RETINOPATHY not in record.grades  # Messidor-1 grades are not ICDR
    assert record.grades[Condition.REFERABLE_DIABETIC_RETINOPATHY] == 1


def test_odir5k_layout(tmp_path: Path) -> None:
    _image(tmp_path / "Training Images" / "0_left.jpg")
    _image(tmp_path / "Training Images" / "0_right.jpg")
    _csv(tmp_path / "ODIR-5K_Training_Annotations.csv",
         ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus", "Left-Diagnostic Keywords",
          "Right-Diagnostic Keywords", "N", "D", "G", "C", "A", "H", "M", "O"],
         [[0, 69, "Female", "0_left.jpg", "0_right.jpg", "cataract", "normal fundus", 0, 0, 0, 1, 0, 0, 0, 0]])
    records = _by_id(load_dataset("odir5k", tmp_path))
    left, right = records["0_left"], records["0_right"]
    assert left.eye == Laterality.LEFT and left.grades[Condition.CATARACT] == 1
    assert Condition.GLAUCOMA not in left.grades  # unknown, not negative, for a non-normal eye
    assert right.grades[Condition.GLAUCOMA] == 0 and right.grades[Condition.DIABETIC_RETINOPATHY] == 0


def test_rfmid_layout(tmp_path: Path) -> None:
    folder = tmp_path / "Training_Set"
    _image(folder / "Training" / "1.png")
    _image(folder / "Training" / "2.png")
    _csv(folder / "RFMiD_Training_Labels.csv", ["ID", "Disease_Risk", "DR", "ARMD", "MH", "BRVO", "CRVO", "HR"],
         [[1, 1, 1, 0, 0, 0, 1, 0], [2, 0, 0, 0, 0, 0, 0, 0]])
    records = {r.record_id.split("-")[-1]: r for r in load_dataset("rfmid", tmp_path)}
    assert records["1"].is_present(Condition.DIABETIC_RETINOPATHY) is True
    assert records["1"].grades[Condition.RETINAL_VEIN_OCCLUSION] == 1
    assert records["2"].grades[Condition.DIABETIC_RETINOPATHY] == 0 and records["2"].split == "train"


def test_mmac_layout(tmp_path: Path) -> None:
    root = tmp_path / "1. Classification of Myopic Maculopathy"
    _image(root / "1. Images" / "1. Training Set" / "mmac_task_1_train_0001.png")
    _image(root / "1. Images" / "1. Training Set" / "mmac_task_1_train_0002.png")
    _csv(root / "2. Groundtruths" / "1. MMAC2023_Myopic_Maculopathy_Classification_Training_Labels.csv",
         ["image", "myopic_maculopathy_grade", "age", "sex"],
         [["mmac_task_1_train_0001.png", 1, 50, 1], ["mmac_task_1_train_0002.png", 3, 60, 2]])
    records = _by_id(load_dataset("mmac", root))
    assert records["mmac_task_1_train_0001"].grades[Condition.PATHOLOGIC_MYOPIA] == 0
    assert records["mmac_task_1_train_0002"].grades == {Condition.MYOPIC_MACULOPATHY: 3, Condition.PATHOLOGIC_MYOPIA: 1}


def test_generic_layout(tmp_path: Path) -> None:
    _image(tmp_path / "img" / "a.png")
    _image(tmp_path / "img" / "b.png")
    _mask(tmp_path / "masks" / "b_ex.png", [(4, 4, 10, 8)])
    _csv(tmp_path / "labels.csv", ["image", "split", "eye", "patient", "diabetic_retinopathy", "glaucoma", "mask_hard_exudate",
                                   "boxes"],
         [["img/a.png", "train", "OD", "p1", 2, "", "", '[{"label": "optic_disc", "box": [0.1, 0.2, 0.3, 0.4]}]'],
          ["img/b.png", "test", "L", "p2", "", 1, "masks/b_ex.png", ""]])
    records = _by_id(load_dataset("generic", tmp_path))
    a, b = records["a"], records["b"]
    assert a.eye == Laterality.RIGHT and a.grades[Condition.DIABETIC_RETINOPATHY] == 2
    assert Condition.GLAUCOMA not in a.grades and a.boxes[0].label == LandmarkType.OPTIC_DISC
    assert b.grades == {Condition.GLAUCOMA: 1} and b.lesions == {LesionType.HARD_EXUDATE: True}
    assert b.boxes[0].box == (4 / 40, 4 / 30, 10 / 40, 8 / 30)


def test_unknown_kind_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset kind"):
        load_dataset("nope", tmp_path)
    with pytest.raises(FileNotFoundError):
        load_dataset("aptos2019", tmp_path / "absent")


SHARED_COUNTS = {
    "DRIVE": (40, 20), "CODRAS": (605, 121), "ODOC_samples": (8, 4), "idrid_grading": (300, 59),
    "eyepacs_kaggle_dr": (624, 120), "odir5k_subset": (1009, 201), "oct_eye_fundus_mx": (590, 113),
    "palm_pm": (795, 158), "HEI-MED": (169, 56),
}


@pytest.mark.shared_data
@pytest.mark.parametrize("kind", sorted(SHARED_COUNTS))
def test_shared_datasets(shared_fundus: Path, kind: str) -> None:
    records = load_dataset(kind, shared_fundus / kind)
    total, test = SHARED_COUNTS[kind]
    assert len(records) == total and sum(r.split == "test" for r in records) == test
    assert all(r.image.is_file() for r in records[:5])
    assert all(r.evaluation_only == (kind in {"eyepacs_kaggle_dr", "HEI-MED"}) for r in records)
    assert kind in ADAPTERS


@pytest.mark.shared_data
def test_shared_label_semantics(shared_fundus: Path) -> None:
    codras = _by_id(load_dataset("CODRAS", shared_fundus / "CODRAS"))
    assert codras["0046"].lesions == {} and codras["0046"].boxes == []  # no label file: unknown, not negative
    assert codras["0001"].lesions[LesionType.HAEMORRHAGE] is True
    assert sum(b.label == LesionType.HAEMORRHAGE for b in codras["0001"].boxes) == 26
    odir = load_dataset("odir5k_subset", shared_fundus / "odir5k_subset")
    both = [r for r in odir if r.grades[Condition.GLAUCOMA] and r.grades[Condition.CATARACT]]
    assert len(both) == 2
    oct_records = load_dataset("oct_eye_fundus_mx", shared_fundus / "oct_eye_fundus_mx")
    npdr = [r for r in oct_records if r.present.get(Condition.DIABETIC_RETINOPATHY)]
    assert npdr and all(Condition.DIABETIC_RETINOPATHY not in r.grades for r in npdr)
