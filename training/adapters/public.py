"""Adapters for the public dataset layouts users bring, as their publishers distribute them.

Each function takes the folder the archive was extracted to. Splits follow the publisher's (training → ``train``,
testing/validation → ``test``) where the layout has them.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from model.schema import Condition, LandmarkType, LesionType
from training.boxes import mask_to_boxes
from training.records import REFERABLE_DR_MIN_GRADE, LabelledBox, Record, laterality

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".JPG", ".JPEG", ".PNG", ".TIF")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(fh)]


def _image_index(folder: Path) -> dict[str, Path]:
    """Images below ``folder`` by file stem."""
    return {p.stem: p for p in sorted(folder.rglob("*")) if p.suffix in IMAGE_SUFFIXES and p.is_file()}


def _split_of(path: Path) -> str:
    text = str(path).lower()
    if "train" in text:
        return "train"
    if "test" in text or "valid" in text or "evaluation" in text:
        return "test"
    return "unspecified"


def idrid_grading(root: Path) -> list[Record]:
    """IDRiD "B. Disease Grading": ``1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_NNN.jpg`` and
    ``2. Groundtruths/*Disease Grading*Labels.csv`` (``Image name``, ``Retinopathy grade``, ``Risk of macular
    edema``)."""
    images = _image_index(root)
    records = []
    for csv_path in sorted(root.rglob("*Labels.csv")):
        split = _split_of(csv_path.name)
        for row in _read_csv(csv_path):
            name = row["Image name"]
            if name not in images:
                continue
            records.append(Record(
                image=images[name], dataset="IDRiD-grading", record_id=name, split=split,
                grades={Condition.DIABETIC_RETINOPATHY: int(row["Retinopathy grade"]),
                        Condition.DIABETIC_MACULAR_EDEMA: int(row["Risk of macular edema"])},
            ))
    return records


IDRID_SEGMENTATION = {
    "MA": LesionType.MICROANEURYSM,
    "HE": LesionType.HAEMORRHAGE,
    "EX": LesionType.HARD_EXUDATE,
    "SE": LesionType.SOFT_EXUDATE,
    "OD": LandmarkType.OPTIC_DISC,
}
"""IDRiD "A. Segmentation" mask suffixes (``IDRiD_NN_<suffix>.tif``)."""


def idrid_segmentation(root: Path) -> list[Record]:
    """IDRiD "A. Segmentation": ``1. Original Images/<set>/IDRiD_NN.jpg`` and ``2. All Segmentation
    Groundtruths/<set>/<n. Lesion>/IDRiD_NN_<MA|HE|EX|SE|OD>.tif``. A missing lesion mask means the lesion is
    absent (IDRiD omits empty masks)."""
    import numpy as np
    from PIL import Image

    masks: dict[str, dict[str, Path]] = {}
    for path in root.rglob("IDRiD_*_*.tif"):
        stem, _, suffix = path.stem.rpartition("_")
        if suffix in IDRID_SEGMENTATION:
            masks.setdefault(stem, {})[suffix] = path
    records = []
    for path in sorted(root.rglob("IDRiD_*.jpg")):
        stem = path.stem
        boxes: list[LabelledBox] = []
        lesions = {kind: False for kind in IDRID_SEGMENTATION.values() if isinstance(kind, LesionType)}
        for suffix, mask_path in masks.get(stem, {}).items():
            label = IDRID_SEGMENTATION[suffix]
            found = mask_to_boxes(np.asarray(Image.open(mask_path)))
            if label == LandmarkType.OPTIC_DISC:
                found = found[:1]
            else:
                lesions[label] = bool(found)
            boxes += [LabelledBox(label, b) for b in found]
        records.append(Record(
            image=path, dataset="IDRiD-segmentation", record_id=stem, split=_split_of(path.parent.name),
            lesions=lesions, boxes=boxes, boxes_complete=True,
            masks={IDRID_SEGMENTATION[s].value: p for s, p in masks.get(stem, {}).items()},
        ))
    return records


def aptos2019(root: Path) -> list[Record]:
    """APTOS 2019 Blindness Detection: ``train.csv`` (``id_code``, ``diagnosis`` ICDR 0–4) and
    ``train_images/<id_code>.png``. The unlabelled test set is skipped."""
    images = _image_index(root / "train_images")
    return [
        Record(image=images[row["id_code"]], dataset="APTOS2019", record_id=row["id_code"], split="train",
               grades={Condition.DIABETIC_RETINOPATHY: int(row["diagnosis"])})
        for row in _read_csv(root / "train.csv") if row["id_code"] in images
    ]


_EYEPACS_NAME = re.compile(r"^(?P<patient>[^_]+)_(?P<eye>left|right)$")


def eyepacs(root: Path) -> list[Record]:
    """EyePACS / Kaggle DR 2015: ``trainLabels.csv`` (``image``, ``level``) and images named
    ``<patient>_<left|right>.jpeg`` anywhere below the folder."""
    images = _image_index(root)
    records = []
    for labels in sorted(root.glob("*Labels*.csv")):
        for row in _read_csv(labels):
            name = row["image"]
            if name not in images:
                continue
            match = _EYEPACS_NAME.match(name)
            records.append(Record(
                image=images[name], dataset="EyePACS", record_id=name, split=_split_of(labels.name),
                eye=laterality(match["eye"]) if match else laterality(None),
                patient=match["patient"] if match else None,
                grades={Condition.DIABETIC_RETINOPATHY: int(row["level"])},
            ))
    return records


def messidor(root: Path) -> list[Record]:
    """Messidor-2 (``messidor_data.csv``: ``image_id``, ``adjudicated_dr_grade`` ICDR 0–4, ``adjudicated_dme``,
    ``adjudicated_gradable``) or Messidor-1 (``Annotation_Base*.csv`` exported from the ``.xls`` files: ``Image
    name``, ``Retinopathy grade`` 0–3, ``Risk of macular edema`` 0–2).

    Messidor-1's retinopathy grade is not ICDR: grade > 0 gives DR presence, grade ≥ 2 referable DR (the
    convention of the Messidor referable-DR literature)."""
    images = _image_index(root)
    records = []
    m2 = root / "messidor_data.csv"
    if m2.is_file():
        for row in _read_csv(m2):
            stem = Path(row["image_id"]).stem
            if stem not in images or row.get("adjudicated_dr_grade", "") == "":
                continue
            records.append(Record(
                image=images[stem], dataset="Messidor-2", record_id=stem,
                grades={Condition.DIABETIC_RETINOPATHY: int(float(row["adjudicated_dr_grade"])),
                        Condition.DIABETIC_MACULAR_EDEMA: min(int(float(row["adjudicated_dme"] or 0)), 2)},
            ))
    for sheet in sorted(root.rglob("Annotation_Base*.csv")):
        for row in _read_csv(sheet):
            stem = Path(row["Image name"]).stem
            if stem not in images:
                continue
            grade = int(row["Retinopathy grade"])
            records.append(Record(
                image=images[stem], dataset="Messidor", record_id=stem,
                present={Condition.DIABETIC_RETINOPATHY: grade > 0},
                grades={Condition.REFERABLE_DIABETIC_RETINOPATHY: int(grade >= REFERABLE_DR_MIN_GRADE),
                        Condition.DIABETIC_MACULAR_EDEMA: int(row["Risk of macular edema"])},
            ))
    return records


ODIR_KEYWORDS: dict[str, Condition] = {
    "glaucoma": Condition.GLAUCOMA,
    "cataract": Condition.CATARACT,
    "diabetic retinopathy": Condition.DIABETIC_RETINOPATHY,
    "age-related macular degeneration": Condition.AGE_RELATED_MACULAR_DEGENERATION,
    "hypertensive retinopathy": Condition.HYPERTENSIVE_RETINOPATHY,
    "pathological myopia": Condition.PATHOLOGIC_MYOPIA,
    "retinal vein occlusion": Condition.RETINAL_VEIN_OCCLUSION,
}
"""ODIR-5K per-eye diagnostic keywords mapped to conditions ("normal fundus" makes all of them absent)."""


def odir5k(root: Path) -> list[Record]:
    """ODIR-5K: the annotation sheet as CSV (``ID``, ``Left-Fundus``, ``Right-Fundus``, ``Left-Diagnostic
    Keywords``, ``Right-Diagnostic Keywords``, …) and the images it names anywhere below the folder. Labels
    come from each eye's own keywords (the N/D/G/… columns describe the patient, not the eye)."""
    images = _image_index(root)
    sheets = [p for p in sorted(root.rglob("*.csv")) if "Left-Fundus" in p.read_text(encoding="utf-8-sig")[:2000]]
    records = []
    for sheet in sheets:
        for row in _read_csv(sheet):
            for side in ("Left", "Right"):
                stem = Path(row[f"{side}-Fundus"]).stem
                if stem not in images:
                    continue
                keywords = row[f"{side}-Diagnostic Keywords"].lower()
                normal = "normal fundus" in keywords
                present = {c: kw in keywords for kw, c in ODIR_KEYWORDS.items() if kw in keywords or normal}
                grades = {c: int(v) for c, v in present.items() if c != Condition.DIABETIC_RETINOPATHY}
                dr = {c: v for c, v in present.items() if c == Condition.DIABETIC_RETINOPATHY}
                if normal:
                    grades[Condition.DIABETIC_RETINOPATHY] = 0
                    dr = {}
                records.append(Record(
                    image=images[stem], dataset="ODIR-5K", record_id=stem, split=_split_of(sheet.name),
                    eye=laterality(side), patient=row.get("ID"), grades=grades, present=dr,
                ))
    return records


RFMID_COLUMNS: dict[str, Condition] = {
    "DR": Condition.DIABETIC_RETINOPATHY,
    "ARMD": Condition.AGE_RELATED_MACULAR_DEGENERATION,
    "BRVO": Condition.RETINAL_VEIN_OCCLUSION,
    "CRVO": Condition.RETINAL_VEIN_OCCLUSION,
    "HR": Condition.HYPERTENSIVE_RETINOPATHY,
}
"""RFMiD label columns mapped to conditions (presence only; RFMiD does not grade)."""


def rfmid(root: Path) -> list[Record]:
    """RFMiD: ``<Set>/RFMiD_<Training|Validation|Testing>_Labels.csv`` (``ID``, ``Disease_Risk``, ``DR``, ``ARMD``,
    …) with images ``<ID>.png`` in the set's folder."""
    records = []
    for sheet in sorted(root.rglob("RFMiD_*_Labels.csv")):
        images = _image_index(sheet.parent)
        for row in _read_csv(sheet):
            if row["ID"] not in images:
                continue
            present: dict[Condition, bool] = {}
            for column, condition in RFMID_COLUMNS.items():
                if column in row:
                    present[condition] = present.get(condition, False) or row[column] == "1"
            grades = {c: int(v) for c, v in present.items() if c != Condition.DIABETIC_RETINOPATHY}
            dr = {c: v for c, v in present.items() if c == Condition.DIABETIC_RETINOPATHY and v}
            if present.get(Condition.DIABETIC_RETINOPATHY) is False:
                grades[Condition.DIABETIC_RETINOPATHY] = 0
            records.append(Record(image=images[row["ID"]], dataset="RFMiD", record_id=f"{sheet.stem}-{row['ID']}",
                                  split=_split_of(sheet.name), grades=grades, present=dr))
    return records


PATHOLOGIC_MYOPIA_MIN_CATEGORY = 2
"""META-PM (Ohno-Matsui et al. 2015): pathologic myopia is myopic maculopathy category ≥ 2 (diffuse
chorioretinal atrophy or worse)."""


def mmac(root: Path) -> list[Record]:
    """MMAC 2023 task 1 (myopic maculopathy classification): ``2. Groundtruths/*Labels.csv`` (``image``,
    ``myopic_maculopathy_grade`` 0–4) and images anywhere below ``1. Images``."""
    images = _image_index(root)
    records = []
    for sheet in sorted(root.rglob("*Labels.csv")):
        for row in _read_csv(sheet):
            stem = Path(row["image"]).stem
            if stem not in images:
                continue
            grade = int(row["myopic_maculopathy_grade"])
            records.append(Record(
                image=images[stem], dataset="MMAC2023", record_id=stem, split=_split_of(sheet.name),
                grades={Condition.MYOPIC_MACULOPATHY: grade,
                        Condition.PATHOLOGIC_MYOPIA: int(grade >= PATHOLOGIC_MYOPIA_MIN_CATEGORY)},
            ))
    return records


ADAPTERS = {
    "idrid-grading": idrid_grading,
    "idrid-segmentation": idrid_segmentation,
    "aptos2019": aptos2019,
    "eyepacs": eyepacs,
    "messidor": messidor,
    "odir5k": odir5k,
    "rfmid": rfmid,
    "mmac": mmac,
}
