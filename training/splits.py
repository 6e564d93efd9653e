"""Validation split carved from the training data, and merging of photographs that several datasets label.

Calibration, the choice of operating points and the choice of the best tower epoch need held-out data that is not
test data. :func:`carve_validation` puts a deterministic fraction of each dataset's training records into a
validation split by hashing the record's group — the patient where the dataset names patients (both eyes of one
person stay on one side), else the photograph — so the split does not depend on record order or RNG state, and
is the same in every run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from training.instructions import content_key, merge_labels
from training.records import Record

VALIDATION = "validation"


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def carve_validation(records: Iterable[Record], fraction: float, seed: int = 0) -> list[Record]:
    """Records with ``split`` "train" whose group hashes below ``fraction`` get ``split`` = "validation"
    (in place); returns all records. Evaluation-only records are left alone."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction {fraction} outside [0, 1)")
    out = list(records)
    for record in out:
        if record.split != "train" or record.evaluation_only:
            continue
        group = record.patient or record.record_id
        if _unit_hash(f"{seed}:{record.dataset}:{group}") < fraction:
            record.split = VALIDATION
    return out


def unique_images(records: Sequence[Record]) -> list[Record]:
    """One record per photograph (byte-identical files across datasets merged, first record wins and gains the
    others' labels, as the instruction builder does); the merged record keeps the first one's split."""
    by_content: dict[str, Record] = {}
    order: list[str] = []
    for record in records:
        key = content_key(record.image)
        if key in by_content:
            merge_labels(by_content[key], record)
            continue
        by_content[key] = record
        order.append(key)
    return [by_content[k] for k in order]
