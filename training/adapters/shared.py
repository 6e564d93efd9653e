"""Adapters for the shared labelled datasets in ``../shared/data/fundus`` (see its README).

Every folder has a ``manifest.csv`` with paths relative to the folder and a ``split`` column. ``eyepacs_kaggle_dr``
and ``HEI-MED`` are evaluation-only: their records carry ``evaluation_only=True`` and the instruction-data
builder refuses them for training.
"""

from __future__ import annotations

import csv
from pathlib import Path

from model.schema import Condition, LandmarkType, LesionType
from training.boxes import mask_to_boxes, yolo_to_box
from training.records import LabelledBox, Record, laterality

EVALUATION_ONLY = ("eyepacs_kaggle_dr", "HEI-MED")


def _rows(root: Path) -> list[dict[str, str]]:
    with (root / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _stem(path: str) -> str:
    return Path(path).stem


def drive(root: Path) -> list[Record]:
    """DRIVE (Staal et al. 2004): vessel masks (1st observer) and FOV masks; no disease labels."""
    records = []
    for row in _rows(root):
        masks = {"vessels": root / row["vessel_mask"], "fov": root / row["fov_mask"]}
        records.append(Record(image=root / row["file"], dataset="DRIVE", record_id=_stem(row["file"]),
                              split=row["split"], masks=masks))
    return records


CODRAS_CLASSES: dict[int, LesionType | LandmarkType] = {
    0: LandmarkType.OPTIC_DISC,
    1: LesionType.HARD_EXUDATE,
    2: LesionType.HAEMORRHAGE,
}
"""CODRAS YOLO classes (``retinal.names``); class 2 includes microaneurysms."""


def read_yolo(path: Path, classes: dict[int, LesionType | LandmarkType]) -> list[LabelledBox]:
    """Boxes of a YOLO label file (``class cx cy w h`` per line, normalised)."""
    boxes = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 5:
            continue
        boxes.append(LabelledBox(classes[int(parts[0])], yolo_to_box(*(float(p) for p in parts[1:]))))
    return boxes


def codras(root: Path) -> list[Record]:
    """CODRAS (IDRiD + DIARETDB1) YOLO boxes: optic disc, hard exudates, haemorrhages. Images without a label
    file have unknown lesions (no boxes, no lesion labels)."""
    records = []
    for row in _rows(root):
        label_file = root / row["yolo_labels"] if row["yolo_labels"] else None
        boxes: list[LabelledBox] = []
        lesions: dict[LesionType, bool] = {}
        if label_file is not None and label_file.is_file():
            boxes = read_yolo(label_file, CODRAS_CLASSES)
            lesions = {kind: any(b.label == kind for b in boxes)
                       for kind in (LesionType.HARD_EXUDATE, LesionType.HAEMORRHAGE)}
        records.append(Record(image=root / row["file"], dataset="CODRAS", record_id=_stem(row["file"]),
                              split=row["split"], lesions=lesions, boxes=boxes, boxes_complete=False))
    return records


def odoc_samples(root: Path) -> list[Record]:
    """Optic-disc crops with disc/cup masks (0 background, 127 rim, 254 cup), vertical CDR, glaucoma if known."""
    import numpy as np
    from PIL import Image

    records = []
    for row in _rows(root):
        mask_path = root / row["mask"]
        mask = np.asarray(Image.open(mask_path))
        boxes = [LabelledBox(LandmarkType.OPTIC_DISC, b) for b in mask_to_boxes(mask > 0)[:1]]
        boxes += [LabelledBox(LandmarkType.OPTIC_CUP, b) for b in mask_to_boxes(mask >= 254)[:1]]
        grades = {Condition.GLAUCOMA: int(row["glaucoma"])} if row["glaucoma"] not in ("", None) else {}
        measurements = {"CDR_vertical": float(row["vertical_cdr"])} if row["vertical_cdr"] else {}
        records.append(Record(image=root / row["file"], dataset="ODOC_samples", record_id=_stem(row["file"]),
                              split=row["split"], grades=grades, boxes=boxes, masks={"optic_disc": mask_path},
                              measurements=measurements))
    return records


def idrid_grading(root: Path) -> list[Record]:
    """IDRiD disease grading: ICDR DR grade 0–4 and DME risk 0–2."""
    return [
        Record(image=root / row["file"], dataset="idrid_grading", record_id=_stem(row["file"]), split=row["split"],
               grades={Condition.DIABETIC_RETINOPATHY: int(row["dr_grade"]),
                       Condition.DIABETIC_MACULAR_EDEMA: int(row["dme_risk"])})
        for row in _rows(root)
    ]


def eyepacs_kaggle_dr(root: Path) -> list[Record]:
    """EyePACS / Kaggle DR 2015 (evaluation only): ICDR grade, eye, patient."""
    return [
        Record(image=root / row["file"], dataset="eyepacs_kaggle_dr", record_id=_stem(row["file"]),
               split=row["split"], eye=laterality(row["eye"]), patient=row["patient_id"],
               grades={Condition.DIABETIC_RETINOPATHY: int(row["dr_grade"])}, evaluation_only=True)
        for row in _rows(root)
    ]


def odir5k_subset(root: Path) -> list[Record]:
    """ODIR-2019 subset: normal / glaucoma / cataract (or both), keyword-confirmed per eye."""
    records = []
    for row in _rows(root):
        classes = set(row["label"].split("+"))
        grades = {Condition.GLAUCOMA: int("glaucoma" in classes), Condition.CATARACT: int("cataract" in classes)}
        records.append(Record(image=root / row["file"], dataset="odir5k_subset", record_id=_stem(row["file"]),
                              split=row["split"], eye=laterality(row["eye"]), patient=row["patient_id"],
                              grades=grades))
    return records


def oct_eye_fundus_mx(root: Path) -> list[Record]:
    """Mexican OCT and fundus dataset: DR as 0 / NPDR / PDR / unknown, DME 0/1.

    0 gives DR grade 0; PDR gives grade 4 (ICDR proliferative); NPDR only says DR is present (grade 1–3
    unknown); DME 1 only says DME is present (risk grade unknown)."""
    records = []
    for row in _rows(root):
        grades: dict[Condition, int] = {}
        present: dict[Condition, bool] = {}
        if row["dr"] == "0":
            grades[Condition.DIABETIC_RETINOPATHY] = 0
        elif row["dr"] == "PDR":
            grades[Condition.DIABETIC_RETINOPATHY] = 4
        elif row["dr"] == "NPDR":
            present[Condition.DIABETIC_RETINOPATHY] = True
        if row["dme"] == "0":
            grades[Condition.DIABETIC_MACULAR_EDEMA] = 0
        elif row["dme"] == "1":
            present[Condition.DIABETIC_MACULAR_EDEMA] = True
        records.append(Record(image=root / row["file"], dataset="oct_eye_fundus_mx", record_id=_stem(row["file"]),
                              split=row["split"], eye=laterality(row["eye"]), patient=row["patient_id"],
                              grades=grades, present=present))
    return records


def palm_pm(root: Path) -> list[Record]:
    """PALM / iChallenge-PM: pathologic myopia 1/0."""
    return [
        Record(image=root / row["file"], dataset="palm_pm", record_id=_stem(row["file"]), split=row["split"],
               grades={Condition.PATHOLOGIC_MYOPIA: int(row["pm"])})
        for row in _rows(root)
    ]


def hei_med(root: Path) -> list[Record]:
    """HEI-MED (evaluation only): exudate masks and ``has_exudate`` (the usual DME proxy), optic-disc centre,
    ELVD quality score."""
    import numpy as np
    from PIL import Image

    records = []
    for row in _rows(root):
        mask_path = root / row["exudate_mask"]
        boxes: list[LabelledBox] = []
        if mask_path.is_file():
            mask = np.asarray(Image.open(mask_path))
            boxes = [LabelledBox(LesionType.HARD_EXUDATE, b) for b in mask_to_boxes(mask)]
        has_exudate = row["has_exudate"] == "1"
        measurements = {}
        if row.get("od_row") and row.get("od_col"):
            measurements = {"optic_disc_x": float(row["od_col"]) / float(row["width"]),
                            "optic_disc_y": float(row["od_row"]) / float(row["height"])}
        records.append(Record(
            image=root / row["file"], dataset="HEI-MED", record_id=_stem(row["file"]), split=row["split"],
            lesions={LesionType.HARD_EXUDATE: has_exudate}, boxes=boxes, boxes_complete=True,
            masks={LesionType.HARD_EXUDATE.value: mask_path}, measurements=measurements, evaluation_only=True,
            present={Condition.DIABETIC_MACULAR_EDEMA: has_exudate},
        ))
    return records


ADAPTERS = {
    "DRIVE": drive,
    "CODRAS": codras,
    "ODOC_samples": odoc_samples,
    "idrid_grading": idrid_grading,
    "eyepacs_kaggle_dr": eyepacs_kaggle_dr,
    "odir5k_subset": odir5k_subset,
    "oct_eye_fundus_mx": oct_eye_fundus_mx,
    "palm_pm": palm_pm,
    "HEI-MED": hei_med,
}
