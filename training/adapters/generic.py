"""The generic folder + CSV dataset format (documented in docs/training.md).

A folder holds the images (any sub-folders) and ``labels.csv`` with one row per image:

- ``image`` (required): path relative to the folder;
- ``split``: ``train`` / ``test`` (default ``unspecified``); ``eye``: left/right/L/R/OS/OD; ``patient``;
- one column per condition key of the result schema (``diabetic_retinopathy``, ``glaucoma``, …) holding the grade
  on the condition's scale (binary conditions 0/1); an empty cell means unknown;
- one column per lesion type (``haemorrhage``, ``hard_exudate``, …) holding 0/1 image-level presence;
- ``mask_<lesion type>`` or ``mask_optic_disc``: a binary mask path, turned into boxes;
- ``boxes``: JSON list of ``{"label": <lesion type or optic_disc>, "box": [x0, y0, x1, y1]}`` normalised.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from model.schema import Condition, LandmarkType, LesionType
from training.boxes import mask_to_boxes
from training.records import LabelledBox, Record, laterality

LABELS_FILE = "labels.csv"


def _label(name: str) -> LesionType | LandmarkType:
    try:
        return LesionType(name)
    except ValueError:
        return LandmarkType(name)


def load(root: Path, labels_file: str = LABELS_FILE) -> list[Record]:
    """Records of a generic folder + CSV dataset; the dataset name is the folder name."""
    import numpy as np
    from PIL import Image

    path = root / labels_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (the generic format needs {labels_file})")
    records = []
    with path.open(newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            if not row.get("image"):
                raise ValueError(f"{path}:{line}: the 'image' column is empty")
            grades = {c: int(row[c.value]) for c in Condition if row.get(c.value, "").strip() != ""}
            lesions = {t: row[t.value].strip() == "1" for t in LesionType if row.get(t.value, "").strip() != ""}
            boxes = [LabelledBox(_label(b["label"]), tuple(b["box"])) for b in json.loads(row.get("boxes") or "[]")]
            masks: dict[str, Path] = {}
            for column, value in row.items():
                if column.startswith("mask_") and value:
                    name = column.removeprefix("mask_")
                    masks[name] = root / value
                    mask = np.asarray(Image.open(root / value))
                    found = mask_to_boxes(mask)
                    if name == LandmarkType.OPTIC_DISC.value:
                        found = found[:1]
                    boxes += [LabelledBox(_label(name), b) for b in found]
                    if name in {t.value for t in LesionType}:
                        lesions.setdefault(LesionType(name), bool(found))
            records.append(Record(
                image=root / row["image"], dataset=root.name, record_id=Path(row["image"]).stem,
                split=row.get("split") or "unspecified", eye=laterality(row.get("eye")),
                patient=row.get("patient") or None, grades=grades, lesions=lesions, boxes=boxes,
                boxes_complete=any(k.startswith("mask_") for k in row), masks=masks,
            ))
    return records
